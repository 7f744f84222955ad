"""export --gguf: the GGUF holds exactly the trained codes; inspect; clean errors."""
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from slim_edge.checkpoint import dequantized_weights, read_meta
from slim_edge.converters.gguf_export import export_checkpoint
from slim_edge.converters.gguf_types import tensor_bytes
from slim_edge.converters.inspect import inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import get_format
from slim_edge.models import resolve
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig

from tiny_models import make_tiny_model

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    """A tiny random llama with SmolLM2's real tokenizer (the converter must recognise it)."""
    folder = make_tiny_model(tmp_path_factory.mktemp("smol") / "m", "llama", layers=1, vocab=49152)
    base = resolve("smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            shutil.copy2(base / f, folder / f)
    return folder


def _gguf_name(hf: str) -> str:
    parts = hf.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}.weight"


@pytest.mark.parametrize("scheme", ["seq2", "sherry", "tequila", "ternary", "q2"])
def test_export_is_bit_exact(scheme, tiny_smol, tiny_text, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_quantize(str(tiny_smol), QuantConfig(scheme=scheme, steps=2, batch_size=1, seq_len=32, calib=str(tiny_text)),
                 ckpt, progress=False)
    out = tmp_path / "m.gguf"
    summary = export_checkpoint(ckpt, out)
    meta = read_meta(ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    deq = dequantized_weights(meta, tensors)
    for e in meta["plan"]:
        fmt = get_format(e["format"])
        type_id, shape, raw = tensor_bytes(out, _gguf_name(e["name"]))
        assert type_id == fmt.type_id and shape == (e["shape"][1], e["shape"][0])
        ours = tensors[e["name"] + ".qweight"].numpy()
        got = raw.reshape(ours.shape)
        # same blocks, rows possibly in rope order: match every GGUF row to a checkpoint row, bit for bit
        rows = {r.tobytes(): i for i, r in enumerate(ours)}
        order = [rows[r.tobytes()] for r in got]
        assert sorted(order) == list(range(len(ours)))
        assert np.array_equal(fmt.dequantize(got, e["shape"][1]), deq[e["name"]].numpy()[order])
    if scheme == "tequila":
        assert any(n.endswith(".bias") for n in summary["types"])
    info = inspect_gguf(out, "stock")
    custom = {"seq2": True, "sherry": True}.get(scheme, False)
    assert info["loads"] is (not custom)
    assert summary["needs_patched_runtime"] is custom
    assert inspect_gguf(out, "patched")["loads"]


def test_export_refuses_to_overwrite(tiny_smol, tiny_text, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_quantize(str(tiny_smol), QuantConfig(scheme="q2", steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
                 ckpt, progress=False)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SlimEdgeError, match="already exists.*--force"):
        export_checkpoint(ckpt, out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SlimEdgeError, match="must end in .gguf"):
        export_checkpoint(ckpt, tmp_path / "m.bin")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SlimEdgeError, match="missing or corrupt"):
        export_checkpoint(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(SlimEdgeError, match="not a slim-edge checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "y.gguf")


@pytest.mark.runtime
def test_stock_type_export_runs_in_unpatched_bindings(tiny_smol, tiny_text, tmp_path):
    """ternary -> TQ2_0 + Q2_0: the stock llama-cpp-python 0.3.36 library (no LLAMA_CPP_LIB_PATH) loads it."""
    import json
    import os
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    run_quantize(str(tiny_smol), QuantConfig(scheme="ternary", steps=0, batch_size=1, seq_len=32,
                                             calib=str(tiny_text)), ckpt, progress=False)
    out = tmp_path / "t.gguf"
    assert export_checkpoint(ckpt, out)["needs_patched_runtime"] is False
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    code = ("import json, sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
            "toks = llm.tokenize(b'The capital of France is'); "
            "out = [int(t) for t, _ in zip(llm.generate(toks, temp=0.0, reset=True), range(8))]; "
            "print(json.dumps({'n': len(out), 'vocab': llm.n_vocab()}))")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n"] == 8 and r["vocab"] == 49152
