"""Builds of the patched ggml plus runtime_patches/kernel_check.c, cached per patch series and flavor.

    ~/.cache/slim-edge/test-builds/<flavor>-<key12>/kernel_check     key = sha256(series, kernel_check.c, flags)

Only the ggml libraries are built (a few minutes on 2 cores), from the tree that
`slim_edge.runtime_patches.runtime.prepare_source` extracts and patches; the full runtime
(`slim-edge runtime build`) is not needed. aarch64 flavors are static and run under qemu-aarch64 with
the named CPU. For a host flavor whose instructions this CPU lacks (/proc/cpuinfo flags) only the
ggml-cpu sources that the series
touches and that hold ISA-specific code (ISA_SOURCES) are compiled, with that flavor's flags, to prove
that they compile; its tests are then skipped. evals/lab/device_kernels.sh builds and runs every flavor on
another machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from slim_edge.fsutil import cache_dir
from slim_edge.runtime_patches import runtime

KERNEL_CHECK = Path(__file__).resolve().parents[2] / "runtime_patches" / "kernel_check.c"
COMMON = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CPU_KLEIDIAI=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_LLAMAFILE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
AARCH64 = [
    "-DCMAKE_SYSTEM_NAME=Linux",
    "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
    "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
    "-DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu",
    "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
]


@dataclass(frozen=True)
class Flavor:
    name: str
    cmake: tuple[str, ...]
    cc: str
    qemu_cpu: str | None = None  # run under qemu-aarch64 -cpu <this>
    cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags the host needs to run it

    @property
    def decode_tables(self) -> bool:
        """Patch 0009's STQ1_0 decode tables are compiled in (x86 with AVX2); elsewhere decode is vec_dot."""
        return "-DGGML_AVX2=ON" in self.cmake

    @property
    def repacks_64(self) -> bool:
        """Patch 0018's load-time repack of Q2_0C_64 / STQ1_0_64 is compiled in (x86 with AVX2); elsewhere the
        repack buffer does not take them."""
        return "-DGGML_AVX2=ON" in self.cmake

    @property
    def vnni_512(self) -> bool:
        """Patch 0019's AVX-512 VNNI gemv of the repacked Q2_0C_64 / STQ1_0_64 is compiled in (AVX512 F/BW + VNNI);
        elsewhere the repacked decode is 0018's AVX2 gemv."""
        return "-DGGML_AVX512=ON" in self.cmake and "-DGGML_AVX512_VNNI=ON" in self.cmake

    @property
    def programs(self) -> list[str]:
        return [self.cc, "cmake"] + (["qemu-aarch64"] if self.qemu_cpu else [])


X86_AVX2 = ("-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON")
X86_AVX2_FLAGS = ("avx2", "fma", "f16c", "bmi2")
FLAVORS = {
    # no SIMD beyond x86-64's SSE2: every new type runs its generic C kernels
    "host-generic": Flavor(
        "host-generic",
        (
            "-DGGML_SSE42=OFF",
            "-DGGML_AVX=OFF",
            "-DGGML_AVX2=OFF",
            "-DGGML_FMA=OFF",
            "-DGGML_F16C=OFF",
            "-DGGML_BMI2=OFF",
            "-DGGML_AVX512=OFF",
        ),
        "c++",
    ),
    "host-avx2": Flavor("host-avx2", (*X86_AVX2, "-DGGML_AVX512=OFF"), "c++", cpu_flags=X86_AVX2_FLAGS),
    # GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    "host-avx512": Flavor(
        "host-avx512",
        (*X86_AVX2, "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=OFF"),
        "c++",
        cpu_flags=(*X86_AVX2_FLAGS, "avx512f", "avx512cd", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"),
    ),
    # -cpu cortex-a76 has dotprod (sdot); cortex-a53 has not and must take the plain NEON path
    "arm64-dotprod": Flavor(
        "arm64-dotprod", (*AARCH64, "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"), "aarch64-linux-gnu-g++", "cortex-a76"
    ),
    "arm64-v8": Flavor("arm64-v8", (*AARCH64, "-DGGML_CPU_ARM_ARCH=armv8-a"), "aarch64-linux-gnu-g++", "cortex-a53"),
}


