"""export --gguf: the GGUF holds exactly the trained codes; its metadata; inspect; clean errors."""

import json
import struct

import pytest
from typer.testing import CliRunner

from gguf_checks import GGUF_NAMES, check_bit_exact
from slim_edge.checkpoint import read_meta
from slim_edge.cli import app
from slim_edge.converters.gguf_export import (
    EXPORT_FORMAT_VERSION,
    export_checkpoint,
    llama_quantize,
    llama_quantize_argv,
)
from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.inspect import inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import get_format
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig
from tiny_models import make_tiny_smol, quantized_exports


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    return make_tiny_smol(tmp_path_factory.mktemp("smol") / "m", layers=1)


@pytest.fixture(scope="module")
def tiny_exports(tiny_smol, tiny_text, tmp_path_factory):
    """scheme -> (checkpoint, GGUF, export summary) after 2 QAT steps on the tiny model, made on first use."""
    return quantized_exports(tmp_path_factory, tiny_smol, tiny_text, 2, "m.gguf", export_checkpoint)


@pytest.mark.parametrize("scheme", ["seq2", "sherry", "tequila", "ternary", "q2"])
def test_export_is_bit_exact(scheme, tiny_exports):
    ckpt, out, summary = tiny_exports(scheme)
    assert check_bit_exact(ckpt, out) == 7
    if scheme == "tequila":
        assert any(n.endswith(".bias") for n in summary["types"])
    info = inspect_gguf(out, "stock")
    custom = {"seq2": True, "sherry": True}.get(scheme, False)
    assert info["loads"] is (not custom)
    assert summary["needs_patched_runtime"] is custom
    assert inspect_gguf(out, "patched")["loads"]


