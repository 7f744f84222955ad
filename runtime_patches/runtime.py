"""The pinned llama.cpp runtime: fetch the vendored tree, apply runtime_patches/, build, find, bind.

    sdist llama-cpp-python 0.3.36 (sha256 pinned) ── vendor/llama.cpp @ 0c1e57098
        └─ + runtime_patches/NNNN-*.patch, in name order
            └─ cmake in <cache>/runtime/.work-<target>/ (a fixed path, so ccache hits across keys)
                └─> <cache>/runtime/<target>-<key12>/{bin,lib}/   (.complete is written last)

The cache key hashes everything that changes the binaries: the pin, the patch series (names and
bytes), the target and its flags. The cache root is $SLIM_EDGE_CACHE, else $XDG_CACHE_HOME/slim-edge,
else ~/.cache/slim-edge. The Python bindings (llama-cpp-python, same pin, so the ctypes structs
match) load our libllama.so through LLAMA_CPP_LIB_PATH: see `load_bindings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlimEdgeError, note
from ..fsutil import cache_dir, sha256_file


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    sha256: str  # of the sdist
    commit: str  # llama.cpp commit named in the sdist's CHANGELOG
    commit_full: str  # HEAD of the vendor/llama.cpp submodule, whose git dir the sdist also ships
    ggml_version: str

    @property
    def sdist_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def vendor_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}/vendor/llama.cpp/"


PIN = Pin(
    package="llama-cpp-python",
    version="0.3.36",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    commit="0c1e57098",
    commit_full="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    ggml_version="0.25.3",
)

TARGETS = ("host", "linux-arm64", "android-arm64")
ISAS = ("avx2", "avx512", "native")
# llama-cli pulls in the server and mtmd libraries; llama-completion is the plain prompt -> text tool
DEFAULT_TOOLS = ("llama-cli", "llama-completion", "llama-bench", "llama-perplexity", "llama-quantize", "llama-imatrix")
# what a device bench and a perplexity run need: without llama-cli (which pulls in the server and mtmd
# libraries) an aarch64 build has far fewer binaries to link statically; find_runtime takes either set
DEVICE_TOOLS = ("llama-bench", "llama-completion", "llama-perplexity")
DEFAULT_ARM_ARCH = "armv8.2-a+dotprod"
ANDROID_PLATFORM = "android-28"
QEMU_CPU = "cortex-a76"  # has dotprod, lacks i8mm: the floor the aarch64 build targets
PATCH_GLOB = "[0-9][0-9][0-9][0-9]-*.patch"


def _shipped_patch_dir() -> Path:
    """The series as package data: runtime_patches/ in a source tree, slim_edge/runtime_patches/ in a wheel."""
    from importlib.resources import files

    return Path(str(files("slim_edge.runtime_patches")))


PATCH_DIR = _shipped_patch_dir()
MARKER = ".complete"
_X86_ISA = {  # GGML_* options set explicitly with GGML_NATIVE=OFF, so a cached build is reproducible
    "avx2": dict(
        SSE42=1, AVX=1, AVX2=1, BMI2=1, FMA=1, F16C=1, AVX_VNNI=0, AVX512=0, AVX512_VBMI=0, AVX512_VNNI=0, AVX512_BF16=0
    ),
    "avx512": dict(
        SSE42=1, AVX=1, AVX2=1, BMI2=1, FMA=1, F16C=1, AVX_VNNI=0, AVX512=1, AVX512_VBMI=1, AVX512_VNNI=1, AVX512_BF16=1
    ),
}
_DEBIAN = {  # program -> Debian package that provides it
    "cmake": "cmake",
    "cc": "build-essential",
    "c++": "build-essential",
    "make": "build-essential",
    "aarch64-linux-gnu-gcc": "g++-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "qemu-aarch64": "qemu-user",
    "patch": "patch",
    "pip": "python3-pip",
}


# --- cache and the pinned source -----------------------------------------------------------


def require(program: str, why: str) -> str:
    """Path of `program` on PATH, or a SlimEdgeError naming the Debian package to install."""
    found = shutil.which(program)
    if found is None:
        pkg = _DEBIAN.get(program, program)
        raise SlimEdgeError(f"{program} not found on PATH (needed {why}); install it: sudo apt-get install {pkg}")
    return found


def fetch_sdist(quiet: bool = False) -> Path:
    """The pinned sdist in <cache>/downloads/, downloaded with pip on first use, sha256-checked."""
    dest = cache_dir() / "downloads" / PIN.sdist_name
    if dest.exists():
        verify_sdist(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{PIN.package}=={PIN.version}"
    if not quiet:
        note(f"downloading {spec} (sdist, {PIN.sdist_name}) with pip ...")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            spec,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / PIN.sdist_name
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise SlimEdgeError(
                f"could not download {spec} with pip (exit {proc.returncode}):\n{tail}\n"
                f"offline? copy {PIN.sdist_name} (sha256 {PIN.sha256}) to {dest}"
            )
        verify_sdist(got)
        os.replace(got, dest)
    return dest


def verify_sdist(path: Path) -> None:
    """The pin: the sdist's sha256, and the llama.cpp commit its CHANGELOG names for this version."""
    digest = sha256_file(path)
    if digest != PIN.sha256:
        raise SlimEdgeError(
            f"{path}: sha256 is {digest}, the pin is {PIN.sha256} ({PIN.package} {PIN.version}); "
            f"delete the file and run again to download it afresh"
        )
    commit, head = changelog_commit(path), submodule_head(path)
    if commit is None or not (commit.startswith(PIN.commit) or PIN.commit.startswith(commit)):
        raise SlimEdgeError(
            f"{path}: CHANGELOG names llama.cpp commit {commit!r} for {PIN.version}, the pin is "
            f"{PIN.commit}; the sdist is not the pinned one"
        )
    if head != PIN.commit_full:
        raise SlimEdgeError(f"{path}: vendor/llama.cpp is at {head!r}, the pin is {PIN.commit_full}")


