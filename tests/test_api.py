"""The public Python API (slim_edge.quantize_ / QuantConfig / load_quantized / export_gguf) does what the CLI does."""

import subprocess
import sys

import pytest
import torch

import slim_edge
from gguf_checks import check_bit_exact
from tiny_models import make_tiny_smol


def test_api_quantize_load_export_equal_the_cli(tmp_path, tiny_text):
    folder = make_tiny_smol(tmp_path / "m", layers=1)
    config = slim_edge.QuantConfig(scheme="seq2", steps=1, batch_size=1, seq_len=32, calib=str(tiny_text))
    report = slim_edge.quantize_(str(folder), config, tmp_path / "ckpt", progress=False)
    assert report["training"]["steps_done"] == 1
    model, _ = slim_edge.load_quantized(tmp_path / "ckpt")
    slim_edge.export_gguf(tmp_path / "ckpt", tmp_path / "api.gguf")
    weights = {
        n: (m.weight.detach().numpy(), None if m.bias is None else m.bias.detach().numpy())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    assert check_bit_exact(tmp_path / "ckpt", tmp_path / "api.gguf", weights) > 0
    subprocess.run(
        [sys.executable, "-m", "slim_edge.cli", "export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "cli.gguf")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "api.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()


def test_api_errors_are_clear():
    from slim_edge.errors import SlimEdgeError

    with pytest.raises(SlimEdgeError, match="give the checkpoint folder"):
        slim_edge.quantize_("smollm2-135m")
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        slim_edge.quantise  # noqa: B018
    assert set(slim_edge.__all__) >= {"QuantConfig", "quantize_", "load_quantized", "export_gguf"}
