"""`--device host`: this machine. Nothing is copied; peak memory is the child's VmHWM (see run_with_rusage)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from slim_edge.errors import SlimEdgeError

from .base import Device, RunResult, find_runtime_dirs


def run_with_rusage(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None, timeout: float | None = None
) -> RunResult:
    """Run argv locally and report its peak RSS in kB.

    The peak is the child's VmHWM (/proc/PID/status), polled while it runs: wait4()'s ru_maxrss is not usable
    from a large parent, because Linux carries the parent's resident size at fork into the child's maxrss
    through exec (a 135M-model bench run from a 6 GB Python process reported 7 GB). ru_maxrss is the
    fallback for a child too short-lived to be polled. Output goes to temporary files, not pipes, so the
    child can be reaped with wait4 directly."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=full_env, cwd=cwd)
        except FileNotFoundError:
            raise SlimEdgeError(f"{argv[0]!r} not found. Check that the runtime is built and on the path given.")
        # wait4 gives this child's own rusage; a timer kills it past the timeout.
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        hwm, done = [0], threading.Event()
        poller = threading.Thread(target=_poll_vmhwm, args=(proc.pid, hwm, done), daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            poller.join()
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if timer and proc.returncode == -9:
            raise SlimEdgeError(f"{os.path.basename(argv[0])} ran longer than {timeout} s and was stopped.")
        rss, method = (hwm[0], "VmHWM") if hwm[0] else (usage.ru_maxrss, "wait4 ru_maxrss")
        out.seek(0)
        err.seek(0)
        return RunResult(
            argv,
            proc.returncode,
            out.read(),
            err.read(),
            peak_rss_kb=rss or None,
            peak_rss_method=method if rss else None,
        )


def _poll_vmhwm(pid: int, hwm: list[int], done: threading.Event, every_s: float = 0.01) -> None:
    """Keep hwm[0] at the largest VmHWM (kB) read from /proc/PID/status until `done` is set."""
    path = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]))
                        break
        except (OSError, ValueError):
            pass
        done.wait(every_s)


class HostDevice(Device):
    name = "host"
    runtime_target = "host"
    copies_files = False

    def __init__(self, workdir: str | None = None, isa: str = "avx2"):
        self.workdir = workdir or tempfile.mkdtemp(prefix="slim-edge-host-")
        self.isa = isa  # which host build runs: `slim-edge runtime build --isa ...`

    def runtime_dirs(self, tools: tuple[str, ...] | None = None) -> tuple[Path, Path]:
        return find_runtime_dirs(self.runtime_target, tools, isa=self.isa)

    def shell(self, command: str, *, timeout: float | None = None) -> RunResult:
        p = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        return RunResult(["sh", "-c", command], p.returncode, p.stdout, p.stderr)

    def copy_to(self, local: Path, remote: str) -> None:
        shutil.copy2(local, remote)

    def copy_from(self, remote: str, local: Path) -> None:
        shutil.copy2(remote, local)

    def stage(self, files: list[Path], *, subdir: str = "") -> dict[Path, str]:
        return {p: str(Path(p).resolve()) for p in files}

    def stage_runtime(self, tools=("llama-bench",)):
        bin_dir, lib_dir = self.runtime_dirs(tuple(tools))
        paths = {t: str(bin_dir / t) for t in tools}
        for t, p in paths.items():
            if not os.access(p, os.X_OK):
                raise SlimEdgeError(f"The host runtime in {bin_dir} lacks an executable {t}. Rebuild the runtime.")
        return paths, {"LD_LIBRARY_PATH": str(lib_dir)}

    def run_measured(self, argv, *, env=None, timeout=None, use_gnu_time=False, stdout_file=None):
        return run_with_rusage(argv, env=env, cwd=self.workdir, timeout=timeout)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
