"""The adb command lines the android backend builds, and its errors (no adb, no phone, unauthorized)."""

import hashlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import time

import pytest

from slim_edge.devices import android, get_device, parse
from slim_edge.devices.android import (
    WORKDIR,
    AndroidDevice,
    adb_devices_argv,
    adb_pull_argv,
    adb_push_argv,
    adb_shell_argv,
    check_arm64,
    choose_serial,
    with_exit_status,
)
from slim_edge.devices.base import THERMAL_COMMAND, VMHWM_WRAPPER, DeviceInfo, RunResult
from slim_edge.errors import SlimEdgeError


def test_adb_argv():
    assert adb_devices_argv() == ["adb", "devices"]
    assert adb_shell_argv(None, "getprop") == ["adb", "shell", "getprop"]
    assert adb_shell_argv("R58M41XYZ12", "uname -m") == ["adb", "-s", "R58M41XYZ12", "shell", "uname -m"]
    assert adb_push_argv("R58M41XYZ12", "/tmp/m.gguf", f"{WORKDIR}/models/m.gguf") == [
        "adb",
        "-s",
        "R58M41XYZ12",
        "push",
        "/tmp/m.gguf",
        "/data/local/tmp/slim-edge/models/m.gguf",
    ]
    assert adb_pull_argv(None, f"{WORKDIR}/out.json", "/tmp/out.json") == [
        "adb",
        "pull",
        "/data/local/tmp/slim-edge/out.json",
        "/tmp/out.json",
    ]


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
    res = dev.run_measured(
        ["/data/local/tmp/slim-edge/bin/llama-bench", "-m", "models/m.gguf", "-t", "2"],
        env={"LD_LIBRARY_PATH": "/data/local/tmp/slim-edge/bin"},
    )
    assert dev.lines == [
        [
            "adb",
            "-s",
            "R58M41XYZ12",
            "shell",
            "cd /data/local/tmp/slim-edge && LD_LIBRARY_PATH=/data/local/tmp/slim-edge/bin "
            f"sh -c {shlex.quote(VMHWM_WRAPPER)} "
            "slim-edge /data/local/tmp/slim-edge/bin/llama-bench -m models/m.gguf -t 2",
        ]
    ]
    assert (res.peak_rss_kb, res.peak_rss_method) == (2048, "VmHWM")


def test_cleanup_and_hash_command_lines():
    dev = Recorder(None)
    dev.remote_hashes(["models/a.gguf", "models/b c.gguf"])
    dev.cleanup()
    assert dev.lines == [
        [
            "adb",
            "shell",
            "sha256sum /data/local/tmp/slim-edge/models/a.gguf '/data/local/tmp/slim-edge/models/b c.gguf' 2>/dev/null",
        ],
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
    assert dev.lines[1] == [
        "adb",
        "-s",
        "R58M41XYZ12",
        "shell",
        'for z in /sys/class/thermal/thermal_zone*; do [ -d "$z" ] || continue; '
        'echo "${z##*thermal_zone} $(cat "$z/type" 2>/dev/null) '
        '$(cat "$z/temp" 2>/dev/null)"; done',
    ]
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
        "sha256sum /data/local/tmp/slim-edge/models/a.gguf /data/local/tmp/slim-edge/models/b.gguf 2>/dev/null",
    ]
    assert local == [
        ["adb", "-s", "R58M41XYZ12", "push", str(b), "/data/local/tmp/slim-edge/models/b.gguf"],
        [
            "adb",
            "-s",
            "R58M41XYZ12",
            "pull",
            "/data/local/tmp/slim-edge/results/b-t2.jsonl",
            str(tmp_path / "out.jsonl"),
        ],
    ]


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
    with pytest.raises(SlimEdgeError, match="x86 phone or emulator image.*'x86_64'.*--device qemu-arm64"):
        AndroidDevice("emulator-5554").check_info(DeviceInfo(device="android", arch="x86_64", abi="x86_64"))
    with pytest.raises(SlimEdgeError, match="ro.product.cpu.abi='x86'.*arm64-v8a"):  # uname printed nothing
        AndroidDevice("emulator-5554").check_info(DeviceInfo(device="android", arch="unknown", abi="x86"))
    AndroidDevice("x").check_info(DeviceInfo(device="android", arch="aarch64", abi="arm64-v8a"))


