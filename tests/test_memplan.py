"""The memory planner: held to every committed GPU measurement (within 15 %), its components held byte for byte to
what a tiny model really holds on CPU, the refusal through the real CLI, and --shard auto's choice."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slim_edge.evals.lab.qat_throughput import SHAPES
from slim_edge.memplan import GIB, LIMIT_ENV, activation_bytes, choose_shard, largest_batch, plan_memory
from slim_edge.qlinear import QuantLinear
from slim_edge.quantize import QuantConfig, make_plan, quantize_
from slim_edge.train import _optimizer, _trained, recompute_layers, train_step

REPORTS = Path(__file__).resolve().parents[1] / "evals" / "reports"
SLIM_EDGE = Path(sys.executable).parent / "slim-edge"
TOLERANCE = 0.15  # issue 21: the estimate within 15 % of the measured peak
# qat_throughput's variants as the planner models them (evals/lab/qat_throughput.py's docstring)
VARIANTS = {
    "session10": dict(compiled=False, teacher_copy=4, reference_loss=True),
    "loss": dict(compiled=False, teacher_copy=4),  # the teacher copy left in fp32
    "loss+bf16t": dict(compiled=False, teacher_copy=2),
    "loss+bf16t+kernels": dict(compiled=True, teacher_copy=2),
    "loss+bf16t+kernels+ddp": dict(compiled=True, teacher_copy=2, shard="ddp"),
}
TINY = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
)


def measured_rows():
    """(file, model, scheme, variant, batch, seq_len, world, peak GiB) of every row with a peak_gib in the committed
    qat_throughput*.json files, whatever their nesting (rows at the top, or in "runs"); a row's own keys win over
    its run's."""
    found = []

    def walk(node, inherited, name):
        if isinstance(node, dict):
            here = {**inherited, **{k: v for k, v in node.items() if not isinstance(v, (dict, list))}}
            if node.get("peak_gib") is not None and "variant" in node:
                found.append(
                    (
                        name,
                        here["model"],
                        here["scheme"],
                        here["variant"],
                        here["batch_size"],
                        here["seq_len"],
                        here.get("world_size", 1),
                        here["peak_gib"],
                    )
                )
            for v in node.values():
                walk(v, here, name)
        elif isinstance(node, list):
            for v in node:
                walk(v, inherited, name)

    for path in sorted(REPORTS.glob("qat_throughput*.json")):
        walk(json.loads(path.read_text()), {}, path.name)
    return found


def test_estimate_within_15_percent_of_every_measured_peak():
    rows = [r for r in measured_rows() if r[3] in VARIANTS]
    assert len(rows) >= 17  # the committed H200 measurements of sessions 15-17 (more as they are added)
    worst = 0.0
    for name, model, scheme, variant, batch, seq, world, peak in rows:
        shape = SHAPES[model.split(" ")[0]]  # "smollm2-135m (random weights)": the real model has the same shape
        plan = plan_memory(
            shape, QuantConfig(scheme=scheme), batch, seq, device="cuda", world=world, **VARIANTS[variant]
        )
        err = abs(plan.total / GIB - peak) / peak
        worst = max(worst, err)
        assert err <= TOLERANCE, (name, model, variant, batch, plan.total / GIB, peak)
    assert worst < TOLERANCE


def _tiny_student(scheme="seq2"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY, max_position_embeddings=512)).eval()
    config = QuantConfig(scheme=scheme, steps=1, batch_size=2, seq_len=32)
    student = copy.deepcopy(base)
    quantize_(student, config, make_plan(student, config))
    qlayers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    weights, scales, others = _trained(student, qlayers)
    trained = {id(p) for p in weights + scales + others}
    for p in student.parameters():
        p.requires_grad_(id(p) in trained)
    return base, student, config, weights, scales, others


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_held_state_bytes_match_a_real_step_on_cpu():
    teacher, student, config, weights, scales, others = _tiny_student()
    opt = _optimizer(weights, others, scales, config)
    x = torch.randint(0, TINY["vocab_size"], (2, 33))
    train_step(student, teacher, x[:, :-1], x[:, 1:], opt, weights + others, scales, config, "cpu")
    plan = plan_memory(TINY, config, device="cpu").components
    params = list(student.parameters())
    scale_bytes = _nbytes([m.scale for m in student.modules() if hasattr(m, "scale")])
    assert scale_bytes == plan["block scales fp32"]
    assert _nbytes(params) - scale_bytes == plan["student latent fp32"]
    assert _nbytes([p.grad for p in params if p.grad is not None]) == plan["gradients fp32"]
    moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert _nbytes(moments) == plan["AdamW moments"]
    _, q, v = student.model.embed_tokens._cache
    assert _nbytes([q, v]) == plan["embedding codes (cached)"]
    assert _nbytes(teacher.parameters()) == plan["teacher fp32 (evaluations)"]