def missing_cpu_flags(flavor: Flavor) -> list[str]:
    """The flags in `flavor.cpu_flags` that /proc/cpuinfo does not list."""
    if not flavor.cpu_flags:
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(flavor.cpu_flags)
    have = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return [f for f in flavor.cpu_flags if f not in have]


# ggml-cpu sources (relative to ggml/src/ggml-cpu) whose code depends on the ISA: what a compile-only
# build of a flavor compiles, where the series touches them
ISA_SOURCES = ("arch/x86/", "arch/arm/", "tiled/", "repack.cpp")  # repack.cpp: the 64-block repack is AVX2-only (0018)


def touched_isa_sources(patches: list[Path], arch: str) -> list[str]:
    """The .c/.cpp files under ggml/src/ggml-cpu that the series touches, in ISA_SOURCES, for `arch`
    ("x86" or "arm": the other architecture's directory is left out)."""
    prefix = "ggml/src/ggml-cpu/"
    other = "arch/arm/" if arch == "x86" else "arch/x86/"
    out = set()
    for p in patches:
        for line in p.read_text(errors="replace").splitlines():
            if line.startswith("+++ b/" + prefix):
                rel = line[len("+++ b/" + prefix) :].strip()
                if rel.endswith((".c", ".cpp")) and rel.startswith(ISA_SOURCES) and not rel.startswith(other):
                    out.add(rel)
    return sorted(out)


def _key(flavor: Flavor, patches: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(runtime.series_sha256(patches).encode())
    h.update(KERNEL_CHECK.read_bytes())
    h.update(repr((flavor.name, COMMON, flavor.cmake)).encode())
    return h.hexdigest()[:12]


def _patched_tree(root: Path, patches: list[Path]) -> tuple[Path, Path]:
    """A fresh `root` with the pinned tree in root/src, the series applied; returns (src, build dir)."""
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    runtime.extract_tree(src)
    # the sdist's tree carries a submodule `.git` file (gitdir: ../../.git/modules/...) that makes
    # `git apply` fail with "not a git repository"; runtime.apply_patches does not remove it yet
    (src / ".git").unlink(missing_ok=True)
    runtime.apply_patches(src, patches)
    return src, root / "build"


def _step(cmd: list[str], f, what: str, log: Path) -> None:
    """One build step with its output in the open log `f`; a failure fails the test, naming the log."""
    if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, LC_ALL="C")).returncode != 0:
        pytest.fail(f"{what} failed: see {log}")


