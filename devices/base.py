"""The interface every device implements, and the flow they share.

A device knows four primitives: run a shell command line, copy a file to it, copy one back, and
where its working folder is. Everything else (probing, hash-skipping pushes, memory checks,
running llama-bench with peak-memory tracking) is written once here on top of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import sha256_file
from slim_edge.runtime_patches.runtime import find_runtime

from . import parse

# One `N type temp` line per thermal zone, the shape people paste from phones; temp stays empty where
# the read fails (some zones refuse it even to adb's shell user).
THERMAL_COMMAND = (
    'for z in /sys/class/thermal/thermal_zone*; do [ -d "$z" ] || continue; '
    'echo "${z##*thermal_zone} $(cat "$z/type" 2>/dev/null) $(cat "$z/temp" 2>/dev/null)"; done'
)

# Prints one section per fact; every command may fail (no getprop off Android, no cpufreq in VMs).
PROBE_SCRIPT = r"""
echo @@uname; uname -m
echo @@getprop; getprop 2>/dev/null
echo @@cpuinfo; cat /proc/cpuinfo 2>/dev/null
echo @@maxfreq; grep . /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq 2>/dev/null
echo @@thermal; {thermal}
echo @@meminfo; cat /proc/meminfo 2>/dev/null
echo @@df; d={workdir_parent}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -k "$d" 2>/dev/null
echo @@time; ls /usr/bin/time /system/bin/time 2>/dev/null
echo @@nproc; nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo
"""

# Runs "$@" in the background and polls its VmHWM (peak resident set) until it exits. VmHWM is a
# high-water mark, so the last reading before exit is the peak up to the polling interval.
VMHWM_WRAPPER = (
    '"$@" & pid=$!; hwm=0; '
    "while kill -0 $pid 2>/dev/null; do "
    "h=$(sed -n 's/^VmHWM:[^0-9]*\\([0-9]*\\).*/\\1/p' /proc/$pid/status 2>/dev/null); "
    '[ -n "$h" ] && hwm=$h; sleep 0.2; done; '
    "wait $pid; rc=$?; echo SLIM_EDGE_VMHWM_KB=$hwm >&2; exit $rc"
)


@dataclass
class RunResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    peak_rss_kb: int | None = None
    peak_rss_method: str | None = None


@dataclass
class DeviceInfo:
    device: str
    arch: str
    soc: str = "unknown"
    model: str = ""
    android_version: str = ""
    abi: str = ""
    cpu_features: list[str] = field(default_factory=list)
    cpu_features_of_interest: list[str] = field(default_factory=list)
    n_cpus: int = 0
    max_freqs_khz: dict[int, int] = field(default_factory=dict)
    big_cores: list[int] = field(default_factory=list)
    thermal_c: dict[str, float] = field(default_factory=dict)
    mem_available_kb: int | None = None
    mem_total_kb: int | None = None
    storage_available_kb: int | None = None
    has_gnu_time: bool = False
    emulated: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["max_freqs_khz"] = {str(k): v for k, v in self.max_freqs_khz.items()}
        return d


def info_from_probe(device: str, text: str, *, emulated: bool = False) -> DeviceInfo:
    """Build DeviceInfo from the output of PROBE_SCRIPT (pure: tested on captured text)."""
    s = parse.parse_sections(text)
    props = parse.parse_getprop(s.get("getprop", ""))
    cpu = parse.parse_cpuinfo(s.get("cpuinfo", ""))
    mem = parse.parse_meminfo(s.get("meminfo", ""))
    freqs = parse.parse_max_freqs(s.get("maxfreq", ""))
    try:
        storage = parse.parse_df_available_kb(s["df"]) if s.get("df", "").strip() else None
    except SlimEdgeError:
        storage = None
    model = " ".join(x for x in (props.get("ro.product.manufacturer", ""), props.get("ro.product.model", "")) if x)
    if not model and cpu["cpus"]:
        model = cpu["cpus"][0].get("model_name", "")
    nproc = s.get("nproc", "").strip().splitlines()
    return DeviceInfo(
        device=device,
        arch=(s.get("uname", "").strip() or "unknown"),
        soc=parse.soc_name(props) if props else (cpu["hardware"] or model or "unknown"),
        model=model,
        android_version=props.get("ro.build.version.release", ""),
        abi=props.get("ro.product.cpu.abi", ""),
        cpu_features=cpu["features"],
        cpu_features_of_interest=parse.features_of_interest(cpu["features"]),
        n_cpus=int(nproc[0]) if nproc and nproc[0].isdigit() else len(cpu["cpus"]),
        max_freqs_khz=freqs,
        big_cores=parse.big_cores(freqs, 1),
        thermal_c=parse.parse_thermal(s.get("thermal", "")),
        mem_available_kb=mem.get("MemAvailable"),
        mem_total_kb=mem.get("MemTotal"),
        storage_available_kb=storage,
        has_gnu_time="/usr/bin/time" in s.get("time", ""),
        emulated=emulated,
    )


def safe_name(name: str) -> str:
    """The name a file takes on the device. A remote path can pass through a shell there (scp's legacy
    protocol runs `scp -t PATH` in the remote user's shell, unquoted), so anything outside [A-Za-z0-9._-] is
    replaced, and a hash of the original name keeps two such names apart: `$(touch X).gguf` becomes
    `_touch_X-<8 hex>.gguf`."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) and len(name) <= 128:
        return name
    stem, ext = os.path.splitext(name)
    ext = ext if re.fullmatch(r"\.[A-Za-z0-9]{1,16}", ext) else ""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem if ext else name).strip("._-")[:64] or "file"
    return f"{clean}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}{ext}"


