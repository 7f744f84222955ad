"""`--device qemu-arm64`: the static aarch64 runtime under `qemu-aarch64 -cpu cortex-a76` here.

For correctness only: emulation runs 70-100x slower than native, so every figure it produces is
labelled "emulated, not a speed figure" wherever it appears.
"""

from __future__ import annotations

import shutil

from slim_edge.errors import SlimEdgeError

from .host import HostDevice, run_with_rusage

EMULATED_LABEL = "emulated, not a speed figure"

# What the qemu cortex-a76 model advertises to the guest (Armv8.2-A with dotprod, no i8mm/SVE).
CORTEX_A76_FEATURES = ["asimd", "asimddp", "asimdhp"]


def qemu_argv(argv: list[str], cpu: str = "cortex-a76", qemu: str = "qemu-aarch64") -> list[str]:
    return [qemu, "-cpu", cpu, *argv]


class QemuArm64Device(HostDevice):
    name = "qemu-arm64"
    runtime_target = "linux-arm64"
    emulated = True

    def __init__(self, workdir: str | None = None, cpu: str = "cortex-a76"):
        super().__init__(workdir)
        self.cpu = cpu

    def check_connection(self) -> None:
        if shutil.which("qemu-aarch64") is None:
            raise SlimEdgeError(
                "qemu-aarch64 is not on PATH. Install the Debian package qemu-user (apt-get install qemu-user)."
            )

    def info(self):
        info = super().info()
        info.device = self.name
        info.arch = f"aarch64 (qemu-aarch64 -cpu {self.cpu} on {info.arch})"
        info.soc = f"qemu {self.cpu} model"
        info.cpu_features = list(CORTEX_A76_FEATURES) if self.cpu == "cortex-a76" else []
        info.cpu_features_of_interest = list(info.cpu_features)
        info.max_freqs_khz, info.big_cores, info.thermal_c = {}, [], {}
        info.emulated = True
        info.notes.append(EMULATED_LABEL)
        return info

    def stage_runtime(self, tools=("llama-bench",)):
        paths, _ = super().stage_runtime(tools)
        return paths, {}

    def run_measured(self, argv, *, env=None, timeout=None, use_gnu_time=False, stdout_file=None):
        res = run_with_rusage(qemu_argv(argv, self.cpu), env=env, cwd=self.workdir, timeout=timeout)
        if res.peak_rss_method:
            res.peak_rss_method += " of the qemu process"
        return res
