"""`--device ssh`: any Linux board (ARM64 or not) over ssh/scp (`--host user@addr`).

Always non-interactive (BatchMode): a missing key or an unknown host fails at once with a message
instead of waiting for a password prompt.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from slim_edge.errors import SlimEdgeError

from .base import Device, RunResult, local_run

ARCH_TO_TARGET = {"aarch64": "linux-arm64", "arm64": "linux-arm64", "x86_64": "host"}


def ssh_options(
    port: int, identity: str | None, strict: str = "accept-new", known_hosts: str | None = None
) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={strict}", "-o", "ConnectTimeout=15"]
    if known_hosts:
        opts += ["-o", f"UserKnownHostsFile={known_hosts}"]
    if identity:
        opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    return opts


def ssh_argv(
    host: str,
    command: str,
    *,
    port: int = 22,
    identity: str | None = None,
    strict: str = "accept-new",
    known_hosts: str | None = None,
) -> list[str]:
    return ["ssh", "-p", str(port), *ssh_options(port, identity, strict, known_hosts), host, command]


# scp's protocol flag: -s (SFTP: remote names are never seen by a shell; OpenSSH >= 8.7), -O (legacy)
SCP_FLAGS = {"sftp": ["-s"], "legacy": ["-O"], None: []}
SAFE_REMOTE = re.compile(r"[A-Za-z0-9._/-]+")


def scp_protocol(version_text: str) -> str | None:
    """ "sftp" when `ssh -V` names an OpenSSH whose scp has -s (8.7 and later), else None (its default)."""
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", version_text)
    return "sftp" if m and (int(m.group(1)), int(m.group(2))) >= (8, 7) else None


@functools.cache
def local_scp_protocol() -> str | None:
    try:
        return scp_protocol(subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr)
    except OSError:
        return None


def scp_to_argv(
    host: str,
    local: Path | str,
    remote: str,
    *,
    port: int = 22,
    identity: str | None = None,
    strict: str = "accept-new",
    known_hosts: str | None = None,
    protocol: str | None = None,
) -> list[str]:
    return [
        "scp",
        "-q",
        *SCP_FLAGS[protocol],
        "-P",
        str(port),
        *ssh_options(port, identity, strict, known_hosts),
        str(local),
        f"{host}:{remote}",
    ]


def scp_from_argv(
    host: str,
    remote: str,
    local: Path | str,
    *,
    port: int = 22,
    identity: str | None = None,
    strict: str = "accept-new",
    known_hosts: str | None = None,
    protocol: str | None = None,
) -> list[str]:
    return [
        "scp",
        "-q",
        *SCP_FLAGS[protocol],
        "-P",
        str(port),
        *ssh_options(port, identity, strict, known_hosts),
        f"{host}:{remote}",
        str(local),
    ]


def _check_remote(remote: str) -> str:
    """Remote paths are built from safe_name()s; anything else could run on the board under legacy scp."""
    if not SAFE_REMOTE.fullmatch(remote) or remote.startswith("-"):
        raise SlimEdgeError(
            f"remote path {remote!r} has characters a remote shell would interpret; slim-edge "
            f"copies only to names of [A-Za-z0-9._/-] (rename the file or the --workdir)"
        )
    return remote


class SshDevice(Device):
    name = "ssh"

    def __init__(
        self,
        host: str = "",
        port: int = 22,
        identity: str | None = None,
        *,
        strict_host_key_checking: str = "accept-new",
        known_hosts: str | None = None,
        workdir: str = "/tmp/slim-edge",
        scp_protocol: str | None = "auto",
    ):
        if not host:
            raise SlimEdgeError("--device ssh needs --host user@address (e.g. --host pi@192.168.1.20).")
        if not 1 <= port <= 65535:
            raise SlimEdgeError(f"--port {port}: an ssh port lies between 1 and 65535")
        if identity is not None and not Path(identity).expanduser().is_file():
            raise SlimEdgeError(f"--identity {identity}: no such key file; pass the private key the board accepts")
        self.host, self.port, self.identity = host, port, identity
        self.strict, self.known_hosts, self.workdir = strict_host_key_checking, known_hosts, workdir
        self.runtime_target = "linux-arm64"
        self.scp_protocol = local_scp_protocol() if scp_protocol == "auto" else scp_protocol

    def _kw(self) -> dict:
        return {"port": self.port, "identity": self.identity, "strict": self.strict, "known_hosts": self.known_hosts}

    def check_connection(self) -> None:
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise SlimEdgeError(f"{tool} is not on PATH. Install the Debian package openssh-client.")
        res = self.shell("uname -m", timeout=60)
        if res.returncode != 0:
            raise SlimEdgeError(
                f"Cannot run commands on {self.host} port {self.port} over ssh (exit {res.returncode}): "
                f"{res.stderr.strip()[-500:]}. Check --host, --port and --identity (a key the board accepts; "
                "password logins are not used)."
            )
        arch = res.stdout.strip()
        if arch not in ARCH_TO_TARGET:
            raise SlimEdgeError(
                f"{self.host} is a {arch!r} machine; slim-edge has runtimes for "
                f"{', '.join(sorted(ARCH_TO_TARGET))} only."
            )
        self.runtime_target = ARCH_TO_TARGET[arch]

    def shell(self, command: str, *, timeout: float | None = None) -> RunResult:
        return local_run(ssh_argv(self.host, command, **self._kw()), timeout=timeout)

    def copy_to(self, local: Path, remote: str) -> None:
        res = local_run(scp_to_argv(self.host, local, _check_remote(remote), **self._kw(), protocol=self.scp_protocol))
        if res.returncode != 0:
            raise SlimEdgeError(f"scp of {local} to {self.host}:{remote} failed: {res.stderr.strip()}")

    def copy_from(self, remote: str, local: Path) -> None:
        res = local_run(
            scp_from_argv(self.host, _check_remote(remote), local, **self._kw(), protocol=self.scp_protocol)
        )
        if res.returncode != 0:
            raise SlimEdgeError(f"scp of {self.host}:{remote} failed: {res.stderr.strip()}")

    def ensure_workdir(self) -> None:
        self.shell_ok(f"mkdir -p {shlex.quote(self.workdir)}")
