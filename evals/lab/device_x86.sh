#!/usr/bin/env bash
# The x86 measurements of issue 3 on a lent many-core host, in three steps (each fits a 10-minute call):
#
#   evals/lab/device_x86.sh prepare SRC.tar.gz WHEELS_DIR OUT   # kernels (device_kernels.sh; SKIP_KERNELS=1: not)
#                                                           # + llama-bench/llama-quantize + the models
#                                                           # (SHAPES, TYPES: fewer than all)
#   evals/lab/device_x86.sh bench SHAPE OUT                     # llama-bench, 4 lanes of 2 types on own cores
#                                                           # (LANES="T1,T2 T3": others; CPU_OFFSET=N: from core N)
#   evals/lab/device_x86.sh prefill SHAPE OUT                   # STQ1_0, Q2_0C: tiled GEMM vs vec_dot (patch 0007)
#   VARIANTS="BIN_DIR:type ..." evals/lab/device_x86.sh rounds SHAPE OUT
#                                                           # decode only (tg64), the variants alternated within
#                                                           # each of 3 rounds on 2 cores (THREADS="2 1": both):
#                                                           # builds compared without the drift between calls
#   evals/lab/device_x86.sh solo SHAPE OUT                      # one type at a time on 2 cores; STQ1_0 twice:
#                                                           # tables (patch 0009) and GGML_CPU_STQ1_0_LUT=0
#
# SRC.tar.gz: `slim-edge runtime source DIR` packed (the patched llama.cpp); WHEELS_DIR: gguf and slim_edge
# wheels. Work goes to /tmp/x86 (kept while the machine is). Each lane runs its types at 1 and 2 threads
# pinned to two physical cores of its own, so lanes share only memory bandwidth (the table says so);
# merge the lanes here with `python -m slim_edge.evals.lab.kernel_bench --merge OUT/*.json --out TABLE`.
# `prefill` runs STQ1_0 and Q2_0C twice in one go: with the default tiled GEMM (patch 0007) beside Q4_0 and
# TQ2_0, and in a lane of its own with GGML_CPU_TILED_MM=0 (prefill on the vec_dot kernels, as before patch
# 0007; rows "STQ1_0 vec_dot", ...), plus Q4_K_M; decode takes the default path (patch 0009) in both.
set -euo pipefail
W=/tmp/x86
here=$(cd "$(dirname "$0")/../.." && pwd)

# one logical CPU per physical core, in order
physical_cpus() {
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        sib=$(cat "$c/topology/thread_siblings_list"); echo "${sib%%[,-]*}"
    done | sort -n -u
}

case "$1" in
prepare)
    src=$2 whl=$3 out=$4
    mkdir -p "$W/src" "$out"
    tar xzf "$src" -C "$W/src" --strip-components=1
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$whl"/*.whl
    { lscpu; echo; physical_cpus | tr '\n' ' '; echo; } > "$out/lscpu.txt"
    # the kernels first, alone: their microbenchmark wants an idle machine
    if [[ -z "${SKIP_KERNELS:-}" ]]; then
        "$here/evals/lab/device_kernels.sh" "$W/src" "$out/kernels" > "$out/kernels.txt" 2>&1 || echo "kernel selftest FAILED"
        cat "$out/kernels.txt"
    fi
    cmake -S "$W/src" -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_OPENSSL=OFF -DGGML_CPU_KLEIDIAI=OFF -DGGML_BACKEND_DL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        > "$out/build.log" 2>&1
    cmake --build "$W/build" -j "$(nproc)" --target llama-bench llama-quantize >> "$out/build.log" 2>&1
    PYTHONPATH=$W/site python3 -m slim_edge.evals.lab.kernel_bench --prepare --bin-dir "$W/build/bin" --work "$W/models" \
        $(for s in ${SHAPES:-llama-3.2-1b 1.8b}; do echo --shape "$s"; done) ${TYPES:+--types "$TYPES"} 2>&1 | tail -20
    ;;