def _sdist_text(sdist: Path, member: str) -> str:
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            f = tar.extractfile(f"{PIN.package.replace('-', '_')}-{PIN.version}/{member}")
        except KeyError:
            return ""
        return f.read().decode() if f else ""


def submodule_head(sdist: Path) -> str:
    return _sdist_text(sdist, ".git/modules/vendor/llama.cpp/HEAD").strip()


def changelog_commit(sdist: Path) -> str | None:
    text = _sdist_text(sdist, "CHANGELOG.md")
    section = re.search(rf"^## \[{re.escape(PIN.version)}\]\n(.*?)(?=^## \[|\Z)", text, re.M | re.S)
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section.group(1)) if section else None
    return m.group(1) if m else None


def extract_tree(dest: Path, sdist: Path | None = None) -> Path:
    """Write the pristine vendor/llama.cpp tree of the pinned sdist to `dest` (which must not exist)."""
    sdist = sdist or fetch_sdist()
    dest = Path(dest)
    try:
        taken = dest.exists() and (not dest.is_dir() or any(dest.iterdir()))
    except OSError as e:  # too long a path, a loop: named here, not a traceback
        raise SlimEdgeError(
            f"{str(dest)[:120]}{'...' if len(str(dest)) > 120 else ''}: {e.strerror}; pick a new directory"
        ) from None
    if taken:
        raise SlimEdgeError(f"{dest} exists and is not an empty folder; pick a new directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimEdgeError(f"cannot make {dest} ({e.strerror}); pick a directory you can write to") from None
    prefix = PIN.vendor_prefix
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar:
            rel = m.name[len(prefix) :] if m.name.startswith(prefix) else ""
            # vendor/llama.cpp/.git is a submodule gitfile pointing into the sdist's own .git: outside
            # the sdist it is a broken repository that makes `git apply` and cmake's git calls fail
            if rel and rel.split("/")[0] != ".git":
                m.name = rel
                members.append(m)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kw)
    return dest


# --- the patch series -------------------------------------------------------------------------