def test_arm64_check_on_captured_getprop(captured):
    for name in ("getprop_sm8650_oneplus12.txt", "getprop_mt6895_realme_gt_neo3.txt"):
        abi = parse.parse_getprop(captured(name))["ro.product.cpu.abi"]
        assert check_arm64("R58M41XYZ12", abi, "aarch64") == []


def test_arm64_check_32bit_cases_synthetic():
    """Synthetic (abi, uname -m) pairs: the kernel decides, the userland only matters to the NDK build."""
    # 32-bit kernel, whatever the CPU: nothing arm64 can run
    with pytest.raises(
        SlimEdgeError,
        match=r"32-bit ARM kernel \(uname -m 'armv7l', ro.product.cpu.abi "
        r"'armeabi-v7a'\).*CPU itself is 64-bit.*static arm64 build of the "
        r"runtime cannot run there.*arm64-v8a",
    ):
        check_arm64("R58M41XYZ12", "armeabi-v7a", "armv7l")
    # 32-bit Android on a 64-bit kernel (its shell reads armv8l; some kernels say aarch64): the static build runs
    for machine in ("armv8l", "aarch64"):
        (note,) = check_arm64("R58M41XYZ12", "armeabi-v7a", machine)
        assert note.startswith(f"32-bit Android on a 64-bit kernel (uname -m {machine!r}")
        with pytest.raises(SlimEdgeError, match="NDK build.*linker64.*Unset ANDROID_NDK"):
            check_arm64("R58M41XYZ12", "armeabi-v7a", machine, static=False)
    assert check_arm64("R58M41XYZ12", "arm64-v8a", "armv8l") == []  # a 64-bit Android under linux32
    info = DeviceInfo(device="android", arch="armv8l", abi="armeabi-v7a")
    AndroidDevice("R58M41XYZ12").check_info(info)
    assert info.notes and "static arm64 runtime runs" in info.notes[0]
    with pytest.raises(SlimEdgeError, match="reports uname -m 'mips'"):
        check_arm64(None, "", "mips")


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


# -- the remote exit status ---------------------------------------------------------------------
CASES = [  # command, its stdout, its exit status
    ("true", "", 0),
    ("false", "", 1),
    ("echo out; echo err >&2; exit 3", "out\n", 3),  # an exit inside the command still reports
    ("printf abc", "abc", 0),  # no final newline: kept exactly
    ("ls /nonexistent-slim-edge-dir >/dev/null 2>&1", "", 2),
    ("echo one\necho two # a comment ends the command", "one\ntwo\n", 0),
    ("sh -c 'kill -TERM $$'", "", 143),
]


