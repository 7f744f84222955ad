"""ckpt_parts: a checkpoint split into small parts and joined again is the same checkpoint."""

import torch
from safetensors.torch import load_file

from slim_edge.checkpoint import load_quantized
from slim_edge.evals.lab.ckpt_parts import pack, unpack
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig


def test_pack_unpack_roundtrip(tiny_llama, tiny_text, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_quantize(
        str(tiny_llama),
        QuantConfig(scheme="sherry", steps=2, batch_size=2, seq_len=32, calib=str(tiny_text)),
        ckpt,
        progress=False,
    )
    pack(ckpt, tmp_path / "parts", part_mb=0.15)
    parts = sorted((tmp_path / "parts").glob("part*.safetensors"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 0.15 * (1 << 20) for p in parts)
    assert not any("embed" in k for p in parts for k in load_file(str(p)))
    unpack(tmp_path / "parts", tmp_path / "joined", model=str(tiny_llama))
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "joined" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(load_quantized(ckpt)[0](x).logits, load_quantized(tmp_path / "joined")[0](x).logits)