def check_fits(info: DeviceInfo, files: list[Path], *, what: str = "the model files") -> None:
    """Refuse before copying when the device has too little storage or RAM for `files`."""
    need_kb = sum(p.stat().st_size for p in files) // 1024
    if info.storage_available_kb is not None and info.storage_available_kb < need_kb + 64 * 1024:
        raise SlimEdgeError(
            f"{info.device}: {what} need {need_kb / 1024:.0f} MiB plus 64 MiB headroom, but only "
            f"{info.storage_available_kb / 1024:.0f} MiB is free in its working folder. "
            "Free space on the device or benchmark fewer/smaller models."
        )
    biggest = max((p.stat().st_size for p in files), default=0) // 1024
    if info.mem_available_kb is not None and info.mem_available_kb < biggest * 1.1:
        raise SlimEdgeError(
            f"{info.device}: the largest model file is {biggest / 1024:.0f} MiB but only "
            f"{info.mem_available_kb / 1024:.0f} MiB of RAM is available (MemAvailable). "
            "Close apps on the device, or drop the largest model (e.g. leave f16 out of --baselines)."
        )


class Device:
    """Base class: subclasses implement shell(), copy_to(), copy_from() and set workdir."""

    name = "device"
    runtime_target = "host"
    emulated = False
    copies_files = True  # False where the device reads this machine's files in place
    workdir = "/tmp/slim-edge"

    # -- primitives -------------------------------------------------------------------------
    def shell(self, command: str, *, timeout: float | None = None) -> RunResult:
        raise NotImplementedError

    def copy_to(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def copy_from(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    # -- shared flow ------------------------------------------------------------------------
    def check_connection(self) -> None:
        """Raise SlimEdgeError with what to do when the device cannot be used."""

    def info(self) -> DeviceInfo:
        parent = self.workdir.rsplit("/", 1)[0] or "/"
        res = self.shell(PROBE_SCRIPT.format(workdir_parent=shlex.quote(parent), thermal=THERMAL_COMMAND), timeout=120)
        info = info_from_probe(self.name, res.stdout, emulated=self.emulated)
        self.check_info(info)
        return info

    def thermal(self) -> dict[str, float]:
        """Current thermal zone readings in degrees C (empty where the kernel exposes none)."""
        return parse.parse_thermal(self.shell(THERMAL_COMMAND, timeout=60).stdout)

    def check_info(self, info: DeviceInfo) -> None:
        """Device-specific refusals (e.g. not arm64)."""

    def ensure_workdir(self) -> None:
        self.shell_ok(f"mkdir -p {shlex.quote(self.workdir)}")

    def remote_path(self, name: str) -> str:
        return f"{self.workdir}/{name}"

    def remote_hashes(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        paths = " ".join(shlex.quote(self.remote_path(n)) for n in names)
        return parse.parse_sha256sum(self.shell(f"sha256sum {paths} 2>/dev/null").stdout)

    def push(self, files: list[Path], *, subdir: str = "") -> dict[str, bool]:
        """Copy `files` into the working folder, skipping those already there with the same sha256.
        Returns {file name: copied?}."""
        prefix = f"{subdir}/" if subdir else ""
        if subdir:
            self.shell_ok(f"mkdir -p {shlex.quote(self.remote_path(subdir))}")
        names = [prefix + safe_name(p.name) for p in files]
        have = self.remote_hashes(names)
        copied = {}
        for p, name in zip(files, names):
            if have.get(safe_name(p.name)) == sha256_file(p):
                copied[name] = False
                continue
            self.copy_to(p, self.remote_path(name))
            copied[name] = True
        return copied

    def stage(self, files: list[Path], *, subdir: str = "") -> dict[Path, str]:
        """Make `files` available on the device; returns {local path: path on the device}."""
        self.push(files, subdir=subdir)
        prefix = f"{subdir}/" if subdir else ""
        return {p: self.remote_path(prefix + safe_name(p.name)) for p in files}

    def stage_runtime(self, tools: tuple[str, ...] = ("llama-bench",)) -> tuple[dict[str, str], dict[str, str]]:
        """Copy the runtime's tools and shared libraries -> ({tool: path on device}, env)."""
        bin_dir, lib_dir = self.runtime_dirs(tools)
        missing = [t for t in tools if not (bin_dir / t).is_file()]
        if missing:
            raise SlimEdgeError(
                f"The {self.runtime_target} runtime in {bin_dir} lacks {', '.join(missing)}. "
                f"Rebuild it with slim_edge.runtime_patches.runtime.ensure_runtime({self.runtime_target!r})."
            )
        libs = sorted(p for p in lib_dir.glob("*.so*") if p.is_file()) if lib_dir.is_dir() else []
        self.push([bin_dir / t for t in tools] + libs, subdir="bin")
        self.shell_ok("chmod 755 " + " ".join(shlex.quote(self.remote_path(f"bin/{t}")) for t in tools))
        env = {"LD_LIBRARY_PATH": self.remote_path("bin")} if libs else {}
        return {t: self.remote_path(f"bin/{t}") for t in tools}, env

    def pull(self, remote_name: str, local: Path) -> Path:
        self.copy_from(self.remote_path(remote_name), local)
        return local

    def cleanup(self) -> None:
        self.shell_ok(f"rm -rf {shlex.quote(self.workdir)}")

    def shell_ok(self, command: str, *, timeout: float | None = None) -> RunResult:
        res = self.shell(command, timeout=timeout)
        if res.returncode != 0:
            raise SlimEdgeError(
                f"{self.name}: command failed with exit code {res.returncode}: {command}\n"
                f"{(res.stderr.strip() or res.stdout.strip())[-2000:]}"  # legacy adb: stderr comes on stdout
            )
        return res

    def run_measured(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        use_gnu_time: bool = False,
        stdout_file: str | None = None,
    ) -> RunResult:
        """Run argv in the working folder and report its peak memory (GNU time -v when the device
        has it, else VmHWM polled from /proc/<pid>/status). With stdout_file, stdout is written to
        that file in the working folder (to pull afterwards) instead of streamed back."""
        env_part = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        cmd = " ".join(shlex.quote(a) for a in argv)
        if use_gnu_time:
            line = f"cd {shlex.quote(self.workdir)} && {env_part} /usr/bin/time -v {cmd}"
        else:
            line = f"cd {shlex.quote(self.workdir)} && {env_part} sh -c {shlex.quote(VMHWM_WRAPPER)} slim-edge {cmd}"
        if stdout_file:
            line += f" > {shlex.quote(stdout_file)}"
        res = self.shell(line, timeout=timeout)
        res.peak_rss_kb, res.peak_rss_method = parse.parse_peak_rss_kb(res.stderr)
        if res.peak_rss_kb is None:  # adb without shell_v2 sends the remote stderr on stdout
            res.peak_rss_kb, res.peak_rss_method = parse.parse_peak_rss_kb(res.stdout)
        res.argv = argv
        return res

    def runtime_dirs(self, tools: tuple[str, ...] | None = None) -> tuple[Path, Path]:
        return find_runtime_dirs(self.runtime_target, tools)


def find_runtime_dirs(target: str, tools: tuple[str, ...] | None = None, isa: str = "avx2") -> tuple[Path, Path]:
    """(bin dir, lib dir) of the built runtime for `target` that has `tools` (default: the full set); `isa`: the
    host build's x86 ISA (runtime.ISAS)."""
    rt = find_runtime(target, tools=tools, isa=isa)  # its SlimEdgeError says how to build it
    return rt.bin_dir, rt.lib_dir


def local_run(argv: list[str], *, timeout: float | None = None, input: str | None = None) -> RunResult:
    """Run a local command, capturing text output; a missing executable is a clear error."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError:
        raise SlimEdgeError(f"{argv[0]!r} is not on PATH. Install it (see the device's docs) and retry.")
    except subprocess.TimeoutExpired:
        raise SlimEdgeError(f"{' '.join(argv[:3])} ... did not finish within {timeout} s.")
    return RunResult(argv, p.returncode, p.stdout, p.stderr)
