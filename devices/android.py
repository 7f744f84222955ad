"""`--device android`: a phone over adb (`--serial` picks one of several).

Files go to /data/local/tmp/slim-edge (the one place a shell user may execute from without root);
the android-arm64 runtime is statically linked, so no NDK libraries are needed on the phone.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import replace
from pathlib import Path

from slim_edge.errors import SlimEdgeError

from . import parse
from .base import Device, DeviceInfo, RunResult, local_run

WORKDIR = "/data/local/tmp/slim-edge"


def adb_argv(serial: str | None, *args: str) -> list[str]:
    return ["adb", *(["-s", serial] if serial else []), *args]


def adb_shell_argv(serial: str | None, command: str) -> list[str]:
    return adb_argv(serial, "shell", command)


def adb_push_argv(serial: str | None, local: Path | str, remote: str) -> list[str]:
    return adb_argv(serial, "push", str(local), remote)


def adb_pull_argv(serial: str | None, remote: str, local: Path | str) -> list[str]:
    return adb_argv(serial, "pull", remote, str(local))


def adb_devices_argv() -> list[str]:
    return ["adb", "devices"]


def with_exit_status(command: str) -> str:
    """`command` in a subshell, then its exit status on a line of its own (parse.split_exit_status).

    adb without the shell_v2 feature (Android < 7, or an older adb) exits 0 whatever the command did,
    so the status travels in the output instead; with shell_v2 it is the same number. The subshell keeps
    an `exit` in `command` from skipping the marker, the empty echo ends output that lacks a final
    newline, and `echo` rather than printf because Android before 6 has no printf."""
    return f'(\n{command}\n)\n__slim_rc=$?; echo; echo "{parse.EXIT_STATUS_MARKER}$__slim_rc"'


def remote_result(res: RunResult, serial: str | None) -> RunResult:
    """The result of `adb shell with_exit_status(command)` with the command's own exit status and output."""
    stdout, status = parse.split_exit_status(res.stdout)
    if status is not None:
        return replace(res, stdout=stdout, returncode=status)
    why = (
        f"adb exited with {res.returncode}"
        if res.returncode
        else "adb exited with 0 but the command's exit status never came back (disconnected mid-command?)"
    )
    note = (
        f"slim-edge: the command did not run to its end on Android device {serial or '(default)'}: {why}. "
        "Check `adb devices` and the USB cable, then retry."
    )
    return replace(res, returncode=res.returncode or 255, stderr=f"{res.stderr.rstrip()}\n{note}".lstrip())


def check_arm64(serial: str | None, abi: str, machine: str, *, static: bool = True) -> list[str]:
    """Refuse a phone the arm64 runtime cannot run on, from ro.product.cpu.abi and `uname -m`; returns
    notes for DeviceInfo.notes.

    `uname -m` names the kernel: aarch64 is a 64-bit kernel; armv8l is also a 64-bit kernel, seen from a
    32-bit process (arm64's compat name, which Android gives its 32-bit processes: a 32-bit Android on a
    64-bit kernel reads armv8l); armv7l and older are a 32-bit kernel, even on a 64-bit (ARMv8) CPU. A
    64-bit kernel runs the static arm64 build under any Android; the NDK build (`static` False) also
    needs Android's 64-bit loader, /system/bin/linker64, which only a 64-bit Android has."""
    who = f"Android device {serial}" if serial else "The Android device"
    seen = f"uname -m {machine!r}, ro.product.cpu.abi {abi!r}"
    use = "Use a phone that runs 64-bit Android (ro.product.cpu.abi=arm64-v8a)."
    android64 = not abi or abi.startswith("arm64")
    if machine in ("aarch64", "arm64", "armv8l"):
        if android64:
            return []
        if not abi.startswith("armeabi"):
            raise SlimEdgeError(f"{who} reports {seen}; the slim-edge runtime is built for arm64-v8a only. {use}")
        if not static:
            raise SlimEdgeError(
                f"{who} runs 32-bit Android on a 64-bit kernel ({seen}): the Android NDK build of the runtime "
                "needs /system/bin/linker64, which 32-bit Android lacks. Unset ANDROID_NDK and rebuild to get "
                "the static arm64 build, which runs there."
            )
        return [
            f"32-bit Android on a 64-bit kernel ({seen}): the static arm64 runtime runs on the kernel "
            "directly; the phone's own apps are 32-bit"
        ]
    if machine.startswith("arm"):
        raise SlimEdgeError(
            f"{who} runs a 32-bit ARM kernel ({seen}), which cannot execute arm64 programs even where the CPU "
            f"itself is 64-bit (ARMv8), so the static arm64 build of the runtime cannot run there; slim-edge has "
            f"no 32-bit ARM runtime. {use}"
        )
    if machine in ("x86_64", "i686", "i386", "x86"):
        raise SlimEdgeError(
            f"{who} is an x86 phone or emulator image ({seen}); the slim-edge runtime is arm64 only. Use an arm64 "
            "phone or an arm64-v8a emulator image, or `--device qemu-arm64` to check correctness on this machine."
        )
    if machine and machine != "unknown":
        raise SlimEdgeError(f"{who} reports {seen}; the slim-edge runtime is built for arm64-v8a only. {use}")
    if not android64:  # uname printed nothing: the ABI is all there is to go on
        raise SlimEdgeError(
            f"{who} reports ro.product.cpu.abi={abi!r}; the slim-edge runtime is built for arm64-v8a only. {use}"
        )
    return []