bench|prefill)
    shape=$2 out=$3
    mkdir -p "$out"
    mapfile -t cpus < <(physical_cpus)
    if [[ $1 == bench ]]; then
        lanes=("STQ1_0,Q4_0" "Q2_0C,TQ2_0" "TQ1_0,Q2_0" "Q4_K_M,F16")
        # LANES="Q2_0C_64,Q4_0 STQ1_0_64,Q4_K_M": other lanes (space-separated, types comma-separated)
        [[ -n "${LANES:-}" ]] && read -ra lanes <<< "$LANES"
        lane_env=()
        for _ in "${lanes[@]}"; do lane_env+=(""); done
    else
        lanes=("STQ1_0,Q4_0" "Q2_0C,TQ2_0" "STQ1_0,Q2_0C" "Q4_K_M")
        lane_env=("" "" "GGML_CPU_TILED_MM=0" "")
    fi
    pids=()
    for i in "${!lanes[@]}"; do
        o=${CPU_OFFSET:-2}  # by default leave the first two cores to the system
        a=${cpus[$((2 * i + o))]} b=${cpus[$((2 * i + o + 1))]}
        label=()
        [[ -n "${lane_env[$i]}" ]] && label=(--label vec_dot)
        # shellcheck disable=SC2086  # lane_env is empty or one NAME=VALUE word
        env ${lane_env[$i]} PYTHONPATH=$W/site taskset -c "$a,$b" python3 -m slim_edge.evals.lab.kernel_bench \
            --bin-dir "$W/build/bin" --work "$W/models" --shape "$shape" --types "${lanes[$i]}" -t 1,2 -r 2 \
            ${label[@]+"${label[@]}"} --out "$out/$shape-lane$i" > "$out/$shape-lane$i.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    tail -n 3 "$out"/*.log
    ;;
solo)
    # nothing else runs: the decode ratios are not bent by lanes sharing memory bandwidth
    shape=$2 out=$3
    mkdir -p "$out"
    mapfile -t cpus < <(physical_cpus)
    pin=${cpus[2]},${cpus[3]}
    run() {  # run NAME [ENV=VALUE] ARGS...: one kernel_bench invocation on the pinned cores
        local name=$1; shift
        env PYTHONPATH=$W/site taskset -c "$pin" python3 -m slim_edge.evals.lab.kernel_bench --bin-dir "$W/build/bin" \
            --work "$W/models" --shape "$shape" -t "${THREADS:-2}" -r "${REPS:-3}" "$@" --out "$out/$shape-$name" \
            > "$out/$shape-$name.log" 2>&1
    }
    run base --types "${TYPES:-STQ1_0,TQ2_0,Q4_0}"
    GGML_CPU_STQ1_0_LUT=0 run vec_dot --types STQ1_0 --label vec_dot
    tail -n 12 "$out/$shape-base.log" "$out/$shape-vec_dot.log"
    ;;
rounds)
    shape=$2 out=$3
    mkdir -p "$out"
    mapfile -t cpus < <(physical_cpus)
    pin=${cpus[2]:-${cpus[0]}},${cpus[3]:-${cpus[1]:-${cpus[0]}}}  # cores 0-1 on a machine with fewer than 4
    for t in ${THREADS:-2}; do
        for r in 1 2 3; do
            for v in ${VARIANTS:?set VARIANTS to \"BIN_DIR:type ...\", e.g. $W/build/bin:stq1_0 $W/build/bin:q4_0}; do
                bin=${v%%:*} type=${v##*:}
                tg=$(taskset -c "$pin" "$bin/llama-bench" -m "$W/models/$shape/$type.gguf" -p 0 -n 64 -r 2 -t "$t" \
                     -o csv 2> /dev/null | tail -n 1 | awk -F, '{ print $(NF - 1) }' | tr -d '"')
                echo "$shape t=$t round=$r bin=$bin type=$type tg64=$tg" | tee -a "$out/rounds.txt"
            done
        done
    done
    ;;
*)
    echo "usage: $0 prepare SRC.tar.gz WHEELS_DIR OUT | bench SHAPE OUT | prefill SHAPE OUT | solo SHAPE OUT | rounds SHAPE OUT" >&2
    exit 2 ;;
esac