def patch_series(patch_dir: Path | None = None) -> list[Path]:
    """NNNN-*.patch in name order. The shipped series (no patch_dir) must be whole, numbered 0001..N: without it
    `runtime build` would build stock llama.cpp, whose files the patched types do not load in."""
    d = Path(patch_dir) if patch_dir is not None else PATCH_DIR
    series = sorted(d.glob(PATCH_GLOB), key=lambda p: p.name)
    if patch_dir is None:
        numbers = [int(p.name[:4]) for p in series]
        if numbers != list(range(1, len(series) + 1)) or not series:
            raise SlimEdgeError(
                f"the runtime patch series in {d} is {'empty' if not series else 'incomplete'} "
                f"(numbers {numbers or 'none'}); reinstall slim-edge (the wheel carries "
                f"runtime_patches/0001-*.patch onwards as package data)"
            )
    return series


def series_sha256(patches: list[Path]) -> str:
    h = hashlib.sha256()
    for p in patches:
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def describe_series(patch_dir: Path | None = None) -> list[dict]:
    """[{name, sha256}] of each patch, in order: what `slim-edge runtime patches` shows; the shipped series
    must be whole (see patch_series)."""
    return [{"name": p.name, "sha256": sha256_file(p)} for p in patch_series(patch_dir)]


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """Apply each patch with `git apply` (strict, no fuzz), else `patch -p1 --forward --fuzz=0`."""
    tree = Path(tree).resolve()
    git = shutil.which("git")
    if not git and patches:
        require("patch", "to apply runtime_patches/")
    # keep git from finding a repository above the tree (it would apply relative to that root)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent), LC_ALL="C")
    for p in patches:
        p = Path(p).resolve()
        if git:
            cmd = [git, "apply", "--whitespace=nowarn", str(p)]
        else:
            cmd = [
                "patch",
                "-p1",
                "--forward",
                "--batch",
                "--fuzz=0",
                "--no-backup-if-mismatch",
                "-r",
                "-",
                "-i",
                str(p),
            ]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise SlimEdgeError(
                f"patch {p.name} does not apply to llama.cpp {PIN.commit} "
                f"({' '.join(cmd[:2])} exit {proc.returncode}):\n{out}\n"
                f"fix or regenerate {p} against the pristine tree (`slim-edge runtime source DIR "
                f"--pristine`)"
            )


def prepare_source(dest: Path, patches: list[Path] | None = None, pristine: bool = False) -> Path:
    """The pinned tree at `dest`, with the patch series applied unless `pristine`."""
    extract_tree(dest)
    if not pristine:
        apply_patches(dest, patch_series() if patches is None else patches)
    return Path(dest)