@pytest.mark.parametrize("shell", ["sh", "mksh"])
def test_exit_status_through_real_shells(shell):
    """with_exit_status run by a real shell here; mksh is Android's /system/bin/sh."""
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell} (Debian package {shell})")
    for command, out, status in CASES:
        p = subprocess.run([shell, "-c", with_exit_status(command)], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0
        assert parse.split_exit_status(p.stdout) == (out, status), command


def test_split_exit_status_pty_and_missing():
    # legacy adb runs the command on a pty: CRLF line ends, stderr mixed into stdout
    assert parse.split_exit_status("out\r\nerr\r\n\r\n__slim_rc=3\r\n") == ("out\r\nerr\r\n", 3)
    assert parse.split_exit_status("partial output\n") == ("partial output\n", None)
    assert parse.split_exit_status("") == ("", None)


def _legacy_adb(tmp_path, body: str):
    """A synthetic stand-in for adb without shell_v2: runs `adb [-s S] shell CMD` here on a pty-like
    stream (stderr into stdout, CRLF line ends) and exits 0 whatever CMD did, as old adb does."""
    sh = shutil.which("mksh") or "sh"
    script = tmp_path / "adb"
    script.write_text(f"""#!/bin/sh
[ "$1" = -s ] && shift 2
[ "$1" = shell ] || exit 1
{body.replace("SH", sh)}
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_failing_command_over_legacy_adb_is_a_failure(monkeypatch, tmp_path):
    _legacy_adb(tmp_path, "SH -c \"$2\" 2>&1 | sed 's/$/\\r/'")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    dev = AndroidDevice("R58M41XYZ12")
    res = dev.shell("echo hello; exit 5")
    assert (res.returncode, res.stdout) == (5, "hello\n")  # local_run reads text: CRLF becomes \n
    assert dev.shell("echo fine").returncode == 0
    # the error names the command and what it printed (on stdout there, stderr being merged into it)
    with pytest.raises(SlimEdgeError, match=r"exit code 2: ls /nonexistent-slim-edge\nls: .*/nonexistent-slim-edge"):
        dev.shell_ok("ls /nonexistent-slim-edge")
    # the VmHWM poller's line arrives on stdout there too
    dev.workdir = str(tmp_path)
    res = dev.run_measured(["python3", "-c", "x = bytearray(60_000_000); import time; time.sleep(0.6)"])
    assert res.returncode == 0 and res.peak_rss_method == "VmHWM" and res.peak_rss_kb > 55_000


def test_lost_exit_status_is_a_failure(monkeypatch, tmp_path):
    _legacy_adb(tmp_path, "echo 'partial output'")  # the connection drops before the command ends
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    res = AndroidDevice("R58M41XYZ12").shell("sleep 100; echo done")
    assert res.returncode == 255 and res.stdout == "partial output\n"
    assert "did not run to its end on Android device R58M41XYZ12: adb exited with 0" in res.stderr


@pytest.fixture
def real_adb(monkeypatch):
    """The real adb, talking to its own server on a free port, run in the foreground (so it is stopped
    and reaped here); skips where a phone is attached (the tests below are about having none)."""
    if shutil.which("adb") is None:
        pytest.skip("needs adb (Debian package adb)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["adb", "-P", str(port), "nodaemon", "server"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, "adb nodaemon server exited"
                time.sleep(0.1)
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
        devices = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=60)
        if parse.parse_adb_devices(devices.stdout):
            pytest.skip("a phone is attached to this machine's adb")
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_real_adb_without_a_phone(real_adb):
    with pytest.raises(SlimEdgeError, match="No Android device is attached.*USB debugging"):
        AndroidDevice().check_connection()
    res = AndroidDevice("R58M41XYZ12").shell("true")
    assert res.returncode == 1
    assert "device 'R58M41XYZ12' not found" in res.stderr
    assert "did not run to its end on Android device R58M41XYZ12: adb exited with 1" in res.stderr
    with pytest.raises(
        SlimEdgeError,
        match="(?s)exit code 1: mkdir -p /data/local/tmp/slim-edge.*"
        "device 'R58M41XYZ12' not found.*Check `adb devices`",
    ):
        AndroidDevice("R58M41XYZ12").ensure_workdir()


def test_runtime_that_does_not_start_is_refused(monkeypatch, tmp_path):
    """A phone whose kernel cannot run arm64 code: mksh's words for it, exit 126 (synthetic reply)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-bench").write_bytes(b"\x7fELF")
    monkeypatch.setattr(android, "local_run", lambda argv, **kw: RunResult(argv, 0, "", ""))

    class Phone(Recorder):
        def runtime_dirs(self, tools=None):
            return tmp_path / "bin", tmp_path / "lib"

        def shell(self, command, *, timeout=None):
            res = super().shell(command, timeout=timeout)
            if command.endswith("--help >/dev/null"):
                res.returncode = 126
                res.stderr = (
                    "/system/bin/sh: /data/local/tmp/slim-edge/bin/llama-bench: not executable: 64-bit ELF file\n"
                )
            return res

    with pytest.raises(
        SlimEdgeError,
        match="llama-bench does not start on Android device R58M41XYZ12 \\(exit 126\\)"
        ".*64-bit ELF file.*cannot run arm64 programs",
    ):
        Phone("R58M41XYZ12").stage_runtime()
    ok = Recorder("R58M41XYZ12")
    ok.runtime_dirs = lambda tools=None: (tmp_path / "bin", tmp_path / "lib")
    assert ok.stage_runtime() == ({"llama-bench": f"{WORKDIR}/bin/llama-bench"}, {})
    assert ok.lines[-1][4] == f"{WORKDIR}/bin/llama-bench --help >/dev/null"
