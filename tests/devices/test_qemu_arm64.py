"""`--device qemu-arm64` end to end: the static aarch64 runtime under qemu-aarch64 -cpu cortex-a76."""

import json
import shutil

import pytest

from slim_edge.devices import get_device
from slim_edge.devices.qemu_arm64 import EMULATED_LABEL, qemu_argv
from slim_edge.errors import SlimEdgeError


def test_qemu_argv():
    assert qemu_argv(["/rt/bin/llama-bench", "-m", "m.gguf"]) == [
        "qemu-aarch64",
        "-cpu",
        "cortex-a76",
        "/rt/bin/llama-bench",
        "-m",
        "m.gguf",
    ]


def test_missing_qemu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlimEdgeError, match="qemu-aarch64 is not on PATH.*qemu-user"):
        get_device("qemu-arm64").check_connection()


@pytest.mark.cross
@pytest.mark.runtime
def test_bench_under_qemu_is_labelled_emulated(tmp_path):
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("needs qemu-aarch64 (Debian package qemu-user)")
    from slim_edge.evals.bench import BenchConfig, run_bench, write_results
    from slim_edge.evals.tiny_gguf import tiny_models
    from slim_edge.runtime_patches.runtime import DEVICE_TOOLS, ensure_runtime

    ensure_runtime("linux-arm64", tools=DEVICE_TOOLS)  # what a device bench needs (no llama-cli)
    models = tiny_models(tmp_path / "m", ("q4_0",))
    cfg = BenchConfig(prompt_lengths=[16], n_gen=8, threads=[1], repetitions=1)
    result = run_bench([models["q4_0"]], "qemu-arm64", cfg, progress=False)
    assert result.emulated
    (m,) = result.models
    assert m.prefill[0]["n_prompt"] == 16 and m.prefill[0]["tps_mean"] > 0
    assert m.decode[0]["n_gen"] == 8 and m.decode[0]["tps_mean"] > 0
    assert m.peak_rss_method == "VmHWM of the qemu process"
    files = write_results(result, tmp_path / "out")
    table = files["bench.md"].read_text()
    assert table.startswith(f"**{EMULATED_LABEL}**")
    assert all(EMULATED_LABEL in row for row in table.splitlines() if row.startswith("| tiny-q4_0"))
    data = json.loads(files["bench.json"].read_text())
    assert data["label"] == EMULATED_LABEL and data["device"]["emulated"] is True
    assert all(mm["label"] == EMULATED_LABEL for mm in data["models"])
    assert "asimddp" in data["device"]["cpu_features_of_interest"]
    from PIL import Image

    for name in ("ttft.png", "decode.png"):
        assert Image.open(files[name]).text["Description"] == EMULATED_LABEL