# --- build configuration and its key ----------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    """Everything that changes the binaries, besides the pin and the patches."""

    target: str = "host"
    isa: str = "avx2"  # host only
    arm_arch: str = DEFAULT_ARM_ARCH  # aarch64 only
    tools: tuple[str, ...] = DEFAULT_TOOLS
    build_type: str = "Release"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise SlimEdgeError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.isa not in ISAS:
            raise SlimEdgeError(f"unknown --isa {self.isa!r}; choose one of {', '.join(ISAS)}")
        if self.target == "host" and platform.machine() not in ("x86_64", "AMD64") and self.isa != "native":
            object.__setattr__(self, "isa", "native")  # the explicit ISA table is for x86 hosts
        object.__setattr__(self, "tools", tuple(sorted(set(self.tools))))

    @property
    def flavor(self) -> str:
        """host | aarch64-static (Debian cross compiler; android-arm64 without an NDK too) | ndk."""
        if self.target == "host":
            return "host"
        if self.target == "android-arm64" and os.environ.get("ANDROID_NDK"):
            return "ndk"
        return "aarch64-static"

    @property
    def dir_target(self) -> str:
        # without an NDK, android-arm64 *is* the static linux-arm64 build: share one cache entry
        return "linux-arm64" if self.flavor == "aarch64-static" else self.target

    def key_material(self, patches: list[Path]) -> dict:
        m = {
            "pin": dataclasses.asdict(PIN),
            "series_sha256": series_sha256(patches),
            "target": self.dir_target,
            "flavor": self.flavor,
            "tools": list(self.tools),
            "build_type": self.build_type,
            "cmake": self.cmake_args(),
        }
        if self.flavor == "ndk":
            m["ndk"] = _ndk_revision()
        if self.flavor == "host" and self.isa == "native":
            m["cpu"] = _cpu_fingerprint()  # a -march=native build must not travel to another CPU
        return m

    def key(self, patches: list[Path]) -> str:
        blob = json.dumps(self.key_material(patches), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def cmake_args(self) -> list[str]:
        """-D options only (no paths of this machine), so they can go into the key."""
        d = {
            "CMAKE_BUILD_TYPE": self.build_type,
            "LLAMA_BUILD_TESTS": any(t.startswith("test-") for t in self.tools),
            "LLAMA_BUILD_EXAMPLES": False,
            "LLAMA_BUILD_TOOLS": True,
            "LLAMA_BUILD_SERVER": "llama-cli" in self.tools or "llama-server" in self.tools,
            "LLAMA_BUILD_APP": False,
            "LLAMA_BUILD_UI": False,  # no npm, and no UI download at build time
            "LLAMA_USE_PREBUILT_UI": False,
            "LLAMA_OPENSSL": False,  # this tree's successor of LLAMA_CURL (which is now ignored)
            "GGML_CPU_KLEIDIAI": False,  # downloads at configure time
            "GGML_BACKEND_DL": False,
            "GGML_CPU_ALL_VARIANTS": False,
            "LLAMA_BUILD_NUMBER": 0,
            "LLAMA_BUILD_COMMIT": PIN.commit,
        }
        if self.flavor == "host":
            d.update(
                BUILD_SHARED_LIBS=True,
                CMAKE_BUILD_WITH_INSTALL_RPATH=True,
                CMAKE_INSTALL_RPATH="$ORIGIN/../lib;$ORIGIN",
            )
            if self.isa == "native":
                d["GGML_NATIVE"] = True
            else:
                d["GGML_NATIVE"] = False
                d.update({f"GGML_{k}": bool(v) for k, v in _X86_ISA[self.isa].items()})
        elif self.flavor == "aarch64-static":
            d.update(
                CMAKE_SYSTEM_NAME="Linux",
                CMAKE_SYSTEM_PROCESSOR="aarch64",
                CMAKE_C_COMPILER="aarch64-linux-gnu-gcc",
                CMAKE_CXX_COMPILER="aarch64-linux-gnu-g++",
                CMAKE_FIND_ROOT_PATH="/usr/aarch64-linux-gnu",
                CMAKE_FIND_ROOT_PATH_MODE_PROGRAM="NEVER",
                CMAKE_FIND_ROOT_PATH_MODE_LIBRARY="ONLY",
                CMAKE_FIND_ROOT_PATH_MODE_INCLUDE="ONLY",
                CMAKE_FIND_ROOT_PATH_MODE_PACKAGE="ONLY",
                BUILD_SHARED_LIBS=False,
                CMAKE_EXE_LINKER_FLAGS="-static",
                # FindOpenMP hands the linker libgomp.so, which -static refuses; ggml's own
                # thread pool is what the NDK build (and upstream's Android docs) use anyway
                GGML_OPENMP=False,
                GGML_NATIVE=False,
                GGML_CPU_ARM_ARCH=self.arm_arch,
            )
        else:  # ndk; the toolchain file path is added at build time (it is a path of this machine)
            d.update(
                ANDROID_ABI="arm64-v8a",
                ANDROID_PLATFORM=ANDROID_PLATFORM,
                BUILD_SHARED_LIBS=False,
                GGML_NATIVE=False,
                GGML_OPENMP=False,
                GGML_LLAMAFILE=False,
                GGML_CPU_ARM_ARCH=self.arm_arch,
            )
        return [f"-D{k}={_cmake_value(v)}" for k, v in sorted(d.items())]

    def required_programs(self) -> list[tuple[str, str]]:
        progs = [("cmake", "to configure llama.cpp")]
        if self.flavor == "host":
            progs += [("cc", "to compile llama.cpp for the host"), ("c++", "to compile llama.cpp")]
        elif self.flavor == "aarch64-static":
            progs += [
                ("aarch64-linux-gnu-gcc", f"to cross-compile llama.cpp for {self.target}"),
                ("aarch64-linux-gnu-g++", f"to cross-compile llama.cpp for {self.target}"),
            ]
        if not shutil.which("ninja"):
            progs.append(("make", "to run the build (ninja is not installed)"))
        return progs


def _cmake_value(v) -> str:
    return ("ON" if v else "OFF") if isinstance(v, bool) else str(v)


def _ndk_revision() -> str:
    ndk = Path(os.environ["ANDROID_NDK"])
    props = ndk / "source.properties"
    if not (ndk / "build/cmake/android.toolchain.cmake").exists():
        raise SlimEdgeError(
            f"ANDROID_NDK={ndk} has no build/cmake/android.toolchain.cmake; point it at an "
            f"unpacked Android NDK, or unset it to get the static aarch64 build"
        )
    m = re.search(r"Pkg\.Revision\s*=\s*(\S+)", props.read_text()) if props.exists() else None
    return m.group(1) if m else "unknown"


def _cpu_fingerprint() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:16]


