"""quantize: plans, QAT on tiny random models for every scheme, exact reload, clean errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slim_edge.checkpoint import load_quantized, read_meta
from slim_edge.cli import app
from slim_edge.errors import SlimEdgeError
from slim_edge.models import load_model
from slim_edge.pipeline import run_quantize
from slim_edge.qlinear import QuantLinear
from slim_edge.quantize import QuantConfig, make_plan, quantize_
from slim_edge.train import arenas_lambda, distill_loss
from tiny_models import make_tiny_model

# CE + KD: on these tiny random models pure distillation (the default) falls only ~6 % in 20 steps, too little for
# the loss checks below; test_default_loss_is_pure_distillation covers the default
FAST = dict(batch_size=2, seq_len=64, lr=1e-3, scale_lr=3e-2, ce_weight=1.0)


@pytest.mark.parametrize("scheme", ["seq2", "sherry", "tequila", "ternary", "q2"])
def test_qat_lowers_loss_and_reloads_exactly(scheme, tiny_llama, tiny_text, tmp_path):
    out = tmp_path / scheme
    config = QuantConfig(scheme=scheme, steps=20, calib=str(tiny_text), **FAST)
    report = run_quantize(str(tiny_llama), config, out, progress=False)
    loss = report["distill_loss"]
    assert loss["final"] < 0.9 * loss["ptq"], loss
    # the saved checkpoint reloads to identical logits of the trained fake-quant model
    student, tok = load_quantized(out)
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    meta = read_meta(out)
    from safetensors.torch import load_file

    from slim_edge.checkpoint import dequantized_weights

    tensors = load_file(str(out / "model.safetensors"))
    deq = dequantized_weights(meta, tensors)
    for name, w in deq.items():
        assert np.array_equal(w.numpy(), student.get_submodule(name).weight.detach().numpy())
    with torch.no_grad():
        a = student(x).logits
        b = load_quantized(out)[0](x).logits
    assert torch.equal(a, b)
    plan = meta["plan"]
    assert {e["format"] for e in plan} <= {"q2_0c", "q2_0", "stq1_0", "tq2_0", "q2_0c_64", "stq1_0_64"}


def test_trained_model_logits_equal_reloaded(tiny_llama, tiny_text, tmp_path):
    """The in-memory QAT model (fake quant, Arenas off) and the reloaded checkpoint agree bit for bit."""
    import copy

    from slim_edge.checkpoint import save_quantized
    from slim_edge.train import calibration_tokens, train

    for scheme in ("sherry", "tequila"):
        teacher, tok, folder = load_model(str(tiny_llama))
        config = QuantConfig(scheme=scheme, steps=5, calib=str(tiny_text), **FAST)
        student = copy.deepcopy(teacher)
        plan = quantize_(student, config)
        ids, _ = calibration_tokens(tok, config.calib)
        train(student, teacher, ids, config, progress=False)
        out = save_quantized(student, plan, config, folder, tmp_path / scheme)
        x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(student(x).logits, load_quantized(out)[0](x).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "hunyuan-dense"])
def test_architectures(arch, tmp_path, tiny_text):
    folder = make_tiny_model(tmp_path / arch, arch, hidden=512, layers=1)
    out = tmp_path / f"{arch}-q"
    report = run_quantize(
        str(folder), QuantConfig(scheme="seq2", steps=2, calib=str(tiny_text), **FAST), out, progress=False
    )
    assert report["plan_summary"]["by_format"] == {"q2_0c": 7}
    model, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_fallback_plan_is_decided_before_training(tmp_path):
    """Rows of 576 take the scheme's own 64-block type (never stock q2_0 unless --target asks for it)."""
    folder = make_tiny_model(tmp_path / "m", "llama", hidden=576, intermediate=1536, layers=1)
    model, _, _ = load_model(str(folder))
    plan = {e.name.split(".")[-1]: e for e in make_plan(model, QuantConfig(scheme="sherry"))}
    assert plan["down_proj"].format == "stq1_0"  # 1536 = 6 * 256
    assert plan["q_proj"].format == "stq1_0_64" and "576" in plan["q_proj"].reason
    plan = {e.name.split(".")[-1]: e for e in make_plan(model, QuantConfig(scheme="seq2"))}
    assert plan["down_proj"].format == "q2_0c" and plan["gate_proj"].format == "q2_0c_64"
    asked = make_plan(model, QuantConfig(scheme="sherry", target="q2_0"))
    assert {e.format for e in asked} == {"q2_0"} and {e.mode for e in asked} == {"sherry"}
    quantize_(model, QuantConfig(scheme="sherry"))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.fmt.name == "stq1_0_64" and q.mode == "sherry"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme,formats,max_bpw",
    [("seq2", {"q2_0c": 30, "q2_0c_64": 180}, 2.3), ("sherry", {"stq1_0": 30, "stq1_0_64": 180}, 1.6)],
)
def test_smollm2_dry_run_plans_no_stock_fallback(scheme, formats, max_bpw, tmp_path):
    """`slim-edge quantize smollm2-135m --scheme seq2|sherry --dry-run`: every linear on the scheme's own types
    (rows of 576 on the 64-blocks, the FFN's 1536 on 512/256); measured 2.1953 (seq2) and 1.4531 (sherry) bpw."""
    r = _cli("quantize", "smollm2-135m", "--scheme", scheme, "--dry-run", "--json", "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["summary"]
    assert summary["by_format"] == formats and "q2_0" not in summary["by_format"]
    assert summary["bits_per_weight"] <= max_bpw
    assert summary["bits_per_weight"] == pytest.approx({"seq2": 2.1953, "sherry": 1.4531}[scheme], abs=1e-4)


def test_arenas_schedule():
    total = 100
    lam = [arenas_lambda(s, total, 1.0, 0.1) for s in range(total)]
    assert lam[0] == 0.0 and lam[5] == pytest.approx(0.5) and lam[10] == pytest.approx(1.0)
    assert lam[-1] == 0.0 and all(a >= b for a, b in zip(lam[10:], lam[11:]))


def test_time_limit_ends_the_schedules(tiny_llama, tiny_text):
    """A run that the time limit cuts short still ends Arenas at 0 and the lr at its floor: the schedules run
    on time. A fake clock (one tick per step) makes it deterministic."""
    import copy

    from slim_edge.train import calibration_tokens, learning_rate, schedule_step, train

    assert schedule_step(7, 100, 0, None) == 7
    assert schedule_step(7, 100, 0, 0.5) == 50 and schedule_step(70, 100, 0, 0.5) == 70
    assert schedule_step(7, 100, 0, 1.3) == 99 and schedule_step(20, 100, 20, 0.5) == 60
    teacher, tok, _ = load_model(str(tiny_llama))
    config = QuantConfig(scheme="sherry", steps=50, calib=str(tiny_text), **FAST)
    student = copy.deepcopy(teacher)
    quantize_(student, config)
    ids, _ = calibration_tokens(tok, config.calib)
    ticks = iter(range(10**6))
    seen = []
    state = train(
        student, teacher, ids, config, progress=False, log=seen.append, deadline=12, clock=lambda: float(next(ticks))
    )
    assert state.step == 11 and len(seen) == 11
    lam = [e["arenas"] for e in seen]
    assert max(lam) > 0.5 and lam[-1] == 0.0  # 11 steps walk the 50-step schedule: up, then down to 0
    assert all(a >= b for a, b in zip(lam[lam.index(max(lam)) :], lam[lam.index(max(lam)) + 1 :]))
    warmup = max(1, config.steps // 20)
    assert seen[-1]["lr"] == pytest.approx(learning_rate(49, 50, config.lr, warmup))


def test_cakld_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    y = torch.tensor([[1, 4, 6]])
    loss, ce, kd = distill_loss(s, t, y, "cakld")
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    expect = 0.0
    for i in range(3):
        conf = lt[0, i, y[0, i]].exp()
        kl_st = (ls[0, i].exp() * (ls[0, i] - lt[0, i])).sum()
        kl_ts = (lt[0, i].exp() * (lt[0, i] - ls[0, i])).sum()
        expect += conf * kl_st + (1 - conf) * kl_ts
    assert float(kd) == pytest.approx(float(expect / 3), rel=1e-5)
    assert float(ce) == pytest.approx(float(-ls[0, torch.arange(3), y[0]].mean()), rel=1e-5)


def test_default_loss_is_pure_distillation(tiny_llama, tiny_text, tmp_path):
    """quantize's default trains on KD alone (measured better on held-out text); CE is still reported."""
    config = QuantConfig(
        scheme="seq2", steps=3, calib=str(tiny_text), **{k: v for k, v in FAST.items() if k != "ce_weight"}
    )
    assert config.ce_weight == 0.0
    report = run_quantize(str(tiny_llama), config, tmp_path / "q", progress=False)
    log = report["training"]["log"]
    assert len(log) == 3
    for row in log:
        assert row["ce"] > 0.1 and row["kd"] > 0
        assert row["loss"] == pytest.approx(row["kd"], rel=1e-6)


def test_config_roundtrip():
    c = QuantConfig(scheme="ternary", target="tq1_0", steps=7)
    assert QuantConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(SlimEdgeError, match="version"):
        QuantConfig.from_json({**c.to_json(), "version": 99})
    with pytest.raises(SlimEdgeError, match="cannot hold"):
        QuantConfig(scheme="sherry", target="q4_0")


runner = CliRunner()


def _cli(*args):
    from slim_edge.cli import main  # noqa: F401  (main maps SlimEdgeError to exit 2)

    return runner.invoke(app, list(args))


def test_cli_errors_are_clean(tmp_path, tiny_llama, tiny_text):
    r = _cli("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert isinstance(r.exception, SlimEdgeError) and "neither a folder" in str(r.exception)
    (tmp_path / "empty").mkdir()
    r = _cli("quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "o"))
    assert "no config.json" in str(r.exception)
    (tmp_path / "exists").mkdir()
    r = _cli("quantize", str(tiny_llama), "-o", str(tmp_path / "exists"))
    assert "already exists" in str(r.exception) and "--force" in str(r.exception)
    r = _cli("quantize", str(tiny_llama), "--scheme", "int3", "-o", str(tmp_path / "o"))
    assert "unknown scheme 'int3'" in str(r.exception)
    r = _cli("quantize", str(tiny_llama), "--calib", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o"))
    assert "no such file" in str(r.exception)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf8 \xc3")
    r = _cli("quantize", str(tiny_llama), "--calib", str(bad), "-o", str(tmp_path / "o"))
    assert "UTF-8" in str(r.exception)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unsupported_architecture(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama", layers=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlimEdgeError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        load_model(str(folder))


def test_dry_run_prints_plan(tiny_llama, tmp_path):
    r = _cli("quantize", str(tiny_llama), "--scheme", "sherry", "--dry-run", "--json", "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["summary"]["by_format"] == {"stq1_0": 7}
    assert data["summary"]["bits_per_weight"] == pytest.approx(1.3125)


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tiny_llama, tiny_text, tmp_path, capsys):
    """SIGINT mid-training saves the state as train.dcp/ (torch.distributed.checkpoint, what any world size resumes);
    resuming gives bit-identical weights to a straight run, and so does resuming the same state saved as an earlier
    version's train.pt, which the next save replaces by train.dcp/."""
    import copy
    import os
    import signal

    from slim_edge.distributed import DCP_META, load_sharded, sharded_checkpoint
    from slim_edge.train import _optimizer, _trained, calibration_tokens, train

    teacher, tok, _ = load_model(str(tiny_llama))
    config = QuantConfig(scheme="sherry", steps=6, calib=str(tiny_text), **FAST)
    ids, _ = calibration_tokens(tok, config.calib)

    def fresh():
        torch.manual_seed(0)
        s = copy.deepcopy(teacher)
        quantize_(s, config)
        return s

    straight = fresh()
    train(straight, teacher, ids, config, progress=False)

    ckpt = tmp_path / "train.pt"
    first = fresh()

    def interrupt(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SlimEdgeError, match=r"interrupted at step 3/6.*train\.dcp: run the same command with --resume"):
        train(first, teacher, ids, config, ckpt_path=ckpt, progress=False, log=interrupt)
    folder = tmp_path / "train.dcp"
    assert sharded_checkpoint(ckpt) == folder and not ckpt.exists()
    assert json.loads((folder / DCP_META).read_text())["state"]["step"] == 3
    resumed = fresh()
    state = train(resumed, teacher, ids, config, ckpt_path=ckpt, progress=False)
    assert state.step == 6
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n

    # the same state in the train.pt layout of before DCP: rank 0's module and optimizer state dicts
    old = fresh()
    opt = _optimizer(
        *(lambda w, s, o: (w, o, s))(*_trained(old, [m for m in old.modules() if isinstance(m, QuantLinear)])), config
    )
    extra = load_sharded(old, opt, folder)
    torch.save({"model": dict(old.state_dict()), "optimizer": opt.state_dict(), **extra}, ckpt)
    shutil.rmtree(folder)
    capsys.readouterr()
    legacy = fresh()
    assert train(legacy, teacher, ids, config, ckpt_path=ckpt, every=5, progress=False).step == 6
    assert f"resumed from {ckpt} at step 3" in capsys.readouterr().err
    for (n, a), (_, b) in zip(straight.state_dict().items(), legacy.state_dict().items()):
        assert torch.equal(a, b), n
    assert not ckpt.exists() and json.loads((folder / DCP_META).read_text())["state"]["step"] == 5


@pytest.mark.parametrize("scheme", ["seq2", "sherry"])
def test_block_reconstruction_lowers_layer_and_logit_error(scheme, tiny_text, tmp_path):
    """Block-AP phase alone (no end-to-end steps): every layer's relative output error drops, and the model's
    logits move towards the FP model's (vs the PTQ start); the checkpoint reloads with finite weights."""
    model = make_tiny_model(tmp_path / "m", "llama", layers=2)
    ptq = QuantConfig(scheme=scheme, steps=0, calib=str(tiny_text), **FAST)
    run_quantize(str(model), ptq, tmp_path / "ptq", progress=False)
    config = QuantConfig(scheme=scheme, steps=0, block_steps=30, block_samples=4, calib=str(tiny_text), **FAST)
    report = run_quantize(str(model), config, tmp_path / "out", progress=False)
    layers = report["blocks"]["layers"]
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:
        assert r["steps"] == 30 and r["rel_err_after"] < 0.8 * r["rel_err_before"], r
    assert report["distill_loss"]["blocks"] == report["distill_loss"]["final"]
    teacher, tok, _ = load_model(str(model))
    text = tiny_text.read_text(encoding="utf-8")[-2000:]  # real text (the block phase learns from text)
    x = tok(text, return_tensors="pt")["input_ids"][:, :256].reshape(2, 128)
    with torch.no_grad():
        t = teacher(x).logits
        err = {
            k: float(((load_quantized(tmp_path / k)[0](x).logits - t) ** 2).sum() / (t**2).sum())
            for k in ("ptq", "out")
        }
    assert err["out"] < 0.8 * err["ptq"], err


def test_block_reconstruction_other_architecture(tiny_text, tmp_path):
    model = make_tiny_model(tmp_path / "q3", "qwen3", layers=1)
    config = QuantConfig(scheme="seq2", steps=2, block_steps=5, block_samples=2, calib=str(tiny_text), **FAST)
    report = run_quantize(str(model), config, tmp_path / "out", progress=False)
    assert len(report["blocks"]["layers"]) == 1 and report["training"]["steps"] == 2


def test_block_options_are_checked():
    with pytest.raises(SlimEdgeError, match="block-steps -1"):
        QuantConfig(block_steps=-1)


def test_time_limit_saves_what_is_trained(tiny_llama, tiny_text, tmp_path):
    """A run past --time-limit stops QAT, still writes a loadable checkpoint and says how far it got."""
    config = QuantConfig(scheme="seq2", steps=50, calib=str(tiny_text), **FAST)
    report = run_quantize(str(tiny_llama), config, tmp_path / "o", progress=False, time_limit=1e-6)
    assert report["training"]["steps"] == 50 and report["training"]["steps_done"] == 0
    assert read_meta(tmp_path / "o")["training"]["steps_done"] == 0
    assert (
        read_meta(tmp_path / "o")["training"]["passes"] == 0 < read_meta(tmp_path / "o")["training"]["planned_passes"]
    )
    load_quantized(tmp_path / "o")
    assert not (tmp_path / "o.partial").exists()


def _train_and_reload(tiny_llama, tiny_text, tmp_path, **flags):
    """20 QAT steps of sherry with `flags` (runtime roundings); the reloaded model, and the same checkpoint
    reloaded with the flags off (plain nn.Linear inputs, stock attention), and the plan's type ids."""
    out = tmp_path / "ckpt"
    config = QuantConfig(scheme="sherry", steps=20, calib=str(tiny_text), **flags, **FAST)
    report = run_quantize(str(tiny_llama), config, out, progress=False)
    assert report["distill_loss"]["final"] < 0.9 * report["distill_loss"]["ptq"]
    meta = read_meta(out)
    assert all(meta["config"][k] is True for k in flags)
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    qc = json.loads((plain / "quant_config.json").read_text())
    qc["config"].update({k: False for k in flags})
    (plain / "quant_config.json").write_text(json.dumps(qc))
    types = {e["name"]: e["type_id"] for e in meta["plan"]}
    return out, plain, load_quantized(out)[0], load_quantized(plain)[0], types


def test_act_quant_trains_and_reloads_as_the_runtime_rounds(tiny_llama, tiny_text, tmp_path):
    """--act-quant: QAT through the runtime's Q8_K input rounding (STE) lowers the loss; the reloaded model
    keeps the rounding and equals, bit for bit, the plain model under the parity simulation's rounding."""
    from safetensors.torch import load_file

    from slim_edge.runtime_patches.runtime_sim import simulate

    out, plain, act_model, plain_model, types = _train_and_reload(tiny_llama, tiny_text, tmp_path, act_quant=True)
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = act_model(x).logits
        b = plain_model(x).logits
        with simulate(plain_model, types, activations=True, kv_f16=False):
            c = plain_model(x).logits
    assert not torch.equal(a, b) and torch.equal(a, c)
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(plain / "model.safetensors")))
    with pytest.raises(SlimEdgeError, match="pass --act-quant to continue it"):
        run_quantize(str(out), QuantConfig(scheme="sherry", steps=1, calib=str(tiny_text), **FAST), tmp_path / "c")


def test_runtime_attention_trains_and_reloads_as_the_runtime_attends(tiny_llama, tiny_text, tmp_path):
    """--runtime-attention (with --act-quant): QAT through the F16 KV cache and ggml's rope angles lowers the
    loss; the reloaded model equals, bit for bit, the plain model under the parity simulation's fullest variant
    (act+kv+rope), and differs from the --act-quant-only model."""
    from slim_edge.runtime_patches.runtime_sim import simulate

    out, _, rt_model, plain_model, types = _train_and_reload(
        tiny_llama, tiny_text, tmp_path, act_quant=True, runtime_attention=True
    )
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = rt_model(x).logits
        with simulate(plain_model, types, activations=True, kv_f16=False):
            act_only = plain_model(x).logits
        with simulate(plain_model, types, activations=True, kv_f16=True, rope=True):
            full = plain_model(x).logits
    assert torch.equal(a, full) and not torch.equal(a, act_only)
    with pytest.raises(SlimEdgeError, match="pass --runtime-attention to continue it"):
        run_quantize(
            str(out),
            QuantConfig(scheme="sherry", steps=1, calib=str(tiny_text), act_quant=True, **FAST),
            tmp_path / "c",
        )


def test_continue_from_checkpoint(tiny_llama, tiny_text, tmp_path):
    """A checkpoint as MODEL: the student starts as exactly the checkpoint (0 steps reproduce its bytes),
    trains on from there, and settings that contradict it are refused."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    run_quantize(
        str(tiny_llama), QuantConfig(scheme="sherry", steps=6, calib=str(tiny_text), **FAST), first, progress=False
    )
    same = tmp_path / "same"
    report = run_quantize(
        str(first), QuantConfig(scheme="sherry", steps=0, calib=str(tiny_text), **FAST), same, progress=False
    )
    assert report["continued_from"] == str(first) and report["model"] == str(tiny_llama)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the latents start spread inside their bins (not on the grid points, where the scales would drift)
    from slim_edge.checkpoint import LATENT_SPREAD, init_from_checkpoint

    student = load_model(str(tiny_llama))[0]
    quantize_(student, QuantConfig(scheme="sherry", **FAST))
    init_from_checkpoint(student, first, seed=0)
    q = student.model.layers[0].mlp.down_proj
    v = q.quantized(return_values=True)[1]
    r = q.weight.detach() / q.scale.detach().repeat_interleave(q.fmt.block_size, dim=1) - v
    assert float(r.abs().max()) <= LATENT_SPREAD + 1e-5 and float(r.std()) > 0.2
    seq2 = tmp_path / "seq2"
    run_quantize(
        str(tiny_llama), QuantConfig(scheme="seq2", steps=6, calib=str(tiny_text), **FAST), seq2, progress=False
    )
    report = run_quantize(
        str(seq2),
        QuantConfig(scheme="seq2", steps=20, calib=str(tiny_text), **{**FAST, "lr": 3e-4}),
        tmp_path / "more",
        progress=False,
    )
    # "ptq" is here the checkpoint's own loss: training goes on from it
    assert report["distill_loss"]["final"] < 0.99 * report["distill_loss"]["ptq"]
    r = _cli("quantize", str(first), "--scheme", "seq2", "-o", str(tmp_path / "x"))
    assert isinstance(r.exception, SlimEdgeError) and "made with scheme 'sherry'" in str(r.exception)
    r = _cli("quantize", str(first), "--steps", "0", "--calib", str(tiny_text), "-o", str(tmp_path / "y"))
    assert r.exit_code == 0, r.output  # --scheme defaults to the checkpoint's own
    # ... and Arenas to off: a continued checkpoint has trained codes, no residual branch to anneal again
    assert read_meta(tmp_path / "y")["config"]["arenas_lambda"] == 0.0
    assert read_meta(first)["config"]["arenas_lambda"] == 1.0
    r = _cli(
        "quantize",
        str(first),
        "--steps",
        "0",
        "--arenas-lambda",
        "0.5",
        "--calib",
        str(tiny_text),
        "-o",
        str(tmp_path / "z"),
    )
    assert r.exit_code == 0 and read_meta(tmp_path / "z")["config"]["arenas_lambda"] == 0.5


def test_quantize_reports_passes_and_warns_past_four(tiny_llama, tiny_text, tmp_path, capsys):
    from slim_edge.pipeline import MAX_PASSES

    small = tmp_path / "small.txt"
    small.write_text(tiny_text.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    config = QuantConfig(scheme="q2", steps=3, calib=str(small), **FAST)
    report = run_quantize(str(tiny_llama), config, tmp_path / "few", progress=False)
    t = report["training"]
    assert t["passes"] == round(3 * FAST["batch_size"] * FAST["seq_len"] / t["text_tokens"], 3)
    err = capsys.readouterr().err
    assert f"{3 * FAST['batch_size'] * FAST['seq_len']:,} tokens seen" in err
    assert ("warning" in err) == (t["passes"] > MAX_PASSES)
    many = int(5 * t["text_tokens"] / (FAST["batch_size"] * FAST["seq_len"])) + 1  # just past 5 passes
    report = run_quantize(
        str(tiny_llama),
        QuantConfig(scheme="q2", steps=many, calib=str(small), **FAST),
        tmp_path / "many",
        progress=False,
    )
    assert report["training"]["passes"] > 5
    assert "warning: 5." in capsys.readouterr().err


class _Touch:
    """Unpickling this creates a file: what a hostile train.pt in OUT.partial/ would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_resume_refuses_a_pickle_that_runs_code(tiny_llama, tiny_text, tmp_path):
    from slim_edge.train import calibration_tokens, train

    teacher, tok, _ = load_model(str(tiny_llama))
    config = QuantConfig(scheme="q2", steps=2, calib=str(tiny_text), **FAST)
    ids, _ = calibration_tokens(tok, config.calib)
    ckpt, marker = tmp_path / "train.pt", tmp_path / "pwned"
    torch.save({"model": {}, "optimizer": _Touch(marker), "state": {}, "rng": {}}, ckpt)
    student = load_model(str(tiny_llama))[0]
    quantize_(student, config)
    with pytest.raises(SlimEdgeError, match="refusing to resume.*delete it"):
        train(student, teacher, ids, config, ckpt_path=ckpt, progress=False)
    assert not marker.exists()
    torch.save({"model": {}, "state": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # an earlier version's train.pt, cut short
    with pytest.raises(
        SlimEdgeError,
        match=r"train\.pt: cannot resume from it \(PytorchStreamReader failed .*\): "
        r"it is damaged; run with --force instead of --resume",
    ):
        train(student, teacher, ids, config, ckpt_path=ckpt, progress=False)


def test_calib_file_is_tokenized_in_pieces_with_the_ids_of_the_whole_text(tiny_llama, tmp_path):
    """A --calib file longer than one piece (memory.PIECE_CHARS) gives exactly the ids of one tokenizer call."""
    from slim_edge.memory import PIECE_CHARS
    from slim_edge.train import calibration_tokens

    _, tok, _ = load_model(str(tiny_llama))
    words = ["alpha", "beta,", "gamma.\n", "delta  ", "épsilon", "zeta;"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(3 * PIECE_CHARS // 5))
    assert len(text) > 2 * PIECE_CHARS
    f = tmp_path / "calib.txt"
    f.write_text(text, encoding="utf-8")
    ids, source = calibration_tokens(tok, str(f))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == whole


def test_a_relative_model_path_is_stored_absolute_so_continuing_elsewhere_finds_the_teacher(
    tiny_llama, tiny_text, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_llama.parent)
    first = tmp_path / "first"
    report = run_quantize(
        tiny_llama.name, QuantConfig(scheme="sherry", steps=0, calib=str(tiny_text), **FAST), first, progress=False
    )
    assert report["model"] == str(tiny_llama.resolve())
    monkeypatch.chdir(tmp_path)  # tiny_llama.name means nothing here
    report = run_quantize(
        str(first),
        QuantConfig(scheme="sherry", steps=0, calib=str(tiny_text), **FAST),
        tmp_path / "again",
        progress=False,
    )
    assert report["model"] == str(tiny_llama.resolve())
