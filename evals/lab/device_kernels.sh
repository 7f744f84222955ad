#!/usr/bin/env bash
# Build the patched ggml twice with runtime_patches/kernel_check.c (the flags of tests/runtime/conftest.py:
# host-avx2 and host-avx512 on x86-64, arm64-dotprod and arm64-v8 on aarch64), then run `kernel_check selftest`,
# the vec_dot microbenchmark of evals/reports/kernel_bench_x86.md (plus the 64-block types of patches 0010-0012
# on rows of 2048 and of SmolLM2's 576) and the mul_mat one (`benchmm`, ns per weight per column at 1, 64 and 512
# columns: STQ1_0 and Q2_0C through the tiled GEMM of patch 0007 (NEON: 0008) and, with GGML_CPU_TILED_MM=0,
# through vec_dot as before it; Q4_0 repacked as llama-bench loads it) on this machine. For hosts pytest does
# not reach (AVX-512 VNNI) and for real ARM cores (qemu's timing means nothing): an aarch64 Linux box, or a
# phone with a native cmake and compiler (e.g. Termux).
#
#   evals/lab/device_kernels.sh PATCHED_LLAMA_CPP_DIR OUT_DIR
#
# PATCHED_LLAMA_CPP_DIR: e.g. `slim-edge runtime source DIR`. OUT_DIR gets five files: cpu.txt, and per
# flavor FLAVOR.log (the build) and FLAVOR.txt (selftest, each type's best ns/weight, every bench line);
# build trees go to a temporary directory. A flavor the CPU cannot run is built, then skipped (the reason
# is in its .txt). Exit status 1 if a selftest fails. SELFTEST_ONLY=1: the selftests, no timing.
set -euo pipefail

src=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
check_c="$(cd "$(dirname "$0")/../.." && pwd)/runtime_patches/kernel_check.c"
jobs=$(nproc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# keep in sync with COMMON and FLAVORS in tests/runtime/conftest.py
common=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF
        -DGGML_CPU_KLEIDIAI=OFF -DGGML_BACKEND_DL=OFF -DGGML_LLAMAFILE=OFF -DLLAMA_BUILD_TESTS=OFF
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
        -DGGML_CCACHE=OFF)
avx2=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
declare -A flags=(
    [host-avx2]="${avx2[*]} -DGGML_AVX512=OFF"
    [host-avx512]="${avx2[*]} -DGGML_AVX512=ON -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=OFF"
    [arm64-dotprod]="-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"
    [arm64-v8]="-DGGML_CPU_ARM_ARCH=armv8-a"
)
# /proc/cpuinfo: x86 "flags", aarch64 "Features" (asimddp: sdot)
declare -A needs=([host-avx2]="avx2 fma f16c bmi2"
                  [host-avx512]="avx2 fma f16c bmi2 avx512f avx512cd avx512dq avx512bw avx512vl avx512_vnni"
                  [arm64-dotprod]="asimd asimddp" [arm64-v8]="asimd")
case "$(uname -m)" in
    x86_64) flavors=(host-avx2 host-avx512) ;;
    aarch64|arm64) flavors=(arm64-dotprod arm64-v8) ;;
    *) echo "no kernel flavors for $(uname -m)"; exit 1 ;;
esac

cpu_flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo | cut -d: -f2) "
{ grep -m1 -E 'model name|CPU part' /proc/cpuinfo || true; nproc
  echo "$cpu_flags" | tr ' ' '\n' | grep -E '^(avx|fma|f16c|asimd|i8mm|sve)' | sort | tr '\n' ' '; echo; } > "$out/cpu.txt"

pin=""
command -v taskset > /dev/null && pin="taskset -c $(( $(nproc) - 1 ))"

status=0
for flavor in "${flavors[@]}"; do
    log="$out/$flavor.log"
    res="$out/$flavor.txt"
    bld="$work/$flavor"
    echo "== $flavor: building (log: $log)"
    # shellcheck disable=SC2086  # the flags are words
    { cmake -S "$src" -B "$bld" "${common[@]}" ${flags[$flavor]} &&
      cmake --build "$bld" -j "$jobs" --target ggml-base ggml-cpu ggml &&
      "${CXX:-c++}" -O2 -x c "$check_c" -x none -I"$src/ggml/include" \
          "$(find "$bld" -name libggml.a)" "$(find "$bld" -name libggml-cpu.a)" "$(find "$bld" -name libggml-base.a)" \
          -lm -lpthread -o "$bld/kernel_check"; } > "$log" 2>&1 || { echo "build failed: see $log"; exit 1; }

    missing=""
    for f in ${needs[$flavor]}; do [[ "$cpu_flags" == *" $f "* ]] || missing+=" $f"; done
    if [[ -n "$missing" ]]; then
        echo "skipped: this CPU lacks$missing" | tee "$res"
        continue
    fi
    "$bld/kernel_check" selftest stq1_0 q2_0c q2_0 q2_0c_64 stq1_0_64 | tee "$res" || status=1
    [[ -n "${SELFTEST_ONLY:-}" ]] && continue
    # the timing of evals/reports/kernel_bench_x86.md, five rounds on one core, then each type's best per row
    # length; rows of 576 (9 blocks of 64: the 64-block kernels' odd last block) against Q4_0 and Q8_0
    for _ in 1 2 3 4 5; do
        for t in stq1_0 q2_0c q2_0 tq2_0 tq1_0 q4_0 q2_0c_64 stq1_0_64; do
            $pin "$bld/kernel_check" bench "$t" 2048 4096 30
        done
        for t in q2_0c_64 stq1_0_64 q4_0 q8_0; do
            $pin "$bld/kernel_check" bench "$t" 576 1536 30
        done
    done > "$work/bench.txt"
    { echo "best of 5 rounds:"
      sort -k1,1 -k2,2 -k4,4g "$work/bench.txt" | awk '!seen[$1 " " $2]++ {print $1, $2, $4, "ns/weight"}'; } | tee -a "$res"
    cat "$work/bench.txt" >> "$res"
    # mul_mat (prefill shape 2048 x 2048), three rounds, then each line's best
    for _ in 1 2 3; do
        for n in 1 64 512; do
            for t in stq1_0 q2_0c; do
                $pin "$bld/kernel_check" benchmm "$t" 2048 2048 "$n" 5 | sed 's/^/tiled   /'
                GGML_CPU_TILED_MM=0 $pin "$bld/kernel_check" benchmm "$t" 2048 2048 "$n" 5 | sed 's/^/vec_dot /'
            done
            for t in tq2_0 tq1_0 q4_k q4_0 q2_0c_64 stq1_0_64; do
                $pin "$bld/kernel_check" benchmm "$t" 2048 2048 "$n" 5 | sed 's/^/default /'
            done
            $pin "$bld/kernel_check" benchmm q4_0 2048 2048 "$n" 5 repack 2> /dev/null | sed 's/^/repack  /'
        done
    done > "$work/benchmm.txt"
    { echo "mul_mat, best of 3 rounds (ns/weight/column):"
      awk -F': ' '{ split($2, v, " "); if (!($1 in best) || v[1] + 0 < best[$1] + 0) best[$1] = v[1] }
                  END { for (k in best) print k ": " best[k] }' "$work/benchmm.txt" | sort -t= -k4,4n -k1,1; } | tee -a "$res"
    cat "$work/benchmm.txt" >> "$res"
done
exit $status