# --- a built runtime --------------------------------------------------------------------------


@dataclass
class Runtime:
    target: str
    key: str
    root: Path
    tools: dict[str, Path]
    config: BuildConfig = field(repr=False)

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    def tool(self, name: str) -> Path:
        if name not in self.tools:
            raise SlimEdgeError(
                f"{name} is not part of this runtime ({', '.join(self.tools)}); build it: "
                f"`slim-edge runtime build --target {self.target} --tool {name}`"
            )
        return self.tools[name]

    def argv(self, name: str, cpu: str = QEMU_CPU) -> list[str]:
        """Command prefix that runs `name` here: directly on the host, under qemu-aarch64 for arm64."""
        path = str(self.tool(name))
        if self.config.flavor == "ndk":
            raise SlimEdgeError(
                f"{name} was built with the Android NDK (bionic) and runs only on the phone; "
                f"push it with adb, or unset ANDROID_NDK for a static build qemu can run"
            )
        if self.config.flavor == "host" or platform.machine() in ("aarch64", "arm64"):
            return [path]
        return emulator(cpu) + [path]

    def env(self) -> dict[str, str]:
        """Environment for the Python bindings (see `load_bindings`)."""
        if self.config.flavor != "host":
            raise SlimEdgeError(f"the Python bindings load host libraries; {self.target} has none (use --target host)")
        e = {"LLAMA_CPP_LIB_PATH": str(self.lib_dir)}
        if (self.lib_dir / "libmtmd.so").exists():
            e["MTMD_CPP_LIB"] = str(self.lib_dir)
        return e

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "key": self.key,
            "root": str(self.root),
            "bin": str(self.bin_dir),
            "lib": str(self.lib_dir),
            "tools": {k: str(v) for k, v in sorted(self.tools.items())},
            "llama_cpp_commit": PIN.commit,
            "flavor": self.config.flavor,
            "isa": self.config.isa if self.config.flavor == "host" else None,
            "arm_arch": None if self.config.flavor == "host" else self.config.arm_arch,
            "log": str(self.log),
        }


def emulator(cpu: str = QEMU_CPU) -> list[str]:
    """qemu-aarch64 with an explicit CPU (binfmt_misc is often not mounted, so call it directly)."""
    return [require("qemu-aarch64", "to run aarch64 binaries on this x86 host"), "-cpu", cpu]


def _runtime_dir(config: BuildConfig, key: str) -> Path:
    return cache_dir() / "runtime" / f"{config.dir_target}-{key[:12]}"


def _load_finished(root: Path, config: BuildConfig, key: str) -> Runtime | None:
    marker = root / MARKER
    if not marker.exists() or marker.read_text().strip() != key:
        return None
    try:
        tools = {k: root / v for k, v in json.loads((root / "runtime.json").read_text())["tools"].items()}
    except (OSError, ValueError, KeyError):
        return None
    if not all(p.exists() for p in tools.values()):
        return None
    return Runtime(config.target, key, root, tools, config)