def compile_isa_sources(flavor: Flavor) -> list[str]:
    """Compile-only build for a flavor this CPU cannot run: the series' ISA-specific ggml-cpu sources
    (touched_isa_sources), with the flavor's flags, through ggml's own CMake targets. Returns them."""
    patches = runtime.patch_series()
    sources = touched_isa_sources(patches, "arm" if flavor.qemu_cpu else "x86")
    # the source list is part of the key: a new entry in ISA_SOURCES must not reuse an older, shorter build
    listed = hashlib.sha256(" ".join(sources).encode()).hexdigest()[:6]
    root = cache_dir() / "test-builds" / f"{flavor.name}-compile-{_key(flavor, patches)}-{listed}"
    done = root / "compiled.txt"
    if done.exists():
        return done.read_text().split()
    if not shutil.which("ninja"):
        build_kernel_check(flavor)  # no file targets without ninja: the whole build proves it as well
        return []
    src, bld = _patched_tree(root, patches)
    log = root / "build.log"
    with open(log, "w") as f:
        _step(
            ["cmake", "-S", str(src), "-B", str(bld), "-G", "Ninja", *COMMON, *flavor.cmake, "-DGGML_CCACHE=OFF"],
            f,
            f"configuring ggml ({flavor.name})",
            log,
        )
        targets = subprocess.run(
            ["ninja", "-C", str(bld), "-t", "targets", "all"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        wanted = tuple(f"ggml-cpu/{s}.o" for s in sources)
        objects = [name for name in (t.split(":")[0] for t in targets) if name.endswith(wanted)]
        if len(objects) != len(sources):
            pytest.fail(f"{flavor.name}: found {len(objects)} object targets for {len(sources)} sources {sources}")
        _step(
            ["cmake", "--build", str(bld), "-j", str(min(2, os.cpu_count() or 1)), "--target", *objects],
            f,
            f"compiling {', '.join(sources)} for {flavor.name}",
            log,
        )
    shutil.rmtree(bld, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    done.write_text("\n".join(sources) + "\n")
    return sources


def build_kernel_check(flavor: Flavor) -> Path:
    patches = runtime.patch_series()
    root = cache_dir() / "test-builds" / f"{flavor.name}-{_key(flavor, patches)}"
    exe = root / "kernel_check"
    if exe.exists():
        return exe
    src, bld = _patched_tree(root, patches)
    launcher = ["-DGGML_CCACHE=ON"] if shutil.which("ccache") else ["-DGGML_CCACHE=OFF"]
    jobs = str(min(2, os.cpu_count() or 1))
    log = root / "build.log"
    with open(log, "w") as f:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(bld), *COMMON, *flavor.cmake, *launcher],
            ["cmake", "--build", str(bld), "-j", jobs, "--target", "ggml-base", "ggml-cpu", "ggml"],
        ):
            _step(cmd, f, f"building ggml ({flavor.name})", log)
        libs = [next(bld.rglob(f"libggml{s}.a")) for s in ("", "-cpu", "-base")]
        cmd = [
            flavor.cc,
            "-O2",
            "-x",
            "c",
            str(KERNEL_CHECK),
            "-x",
            "none",
            f"-I{src / 'ggml' / 'include'}",
            *map(str, libs),
            "-lm",
            "-lpthread",
            "-o",
            str(exe) + ".tmp",
        ]
        if flavor.qemu_cpu:
            cmd.insert(1, "-static")
        _step(cmd, f, f"compiling kernel_check ({flavor.name})", log)
    os.replace(str(exe) + ".tmp", exe)
    shutil.rmtree(bld, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return exe


class KernelCheck:
    """Runs kernel_check (under qemu for aarch64 flavors) on numpy arrays through temporary files."""

    def __init__(self, exe: Path, flavor: Flavor, tmp: Path):
        self.argv = ([shutil.which("qemu-aarch64"), "-cpu", flavor.qemu_cpu] if flavor.qemu_cpu else []) + [str(exe)]
        self.flavor, self.tmp = flavor, tmp

    def run(self, *args, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> str:
        """`env`: extra environment variables, e.g. GGML_CPU_TILED_MM=0 (qemu-aarch64 passes them on); `ok`: the
        exit statuses that are not a failure (self.returncode holds the last one)."""
        proc = subprocess.run(
            [*self.argv, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ, **env) if env else None,
        )
        assert proc.returncode in ok, f"kernel_check {' '.join(map(str, args))} failed:\n{proc.stdout}{proc.stderr}"
        self.returncode = proc.returncode
        return proc.stdout

    def _files(self, *arrays):
        paths = []
        for a in arrays:
            p = self.tmp / f"in{len(paths)}.bin"
            np.ascontiguousarray(a).tofile(p)
            paths.append(p)
        return paths

    def quantize(self, type_name: str, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        files = self._files(x.astype(np.float32), *([] if weights is None else [weights.astype(np.float32)]))
        self.run("quantize", type_name, x.shape[-1], files[0], self.tmp / "out.bin", *files[1:])
        return np.fromfile(self.tmp / "out.bin", np.uint8).reshape(x.shape[0], -1)

    def dequantize(self, type_name: str, raw: np.ndarray, n: int) -> np.ndarray:
        (p,) = self._files(raw)
        self.run("dequantize", type_name, n, p, self.tmp / "out.f32")
        return np.fromfile(self.tmp / "out.f32", np.float32).reshape(raw.shape[0], n)

    def vecdot(self, type_name: str, raw: np.ndarray, x: np.ndarray):
        """(kernel, exact-with-quantized-activations), each [n_cols, n_rows]."""
        pw, px = self._files(raw, x.astype(np.float32))
        self.run("vecdot", type_name, x.shape[1], pw, px, self.tmp / "out.f32")
        out = np.fromfile(self.tmp / "out.f32", np.float32).reshape(2, x.shape[0], raw.shape[0])
        return out[0], out[1]

    def getrows(self, type_name: str, raw: np.ndarray, n: int, ids, threads: int = 2) -> np.ndarray:
        pw, pi = self._files(raw, np.asarray(ids, np.int32))
        self.run("getrows", type_name, n, pw, pi, self.tmp / "out.f32", threads)
        return np.fromfile(self.tmp / "out.f32", np.float32).reshape(len(ids), n)

    def mulmatid(
        self, type_name: str, raw: np.ndarray, n_experts: int, x: np.ndarray, ids: np.ndarray, threads: int = 2
    ) -> np.ndarray:
        """ggml_mul_mat_id: `raw` holds n_experts equal blocks of rows; token t goes to experts ids[t]."""
        pw, px, pi = self._files(raw, x.astype(np.float32), np.asarray(ids, np.int32))
        self.run("mulmatid", type_name, x.shape[1], pw, px, pi, self.tmp / "out.f32", n_experts, threads)
        return np.fromfile(self.tmp / "out.f32", np.float32).reshape(x.shape[0], ids.shape[1], -1)

    def mulmat(
        self,
        type_name: str,
        raw: np.ndarray,
        x: np.ndarray,
        threads: int = 2,
        env: dict[str, str] | None = None,
        repack: bool = False,
    ) -> np.ndarray | None:
        """`repack`: the weights in the CPU backend's repack buffer (llama.cpp's --repack 1); None where that
        buffer does not take the type (kernel_check exits 3)."""
        pw, px = self._files(raw, x.astype(np.float32))
        self.run(
            "mulmat",
            type_name,
            x.shape[1],
            pw,
            px,
            self.tmp / "out.f32",
            threads,
            *(["repack"] if repack else []),
            env=env,
            ok=(0, 3) if repack else (0,),
        )
        if self.returncode == 3:
            return None
        return np.fromfile(self.tmp / "out.f32", np.float32).reshape(x.shape[0], raw.shape[0])


@pytest.fixture(
    scope="session",
    params=[pytest.param(n, marks=[pytest.mark.cross] if f.qemu_cpu else []) for n, f in FLAVORS.items()],
)
def kernel_check(request, tmp_path_factory):
    flavor = FLAVORS[request.param]
    missing = [p for p in flavor.programs if not shutil.which(p)]
    if missing:
        pytest.skip(f"{flavor.name} needs {', '.join(missing)}")
    lacking = missing_cpu_flags(flavor)
    if lacking:  # the CPU cannot run it: prove that its ISA code compiles
        compiled = compile_isa_sources(flavor)
        pytest.skip(
            f"{flavor.name}: compiled {len(compiled)} ISA-specific sources of the series "
            f"({', '.join(compiled)}), but this CPU lacks {' '.join(lacking)} (/proc/cpuinfo flags)"
        )
    exe = build_kernel_check(flavor)
    return KernelCheck(exe, flavor, tmp_path_factory.mktemp(flavor.name))
