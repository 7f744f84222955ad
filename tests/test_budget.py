"""quantize --bits: the budget's greedy choice, its measured sensitivity, q4_0 linears, and the token embedding
trained on its export type (codes in the checkpoint, the same bytes in the GGUF)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from slim_edge.budget import (
    calibration_windows,
    check_bits,
    choose,
    entry_bits,
    measure_sensitivity,
    plan_bits,
    promotable,
)
from slim_edge.checkpoint import load_quantized, read_meta, read_tensors
from slim_edge.cli import app
from slim_edge.converters.gguf_export import export_checkpoint
from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.gguf_types import tensor_bytes
from slim_edge.errors import SlimEdgeError
from slim_edge.formats import get_format
from slim_edge.models import load_model
from slim_edge.pipeline import run_quantize
from slim_edge.qlinear import QuantEmbedding, QuantLinear, TiedHead
from slim_edge.quantize import PlanEntry, QuantConfig, make_plan, quantize_
from tiny_models import make_tiny_model, make_tiny_smol


def _plan(*specs):
    """PlanEntry rows from (name, rows, in_features, format)."""
    return [PlanEntry(n, (r, k), f, "keep" if f == "f16" else "grid") for n, r, k, f in specs]


def test_greedy_takes_the_most_kl_per_extra_bit_that_fits():
    # q2_0 = 2.25 bpw, so a promotion costs 2.25 bits per weight: a 64x128 tensor 18432 bits, 64x64 9216, 32x64 4608
    plan = _plan(("a", 64, 128, "q2_0"), ("b", 64, 64, "q2_0"), ("c", 64, 64, "q2_0"), ("d", 32, 64, "q2_0"))
    table = [{"name": "a", "kl": 1.0}, {"name": "b", "kl": 0.6}, {"name": "c", "kl": 0.1}, {"name": "d", "kl": 0.2}]
    # per bit: b 6.5e-5 > a 5.4e-5 > d 4.3e-5 > c 1.1e-5; 18432 weights at 2.25 bpw = 41472 bits
    assert plan_bits(plan) == (41472, 18432)
    # B = 3.0: 13824 bits to spend: b (9216), a does not fit, d (4608) fills it exactly
    assert choose(table, plan, 3.0) == {"b": ("q4_0", "sensitive: KL +0.6"), "d": ("q4_0", "sensitive: KL +0.2")}
    # B = 2.9: 11980 bits: b, then neither a nor d nor c fits
    assert set(choose(table, plan, 2.9)) == {"b"}
    assert choose(table, plan, 2.25) == {}
    assert set(choose(table, plan, 4.5)) == {"a", "b", "c", "d"}
    # kept (f16) rows, rows already in q4_0 and rows no q4_0 block divides are never candidates
    odd = _plan(("k", 64, 64, "f16"), ("q", 64, 64, "q4_0"), ("s", 64, 48, "q2_0"))
    assert [promotable(e) for e in odd] == [False, False, False]


def test_budget_never_exceeds_bits_and_is_within_one_tensor_of_them():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        specs = [
            (
                f"t{i}",
                int(rng.choice([32, 64, 96, 576])),
                int(rng.choice([64, 128, 512, 1536])),
                str(rng.choice(["q2_0", "q2_0c", "stq1_0"])),
            )
            for i in range(n)
        ]
        plan = [e for e in _plan(*specs) if e.shape[1] % get_format(e.format).block_size == 0] or _plan(
            specs[0][:3] + ("q2_0",)
        )
        table = [{"name": e.name, "kl": float(rng.exponential())} for e in plan]
        have, weights = plan_bits(plan)
        bits = float(rng.uniform(have / weights, 4.5))
        chosen = choose(table, plan, bits)
        after = have + sum(entry_bits(e, "q4_0") - entry_bits(e) for e in plan if e.name in chosen)
        budget = math.floor(bits * weights)
        assert after <= budget, (trial, after, budget)
        left = [entry_bits(e, "q4_0") - entry_bits(e) for e in plan if e.name not in chosen]
        assert not left or budget - after < min(left), (trial, budget - after, left)


def test_bits_outside_the_scheme_and_q4_0_are_clean_errors(tiny_llama, tmp_path):
    with pytest.raises(SlimEdgeError, match=r"^--bits 4\.6: .*4\.5") as e:
        QuantConfig(scheme="seq2", bits=4.6)
    assert "\n" not in str(e.value)
    model, _, _ = load_model(str(tiny_llama))
    plan = make_plan(model, QuantConfig(scheme="seq2"))
    assert plan_bits(plan)[0] / plan_bits(plan)[1] == 2.03125  # q2_0c everywhere: (2 + 128) * 8 / 512
    check_bits(plan, 2.03125, "seq2")
    with pytest.raises(
        SlimEdgeError,
        match=r"^--bits 2\.0: seq2 itself takes 2\.0312 bits per weight .*between "
        r"2\.0313 and 4\.5",
    ) as e:
        check_bits(plan, 2.0, "seq2")
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(
        app,
        [
            "quantize",
            str(tiny_llama),
            "--scheme",
            "sherry",
            "--bits",
            "1.2",
            "-o",
            str(tmp_path / "out"),
            "--calib",
            "pydoc",
        ],
    )
    assert isinstance(r.exception, SlimEdgeError) and "sherry itself takes 1.3125 bits" in str(r.exception)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_q4_0_quant_linear_forward_is_the_exported_blocks():
    torch.manual_seed(0)
    lin = nn.Linear(96, 64, bias=False)
    nn.init.normal_(lin.weight, 0, 0.05)
    q = QuantLinear(lin, "q4_0", "grid")
    raw = q.export()["qweight"]
    assert raw.shape == (64, 3 * 18)
    deq = torch.from_numpy(get_format("q4_0").dequantize(raw, 96))
    w, v = q.quantized(return_values=True)
    assert torch.equal(w, deq)
    assert v.min() == -8 and v.max() <= 7  # the whole 16-level grid is in use
    x = torch.randn(5, 96)
    assert torch.equal(q(x), F.linear(x, deq))


def test_q8_0_embedding_is_its_codes_and_stays_tied(tiny_llama):
    model, _, _ = load_model(str(tiny_llama))
    x = torch.randint(0, 256, (2, 16))
    quantize_(model, QuantConfig(scheme="seq2"))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedHead)
    raw = emb.export()
    assert raw.shape == (256, 512 // 32 * 34)
    deq = torch.from_numpy(get_format("q8_0").dequantize(raw, 512))
    assert torch.equal(emb.quantized(), deq)
    assert torch.equal(emb(x), deq[x])
    assert head.weight is emb.quantized()  # one weight, one cached fake-quant
    h = torch.randn(3, 512)
    assert torch.equal(head(h), F.linear(h, deq))
    # q8_0's scale is the reference's absmax / 127: every block's largest weight is +-127 levels
    assert np.array_equal(np.abs(get_format("q8_0").unpack(raw)[0]).reshape(-1, 32).max(1), np.full(256 * 16, 127))
    # nothing of it trains: the student's trainable parameters are the linears' weights and scales (and norms)
    assert not emb.weight.requires_grad and not emb.scale.requires_grad


def test_q4_0_embedding_is_its_codes():
    torch.manual_seed(1)
    e = nn.Embedding(64, 64)
    q = QuantEmbedding(e, "q4_0")
    deq = torch.from_numpy(get_format("q4_0").dequantize(q.export(), 64))
    assert torch.equal(q.quantized(), deq)
    w = e.weight.detach()
    rel = float((deq - w).pow(2).sum() / w.pow(2).sum())
    # init_scale's MSE search (positive scales) is a little worse than the reference's signed max / -8,
    # which mirrors the grid per block: 32.5 vs 31.2 squared error here
    ref = torch.from_numpy(get_format("q4_0").dequantize(get_format("q4_0").quantize(w.numpy()), 64))
    assert rel < 0.011 and float((deq - w).pow(2).sum()) < 1.05 * float((ref - w).pow(2).sum())


def test_sensitivity_replays_the_layers_before_the_swapped_one(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama", layers=3)
    model, _, _ = load_model(str(folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = QuantConfig(scheme="seq2")
    plan = make_plan(model, config)
    ids = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    table = {r["name"]: r for r in measure_sensitivity(model, plan, ids, config, progress=False)}
    assert len(table) == 21 and all(r["kl"] > 0 for r in table.values())
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the teacher is restored
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    # the KL of a layer-2 tensor, by a plain forward of the whole model with that tensor swapped
    x = calibration_windows(ids)
    name = "model.layers.2.mlp.down_proj"
    with torch.no_grad():
        t = torch.log_softmax(model(x).logits, -1)
        parent = model.get_submodule(name.rpartition(".")[0])
        lin = parent.down_proj
        parent.down_proj = QuantLinear(lin, "q2_0c", "grid")
        s = torch.log_softmax(model(x).logits, -1)
        parent.down_proj = lin
    kl = float((t.exp() * (t - s)).sum(-1).mean())
    assert table[name]["kl"] == pytest.approx(kl, rel=1e-5)
    assert table[name]["extra_bits"] == 512 * 1024 // 32 * 18 * 8 - 512 * 2 * 130 * 8


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    return make_tiny_smol(tmp_path_factory.mktemp("smol") / "m", layers=2)


@pytest.fixture(scope="module")
def bits_export(tiny_smol, tiny_text, tmp_path_factory):
    """(checkpoint, quantize report, GGUF, export summary) of seq2 --bits 2.5 after 2 QAT steps."""
    d = tmp_path_factory.mktemp("bits")
    config = QuantConfig(scheme="seq2", bits=2.5, steps=2, batch_size=1, seq_len=32, calib=str(tiny_text))
    report = run_quantize(str(tiny_smol), config, d / "ckpt", progress=False)
    return d / "ckpt", report, d / "m.gguf", export_checkpoint(d / "ckpt", d / "m.gguf")


def test_bits_checkpoint_exports_its_q4_0_linears_and_embedding_codes(bits_export, tiny_text, tmp_path):
    ckpt, report, out, summary = bits_export
    meta = read_meta(ckpt)
    plan = meta["plan"]
    promoted = [e for e in plan if e["format"] == "q4_0"]
    assert promoted and all(e["reason"].startswith("sensitive: KL +") for e in promoted)
    n = sum(e["shape"][0] * e["shape"][1] for e in plan)
    bits = sum(e["shape"][0] * get_format(e["format"]).row_bytes(e["shape"][1]) * 8 for e in plan)
    assert bits <= math.floor(2.5 * n) and report["plan_summary"]["bits_per_weight"] == round(bits / n, 4)
    table = meta["budget"]["sensitivity"]
    assert len(table) == 14 and {r["name"] for r in table if r["promoted"]} == {e["name"] for e in promoted}
    assert json.loads((ckpt / "report.json").read_text())["budget"]["sensitivity"] == table
    assert meta["embedding"] == {
        "name": "model.embed_tokens",
        "shape": [49152, 512],
        "format": "q8_0",
        "type_id": 8,
        "tied": True,
    }
    tensors = read_tensors(ckpt)
    codes = tensors["model.embed_tokens.qweight"].numpy()
    assert "model.embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors

    table = read_tensor_table(out)
    type_id, shape, raw = tensor_bytes(out, "token_embd.weight", table)
    assert (type_id, shape) == (8, (512, 49152)) and np.array_equal(raw.reshape(codes.shape), codes)
    assert "output.weight" not in {t.name for t in table.tensors}  # tied: the runtime multiplies by token_embd
    assert summary["kept"]["token_embd.weight"]["exact"]
    gguf = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    for e in plan:
        parts = e["name"].split(".")
        type_id, _, raw = tensor_bytes(out, f"blk.{parts[2]}.{gguf[parts[-1]]}.weight", table)
        ours = tensors[e["name"] + ".qweight"].numpy()
        assert type_id == get_format(e["format"]).type_id
        assert sorted(r.tobytes() for r in raw.reshape(ours.shape)) == sorted(r.tobytes() for r in ours)

    # the reloaded PyTorch model holds the codes' values, tied
    model, _ = load_quantized(ckpt)
    deq = torch.from_numpy(get_format("q8_0").dequantize(codes, 512))
    assert torch.equal(model.model.embed_tokens.weight, deq) and model.lm_head.weight is model.model.embed_tokens.weight

    # continuing the checkpoint keeps its plan and its embedding codes (they do not train)
    more = run_quantize(
        str(ckpt),
        QuantConfig(
            scheme="seq2", bits=2.5, steps=1, batch_size=1, seq_len=32, calib=str(tiny_text), arenas_lambda=0.0
        ),
        tmp_path / "more",
        progress=False,
    )
    assert read_meta(tmp_path / "more")["plan"] == plan and more["budget"] is None
    assert np.array_equal(read_tensors(tmp_path / "more")["model.embed_tokens.qweight"].numpy(), codes)


def test_q4_0_embedding_export_writes_the_trained_codes_not_a_requantization(tiny_smol, tiny_text, tmp_path):
    """The reference Q4_0 quantizer of the trained values would pick other scales (signed max / -8): only the
    stored codes give the file the model that trained."""
    ckpt = tmp_path / "ckpt"
    run_quantize(
        str(tiny_smol),
        QuantConfig(scheme="q2", embedding_type="q4_0", steps=0, batch_size=1, seq_len=32, calib=str(tiny_text)),
        ckpt,
        progress=False,
    )
    codes = read_tensors(ckpt)["model.embed_tokens.qweight"].numpy()
    values = get_format("q4_0").dequantize(codes, 512)
    assert not np.array_equal(get_format("q4_0").quantize(values), codes)  # a re-quantization would differ
    out = tmp_path / "m.gguf"
    summary = export_checkpoint(ckpt, out)
    type_id, shape, raw = tensor_bytes(out, "token_embd.weight")
    assert (type_id, shape) == (2, (512, 49152)) and np.array_equal(raw.reshape(codes.shape), codes)
    assert summary["kept"]["token_embd.weight"] == {
        "type": "q4_0",
        "exact": True,
        "max_abs_err": 0.0,
        "rel_rms_err": 0.0,
    }


@pytest.mark.runtime
def test_bits_export_generates_in_the_patched_runtime(bits_export):
    """Q4_0 beside Q2_0C linears and the trained Q8_0 embedding as the tied head: the patched runtime loads the
    file and decodes."""
    import subprocess

    from slim_edge.runtime_patches import runtime

    host = runtime.ensure_runtime("host")
    _, _, out, summary = bits_export
    assert {"q4_0", "q2_0c", "q8_0"} <= set(summary["types"].values())
    proc = subprocess.run(
        [*host.argv("llama-bench"), "-m", str(out), "-p", "16", "-n", "8", "-r", "1", "-t", "2", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 8)] and all(r["avg_ts"] > 0 for r in rows)


def test_bits_dry_run_samples_nothing_and_plans_what_the_run_does(tiny_smol, tiny_text, tmp_path, monkeypatch):
    import slim_edge.gendata as gendata

    drawn, sample = [], gendata.teacher_tokens
    monkeypatch.setattr(gendata, "teacher_tokens", lambda *a, **k: drawn.append(a[1]) or sample(*a, **k))
    # :cache=0: an earlier run may have left this draw in the user's samples cache (then nothing is drawn)
    config = QuantConfig(
        scheme="seq2", bits=2.5, steps=0, batch_size=1, seq_len=32, calib=f"{tiny_text},teacher:64:cache=0"
    )
    dry = run_quantize(str(tiny_smol), config, tmp_path / "dry", progress=False, dry_run=True)
    assert drawn == [] and not list(tmp_path.iterdir())  # no sample, nothing written
    run_quantize(str(tiny_smol), config, tmp_path / "run", progress=False)
    assert drawn == [64]
    # the sensitivity is measured on the text source alone in both: the same plan
    assert dry["budget"]["sensitivity"] == read_meta(tmp_path / "run")["budget"]["sensitivity"]
    assert dry["plan"] == read_meta(tmp_path / "run")["plan"]
