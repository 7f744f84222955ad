"""The adb command lines the android backend builds, and its errors (no adb, no phone, unauthorized)."""

import hashlib
import os
import shlex
import stat

import pytest

from slim_edge.devices import android, get_device
from slim_edge.devices.android import (WORKDIR, AndroidDevice, adb_devices_argv, adb_pull_argv, adb_push_argv,
                                       adb_shell_argv, choose_serial)
from slim_edge.devices.base import THERMAL_COMMAND, DeviceInfo, RunResult, VMHWM_WRAPPER
from slim_edge.errors import SlimEdgeError


def test_adb_argv():
    assert adb_devices_argv() == ["adb", "devices"]
    assert adb_shell_argv(None, "getprop") == ["adb", "shell", "getprop"]
    assert adb_shell_argv("R58M41XYZ12", "uname -m") == ["adb", "-s", "R58M41XYZ12", "shell", "uname -m"]
    assert adb_push_argv("R58M41XYZ12", "/tmp/m.gguf", f"{WORKDIR}/models/m.gguf") == [
        "adb", "-s", "R58M41XYZ12", "push", "/tmp/m.gguf", "/data/local/tmp/slim-edge/models/m.gguf"]
    assert adb_pull_argv(None, f"{WORKDIR}/out.json", "/tmp/out.json") == [
        "adb", "pull", "/data/local/tmp/slim-edge/out.json", "/tmp/out.json"]


class Recorder(AndroidDevice):
    """Records the command lines instead of running them (the argv builders are what we test)."""

    def __init__(self, serial):
        super().__init__(serial)
        self.lines = []

    def shell(self, command, *, timeout=None):
        self.lines.append(adb_shell_argv(self.serial, command))
        return RunResult(self.lines[-1], 0, "", "SLIM_EDGE_VMHWM_KB=2048\n")


def test_measured_run_command_line():
    dev = Recorder("R58M41XYZ12")
    res = dev.run_measured(["/data/local/tmp/slim-edge/bin/llama-bench", "-m", "models/m.gguf", "-t", "2"],
                           env={"LD_LIBRARY_PATH": "/data/local/tmp/slim-edge/bin"})
    assert dev.lines == [["adb", "-s", "R58M41XYZ12", "shell",
                          "cd /data/local/tmp/slim-edge && LD_LIBRARY_PATH=/data/local/tmp/slim-edge/bin "
                          f"sh -c {shlex.quote(VMHWM_WRAPPER)} "
                          "slim-edge /data/local/tmp/slim-edge/bin/llama-bench -m models/m.gguf -t 2"]]
    assert (res.peak_rss_kb, res.peak_rss_method) == (2048, "VmHWM")


def test_cleanup_and_hash_command_lines():
    dev = Recorder(None)
    dev.remote_hashes(["models/a.gguf", "models/b c.gguf"])
    dev.cleanup()
    assert dev.lines == [
        ["adb", "shell", "sha256sum /data/local/tmp/slim-edge/models/a.gguf "
                         "'/data/local/tmp/slim-edge/models/b c.gguf' 2>/dev/null"],
        ["adb", "shell", "rm -rf /data/local/tmp/slim-edge"],
    ]


def test_probe_and_thermal_command_lines(captured):
    class Phone(Recorder):  # answers the thermal loop with the Motorola SM4375 capture
        def shell(self, command, *, timeout=None):
            res = super().shell(command, timeout=timeout)
            res.stdout = captured("thermal_moto_sm4375.txt") if command == THERMAL_COMMAND else ""
            return res

    dev = Phone("R58M41XYZ12")
    dev.info()
    probe = dev.lines[0][4]
    assert dev.lines[0][:4] == ["adb", "-s", "R58M41XYZ12", "shell"]
    assert "echo @@df; d=/data/local/tmp; while" in probe and f"echo @@thermal; {THERMAL_COMMAND}\n" in probe
    zones = dev.thermal()
    assert dev.lines[1] == ["adb", "-s", "R58M41XYZ12", "shell",
                            'for z in /sys/class/thermal/thermal_zone*; do [ -d "$z" ] || continue; '
                            'echo "${z##*thermal_zone} $(cat "$z/type" 2>/dev/null) $(cat "$z/temp" 2>/dev/null)"; done']
    assert len(zones) == 77 and zones["thermal_zone36 cpu-1-0-usr"] == 42.6


