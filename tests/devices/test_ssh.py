"""The ssh backend: its command lines, and end to end against a real sshd on localhost."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from slim_edge.devices.base import safe_name
from slim_edge.devices.ssh import SshDevice, scp_from_argv, scp_protocol, scp_to_argv, ssh_argv
from slim_edge.errors import SlimEdgeError

OPTS = [
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=yes",
    "-o",
    "ConnectTimeout=15",
    "-o",
    "UserKnownHostsFile=/k/known_hosts",
    "-i",
    "/k/id",
    "-o",
    "IdentitiesOnly=yes",
]


def test_ssh_argv():
    kw = {"port": 2222, "identity": "/k/id", "strict": "yes", "known_hosts": "/k/known_hosts"}
    assert ssh_argv("pi@10.0.0.2", "uname -m", **kw) == ["ssh", "-p", "2222", *OPTS, "pi@10.0.0.2", "uname -m"]
    assert scp_to_argv("pi@10.0.0.2", "/m/a.gguf", "/tmp/slim-edge/models/a.gguf", **kw) == [
        "scp",
        "-q",
        "-P",
        "2222",
        *OPTS,
        "/m/a.gguf",
        "pi@10.0.0.2:/tmp/slim-edge/models/a.gguf",
    ]
    assert scp_from_argv("pi@10.0.0.2", "/tmp/slim-edge/x", "/tmp/x", **kw) == [
        "scp",
        "-q",
        "-P",
        "2222",
        *OPTS,
        "pi@10.0.0.2:/tmp/slim-edge/x",
        "/tmp/x",
    ]
    assert ssh_argv("b", "true") == [
        "ssh",
        "-p",
        "22",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "ConnectTimeout=15",
        "b",
        "true",
    ]


def test_scp_protocol_and_safe_names():
    assert scp_protocol("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19 27 Jan 2026") == "sftp"
    assert scp_protocol("OpenSSH_8.7p1, OpenSSL 1.1.1k") == "sftp"
    assert scp_protocol("OpenSSH_8.4p1 Debian-5+deb11u3, OpenSSL 1.1.1w") is None  # no -s before 8.7
    assert scp_to_argv("b", "/m/a", "/r/a", protocol="sftp")[:3] == ["scp", "-q", "-s"]
    assert scp_from_argv("b", "/r/a", "/m/a", protocol="legacy")[:3] == ["scp", "-q", "-O"]
    assert safe_name("model-q4_0.gguf") == "model-q4_0.gguf"
    assert (
        safe_name("$(touch X).gguf")
        == "touch_X-" + __import__("hashlib").sha256(b"$(touch X).gguf").hexdigest()[:8] + ".gguf"
    )
    assert safe_name("a b.gguf") != safe_name("a;b.gguf") and safe_name("-rf") != "-rf"


def test_unsafe_remote_paths_are_refused(tmp_path):
    dev = SshDevice("pi@10.0.0.2", scp_protocol="legacy")
    with pytest.raises(SlimEdgeError, match=r"remote path '/tmp/\$\(id\).gguf' has characters a remote shell"):
        dev.copy_to(tmp_path / "x", "/tmp/$(id).gguf")


def test_host_is_required():
    with pytest.raises(SlimEdgeError, match="--host user@address"):
        SshDevice("")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 accepting one throwaway key; yields SshDevice keyword arguments."""
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("needs root and the Debian package openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = _free_port()
    sftp = next(
        (p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server") if Path(p).exists()),
        "internal-sftp",
    )
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"Subsystem sftp {sftp}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {proc.stdout.read()}")
            time.sleep(0.1)
    yield {
        "host": "root@127.0.0.1",
        "port": port,
        "identity": str(d / "id"),
        "strict_host_key_checking": "yes",
        "known_hosts": str(d / "known_hosts"),
        "workdir": str(d / "board" / "slim-edge"),
    }
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.sshd
def test_device_flow_over_real_sshd(sshd, tmp_path):
    dev = SshDevice(**sshd)
    dev.check_connection()
    assert dev.runtime_target == "host"  # the "board" is this x86-64 machine
    info = dev.info()
    assert info.arch == "x86_64" and info.mem_available_kb > 0 and info.storage_available_kb > 0
    dev.ensure_workdir()
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(4096))
    assert dev.push([a], subdir="models") == {"models/a.bin": True}
    assert dev.push([a], subdir="models") == {"models/a.bin": False}  # same sha256 on the board: skipped
    a.write_bytes(os.urandom(4096))
    assert dev.push([a], subdir="models") == {"models/a.bin": True}
    back = dev.pull("models/a.bin", tmp_path / "back.bin")
    assert back.read_bytes() == a.read_bytes()
    res = dev.run_measured(["python3", "-c", "x = bytearray(150_000_000); import time; time.sleep(0.6)"])
    assert res.returncode == 0 and res.peak_rss_kb > 140_000
    assert res.peak_rss_method in ("GNU time -v", "VmHWM")
    dev.cleanup()
    assert not Path(sshd["workdir"]).exists()