def _saved_bytes(student, batch, seq, autocast):
    """Bytes of the distinct storages autograd saves in one forward; parameters and the embedding's cached codes
    (held anyway: "embedding codes") excluded."""
    student.model.embed_tokens.quantized()
    held = list(student.parameters()) + list(student.model.embed_tokens._cache[1:])
    params = {p.untyped_storage().data_ptr() for p in held}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, TINY["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            student(x)
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_activation_and_weight_bytes_match_autograd(autocast):
    """Per token and per weight, what autograd saves in the student's forward equals the planner's table, in fp32
    (cpu) and under bf16 autocast (on CPU: the same casts as CUDA's autocast for linear and attention)."""
    *_, student, config, _w, _s, _o = _tiny_student()
    seq = 32
    small, large = (_saved_bytes(student, b, seq, autocast) for b in (2, 5))
    assert (large - small) / (3 * seq) == activation_bytes(TINY, autocast=autocast)
    plan = plan_memory(TINY, config, batch=2, seq_len=seq, device="cuda" if autocast else "cpu").components
    rope = 2 * 4 * seq * TINY["hidden_size"] // TINY["num_attention_heads"]  # cos and sin, fp32, once per forward
    assert small - 2 * seq * activation_bytes(TINY, autocast=autocast) - rope == plan["saved per weight"]


def test_refused_through_the_cli_with_the_batch_that_fits(tiny_llama, tiny_text, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    config = QuantConfig(scheme="seq2", steps=2, batch_size=8, seq_len=64)
    need = plan_memory(cfg, config, device="cpu").total
    limit = (
        plan_memory(cfg, config, batch=3, device="cpu").total + plan_memory(cfg, config, batch=4, device="cpu").total
    ) / 2
    assert largest_batch(cfg, config, int(limit), device="cpu") == 3
    argv = [
        str(SLIM_EDGE),
        "quantize",
        str(tiny_llama),
        "--scheme",
        "seq2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--calib",
        str(tiny_text),
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, LIMIT_ENV: str(limit / GIB)}
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"needs about {need / GIB:.2f} GiB of RAM" in run.stderr
    assert f"{limit / GIB:.2f} GiB of RAM is free" in run.stderr
    assert "pass --batch-size 3 (" in run.stderr and "--no-memory-check" in run.stderr
    # the same optimizer step in passes that fit: the largest batch <= 3 that divides 8
    assert "or --batch-size 2 --global-batch-size 8 (the same 8-sequence step in 4 accumulated passes" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    run = subprocess.run(argv + ["--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]  # a dry run says it and goes on to the tensor plan
    assert "dry run: the real run would stop here" in run.stderr and "pass --batch-size 3 (" in run.stderr
    assert "bits per weight in the quantized linears" in run.stderr
    run = subprocess.run(
        argv + ["--no-memory-check", "--dry-run"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "would stop" not in run.stderr, run.stderr[-2000:]


def test_shard_auto_takes_fsdp_when_a_replica_does_not_fit():
    one_b, config, ranks = SHAPES["llama-1b"], QuantConfig(scheme="seq2", batch_size=8, seq_len=512), 8
    ddp = plan_memory(one_b, config, world=ranks, shard="ddp")
    fsdp = plan_memory(one_b, config, world=ranks, shard="fsdp")
    assert ddp.components["AdamW moments"] == ranks * fsdp.components["AdamW moments"]
    assert fsdp.total < ddp.total
    between = (ddp.total + fsdp.total) // 2
    assert choose_shard(one_b, config, ranks, between, "cuda") == "fsdp"
    assert choose_shard(one_b, config, ranks, ddp.total, "cuda") == "ddp"
    assert choose_shard(one_b, config, ranks, fsdp.total - 1, "cuda") == "ddp"  # neither fits: the replica's error


def test_torchrun_shard_auto_trains_fsdp_when_only_the_shards_fit(tiny_text, tmp_path):
    """Two CPU ranks with --shard auto and a limit between the fsdp and the ddp plan: the run trains sharded."""
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "m", "llama", layers=4)
    cfg = json.loads((model / "config.json").read_text())
    config = QuantConfig(scheme="sherry", steps=2, batch_size=2, seq_len=64)
    ddp, fsdp = (plan_memory(cfg, config, device="cpu", world=2, shard=s).total for s in ("ddp", "fsdp"))
    assert fsdp < ddp
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "--no-python",
        str(SLIM_EDGE),
        "quantize",
        str(model),
        "--scheme",
        "sherry",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--calib",
        str(tiny_text),
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", LIMIT_ENV: str((ddp + fsdp) / 2 / GIB)}
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--shard auto: fsdp" in run.stderr
    assert json.loads((out / "report.json").read_text())["shard"] == "fsdp"


def test_activation_checkpointing_gives_the_same_grads_and_keeps_only_layer_inputs(tiny_llama, tiny_text, tmp_path):
    """--activation-checkpointing (torch.utils.checkpoint per decoder layer, non-reentrant): one process's gradients
    equal those without it; the plan keeps the layers' fp32 inputs and one recomputed layer, and --dry-run shows it."""
    _, student, config, weights, scales, others = _tiny_student()
    student.train()
    redo = copy.deepcopy(student)
    recompute_layers(redo)
    calls = []
    # a pre-hook: the recompute stops (early stop) once the last saved tensor is back, before the MLP returns
    redo.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randint(0, TINY["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(1))
    for m in (student, redo):
        torch.nn.functional.cross_entropy(m(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    assert len(calls) == 2  # the forward and its recompute in the backward
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    redone = {n: p.grad for n, p in redo.named_parameters() if p.grad is not None}
    assert grads.keys() == redone.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(redone[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    h, layers = TINY["hidden_size"], TINY["num_hidden_layers"]
    full, ckpt = (
        plan_memory(TINY, QuantConfig(scheme="seq2", activation_checkpointing=c), device="cpu") for c in (False, True)
    )
    tokens = full.batch * full.seq_len
    per_layer = (activation_bytes(TINY, autocast=False) - 4 * h) // layers
    assert ckpt.components["activations (checkpointed: layer inputs + one layer)"] == tokens * (
        layers * 4 * h + per_layer + 4 * h
    )
    cfg = json.loads((tiny_llama / "config.json").read_text())
    plan = plan_memory(
        cfg,
        QuantConfig(scheme="sherry", steps=2, batch_size=2, seq_len=64, activation_checkpointing=True),
        device="cpu",
    )
    run = subprocess.run(
        [
            str(SLIM_EDGE),
            "quantize",
            str(tiny_llama),
            "--scheme",
            "sherry",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--calib",
            str(tiny_text),
            "--device",
            "cpu",
            "--activation-checkpointing",
            "--dry-run",
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    value = plan.components["activations (checkpointed: layer inputs + one layer)"] / GIB
    assert f"activations (checkpointed: layer inputs + one layer) {value:8.2f} GiB" in run.stderr, run.stderr[-2000:]


def test_sharded_teacher_is_counted_per_rank():
    one_b, ranks = SHAPES["llama-1b"], 8
    base = QuantConfig(scheme="seq2", batch_size=8, seq_len=512)
    whole = plan_memory(one_b, base, world=ranks, shard="fsdp").components
    split = plan_memory(
        one_b, QuantConfig(scheme="seq2", batch_size=8, seq_len=512, shard_teacher=True), world=ranks, shard="fsdp"
    ).components
    assert split["teacher copy (QAT forward)"] == whole["teacher copy (QAT forward)"] // ranks
    gathered = whole["FSDP gathered weights"] // 2  # the student's gathered fp32 weights; the teacher's are bf16
    assert split["FSDP gathered teacher weights"] == gathered
    bf16 = plan_memory(
        one_b, QuantConfig(scheme="seq2", batch_size=8, seq_len=512, fsdp_precision="bf16"), world=ranks, shard="fsdp"
    ).components
    assert bf16["FSDP gathered weights"] == whole["FSDP gathered weights"] // 2