def test_export_says_what_runtime_roundings_the_model_was_trained_through(tiny_smol, tiny_text, tmp_path):
    from slim_edge.converters.model_card import write_card

    config = QuantConfig(
        scheme="sherry", steps=1, batch_size=1, seq_len=32, calib=str(tiny_text), act_quant=True, runtime_attention=True
    )
    run_quantize(str(tiny_smol), config, tmp_path / "ckpt", progress=False)
    summary = export_checkpoint(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["trained_for"] == {"act_quant": True, "runtime_attention": True}
    meta = read_tensor_table(tmp_path / "m.gguf", metadata=True).metadata
    assert json.loads(meta["slim_edge.trained_for"]) == summary["trained_for"]
    card = write_card(tmp_path / "m.gguf", summary, "ckpt").read_text()
    assert "keep llama.cpp's default F16 KV cache" in card


@pytest.mark.parametrize("scheme,type_id", [("seq2", 44), ("sherry", 43), ("q2", 42)])
def test_metadata_of_custom_ids_reads_back(scheme, type_id, tiny_exports, tiny_smol, tmp_path):
    """slim-edge's reader gives the metadata that export wrote, where gguf-py 0.19.0 refuses the file."""
    import gguf

    ckpt, out, summary = tiny_exports(scheme)
    table = read_tensor_table(out, metadata=True)
    assert {t.type_id for t in table.tensors if t.name.endswith("ffn_down.weight")} == {type_id}
    if type_id != 42:  # PyPI gguf 0.19.0 knows neither 43 nor 44
        with pytest.raises(Exception):
            gguf.GGUFReader(out)
    meta, ckpt_meta = table.metadata, read_meta(ckpt)
    assert meta["general.architecture"] == "llama"
    assert meta["slim_edge.export_format_version"] == EXPORT_FORMAT_VERSION
    assert meta["slim_edge.scheme"] == scheme
    assert json.loads(meta["slim_edge.plan"]) == ckpt_meta["plan"]
    used = set(summary["types"].values()) - {"f32"}
    assert json.loads(meta["slim_edge.type_ids"]) == {f: get_format(f).type_id for f in used}
    assert json.loads(meta["slim_edge.training"])["steps"] == 2
    assert json.loads(meta["slim_edge.trained_for"]) == {"act_quant": False, "runtime_attention": False}
    assert meta["slim_edge.runtime"].startswith("slim-edge patched" if type_id != 42 else "stock")
    assert table.kv_types["slim_edge.export_format_version"] == "uint32"
    vocab = json.loads((tiny_smol / "tokenizer.json").read_text())["model"]
    assert meta["llama.vocab_size"] == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert table.kv_types["tokenizer.ggml.tokens"] == "array[string]"
    assert len(meta["tokenizer.ggml.token_type"]) == 49152
    assert len(meta["tokenizer.ggml.merges"]) == len(vocab["merges"])
    by_id = {i: tok for tok, i in vocab["vocab"].items()}
    assert all(meta["tokenizer.ggml.tokens"][i] == by_id[i] for i in (0, 1, 2, 100, 49151))
    # every key and value, against gguf-py on a copy of the header that declares no tensors
    header = bytearray(out.read_bytes()[: table.info_start])
    struct.pack_into("<Q", header, 8, 0)
    (tmp_path / "header.gguf").write_bytes(header)
    fields = {
        f.name: f for f in gguf.GGUFReader(tmp_path / "header.gguf").fields.values() if not f.name.startswith("GGUF.")
    }
    assert list(fields) == list(meta)
    assert all(fields[k].contents() == v for k, v in meta.items())
    # named after the base model's folder, as the converter names a baseline (not the export's temp folder)
    assert meta["general.name"].replace(" ", "-").lower() == tiny_smol.name.lower(), meta["general.name"]
    assert inspect_gguf(out, "patched")["metadata"]["slim_edge.scheme"] == scheme


@pytest.mark.slow
def test_export_says_when_the_embedding_type_is_not_exact(smol_ptq, tmp_path):
    """An embedding type that cannot hold the checkpoint's embedding is exported, with a note naming one that can."""
    ckpt = smol_ptq("sherry")[0]
    r = CliRunner().invoke(
        app, ["export", str(ckpt), "--gguf", str(tmp_path / "f16.gguf"), "--token-embedding-type", "f16", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert "token_embd.weight in f16 differs from the checkpoint" in r.stderr and "q8_0 holds it exactly" in r.stderr
    k = json.loads(r.stdout)["kept"]["token_embd.weight"]
    assert k["type"] == "f16" and not k["exact"] and k["exact_in"] == "q8_0"
    assert 0 < k["max_abs_err"] < 1e-3 and 0 < k["rel_rms_err"] < 1e-3


def test_export_refuses_to_overwrite(tiny_smol, tiny_text, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_quantize(
        str(tiny_smol),
        QuantConfig(scheme="q2", steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
        ckpt,
        progress=False,
    )
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
    """ternary -> TQ2_0 + Q2_0: the pinned llama.cpp with no patch at all (built once, cached by its key; the bindings
    are installed without a library of their own) loads it and generates through llama-cpp-python 0.3.36."""
    import json
    import os
    import subprocess
    import sys

    from slim_edge.runtime_patches.runtime import ensure_runtime

    stock = ensure_runtime("host", patches=[], tools=("llama-completion",), progress=False)
    assert stock.key != ensure_runtime("host").key

    ckpt = tmp_path / "ckpt"
    run_quantize(
        str(tiny_smol),
        QuantConfig(scheme="ternary", steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
        ckpt,
        progress=False,
    )
    out = tmp_path / "t.gguf"
    assert export_checkpoint(ckpt, out)["needs_patched_runtime"] is False
    env = {**{k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}, **stock.env()}
    code = (
        "import json, sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
        "toks = llm.tokenize(b'The capital of France is'); "
        "out = [int(t) for t, _ in zip(llm.generate(toks, temp=0.0, reset=True), range(8))]; "
        "print(json.dumps({'n': len(out), 'vocab': llm.n_vocab()}))"
    )
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n"] == 8 and r["vocab"] == 49152


@pytest.mark.runtime
@pytest.mark.parametrize("scheme,types", [("seq2", {44, 45}), ("sherry", {43, 46})])
def test_rows_of_576_export_to_the_64_blocks_and_run_as_trained(scheme, types, tiny_text, tmp_path):
    """SmolLM2's widths (hidden 576, FFN 1536): the export holds Q2_0C_64 / STQ1_0_64 (ids 45, 46) beside the
    512/256 types, bit for bit, and the patched runtime computes what PyTorch computes from the checkpoint
    (parity on 128 lee:eval tokens, mean KLD <= 0.01 against the PyTorch checkpoint and its runtime simulation)."""
    from slim_edge.evals.parity import parity

    folder = make_tiny_smol(tmp_path / "m", layers=1, hidden=576, intermediate=1536)
    ckpt, out = tmp_path / "ckpt", tmp_path / "m.gguf"
    run_quantize(
        str(folder),
        QuantConfig(scheme=scheme, steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
        ckpt,
        progress=False,
    )
    summary = export_checkpoint(ckpt, out)
    assert check_bit_exact(ckpt, out) == 7
    linear = {t.type_id for t in read_tensor_table(out).tensors if t.name.split(".")[-2] in GGUF_NAMES.values()}
    assert linear == types and summary["needs_patched_runtime"]
    assert inspect_gguf(out, "patched")["loads"] and not inspect_gguf(out, "stock")["loads"]
    r = parity(str(ckpt), out, n_tokens=128, variants=("weights", "act+kv+rope"), floor=False)
    assert r["variants"]["act+kv+rope"]["mean_kld"] <= 0.01, r["variants"]
    assert r["variants"]["weights"]["mean_kld"] <= 0.01, r["variants"]


# --- llama-quantize: the one helper for stock types (export --type, bench --baselines, kernel_bench) -----
def test_llama_quantize_argv():
    assert llama_quantize_argv(
        ["/b/llama-quantize"],
        "f16.gguf",
        "q.gguf.tmp",
        "q4_k_m",
        token_embedding_type="q6_K",
        output_tensor_type="q6_K",
    ) == [
        "/b/llama-quantize",
        "--token-embedding-type",
        "q6_K",
        "--output-tensor-type",
        "q6_K",
        "f16.gguf",
        "q.gguf.tmp",
        "Q4_K_M",
    ]
    # the type alone (export --type, bench --baselines); the prefix may be several words (qemu for arm64)
    assert llama_quantize_argv(["qemu-aarch64", "-cpu", "cortex-a76", "/rt/llama-quantize"], "a", "b", "Q4_0") == [
        "qemu-aarch64",
        "-cpu",
        "cortex-a76",
        "/rt/llama-quantize",
        "a",
        "b",
        "Q4_0",
    ]


def test_bin_dir_without_llama_quantize(tmp_path):
    with pytest.raises(SlimEdgeError, match=f"--bin-dir {tmp_path} has no llama-quantize.*bin folder"):
        llama_quantize(tmp_path / "f16.gguf", tmp_path / "q4_0.gguf", "Q4_0", bin_dir=tmp_path)


# --- the real model -----------------------------------------------------------------------------

SMOL_SCHEMES = ["seq2", "sherry", "tequila", "ternary", "q2"]


@pytest.fixture(scope="module")
def smol_ptq(tiny_text, tmp_path_factory):
    """scheme -> (checkpoint, GGUF, PyTorch weights) of SmolLM2-135M at PTQ (`slim-edge quantize --steps 0`),
    made on first use. Only the first and the last block are quantized (the other 28 go through --keep):
    they hold every linear shape, so every format and fallback of each scheme, at 1/15 of the PTQ time.
    The PyTorch weights are the QuantLinear forward weights (and Tequila biases), recomputed from the FP
    model: PTQ is deterministic."""
    import torch

    from slim_edge.models import load_model
    from slim_edge.qlinear import QuantLinear
    from slim_edge.schemes import get_scheme

    fp, _, _ = load_model("smollm2-135m")
    n = fp.config.num_hidden_layers
    keep = ("embed_tokens", "lm_head") + tuple(f"layers.{i}." for i in range(1, n - 1))
    made = {}

    def get(scheme: str):
        if scheme not in made:
            d = tmp_path_factory.mktemp(f"smol-{scheme}")
            config = QuantConfig(scheme=scheme, steps=0, keep=keep, batch_size=1, seq_len=32, calib=str(tiny_text))
            run_quantize("smollm2-135m", config, d / "ckpt", progress=False)
            summary = export_checkpoint(d / "ckpt", d / "m.gguf")
            lam = config.tequila_lambda if get_scheme(scheme).tequila else 0.0
            weights = {}
            with torch.no_grad():
                for e in read_meta(d / "ckpt")["plan"]:
                    q = QuantLinear(fp.get_submodule(e["name"]), e["format"], e["mode"], tequila_lambda=lam)
                    w, values = q.quantized(return_values=True)
                    b = q.effective_bias(values)
                    weights[e["name"]] = (w.numpy(), None if b is None else b.numpy())
            made[scheme] = (d / "ckpt", d / "m.gguf", weights, summary)
        return made[scheme]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SMOL_SCHEMES)
def test_smollm2_ptq_export_is_bit_exact(scheme, smol_ptq):
    ckpt, out, weights, summary = smol_ptq(scheme)
    # the shipped SmolLM2 keeps token_embd in Q8_0, so the default Q8_0 embedding is the checkpoint's exactly
    assert summary["kept"]["token_embd.weight"] == {
        "type": "q8_0",
        "exact": True,
        "max_abs_err": 0.0,
        "rel_rms_err": 0.0,
    }
    plan = read_meta(ckpt)["plan"]
    assert {e["name"].split(".")[2] for e in plan} == {"0", "29"} and len(plan) == 14
    assert check_bit_exact(ckpt, out, weights) == 14
    formats = {e["format"] for e in plan}
    assert (
        formats
        == {
            "seq2": {"q2_0c", "q2_0c_64"},
            "sherry": {"stq1_0", "stq1_0_64"},
            "tequila": {"tq2_0", "q2_0"},
            "ternary": {"tq2_0", "q2_0"},
            "q2": {"q2_0"},
        }[scheme]
    )