def find_runtime(
    target: str = "host",
    *,
    isa: str = "avx2",
    arm_arch: str = DEFAULT_ARM_ARCH,
    tools: tuple[str, ...] | None = None,
    patches: list[Path] | None = None,
) -> Runtime:
    """The finished build for this configuration and the current patch series, else a SlimEdgeError."""
    wanted = tuple(tools or DEFAULT_TOOLS)
    patches = patch_series() if patches is None else patches
    # a full default build (or the DEVICE_TOOLS one) serves any subset of its tools (kernel_bench asks for
    # llama-bench + llama-quantize, a device bench for llama-bench)
    configs = [BuildConfig(target, isa, arm_arch, t) for t in (DEFAULT_TOOLS, DEVICE_TOOLS) if set(wanted) < set(t)] + [
        BuildConfig(target, isa, arm_arch, wanted)
    ]
    rt = None
    for config in configs:
        key = config.key(patches)
        rt = _load_finished(_runtime_dir(config, key), config, key)
        if rt is not None:
            break
    if rt is None:
        flags = f" --isa {config.isa}" if config.flavor == "host" and config.isa != "avx2" else ""
        raise SlimEdgeError(
            f"no llama.cpp runtime built for target {target} with the current {len(patches)} patch(es) "
            f"(key {key[:12]}); run `slim-edge runtime build --target {target}{flags}`"
        )
    return rt


def ensure_runtime(target: str = "host", **kw) -> Runtime:
    """find_runtime, building first when needed."""
    try:
        return find_runtime(target, **{k: kw[k] for k in ("isa", "arm_arch", "tools", "patches") if k in kw})
    except SlimEdgeError:
        return build(target, **kw)