def test_push_skips_same_hash_and_pull(monkeypatch, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"on the phone already")
    b.write_bytes(b"new")
    local = []
    monkeypatch.setattr(android, "local_run", lambda argv, **kw: local.append(argv) or RunResult(argv, 0, "", ""))

    class Phone(Recorder):  # the phone holds a.gguf with the same sha256
        def shell(self, command, *, timeout=None):
            res = super().shell(command, timeout=timeout)
            if command.startswith("sha256sum"):
                res.stdout = f"{hashlib.sha256(a.read_bytes()).hexdigest()}  {WORKDIR}/models/a.gguf\n"
            return res

    dev = Phone("R58M41XYZ12")
    assert dev.push([a, b], subdir="models") == {"models/a.gguf": False, "models/b.gguf": True}
    dev.pull("results/b-t2.jsonl", tmp_path / "out.jsonl")
    assert [ln[4] for ln in dev.lines] == [
        "mkdir -p /data/local/tmp/slim-edge/models",
        "sha256sum /data/local/tmp/slim-edge/models/a.gguf /data/local/tmp/slim-edge/models/b.gguf 2>/dev/null"]
    assert local == [["adb", "-s", "R58M41XYZ12", "push", str(b), "/data/local/tmp/slim-edge/models/b.gguf"],
                     ["adb", "-s", "R58M41XYZ12", "pull", "/data/local/tmp/slim-edge/results/b-t2.jsonl",
                      str(tmp_path / "out.jsonl")]]


def test_choose_serial(captured):
    assert choose_serial("List of devices attached\nR58M41XYZ12\tdevice\n\n", None) == "R58M41XYZ12"
    assert choose_serial(captured("adb_devices_two.txt"), "emulator-5554") == "emulator-5554"
    with pytest.raises(SlimEdgeError, match="Pick one with --serial"):
        choose_serial(captured("adb_devices_two.txt"), None)
    with pytest.raises(SlimEdgeError, match="No Android device with serial 'XYZ'"):
        choose_serial(captured("adb_devices_two.txt"), "XYZ")
    with pytest.raises(SlimEdgeError, match="No Android device is attached"):
        choose_serial(captured("adb_devices_none.txt"), None)
    with pytest.raises(SlimEdgeError, match="R58M41XYZ12 is unauthorized.*Allow USB debugging"):
        choose_serial(captured("adb_devices_unauthorized.txt"), None)


def test_not_arm64_is_refused():
    with pytest.raises(SlimEdgeError, match="ro.product.cpu.abi='x86_64'.*arm64-v8a"):
        AndroidDevice("emulator-5554").check_info(DeviceInfo(device="android", arch="x86_64", abi="x86_64"))
    AndroidDevice("x").check_info(DeviceInfo(device="android", arch="aarch64", abi="arm64-v8a"))


def test_no_adb_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no adb anywhere
    with pytest.raises(SlimEdgeError, match="adb is not on PATH.*apt-get install adb"):
        get_device("android").check_connection()


def _fake_adb(tmp_path, output: str):
    script = tmp_path / "adb"
    script.write_text("#!/bin/sh\ncat <<'END'\n" + output + "END\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_unauthorized_phone(monkeypatch, tmp_path, captured):
    _fake_adb(tmp_path, captured("adb_devices_unauthorized.txt"))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    with pytest.raises(SlimEdgeError, match="R58M41XYZ12 is unauthorized"):
        get_device("android").check_connection()


def test_no_phone_attached(monkeypatch, tmp_path, captured):
    _fake_adb(tmp_path, captured("adb_devices_none.txt"))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    with pytest.raises(SlimEdgeError, match="No Android device is attached"):
        get_device("android", serial=None).check_connection()
