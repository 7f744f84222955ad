"""`--device android`: a phone over adb (`--serial` picks one of several).

Files go to /data/local/tmp/slim-edge (the one place a shell user may execute from without root);
the android-arm64 runtime is statically linked, so no NDK libraries are needed on the phone.
"""

from __future__ import annotations

import shutil
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


def choose_serial(devices_output: str, serial: str | None) -> str:
    """Pick the device to use from `adb devices` output, or say exactly what is wrong."""
    devices = parse.parse_adb_devices(devices_output)
    if serial:
        state = dict(devices).get(serial)
        if state is None:
            seen = ", ".join(f"{s} ({st})" for s, st in devices) or "none"
            raise SlimEdgeError(f"No Android device with serial {serial!r} is attached (attached: {seen}). "
                                "Check `adb devices` and pass one of those to --serial.")
        devices = [(serial, state)]
    if not devices:
        raise SlimEdgeError("No Android device is attached (`adb devices` lists none). Connect the phone by USB, "
                            "enable Developer options > USB debugging, and accept the prompt on the phone.")
    unauthorized = [s for s, st in devices if st == "unauthorized"]
    if unauthorized and len(devices) == len(unauthorized):
        raise SlimEdgeError(f"Android device {unauthorized[0]} is unauthorized. Unlock the phone and accept "
                            "'Allow USB debugging?' for this computer (if no prompt shows, revoke USB debugging "
                            "authorizations in Developer options and reconnect), then retry.")
    ready = [s for s, st in devices if st == "device"]
    if not ready:
        raise SlimEdgeError(f"Android device {devices[0][0]} is {devices[0][1]!r}, not ready. "
                            "Reconnect it or run `adb reconnect`, then retry.")
    if len(ready) > 1:
        raise SlimEdgeError(f"{len(ready)} Android devices are attached ({', '.join(ready)}). "
                            "Pick one with --serial.")
    return ready[0]


class AndroidDevice(Device):
    name = "android"
    runtime_target = "android-arm64"
    workdir = WORKDIR

    def __init__(self, serial: str | None = None):
        self.serial = serial

    def check_connection(self) -> None:
        if shutil.which("adb") is None:
            raise SlimEdgeError("adb is not on PATH. Install it (Debian/Ubuntu: apt-get install adb; "
                                "elsewhere: Android SDK platform-tools) and retry.")
        res = local_run(adb_devices_argv(), timeout=60)
        self.serial = choose_serial(res.stdout, self.serial)

    def check_info(self, info: DeviceInfo) -> None:
        if info.abi and not info.abi.startswith("arm64"):
            raise SlimEdgeError(f"Android device {self.serial} reports ro.product.cpu.abi={info.abi!r}; "
                                "the slim-edge runtime is built for arm64-v8a only. Use an arm64 phone.")

    def shell(self, command: str, *, timeout: float | None = None) -> RunResult:
        return local_run(adb_shell_argv(self.serial, command), timeout=timeout)

    def copy_to(self, local: Path, remote: str) -> None:
        res = local_run(adb_push_argv(self.serial, local, remote))
        if res.returncode != 0:
            raise SlimEdgeError(f"adb push {local} failed: {res.stderr.strip() or res.stdout.strip()}")

    def copy_from(self, remote: str, local: Path) -> None:
        res = local_run(adb_pull_argv(self.serial, remote, local))
        if res.returncode != 0:
            raise SlimEdgeError(f"adb pull {remote} failed: {res.stderr.strip() or res.stdout.strip()}")