# --- the build --------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"waiting for another slim-edge build holding {path} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _work_dir(parent: Path, name: str) -> Iterator[Path]:
    """The target's work dir, or a numbered sibling while another key of the same target builds there."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        path = parent / (name if i == 0 else f"{name}-{i}")
        with open(parent / f"{path.name}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                yield path
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return
    with _locked(parent / f"{name}.lock"):
        yield parent / name


def build(
    target: str = "host",
    *,
    isa: str = "avx2",
    arm_arch: str = DEFAULT_ARM_ARCH,
    tools: tuple[str, ...] | None = None,
    patches: list[Path] | None = None,
    jobs: int | None = None,
    force: bool = False,
    keep_build: bool = False,
    progress: bool = True,
) -> Runtime:
    """Build (or reuse) the patched runtime for `target`; returns where its tools and libraries are."""
    if jobs is not None and jobs < 1:
        raise SlimEdgeError(f"--jobs {jobs}: give at least 1 compile job (default: one per CPU)")
    config = BuildConfig(target, isa, arm_arch, tuple(tools or DEFAULT_TOOLS))
    patches = patch_series() if patches is None else [Path(p) for p in patches]
    for prog, why in config.required_programs():
        require(prog, why)
    ndk_toolchain = None
    if config.flavor == "ndk":
        _ndk_revision()
        ndk_toolchain = Path(os.environ["ANDROID_NDK"]) / "build/cmake/android.toolchain.cmake"
    key = config.key(patches)
    root = _runtime_dir(config, key)
    # one work dir per target, reused by every key: libllama is a unity build whose generated sources
    # #include absolute paths, so only a fixed source path lets ccache reuse them after a patch edit
    work_name = f".work-{config.dir_target}"
    with _locked(root.parent / f"{root.name}.lock"), _work_dir(root.parent, work_name) as work:
        if force and root.exists():
            shutil.rmtree(root)
        done = _load_finished(root, config, key)
        if done is not None:
            return done
        (root / MARKER).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        src, bld = work / "src", work / "build"
        stamp = work / "key"
        # resume a killed build of this key; any other key starts from a fresh tree and build dir
        # (ninja compares mtimes, so reusing objects across patch series could keep stale ones)
        if force or not stamp.exists() or stamp.read_text().strip() != key:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            sdist = fetch_sdist(quiet=not progress)
            if progress:
                note(f"extracting llama.cpp {PIN.commit} and applying {len(patches)} patch(es) ...")
            extract_tree(src, sdist)
            apply_patches(src, patches)
            stamp.write_text(key + "\n")
        args = config.cmake_args()
        if ndk_toolchain:
            args.append(f"-DCMAKE_TOOLCHAIN_FILE={ndk_toolchain}")
        args.append("-DGGML_CCACHE=" + ("ON" if shutil.which("ccache") else "OFF"))
        gen = ["-G", "Ninja"] if shutil.which("ninja") else ["-G", "Unix Makefiles"]
        if (bld / "CMakeCache.txt").exists() and gen[1] not in (bld / "CMakeCache.txt").read_text():
            shutil.rmtree(bld)
        env = dict(
            os.environ, GIT_CEILING_DIRECTORIES=str(work), LC_ALL="C", CCACHE_BASEDIR=str(work), CCACHE_NOHASHDIR="1"
        )
        log = root / "build.log"
        build_targets = list(config.tools) + (["llama", "ggml"] if config.flavor == "host" else [])
        jobs = jobs or os.cpu_count() or 2
        with open(log, "w", buffering=1) as logf:  # line-buffered: `tail -f` shows progress
            logf.write(f"# slim-edge runtime build {config} key {key}\n")
            _run_logged(["cmake", "-S", str(src), "-B", str(bld), *gen, *args], env, logf, log, "configuring", progress)
            what = f"building {target} ({len(build_targets)} targets, -j{jobs})"
            _run_logged(
                ["cmake", "--build", str(bld), "-j", str(jobs), "--target", *build_targets],
                env,
                logf,
                log,
                what,
                progress,
            )
        rt = _install(root, bld, config, key)
        manifest = {
            **rt.to_json(),
            "tools": {k: str(v.relative_to(root)) for k, v in rt.tools.items()},
            "patches": [p.name for p in patches],
            "key_material": config.key_material(patches),
            "build_seconds": round(time.time() - t0, 1),
        }
        (root / "runtime.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if keep_build:
            note(f"kept the patched tree and build dir: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        _write_marker(root / MARKER, key)
        if progress:
            note(
                f"built llama.cpp {PIN.commit} + {len(patches)} patch(es) for {target} in "
                f"{time.time() - t0:.0f} s: {rt.bin_dir}"
            )
        return rt


def _run_logged(cmd: list[str], env: dict, logf, log: Path, what: str, progress: bool) -> None:
    """Run `cmd` with its output in the log; a progress bar on a terminal, a line per 10 % elsewhere."""
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    bar, last_decile = None, -1
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc=what, total=None, unit="step", file=sys.stderr, leave=False, mininterval=0.5)
    elif progress:
        note(f"{what} ... (log: {log})")
    tail: deque[str] = deque(maxlen=40)
    # its own process group, so an interrupted build takes its compilers down with it
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    old_term = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for line in proc.stdout:
            logf.write(line)
            tail.append(line.rstrip("\n"))
            m = re.match(r"\[(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)  # ninja, make
            if not m or not progress:
                continue
            done, total = int(m.group(1)), int(m.group(2)) if m.lastindex == 2 else 100
            if bar is not None:
                bar.total, bar.n = total, done
                bar.refresh()
            elif done * 10 // total > last_decile:
                last_decile = done * 10 // total
                note(f"{what}: {done}/{total}")
        rc = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old_term)
        if bar is not None:
            bar.close()
        logf.flush()
    if rc != 0:
        raise SlimEdgeError(
            f"{what} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail) + f"\nfull log: {log}"
        )


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _install(root: Path, bld: Path, config: BuildConfig, key: str) -> Runtime:
    out_bin, out_lib = root / "bin", root / "lib"
    for d in (out_bin, out_lib):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    tools = {}
    for t in config.tools:
        src = bld / "bin" / t
        if not src.exists():
            raise SlimEdgeError(f"the build finished but {src} is missing; see {root / 'build.log'}")
        shutil.copy2(src, out_bin / t)
        tools[t] = out_bin / t
    if config.flavor == "host":
        for lib in sorted((bld / "bin").glob("lib*.so*")):
            shutil.copy2(lib, out_lib / lib.name, follow_symlinks=False)
        if not (out_lib / "libllama.so").exists():
            raise SlimEdgeError(f"the build made no libllama.so in {bld / 'bin'}; see {root / 'build.log'}")
    return Runtime(config.target, key, root, tools, config)


def _write_marker(path: Path, key: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- Python bindings --------------------------------------------------------------------------

_CTX_DEFAULTS = {
    "n_ctx": 512,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_seq_max": 1,
    "type_k": 1,
    "type_v": 1,
    "offload_kqv": True,
    "no_perf": True,
    "swa_full": True,
    "kv_unified": False,
    "n_samplers": 0,
}
_MODEL_DEFAULTS = {"n_gpu_layers": -1, "vocab_only": False, "use_extra_bufts": True, "load_mtp": False}


def load_bindings(runtime: Runtime | None = None):
    """Import llama_cpp (llama-cpp-python, pinned) bound to our patched libllama.so; returns the module.

    LLAMA_CPP_LIB_PATH is read once, at import: call this before anything imports llama_cpp.
    The struct check compares the C defaults against the Python ctypes structs field by field;
    a layout mismatch (bindings and library from different commits) shifts the trailing fields.
    """
    rt = runtime or find_runtime("host")
    lib = rt.lib_dir.resolve()
    if "llama_cpp" not in sys.modules:
        os.environ.update(rt.env())
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "llama_cpp":
            raise SlimEdgeError(
                f"llama_cpp is installed but its dependency {e.name} is not: "
                f"pip install {PIN.package}=={PIN.version} with its dependencies"
            ) from None
        raise SlimEdgeError(
            f"llama_cpp is not installed; install the pinned bindings without their own build: "
            f"CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-cache-dir {PIN.package}=={PIN.version}"
        ) from None
    except (OSError, RuntimeError) as e:  # the library failed to load
        where = os.environ.get("LLAMA_CPP_LIB_PATH")
        raise SlimEdgeError(
            f"import llama_cpp with LLAMA_CPP_LIB_PATH={where} "
            f"failed: {e}; rebuild with `slim-edge runtime build --force`"
        ) from None
    if getattr(llama_cpp, "__version__", None) != PIN.version:
        raise SlimEdgeError(
            f"llama_cpp {llama_cpp.__version__} is installed, the pin is {PIN.version} "
            f"(its ctypes structs must match llama.cpp {PIN.commit}); "
            f"pip install {PIN.package}=={PIN.version}"
        )
    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    if loaded.parent != lib:
        raise SlimEdgeError(
            f"llama_cpp was already imported with {loaded}, not {lib / 'libllama.so'}; "
            f"call load_bindings() before importing llama_cpp, or export "
            f"LLAMA_CPP_LIB_PATH={lib}"
        )
    stray = [str(p) for p in loaded_libraries() if re.match(r"lib(llama|ggml)", p.name) and p.parent.resolve() != lib]
    if stray:
        raise SlimEdgeError(f"another llama.cpp build is loaded in this process: {', '.join(stray)}")
    _check_structs(llama_cpp)
    return llama_cpp


def loaded_libraries() -> list[Path]:
    """Shared objects mapped into this process (Linux), for checking which libggml was loaded."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    fields = (line.split(None, 5) for line in maps.splitlines())
    return sorted({Path(f[5]) for f in fields if len(f) == 6 and ".so" in f[5]})


def _check_structs(llama_cpp) -> None:
    checks = (("llama_context_default_params", _CTX_DEFAULTS), ("llama_model_default_params", _MODEL_DEFAULTS))
    for fn, want in checks:
        got = getattr(llama_cpp, fn)()
        bad = {k: getattr(got, k) for k, v in want.items() if getattr(got, k) != v}
        if bad:
            raise SlimEdgeError(
                f"{fn}() through the bindings gives {bad}, llama.cpp {PIN.commit} sets "
                f"{ {k: want[k] for k in bad} }: the bindings and libllama.so come from "
                f"different commits; reinstall {PIN.package}=={PIN.version} and rebuild "
                f"the runtime"
            )