@pytest.mark.sshd
def test_hostile_file_name_over_legacy_scp_runs_nothing(sshd, tmp_path):
    """scp -O (the legacy protocol, the default before OpenSSH 9.0) hands the remote path to the board's
    shell: `$(touch NAME).gguf` would run `touch`. The file arrives under a safe name, byte for byte."""
    marker = f"pwned-{os.getpid()}-{time.time_ns()}"
    hostile = tmp_path / f"$(touch {marker}).gguf"
    hostile.write_bytes(os.urandom(2048))
    dev = SshDevice(**sshd, scp_protocol="legacy")
    dev.ensure_workdir()
    staged = dev.stage([hostile], subdir="models")
    remote = Path(staged[hostile])
    try:
        assert not (Path.home() / marker).exists() and not list(Path("/").glob(f"*/{marker}"))
        assert remote.name == safe_name(hostile.name) and remote.read_bytes() == hostile.read_bytes()
        assert dev.push([hostile], subdir="models") == {f"models/{remote.name}": False}  # hash match on the board
    finally:
        (Path.home() / marker).unlink(missing_ok=True)
        dev.cleanup()


@pytest.mark.sshd
def test_wrong_key_is_a_clear_error(sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    dev = SshDevice(**{**sshd, "identity": str(tmp_path / "other")})
    with pytest.raises(SlimEdgeError, match="Cannot run commands on root@127.0.0.1.*--identity"):
        dev.check_connection()


@pytest.mark.sshd
@pytest.mark.runtime
def test_bench_end_to_end_over_ssh(sshd, tmp_path):
    from slim_edge.evals.bench import BenchConfig, run_bench
    from slim_edge.evals.tiny_gguf import tiny_models
    from slim_edge.runtime_patches.runtime import ensure_runtime

    ensure_runtime("host")
    models = tiny_models(tmp_path, ("q4_0",))
    dev = SshDevice(**sshd)
    cfg = BenchConfig(prompt_lengths=[16, 32], n_gen=8, threads=[1], repetitions=2)
    result = run_bench([models["q4_0"]], dev, cfg, progress=False)
    (m,) = result.models
    assert [e["n_prompt"] for e in m.prefill] == [16, 32]
    assert all(e["tps_mean"] > 0 and len(e["samples_ns"]) == 2 and e["ttft_ms_mean"] > 0 for e in m.prefill)
    assert m.decode[0]["n_gen"] == 8 and m.decode[0]["tps_mean"] > 0
    assert m.peak_rss_kb > 1000 and m.peak_rss_method in ("GNU time -v", "VmHWM")
    assert result.runtime["build_commit"]
    # second run: runtime and model are already on the board (hash match), nothing is copied again
    assert dev.push([models["q4_0"]], subdir="models") == {"models/tiny-q4_0.gguf": False}
    dev.cleanup()