def choose_serial(devices_output: str, serial: str | None) -> str:
    """Pick the device to use from `adb devices` output, or say exactly what is wrong."""
    devices = parse.parse_adb_devices(devices_output)
    if serial:
        state = dict(devices).get(serial)
        if state is None:
            seen = ", ".join(f"{s} ({st})" for s, st in devices) or "none"
            raise SlimEdgeError(
                f"No Android device with serial {serial!r} is attached (attached: {seen}). "
                "Check `adb devices` and pass one of those to --serial."
            )
        devices = [(serial, state)]
    if not devices:
        raise SlimEdgeError(
            "No Android device is attached (`adb devices` lists none). Connect the phone by USB, "
            "enable Developer options > USB debugging, and accept the prompt on the phone."
        )
    unauthorized = [s for s, st in devices if st == "unauthorized"]
    if unauthorized and len(devices) == len(unauthorized):
        raise SlimEdgeError(
            f"Android device {unauthorized[0]} is unauthorized. Unlock the phone and accept "
            "'Allow USB debugging?' for this computer (if no prompt shows, revoke USB debugging "
            "authorizations in Developer options and reconnect), then retry."
        )
    ready = [s for s, st in devices if st == "device"]
    if not ready:
        raise SlimEdgeError(
            f"Android device {devices[0][0]} is {devices[0][1]!r}, not ready. "
            "Reconnect it or run `adb reconnect`, then retry."
        )
    if len(ready) > 1:
        raise SlimEdgeError(f"{len(ready)} Android devices are attached ({', '.join(ready)}). Pick one with --serial.")
    return ready[0]


class AndroidDevice(Device):
    name = "android"
    runtime_target = "android-arm64"
    workdir = WORKDIR

    def __init__(self, serial: str | None = None):
        self.serial = serial

    def check_connection(self) -> None:
        if shutil.which("adb") is None:
            raise SlimEdgeError(
                "adb is not on PATH. Install it (Debian/Ubuntu: apt-get install adb; "
                "elsewhere: Android SDK platform-tools) and retry."
            )
        res = local_run(adb_devices_argv(), timeout=60)
        self.serial = choose_serial(res.stdout, self.serial)

    def check_info(self, info: DeviceInfo) -> None:
        info.notes += check_arm64(self.serial, info.abi, info.arch, static=_static_runtime())

    def shell(self, command: str, *, timeout: float | None = None) -> RunResult:
        res = local_run(adb_shell_argv(self.serial, with_exit_status(command)), timeout=timeout)
        return remote_result(res, self.serial)

    def stage_runtime(self, tools: tuple[str, ...] = ("llama-bench",)) -> tuple[dict[str, str], dict[str, str]]:
        """Base staging, then each tool started once (`--help`): the proof that this phone runs the build."""
        paths, env = super().stage_runtime(tools)
        env_part = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        for tool, path in paths.items():
            res = self.shell(f"{env_part} {shlex.quote(path)} --help >/dev/null".lstrip(), timeout=120)
            if res.returncode != 0:
                said = (res.stderr.strip() or res.stdout.strip())[-600:] or "(no output)"
                raise SlimEdgeError(
                    f"The arm64 runtime's {tool} does not start on Android device {self.serial} (exit "
                    f"{res.returncode}): {said}. 'not executable: 64-bit ELF file' means the phone cannot run "
                    "arm64 programs (a 32-bit kernel): use a phone that runs 64-bit Android."
                )
        return paths, env

    def copy_to(self, local: Path, remote: str) -> None:
        res = local_run(adb_push_argv(self.serial, local, remote))
        if res.returncode != 0:
            raise SlimEdgeError(f"adb push {local} failed: {res.stderr.strip() or res.stdout.strip()}")

    def copy_from(self, remote: str, local: Path) -> None:
        res = local_run(adb_pull_argv(self.serial, remote, local))
        if res.returncode != 0:
            raise SlimEdgeError(f"adb pull {remote} failed: {res.stderr.strip() or res.stdout.strip()}")


def _static_runtime() -> bool:
    """Whether the android-arm64 runtime is the static build (False: the NDK build,
    see slim_edge.runtime_patches.runtime)."""
    try:
        from slim_edge.runtime_patches.runtime import BuildConfig
    except ImportError:
        return True
    return BuildConfig("android-arm64").flavor != "ndk"
