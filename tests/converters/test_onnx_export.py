"""`slim-edge export --onnx`: the checkpoint's codes in MatMulNBits, run by the real onnxruntime."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from slim_edge.checkpoint import dequantized_weights, embedding_codes, load_quantized, read_meta, read_tensors  # noqa: E402
from slim_edge.converters.onnx_export import export_onnx, onnx_grid, pack_weight, require_onnx, split_8bit, unpack_codes  # noqa: E402
from slim_edge.errors import SlimEdgeError  # noqa: E402
from slim_edge.evals.backends import OnnxLM  # noqa: E402
from slim_edge.formats import FORMATS, get_format  # noqa: E402
from slim_edge.formats.base import Format  # noqa: E402
from slim_edge.pipeline import run_quantize  # noqa: E402
from slim_edge.quantize import QuantConfig  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

SCHEMES = ["seq2", "sherry", "tequila", "ternary", "q2"]


def onnx_initializers(path: Path) -> tuple[dict, dict]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # the embedding's gather reads the head's codes through a Reshape
        if n.op_type == "Reshape" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]].reshape(inits[n.input[1]])
    nodes = {
        (n.op_type, n.input[1 if n.op_type == "MatMulNBits" else 0]): n
        for n in model.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    return inits, nodes


def decode_node(node, inits: dict) -> np.ndarray:
    """The float weight [N, K] a MatMulNBits / GatherBlockQuantized node computes with, read from its inputs and
    attributes as the op defines it: (code - zero point) * scale per block."""
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMulNBits":
        data, scales = inits[node.input[1]], inits[node.input[2]]
        zp_name = node.input[3] if len(node.input) > 3 else ""
    else:
        data, scales = inits[node.input[0]], inits[node.input[2]]
        zp_name = node.input[3] if len(node.input) > 3 else ""
    bits, block = attrs["bits"], attrs["block_size"]
    n = data.shape[0]
    codes = unpack_codes(data.reshape(n, -1), bits).astype(np.float32)
    k = codes.shape[1]
    nb = k // block
    zp = np.full((n, nb), 1 << (bits - 1), np.float32)
    if zp_name:
        z = inits[zp_name]
        zp = (
            unpack_codes(z.reshape(n, -1), bits)[:, :nb].astype(np.float32) if z.dtype == np.uint8 else z.reshape(n, nb)
        )
    return ((codes.reshape(n, nb, block) - zp[:, :, None]) * scales.reshape(n, nb, 1)).reshape(n, k)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnx_weights_decode_to_the_checkpoint_values_exactly(scheme, onnx_exports):
    ckpt, out, summary = onnx_exports(scheme)
    inits, nodes = onnx_initializers(out / "model.onnx")
    meta, tensors = read_meta(ckpt), read_tensors(ckpt)
    want = dequantized_weights(meta, tensors)
    assert len(want) == 14
    for name, w in want.items():
        got = decode_node(nodes["MatMulNBits", f"{name}.qweight"], inits)
        assert got.tobytes() == w.numpy().tobytes(), name
        if scheme == "seq2":  # SEQ's 2-bit codes are the checkpoint's own bytes
            fmt = get_format(summary["weights"][name]["format"])
            raw = tensors[f"{name}.qweight"].numpy().reshape(-1, fmt.type_size)[:, 2:]
            assert inits[f"{name}.qweight"].tobytes() == raw.tobytes(), name
        if f"{name}.bias" in tensors:
            assert inits[f"{name}.bias"].tobytes() == tensors[f"{name}.bias"].numpy().tobytes()
    emb_name, fmt, raw = embedding_codes(meta, tensors)
    emb = fmt.dequantize(raw, meta["embedding"]["shape"][1])
    # the q8_0 embedding as two 4-bit halves (split_8bit), shared by the two gathers and the tied head's two
    # MatMulNBits; each pair sums to the embedding's values exactly
    gathers = [n for (op, _), n in nodes.items() if op == "GatherBlockQuantized"]
    heads = [nodes["MatMulNBits", f"{emb_name}.{half}.qweight"] for half in ("hi", "lo")]
    assert len(gathers) == 2
    for pair in (gathers, heads):
        hi, lo = (decode_node(node, inits) for node in pair)
        assert (hi + lo).tobytes() == emb.tobytes()
    assert summary["weights"]["model.layers.0.mlp.up_proj"]["bits"] == 2
    # 2 bits + a float32 scale and a float32 zero point per block (64 for q2_0, 256 for the others)
    assert summary["linear_bits_per_weight"] == {"seq2": 2.25, "q2": 3.0}.get(scheme, 2.25)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q2_0c", "stq1_0", "q2_0"])
def test_split_8bit_and_4bit_codes_keep_the_values(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(2)
    k, n = 512, 8
    raw = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    want = fmt.dequantize(raw, k)
    pw = pack_weight(fmt, raw, k, min_bits=4)
    assert pw.grid.bits == (8 if name == "q8_0" else 4)
    assert pw.zero_points is None  # the levels around the default zero point: no zero-point tensor
    assert pw.values().tobytes() == want.tobytes()
    if name == "q8_0":
        hi, lo = split_8bit(pw)
        assert (hi.grid.bits, lo.grid.bits) == (4, 4)
        assert (hi.values() + lo.values()).tobytes() == want.tobytes()


def test_onnx_bits_4_export_decodes_exactly(onnx_exports, tmp_path):
    ckpt, _, _ = onnx_exports("seq2")
    summary = export_onnx(ckpt, tmp_path / "o4", bits=4)
    inits, nodes = onnx_initializers(tmp_path / "o4" / "model.onnx")
    want = dequantized_weights(read_meta(ckpt), read_tensors(ckpt))
    for name, w in want.items():
        node = nodes["MatMulNBits", f"{name}.qweight"]
        assert node.attribute[[a.name for a in node.attribute].index("bits")].i == 4
        assert decode_node(node, inits).tobytes() == w.numpy().tobytes(), name
    assert summary["onnx_bits"] == 4 and summary["linear_bits_per_weight"] == 4.0625  # + a float32 scale per 512
    with pytest.raises(SlimEdgeError, match="--onnx-bits 3"):
        export_onnx(ckpt, tmp_path / "o3", bits=3)
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "f16"])
def test_every_format_runs_exactly_in_matmulnbits(name):
    import onnxruntime as ort
    from onnx import TensorProto as T, helper, numpy_helper

    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    k, n = 1024, 32
    raw = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    pw = pack_weight(fmt, raw, k)
    assert pw.values().tobytes() == fmt.dequantize(raw, k).tobytes()
    inits = [numpy_helper.from_array(pw.codes, "B"), numpy_helper.from_array(pw.scales, "S")]
    if pw.zero_points is not None:
        inits.append(numpy_helper.from_array(pw.zero_points, "Z"))
    node = helper.make_node(
        "MatMulNBits",
        ["A"] + [i.name for i in inits],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=pw.grid.bits,
        block_size=pw.grid.block,
    )
    graph = helper.make_graph(
        [node],
        "t",
        [helper.make_tensor_value_info("A", T.FLOAT, [4, k])],
        [helper.make_tensor_value_info("Y", T.FLOAT, [4, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    a = rng.standard_normal((4, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    ref = a.astype(np.float64) @ fmt.dequantize(raw, k).astype(np.float64).T
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _torch_logits(ckpt: Path, ids: np.ndarray) -> np.ndarray:
    import torch

    model, _ = load_quantized(ckpt)
    with torch.no_grad():
        return model(torch.as_tensor(ids[None])).logits[0].numpy()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnxruntime_logits_match_pytorch(scheme, onnx_exports, tiny_text):
    ckpt, out, _ = onnx_exports(scheme)
    lm = OnnxLM(out)
    ids = np.asarray(lm.tokenize(tiny_text.read_text()[5000:5200])[:128], np.int64)
    assert len(ids) == 128
    kld = _kld(_torch_logits(ckpt, ids), lm.logits(ids))
    assert kld <= 1e-4, kld


def test_kv_cache_decoding_equals_a_full_forward(onnx_exports):
    _, out, _ = onnx_exports("sherry")
    lm = OnnxLM(out)
    ids = np.random.default_rng(0).integers(0, lm.n_vocab, 24)
    full = lm.logits(ids)
    logits, cache = lm.step(ids[:8], lm.empty_cache(), 0)
    rows = [logits]
    for pos in range(8, len(ids)):
        logits, cache = lm.step(ids[pos : pos + 1], cache, pos)
        rows.append(logits)
    assert cache["past_key_values.1.value"].shape == (1, 2, 24, 128)
    assert np.abs(np.concatenate(rows) - full).max() < 1e-4


def test_genai_config_and_tokenizer_are_written(onnx_exports):
    import onnx

    ckpt, out, summary = onnx_exports("seq2")
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["decoder"]["num_hidden_layers"] == 2 and cfg["decoder"]["num_key_value_heads"] == 2
    assert cfg["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input][:5] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert not summary["external_data"] and not (out / "model.onnx.data").exists()


def test_export_refuses_to_overwrite_and_cli_writes(onnx_exports, tmp_path):
    from typer.testing import CliRunner

    from slim_edge.cli import app

    ckpt, out, _ = onnx_exports("q2")
    with pytest.raises(SlimEdgeError, match="already exists; pass --force"):
        export_onnx(ckpt, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "other"), "--force"])
    assert isinstance(r.exception, SlimEdgeError) and "did not write" in str(r.exception)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    r = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    assert "3.000 bits per weight" in r.output and (tmp_path / "new" / "model.onnx").is_file()


def test_unmapped_formats_and_architectures_are_clear_errors(tiny_text, tmp_path):
    odd = Format("q3_48", type_id=99, block_size=48, type_size=2 + 18, levels=(-4, -3, -2, -1, 0, 1, 2, 3))
    with pytest.raises(SlimEdgeError, match="model.layers.0.mlp.up_proj: q3_48's block 48 is not a power of two"):
        onnx_grid(odd, "model.layers.0.mlp.up_proj")
    with pytest.raises(SlimEdgeError, match="f16 .block 1. has no ONNX MatMulNBits mapping"):
        onnx_grid(FORMATS["f16"])
    qwen = make_tiny_model(tmp_path / "qwen", "qwen2", layers=1)
    run_quantize(
        str(qwen),
        QuantConfig(scheme="q2", steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
        tmp_path / "ckpt",
        progress=False,
    )
    with pytest.raises(SlimEdgeError, match="this checkpoint is Qwen2ForCausalLM: export it with --gguf"):
        export_onnx(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when the package is absent
    with pytest.raises(SlimEdgeError, match=r"pip install 'slim-edge\[onnx\]'"):
        require_onnx()


def test_inspect_reads_ops_bits_and_size_from_the_file(onnx_exports):
    from slim_edge.converters.onnx_export import format_onnx_report, inspect_onnx

    _, out, summary = onnx_exports("seq2")
    r = inspect_onnx(out / "model.onnx")
    assert r["ops"]["com.microsoft.MatMulNBits"] == 16 and r["ops"]["com.microsoft.GatherBlockQuantized"] == 2
    up = next(w for w in r["weights"] if w["name"] == "model.layers.0.mlp.up_proj")
    # 1024 x 512 weights: 2-bit codes, one float32 scale and one float32 zero point per 256
    assert (up["bits"], up["block_size"], up["bytes"]) == (2, 256, 1024 * 512 // 4 + 1024 * 2 * 8)
    assert r["linear_bits_per_weight"] == 2.25 and r["bytes"] == summary["bytes"]
    assert "2.250 bits per weight" in format_onnx_report(r)
    assert r["attention"] == {
        "kind": "gqa",
        "num_heads": 4,
        "kv_num_heads": 2,
        "rotary_inside": True,
        "ops": {"com.microsoft.GroupQueryAttention": 2, "com.microsoft.SkipSimplifiedLayerNormalization": 4},
    }
    assert (
        "attention: gqa, 4 query / 2 KV heads, RoPE inside (com.microsoft.GroupQueryAttention x2, "
        "com.microsoft.SkipSimplifiedLayerNormalization x4)"
    ) in format_onnx_report(r)


def test_inspect_names_the_plain_attention(both_attentions):
    from slim_edge.converters.onnx_export import format_onnx_report, inspect_onnx

    r = inspect_onnx(both_attentions[1]["plain"][0])
    assert r["attention"] == {"kind": "plain", "ops": {"Softmax": 2}}
    assert "attention: plain, standard ops (Softmax x2)" in format_onnx_report(r)


def test_eval_scores_an_onnx_export_against_its_checkpoint(onnx_exports):
    from slim_edge.evals.eval_cmd import evaluate

    ckpt, out, _ = onnx_exports("sherry")
    result = evaluate(
        [str(out)], reference=str(ckpt), corpus="pydoc", ctx=128, max_chunks=2, gen_tokens=0, progress=False
    )
    ref, row = result["models"]
    assert row["backend"] == "onnx" and ref["backend"] == "torch"
    assert row["mean_kld"] < 1e-6 and abs(row["ppl"] / ref["ppl"] - 1) < 1e-4


def test_bench_times_onnxruntime_in_llama_bench_rows(onnx_exports):
    from slim_edge.evals.bench import BenchConfig, run_bench

    _, out, summary = onnx_exports("seq2")
    cfg = BenchConfig(prompt_lengths=[8, 32], n_gen=4, threads=[1], repetitions=2, chat_ttft=False)
    result = run_bench([out], "host", cfg, progress=False, log=lambda m: None)
    (m,) = result.models
    assert (m.name, m.model_type, m.file_size) == ("onnx", "onnx", summary["bytes"])
    assert [e["n_prompt"] for e in m.prefill] == [8, 32] and [e["n_gen"] for e in m.decode] == [4]
    for e in m.prefill:  # TTFT is the measured prefill time of the prompt
        assert len(e["ttft_ms_samples"]) == 2
        assert e["ttft_ms_mean"] == pytest.approx(np.mean(e["samples_ns"]) / 1e6)
        assert e["tps_mean"] == pytest.approx(np.mean([e["n_prompt"] / (ns / 1e9) for ns in e["samples_ns"]]))
    assert "| onnx | " in result.markdown() and "onnxruntime 1." in result.markdown()


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_onnx(tiny_text, tmp_path_factory):
    """scheme -> (checkpoint, ONNX folder) of SmolLM2-135M at PTQ (`slim-edge quantize --steps 0`), with only
    the first and the last block quantized (as in test_export: every linear shape and fallback format of the
    scheme, at 1/15 of the PTQ time); made on first use."""
    from slim_edge.models import load_model

    fp, _, _ = load_model("smollm2-135m")
    n = fp.config.num_hidden_layers
    del fp
    keep = ("embed_tokens", "lm_head") + tuple(f"layers.{i}." for i in range(1, n - 1))
    made = {}

    def get(scheme: str):
        if scheme not in made:
            d = tmp_path_factory.mktemp(f"smol-onnx-{scheme}")
            config = QuantConfig(scheme=scheme, steps=0, keep=keep, batch_size=1, seq_len=32, calib=str(tiny_text))
            run_quantize("smollm2-135m", config, d / "ckpt", progress=False)
            export_onnx(d / "ckpt", d / "onnx")
            made[scheme] = (d / "ckpt", d / "onnx")
        return made[scheme]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["seq2", "sherry"])
def test_smollm2_onnx_matches_pytorch_on_512_held_out_tokens(scheme, smol_onnx):
    from slim_edge import corpora

    ckpt, out = smol_onnx(scheme)
    inits, nodes = onnx_initializers(out / "model.onnx")
    want = dequantized_weights(read_meta(ckpt), read_tensors(ckpt))
    assert len(want) == 14
    for name, w in want.items():
        assert decode_node(nodes["MatMulNBits", f"{name}.qweight"], inits).tobytes() == w.numpy().tobytes(), name
    lm = OnnxLM(out)
    ids = np.asarray(([lm.bos_id] if lm.add_bos else []) + lm.tokenize(corpora.get_text("lee", "eval").text)[:512])
    kld = _kld(_torch_logits(ckpt, ids), lm.logits(ids))
    assert kld <= 1e-4, kld


def test_external_data_export_loads_and_computes_the_same(onnx_exports, tmp_path):
    import onnx

    ckpt, out, _ = onnx_exports("ternary")
    summary = export_onnx(ckpt, tmp_path / "ext", external_data=True)
    assert summary["external_data"] and (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000
    assert summary["bytes"] == sum(f.stat().st_size for f in (tmp_path / "ext").glob("model.onnx*"))
    onnx.checker.check_model(str(tmp_path / "ext" / "model.onnx"), full_check=True)
    ids = np.arange(1, 40)
    assert OnnxLM(tmp_path / "ext").logits(ids).tobytes() == OnnxLM(out).logits(ids).tobytes()


def test_a_float_model_exports_as_the_fp32_baseline(tiny2, tmp_path):
    import torch

    from slim_edge.models import load_model

    summary = export_onnx(str(tiny2), tmp_path / "fp")
    assert summary["linear_bits_per_weight"] == 32.0 and "MatMulNBits" not in summary["ops"]
    model, _, _ = load_model(str(tiny2))
    ids = np.arange(3, 60)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids[None])).logits[0].numpy()
    assert np.abs(OnnxLM(tmp_path / "fp").logits(ids) - ref).max() < 1e-4


# --- attention: onnxruntime's fused GroupQueryAttention (the default) and the plain-op graph ------------------


def test_gqa_is_the_default_and_replaces_the_attention_ops(both_attentions):
    _, exports = both_attentions
    (_, gqa), (_, plain) = exports["gqa"], exports["plain"]
    assert (gqa["attention"], plain["attention"]) == ("gqa", "plain")
    # per layer one GroupQueryAttention and two SkipSimplifiedLayerNormalization (the post-attention norm and
    # the next input norm or the final one, each with the residual add inside); no Softmax, Concat or RoPE ops
    assert (gqa["ops"]["GroupQueryAttention"], gqa["ops"]["SkipSimplifiedLayerNormalization"]) == (2, 4)
    assert not {"Softmax", "Concat", "Slice", "Expand", "Cos"} & set(gqa["ops"])
    assert (plain["ops"]["Softmax"], plain["ops"]["Concat"]) == (2, 16) and "GroupQueryAttention" not in plain["ops"]
    assert sum(gqa["ops"].values()) == 49 and sum(plain["ops"].values()) == 177
    assert gqa["weights"] == plain["weights"]  # the same codes either way


def test_gqa_logits_match_pytorch_and_the_plain_graph(both_attentions, tiny_text):
    ckpt, exports = both_attentions
    gqa, plain = OnnxLM(exports["gqa"][0]), OnnxLM(exports["plain"][0])
    ids = np.asarray(gqa.tokenize(tiny_text.read_text()[3000:4000])[:300], np.int64)
    assert len(ids) == 300
    ref, got = _torch_logits(ckpt, ids), gqa.logits(ids)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < 2e-5, np.abs(got - ref).max() / scale
    assert np.abs(got - plain.logits(ids)).max() / scale < 2e-5
    assert _kld(ref, got) <= 1e-8


def test_gqa_decoding_in_chunks_with_past_equals_the_full_forward(both_attentions):
    ckpt, exports = both_attentions
    lm = OnnxLM(exports["gqa"][0])
    ids = np.random.default_rng(3).integers(0, lm.n_vocab, 40)
    full = lm.logits(ids)
    # a prompt, single tokens, then chunks of several new tokens on top of a past (seqlens_k and positions
    # derived from attention_mask inside the graph)
    bounds = [0, 6, 7, 8, 9, 13, 25, 40]
    cache, rows = lm.empty_cache(), []
    for a, b in zip(bounds, bounds[1:]):
        logits, cache = lm.step(ids[a:b], cache, a)
        rows.append(logits)
    assert cache["past_key_values.1.key"].shape == (1, 2, 40, 128)
    assert np.abs(np.concatenate(rows) - full).max() < 1e-4
    # the cache itself is the plain graph's (RoPE'd keys, raw values), so the two can hand a cache over
    _, plain_cache = OnnxLM(exports["plain"][0]).step(ids, lm.empty_cache(), 0)
    for name, v in plain_cache.items():
        assert np.abs(cache[name] - v).max() < 1e-4, name


def test_gqa_positions_past_the_rope_caches_are_a_clear_error(both_attentions):
    """gqa's cos/sin caches hold max_position_embeddings rows (512 on the tiny model): onnxruntime fails a step
    past them with "cos_cache dimension 0 shall not be less than total_sequence_length"; OnnxLM says what and
    what to do first. The plain graph computes RoPE from the positions and runs on."""
    _, exports = both_attentions
    gqa, plain = OnnxLM(exports["gqa"][0]), OnnxLM(exports["plain"][0])
    assert (gqa.max_positions, plain.max_positions) == (512, None)
    ids = np.random.default_rng(4).integers(0, gqa.n_vocab, 512)
    _, cache = gqa.step(ids, gqa.empty_cache(), 0)  # all 512 positions
    with pytest.raises(
        SlimEdgeError,
        match=r"3 token\(s\) at position 512 reach position 514, past the 512 "
        r"positions .* --onnx-attention plain",
    ):
        gqa.step(ids[:3], cache, 512)
    with pytest.raises(SlimEdgeError, match=r"past the 512 positions"):
        gqa.logits(np.concatenate([ids, ids[:1]]))
    logits, _ = plain.step(ids[:3], plain.step(ids, plain.empty_cache(), 0)[1], 512)
    assert logits.shape == (3, plain.n_vocab) and np.isfinite(logits).all()


def test_exports_carry_the_ir_version_of_their_opset(both_attentions):
    """IR 10 with opset 21, not the installed onnx's newest IR (onnx 1.23: 14), which onnxruntime 1.30 refuses
    to load ("max supported IR version: 13"; measured on the GPU machine: evals/reports/onnx_portability.md)."""
    import onnx

    for folder, _ in both_attentions[1].values():
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert model.ir_version == 10
        assert sorted((o.domain, o.version) for o in model.opset_import) == [("", 21), ("com.microsoft", 1)]


def test_an_export_onnxruntime_refuses_names_the_reason(both_attentions, tmp_path):
    """What the GPU machine's onnxruntime said of an IR-14 file, as OnnxLM reports it: the reason, not the C++
    signature onnxruntime wraps it in (which filled the first 300 characters the message kept)."""
    import onnx

    model = onnx.load(str(both_attentions[1]["gqa"][0] / "model.onnx"))
    model.ir_version = 99
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(
        SlimEdgeError,
        match=r"could not load .*model.onnx \(.*failed: Unsupported model IR version: "
        r"99, max supported IR version: \d+\); re-export",
    ):
        OnnxLM(tmp_path / "model.onnx")


def test_onnx_attention_option_is_checked(onnx_exports, tmp_path):
    from typer.testing import CliRunner

    from slim_edge.cli import app

    ckpt, _, _ = onnx_exports("q2")
    with pytest.raises(SlimEdgeError, match="--onnx-attention flash: choose one of gqa, plain"):
        export_onnx(ckpt, tmp_path / "bad", attention="flash")
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(
        app, ["export", str(ckpt), "--onnx", str(tmp_path / "p"), "--onnx-attention", "plain", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["attention"] == "plain"
    assert json.loads((tmp_path / "p" / "slim_edge_onnx.json").read_text())["ops"]["Softmax"] == 2
    r = CliRunner().invoke(app, ["export", str(ckpt), "--gguf", str(tmp_path / "x.gguf"), "--onnx-attention", "gqa"])
    assert isinstance(r.exception, SlimEdgeError) and "applies to --onnx exports only" in str(r.exception)


def test_exports_name_the_oldest_onnxruntime_that_runs_them(both_attentions, onnx_exports, tmp_path):
    """slim_edge_onnx.json's min_onnxruntime, from the graph: 2-bit MatMulNBits needs 1.27 (1.24-1.26 fail in it
    at run time, measured); OnnxLM refuses an older onnxruntime up front with the fix, and an error while
    running is one SlimEdgeError with onnxruntime's reason, not a traceback."""
    import shutil

    from slim_edge.converters.onnx_export import version_tuple

    _, exports = both_attentions
    folder, summary = exports["gqa"]
    assert (
        summary["min_onnxruntime"]
        == "1.27"
        == json.loads((folder / "slim_edge_onnx.json").read_text())["min_onnxruntime"]
    )
    assert version_tuple("1.27.0") == (1, 27, 0) and version_tuple("1.28.0.dev20260101+cu12") == (1, 28, 0)
    assert version_tuple("1.9.0") < version_tuple("1.27") < version_tuple("1.32.0")
    future = tmp_path / "future"
    shutil.copytree(folder, future)
    info = json.loads((future / "slim_edge_onnx.json").read_text())
    (future / "slim_edge_onnx.json").write_text(json.dumps({**info, "min_onnxruntime": "99.1"}))
    with pytest.raises(
        SlimEdgeError,
        match=r"onnxruntime [0-9.]+ is older than 99.1, the first that runs this "
        r"export.*pip install -U 'onnxruntime>=99.1'",
    ):
        OnnxLM(future)
    lm = OnnxLM(folder)
    bad = {name: np.zeros((1, shape[1], 2, shape[3] + 1), np.float32) for name, shape in lm.past}
    with pytest.raises(SlimEdgeError, match=r"onnxruntime [0-9.]+ failed to run .*model.onnx \(.*\)"):
        lm.step([1, 2], bad, 2)
