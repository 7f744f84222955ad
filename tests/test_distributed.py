"""torchrun data parallelism on CPU (gloo), real processes: 2 ranks x batch B train as 1 process x batch 2B,
a SIGTERM to one rank stops both at one step with a loadable checkpoint (train.dcp/, DDP as FSDP), and 1 process
resumes it, as 2 ranks resume one process's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slim_edge.checkpoint import dequantized_weights, read_meta
from slim_edge.distributed import (
    DCP_META,
    World,
    data_parallel,
    load_sharded,
    no_buffer_sync,
    save_sharded,
    sharded_checkpoint,
    sharding,
    world_from_env,
)
from slim_edge.errors import SlimEdgeError
from slim_edge.pipeline import check_distributed, run_quantize
from slim_edge.quantize import QuantConfig
from slim_edge.train import _batches

B, STEPS = 2, 12
FIRST_STEPS = 3  # fsdp: the steps before a code flips (test_two_fsdp_ranks_...)
OPTS = dict(scheme="sherry", steps=STEPS, seq_len=64, lr=1e-3, scale_lr=3e-2)
SLIM_EDGE = Path(sys.executable).parent / "slim-edge"
PROBE = Path(__file__).with_name("torchrun_probe.py")


def _torchrun(tiny_llama, tiny_text, out: Path, *extra: str, probe: Path | None = None) -> subprocess.Popen:
    """2 ranks of `slim-edge quantize`; probe: a folder for tests/torchrun_probe.py's per-rank counts of forwards."""
    program = [str(PROBE)] if probe else ["--no-python", str(SLIM_EDGE)]
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        *program,
        "quantize",
        str(tiny_llama),
        "--scheme",
        OPTS["scheme"],
        "--steps",
        str(STEPS),
        "--batch-size",
        str(B),
        "--seq-len",
        str(OPTS["seq_len"]),
        "--lr",
        str(OPTS["lr"]),
        "--scale-lr",
        str(OPTS["scale_lr"]),
        "--calib",
        str(tiny_text),
        "--device",
        "cpu",
        "-o",
        str(out),
        *extra,
    ]
    # two ranks on a 2-core machine: one thread each, or they contend
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if probe:
        probe.mkdir(parents=True, exist_ok=True)
        env["SLIM_EDGE_PROBE"] = str(probe)
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # ranks out of step hang in a collective: fail, do not hang the suite
        for rank in (0, 1):  # torchrun starts its workers in sessions of their own: killpg misses them
            pid = _rank_pid(proc.pid, rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung past {timeout} s:\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def _one_process(tiny_llama, tiny_text, out: Path, **options) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same summation order in the matmuls
    try:
        return run_quantize(
            str(tiny_llama),
            QuantConfig(batch_size=2 * B, calib=str(tiny_text), **OPTS),
            out,
            progress=False,
            device="cpu",
            **options,
        )
    finally:
        torch.set_num_threads(threads)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its children are the workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads((folder / "report.json").read_text())["training"]["log"]}


def _assert_same_model(a: Path, b: Path):
    """The float tensors within float noise; the quantized linears' codes equal and their fp16 block scales
    within one fp16 ulp (fp32 noise can cross an fp16 rounding boundary), so a flipped code fails."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        if ta[k].is_floating_point():
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=k)
    wa, wb = dequantized_weights(read_meta(a), ta), dequantized_weights(read_meta(b), tb)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k] == 0, wb[k] == 0), k
        torch.testing.assert_close(wa[k], wb[k], rtol=2**-10, atol=0, msg=k)


def _assert_close_model(a: Path, b: Path, flipped: float):
    """As _assert_same_model, but a fraction `flipped` of each linear's weights may be off by more than 1 % (a
    flipped code), and the floats (norms) by 1e-3; block scales drift below 1 %."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        if ta[k].is_floating_point():
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-3, msg=k)
    wa, wb = dequantized_weights(read_meta(a), ta), dequantized_weights(read_meta(b), tb)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        off = ~torch.isclose(wa[k], wb[k], rtol=1e-2, atol=0)
        assert off.float().mean() <= flipped, (k, off.float().mean().item())


def _assert_same_losses(ref: dict[int, float], got: dict[int, float]):
    assert got and set(got) <= set(ref)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5), (step, loss, ref[step])


def _assert_fsdp_losses(ref: dict[int, float], got: dict[int, float]):
    for step, loss in got.items():  # the fsdp tolerance (test_two_fsdp_ranks_...)
        assert loss == pytest.approx(ref[step], rel=5e-3), (step, loss, ref[step])


def _assert_parallel_run(reference: Path, out: Path):
    """A 2-rank DDP or fsdp run (or its 1-process resume) against the 1-process run at twice the batch: the same
    losses to 1e-5 for the first FIRST_STEPS steps, then as fsdp's (rel 5e-3, at most 1e-3 flipped codes).

    The ranks' matmuls see batch B where the reference sees 2B, and an allreduce sums the two halves' grads where
    the reference sums one batch: on a CPU whose BLAS blocks by batch size (CI's, not this 2-core AVX2 box, where
    they agree to 1e-5 at all 12 steps) that is float noise, which Adam and the ternary codes amplify as under
    fsdp: measured on CI 1.3e-4 relative at step 6, within 1e-5 up to step 5. A wrong data split or no gradient
    averaging is off by > 1e-3 at step 1 or 2."""
    ref, got = _losses(reference), _losses(out)
    assert got and set(got) <= set(ref)
    _assert_same_losses(ref, {s: v for s, v in got.items() if s <= FIRST_STEPS})
    _assert_fsdp_losses(ref, got)
    _assert_close_model(reference, out, flipped=1e-3)


@pytest.fixture(scope="module")
def reference(tiny_llama, tiny_text, tmp_path_factory) -> Path:
    """1 process, batch 2B."""
    out = tmp_path_factory.mktemp("ref") / "out"
    _one_process(tiny_llama, tiny_text, out)
    return out


@pytest.fixture(scope="module")
def stopped(tiny_llama, tiny_text, tmp_path_factory) -> tuple[Path, int, str]:
    """2 ranks, saving every step; SIGTERM to rank 1 alone once the first save is there."""
    return _stop_rank_1(tiny_llama, tiny_text, tmp_path_factory.mktemp("stopped") / "out")


@pytest.fixture(scope="module")
def stopped_fsdp(tiny_llama, tiny_text, tmp_path_factory) -> tuple[Path, int, str]:
    """As `stopped`, under --shard fsdp."""
    return _stop_rank_1(tiny_llama, tiny_text, tmp_path_factory.mktemp("stopped_fsdp") / "out", "--shard", "fsdp")


def _stop_rank_1(tiny_llama, tiny_text, out: Path, *extra: str) -> tuple[Path, int, str]:
    ckpt = out.with_name("out.partial") / "train.dcp" / ".metadata"
    proc = _torchrun(tiny_llama, tiny_text, out, "--checkpoint-every", "1", *extra)
    t0 = time.monotonic()
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() - t0 < 90:
        time.sleep(0.01)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None and ckpt.is_file(), "training did not start"
    os.kill(pid, signal.SIGTERM)
    rc, _, stderr = _finish(proc)
    return out, rc, stderr


def test_two_ranks_sample_half_the_teacher_batches_each_and_draw_what_one_process_draws(
    tiny_llama, tiny_text, tmp_path, monkeypatch
):
    from slim_edge.gendata import teacher_tokens
    from slim_edge.models import load_model
    from slim_edge.train import calibration_tokens

    samples, probe = tmp_path / "samples", tmp_path / "probe"
    monkeypatch.setenv("SLIM_EDGE_SAMPLES", str(samples))
    L = OPTS["seq_len"]
    # 5 sequences in sampling batches of 2: batches 0 and 2 (3 sequences) on rank 0, batch 1 (2) on rank 1
    calib = f"{tiny_text},teacher:{5 * L}:batch=2"
    proc = _torchrun(tiny_llama, tiny_text, tmp_path / "out", "--calib", calib, "--steps", "1", probe=probe)
    rc, _, stderr = _finish(proc)
    assert rc == 0, stderr[-3000:]
    drawn = [json.loads((probe / f"rank{r}.json").read_text())["teacher_tokens"] for r in (0, 1)]
    assert drawn == [[3 * L], [2 * L]]
    (kept,) = samples.glob("*.pt")
    blob = torch.load(kept, weights_only=True)
    model, tok = load_model(str(tiny_llama))[:2]
    starts = calibration_tokens(tok, str(tiny_text))[0]
    one = teacher_tokens(model, 5 * L, L, starts, device="cpu", seed=1, batch=2, progress=False)  # seed 0 + source 1
    assert blob["dropped"] == 0 and torch.equal(blob["ids"].to(torch.int64), one)


def test_world_from_env():
    assert world_from_env({}) == World()
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(SlimEdgeError, match="RANK 4 is outside WORLD_SIZE 4"):
        world_from_env({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(SlimEdgeError, match="--block-steps 3 is not done under torchrun"):
        check_distributed(World(0, 2), QuantConfig(block_steps=3), measure=False)
    with pytest.raises(SlimEdgeError, match="--ptq gptq"):
        check_distributed(World(1, 2), QuantConfig(ptq="gptq"), measure=False)


def test_rank_shards_are_the_global_batch():
    ids = torch.arange(1000)
    one = next(_batches(ids, 2 * B, 16, np.random.default_rng(0)))[0]
    shards = [next(_batches(ids, B, 16, np.random.default_rng(0), World(r, 2)))[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), one)


def test_accumulated_passes_are_the_rows_of_the_global_batch():
    """2 ranks x 1 sequence x 2 accumulated passes draw the rows one process draws at batch 4, rank 0 the first two."""
    ids = torch.arange(1000)
    one = next(_batches(ids, 2 * B, 16, np.random.default_rng(0)))[0]
    micro = [next(_batches(ids, B // 2, 16, np.random.default_rng(0), World(r, 2), accumulation=2)) for r in range(2)]
    assert all(len(m) == 2 and m[0][0].shape == (B // 2, 16) for m in micro)
    assert torch.equal(torch.cat([x for m in micro for x, _ in m]), one)
    assert torch.equal(micro[1][0][1][:, :-1], one[B : B + 1, 1:])  # y is x shifted by one
    with pytest.raises(
        SlimEdgeError,
        match=r"--global-batch-size 8 is not a multiple of --batch-size 2 x 3 ranks "
        r"= 6: pass 6 or 12",
    ):
        QuantConfig(batch_size=2, global_batch_size=8).accumulation(3)
    with pytest.raises(
        SlimEdgeError,
        match=r"--global-batch-size 8 is not a multiple of --batch-size 3: pass a "
        r"multiple of it, e.g. 9",
    ):
        QuantConfig(batch_size=3, global_batch_size=8)
    cli = subprocess.run(
        [str(SLIM_EDGE), "quantize", "--batch-size", "3", "--global-batch-size", "8", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "slim-edge: error: --global-batch-size 8 is not a multiple of --batch-size 3" in cli.stderr, cli.stderr


def test_one_process_accumulating_two_passes_trains_as_one_pass_at_twice_the_batch(
    tiny_llama, tiny_text, tmp_path, reference, capfd
):
    """--batch-size B --global-batch-size 2B in one process: each step sums the gradients of two passes of B, each
    weighted 1/2, so the losses (the passes' mean) and the model are those of one pass of 2B (the reference),
    judged as a parallel run (the matmuls see B rows instead of 2B: float noise)."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_quantize(
            str(tiny_llama),
            QuantConfig(batch_size=B, global_batch_size=2 * B, calib=str(tiny_text), **OPTS),
            out,
            progress=False,
            device="cpu",
        )
    finally:
        torch.set_num_threads(threads)
    assert f"{STEPS} steps x {2 * B} ({B} x 2 accumulated passes) x {OPTS['seq_len']}" in capfd.readouterr().err
    assert len(_losses(out)) == STEPS
    _assert_parallel_run(reference, out)
    meta = read_meta(out)
    assert meta["training"]["tokens"] == STEPS * 2 * B * OPTS["seq_len"]


def test_two_ranks_accumulating_train_as_one_process_at_the_global_batch(tiny_llama, tiny_text, tmp_path, reference):
    """2 DDP ranks x 1 sequence x 2 accumulated passes (no all-reduce in the first pass's backward): the global
    batch of 4 = 2B, so the run is the reference's."""
    out = tmp_path / "out"
    rc, _, stderr = _finish(
        _torchrun(tiny_llama, tiny_text, out, "--batch-size", str(B // 2), "--global-batch-size", str(2 * B))
    )
    assert rc == 0, stderr[-3000:]
    assert f"{STEPS} steps x {2 * B} (2 ranks x {B // 2} x 2 accumulated passes)" in stderr
    _assert_parallel_run(reference, out)


def test_two_ranks_train_as_one_process_at_twice_the_batch(tiny_llama, tiny_text, tmp_path, reference):
    out = tmp_path / "out"
    rc, stdout, stderr = _finish(_torchrun(tiny_llama, tiny_text, out))
    assert rc == 0, stderr[-3000:]
    assert f"{STEPS} steps x {2 * B} (2 ranks x {B})" in stderr
    assert stderr.count("wrote ") == 1, "rank 1 printed its summary too"
    assert len(_losses(reference)) == STEPS
    _assert_parallel_run(reference, out)


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama, tiny_text, tmp_path_factory) -> tuple[Path, int, str]:
    """2 fsdp ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("fsdp") / "out"
    return (out, *_finish(_torchrun(tiny_llama, tiny_text, out, "--shard", "fsdp"))[::2])


def test_two_fsdp_ranks_train_as_one_process_at_twice_the_batch(fsdp_run, reference):
    """FSDP2 (fully_shard per decoder layer and the root, gloo): reduce-scattered grads, the global-norm clip and
    the sharded AdamW train as the 1-process run; rank 0 writes the same folder.

    Tight only until the first code flips: the clip (active: the norms are 1.03-1.49 in these steps) takes a norm
    summed from the shards in another order, 1.8e-6 relative off DDP's at step 1 (measured; the losses of steps 1-2
    equal DDP's to 8 digits: Adam's first step is scale-free), Adam turns that into lr-sized steps on near-zero
    grads from step 2, and once a ternary code flips the runs part chaotically (measured: 5e-7 at step 3, 3e-5 at 4,
    1.5e-3 at 12; 1.7e-4 of the codes flipped, the scales < 1 % apart). So: DDP's 1e-5 for the first FIRST_STEPS steps,
    and 5e-3 and at most 1e-3 flipped codes after that. A wrong data split or no gradient averaging is off by > 1e-3 at
    step 1 or 2."""
    out, rc, stderr = fsdp_run
    assert rc == 0, stderr[-3000:]
    assert stderr.count("wrote ") == 1, "rank 1 printed its summary too"
    assert json.loads((out / "report.json").read_text())["shard"] == "fsdp"
    assert len(_losses(reference)) == STEPS and set(_losses(out)) == set(_losses(reference))
    _assert_parallel_run(reference, out)


def test_a_sharded_teacher_gives_the_losses_of_a_replicated_one(fsdp_run, tiny_llama, tiny_text, tmp_path):
    """--shard-teacher: the teacher's layers fully_shard-ed as the student's, gathered for its no-grad forward; the
    gathered weights are the teacher's own, so the 2-rank fsdp run's losses and model are the replicated teacher's."""
    out = tmp_path / "out"
    rc, _, stderr = _finish(_torchrun(tiny_llama, tiny_text, out, "--shard", "fsdp", "--shard-teacher"))
    assert rc == 0, stderr[-3000:]
    ref, got = _losses(fsdp_run[0]), _losses(out)
    assert len(got) == STEPS
    _assert_same_losses(ref, got)
    _assert_same_model(fsdp_run[0], out)


def test_activation_checkpointing_under_fsdp_recomputes_and_trains_the_same(fsdp_run, tiny_llama, tiny_text, tmp_path):
    """--activation-checkpointing over 2 fsdp ranks: on each rank every training step runs the decoder layer's MLP
    twice with autograd on (the forward and its recompute in the backward; the run without it: once), and the losses
    and the model are those of the same run without it, judged as _assert_parallel_run judges a parallel run."""
    out, probe = tmp_path / "out", tmp_path / "probe"
    rc, _, stderr = _finish(
        _torchrun(tiny_llama, tiny_text, out, "--shard", "fsdp", "--activation-checkpointing", probe=probe)
    )
    assert rc == 0, stderr[-3000:]
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    for rank in (0, 1):
        calls = json.loads((probe / f"rank{rank}.json").read_text())
        assert calls["LlamaMLP"] == 2 * STEPS * layers, (rank, calls)
    ref, got = _losses(fsdp_run[0]), _losses(out)
    assert len(got) == STEPS and set(got) == set(ref)
    _assert_parallel_run(fsdp_run[0], out)


BF16_LOSS_BOUND = 5e-2  # bf16 gathered weights: relative to the fp32 fsdp run's loss at every step (measured 1.9e-2)


def test_fsdp_bf16_precision_trains_near_fp32_with_fp32_masters(fsdp_run, tiny_llama, tiny_text, tmp_path):
    """--fsdp-precision bf16 over 2 gloo ranks runs (bf16 all-gathers, fp32 reduce-scatters) and its losses stay
    within BF16_LOSS_BOUND of the fp32 run's; in one process under the same policy the sharded parameters, their
    gradients and AdamW's moments stay fp32 while the forward computes in bf16."""
    out = tmp_path / "out"
    rc, _, stderr = _finish(_torchrun(tiny_llama, tiny_text, out, "--shard", "fsdp", "--fsdp-precision", "bf16"))
    assert rc == 0, stderr[-3000:]
    ref, got = _losses(fsdp_run[0]), _losses(out)
    assert len(got) == STEPS
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    assert 0 < worst <= BF16_LOSS_BOUND, worst  # > 0: the weights really were bf16

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from slim_edge.distributed import fully_sharded
    from slim_edge.qlinear import QuantLinear
    from slim_edge.quantize import make_plan, quantize_
    from slim_edge.train import _optimizer, _trained, decoder_layers, train_step

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, vocab_size=256
            )
        ).eval()
        config = QuantConfig(scheme="sherry", steps=1, batch_size=2, seq_len=32)
        student = __import__("copy").deepcopy(teacher)
        quantize_(student, config, make_plan(student, config))
        qlayers = [m for m in student.modules() if isinstance(m, QuantLinear)]
        fully_sharded(student, decoder_layers(student), "bf16")
        weights, scales, others = _trained(student, qlayers)
        for p in student.parameters():
            p.requires_grad_(any(p is q for q in weights + scales + others))
        seen = []
        qlayers[0].register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, m.scale.dtype)))
        opt = _optimizer(weights, others, scales, config)
        x = torch.randint(0, 256, (2, 33))
        train_step(student, teacher, x[:, :-1], x[:, 1:], opt, weights + others, scales, config, "cpu")
        assert seen == [(torch.bfloat16, torch.bfloat16)]  # what the forward multiplied
        masters = weights + scales + others
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in masters)
        assert all(p.grad.dtype == torch.float32 for p in masters)
        assert {v.dtype for st in opt.state.values() for k, v in st.items() if k != "step"} == {torch.float32}
    finally:
        dist.destroy_process_group()


def test_shard_takes_auto_ddp_or_fsdp():
    with pytest.raises(SlimEdgeError, match=r"--shard 'zero3': choose one of auto, ddp, fsdp"):
        QuantConfig(shard="zero3")
    with pytest.raises(SlimEdgeError, match=r"--fsdp-precision 'fp16': choose one of fp32, bf16"):
        QuantConfig(fsdp_precision="fp16")
    assert sharding(World(), "fsdp") is None  # one process: no sharding
    assert sharding(World(0, 2), "auto") == "ddp"
    assert sharding(World(1, 2), "fsdp") == "fsdp"
    cli = subprocess.run([str(SLIM_EDGE), "quantize", "--shard", "zero3", "--dry-run"], capture_output=True, text=True)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "slim-edge: error: --shard 'zero3': choose one of auto, ddp, fsdp" in cli.stderr, cli.stderr


def test_sigterm_to_one_rank_saves_a_loadable_checkpoint(stopped):
    """DDP saves train.dcp/ as fsdp does: DCP writes each replicated tensor once, so both ranks' files hold a share
    (together one replica: each under 80 % of the two), and nothing half-written or in the train.pt layout is left."""
    out, rc, stderr = stopped
    assert rc != 0 and "interrupted at step" in stderr, stderr[-3000:]
    partial = out.with_name("out.partial")
    assert not out.exists() and not list(partial.glob("*.tmp")) and not list(partial.glob(".*.tmp"))
    folder = partial / "train.dcp"
    assert sorted(p.name for p in partial.glob("train*")) == ["train.dcp"]
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", DCP_META]
    sizes = [(folder / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert max(sizes) < 0.8 * sum(sizes), sizes
    meta = json.loads((folder / DCP_META).read_text())
    assert 1 <= meta["state"]["step"] < STEPS and meta["global_batch"] == 2 * B
    assert f"interrupted at step {meta['state']['step']}/{STEPS}" in stderr  # both ranks stopped at the saved step


def test_one_process_resumes_a_two_rank_checkpoint(tiny_llama, tiny_text, reference, stopped, tmp_path):
    """2 DDP ranks -> 1 process, from train.dcp/."""
    out = _copied(stopped, tmp_path)
    step = _dcp_step(out)
    _one_process(tiny_llama, tiny_text, out, resume=True)
    got = _losses(out)
    assert min(got) == step + 1 and max(got) == STEPS
    _assert_parallel_run(reference, out)


def _copied(stopped: tuple[Path, int, str], tmp_path: Path) -> Path:
    """A copy of a stopped run's OUT.partial beside tmp_path/out, so that resuming it leaves the fixture's alone."""
    out = tmp_path / "out"
    shutil.copytree(stopped[0].with_name("out.partial"), out.with_name("out.partial"))
    return out


def _dcp_step(out: Path) -> int:
    return json.loads((out.with_name("out.partial") / "train.dcp" / DCP_META).read_text())["state"]["step"]


def test_fsdp_checkpoint_is_sharded_dcp_and_one_process_resumes_it(
    stopped_fsdp, tiny_llama, tiny_text, reference, tmp_path
):
    """SIGTERM under fsdp: each rank wrote its own shard file into train.dcp/ (torch.distributed.checkpoint), nothing
    half-written is left, and one process resumes it (2 ranks -> 1) as the uninterrupted run continues."""
    _, rc, stderr = stopped_fsdp
    assert rc != 0 and "interrupted at step" in stderr, stderr[-3000:]
    out = _copied(stopped_fsdp, tmp_path)
    partial = out.with_name("out.partial")
    folder = partial / "train.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", DCP_META]
    assert sorted(p.name for p in partial.glob("train*")) == ["train.dcp"]  # no train.pt, .tmp or .old beside it
    sizes = [(folder / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert min(sizes) > 0.3 * sum(sizes)  # each rank's share, not one rank's gathered copy
    step = _dcp_step(out)
    assert 1 <= step < STEPS and f"interrupted at step {step}/{STEPS}" in stderr
    assert json.loads((folder / DCP_META).read_text())["global_batch"] == 2 * B
    _one_process(tiny_llama, tiny_text, out, resume=True)
    got = _losses(out)
    assert min(got) == step + 1 and max(got) == STEPS
    _assert_fsdp_losses(_losses(reference), got)
    _assert_close_model(reference, out, flipped=1e-3)


@pytest.mark.parametrize("source,shard", [("stopped", "fsdp"), ("stopped_fsdp", "ddp"), ("stopped_fsdp", "fsdp")])
def test_two_ranks_resume_the_other_shardings_checkpoint(
    source, shard, request, tiny_llama, tiny_text, reference, tmp_path
):
    """2 DDP ranks -> 2 fsdp ranks, 2 fsdp -> 2 DDP and 2 fsdp -> 2 fsdp (each reading its own rows): DCP reads the
    replicated tensors DDP's ranks shared out into FSDP's rows, and FSDP's shards into DDP's full replicas; all
    continue as the uninterrupted run."""
    out = _copied(request.getfixturevalue(source), tmp_path)
    step = _dcp_step(out)
    rc, _, stderr = _finish(_torchrun(tiny_llama, tiny_text, out, "--shard", shard, "--resume"))
    assert rc == 0, stderr[-3000:]
    assert f"resumed from {out.with_name('out.partial') / 'train.dcp'} at step {step}" in stderr
    got = _losses(out)
    assert min(got) == step + 1 and max(got) == STEPS
    _assert_fsdp_losses(_losses(reference), got)
    _assert_close_model(reference, out, flipped=1e-3)


def _as_train_pt(folder: Path) -> Path:
    """A train.dcp/ rewritten as the train.pt of before DCP (one process's module and optimizer state dicts, the
    optimizer's parameters numbered in its param_groups' order, the DCP's slim_edge.json beside them); train.dcp/
    removed. Checked against opt.state_dict() of an AdamW with two groups: equal."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from slim_edge.distributed import by_index

    flat, ckpt = folder.with_name("flat.tmp"), folder.with_name("train.pt")
    dcp_to_torch_save(folder, flat)
    sd = torch.load(flat, weights_only=True)
    names = [n for g in sd["optim"]["param_groups"] for n in g["params"]]
    torch.save(
        {
            "model": sd["model"],
            "optimizer": by_index(sd["optim"], names),
            **json.loads((folder / DCP_META).read_text()),
        },
        ckpt,
    )
    flat.unlink()
    shutil.rmtree(folder)
    return ckpt


@pytest.mark.parametrize("shard,legacy", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_ranks_resume_a_one_process_dcp_checkpoint(shard, legacy, tiny_llama, tiny_text, reference, tmp_path):
    """1 -> 2: one process saves a DCP folder (one shard file, --shard alike); SIGTERM; 2 ranks (ddp or fsdp) resume
    it and end as the uninterrupted run (_assert_parallel_run's tolerance after the resumed step). legacy: the same
    state as an earlier version's train.pt, which fsdp ranks load through load_optimizer."""
    out = tmp_path / "out"
    folder = out.with_name("out.partial") / "train.dcp"
    argv = [
        str(SLIM_EDGE),
        "quantize",
        str(tiny_llama),
        "--scheme",
        OPTS["scheme"],
        "--steps",
        str(STEPS),
        "--batch-size",
        str(2 * B),
        "--seq-len",
        str(OPTS["seq_len"]),
        "--lr",
        str(OPTS["lr"]),
        "--scale-lr",
        str(OPTS["scale_lr"]),
        "--calib",
        str(tiny_text),
        "--device",
        "cpu",
        "-o",
        str(out),
        "--shard",
        shard,
        "--checkpoint-every",
        "1",
    ]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while not (folder / ".metadata").is_file() and proc.poll() is None and time.monotonic() - t0 < 90:
        time.sleep(0.01)
    assert (folder / ".metadata").is_file(), "training did not start"
    proc.send_signal(signal.SIGTERM)
    rc, _, stderr = _finish(proc)
    assert rc != 0 and "interrupted at step" in stderr, stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", DCP_META]
    step = _dcp_step(out)
    assert 1 <= step < STEPS
    where = _as_train_pt(folder) if legacy else folder
    rc, _, stderr = _finish(_torchrun(tiny_llama, tiny_text, out, "--shard", shard, "--resume"))
    assert rc == 0, stderr[-3000:]
    assert f"resumed from {where} at step {step}" in stderr and "warning" not in stderr.lower()
    got = _losses(out)
    assert min(got) == step + 1 and max(got) == STEPS
    _assert_fsdp_losses(_losses(reference), got)
    _assert_close_model(reference, out, flipped=1e-3)


def test_a_save_keeps_the_previous_checkpoint_until_the_new_one_is_whole(tmp_path):
    """save_sharded: a crash after the old folder moved aside and before the new one moved in leaves train.dcp.old,
    which sharded_checkpoint finds; a leftover train.dcp.tmp (a save that died half-way) is never read."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        lin = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(lin.parameters())
        folder = tmp_path / "train.dcp"
        save_sharded(World(), lin, opt, {"state": {"step": 1}}, folder)
        os.replace(folder, folder.with_name("train.dcp.old"))  # as if the next save died between its renames
        (tmp_path / "train.dcp.tmp").mkdir()  # and one more died while writing
        assert sharded_checkpoint(tmp_path / "train.pt") == folder.with_name("train.dcp.old")
        with torch.no_grad():
            lin.weight.fill_(7.0)
        save_sharded(World(), lin, opt, {"state": {"step": 2}}, folder)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["train.dcp"]
        with torch.no_grad():
            lin.weight.zero_()
        assert load_sharded(lin, opt, sharded_checkpoint(tmp_path / "train.pt"))["state"]["step"] == 2
        assert torch.equal(lin.weight, torch.full((2, 4), 7.0))
    finally:
        dist.destroy_process_group()


def test_a_damaged_or_foreign_dcp_is_refused_with_its_reason(tmp_path):
    """load_sharded: another model's state, a truncated or missing shard file and a damaged slim_edge.json are each
    one SlimEdgeError line naming the folder and DCP's reason, not CheckpointException's per-rank tracebacks."""
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters())
    folder = tmp_path / "train.dcp"
    save_sharded(World(), lin, opt, {"state": {"step": 1}}, folder)
    other = torch.nn.Linear(4, 2)
    with pytest.raises(
        SlimEdgeError,
        match=r"train\.dcp: cannot resume from it \(ValueError: Size mismatch between "
        r"saved torch\.Size\(\[3, 4\]\) and current: torch\.Size\(\[2, 4\]\) "
        r"for model\.weight\).*--force instead of --resume",
    ):
        load_sharded(other, torch.optim.AdamW(other.parameters()), folder)
    shard = folder / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimEdgeError, match=r"cannot resume from it \(EOFError\)"):
        load_sharded(lin, opt, folder)
    shard.unlink()
    with pytest.raises(SlimEdgeError, match=r"cannot resume from it \(FileNotFoundError: .*No such file"):
        load_sharded(lin, opt, folder)
    shard.write_bytes(data)
    assert load_sharded(lin, opt, folder)["state"]["step"] == 1
    (folder / DCP_META).write_text("{")
    with pytest.raises(SlimEdgeError, match=r"cannot resume from it \(JSONDecodeError: Expecting property name"):
        load_sharded(lin, opt, folder)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_save_holds_two_training_states_at_most(tmp_path, monkeypatch):
    """A crash after a save's renames and before it removed train.dcp.old/ leaves it beside a whole train.dcp/: the
    next save removes it before writing train.dcp.tmp/, so when the new state is whole (just before its rename) the
    folder holds 2 states, as pipeline.disk_need counts, not 3."""
    from slim_edge import distributed

    module = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(2, 256)).sum().backward()
    opt.step()
    folder = tmp_path / "train.dcp"
    save_sharded(World(), module, opt, {"state": {"step": 1}}, folder)
    one = _bytes(folder)
    assert one > 3 * 256 * 256 * 4  # the weight and its two moments
    shutil.copytree(folder, folder.with_name("train.dcp.old"))  # the crash's leftover
    peak, fsync_tree = [], distributed.fsync_tree
    monkeypatch.setattr(distributed, "fsync_tree", lambda p: peak.append(_bytes(tmp_path)) or fsync_tree(p))
    save_sharded(World(), module, opt, {"state": {"step": 2}}, folder)
    assert len(peak) == 1 and peak[0] / one == pytest.approx(2, abs=0.01), (peak, one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.dcp"]
    assert load_sharded(module, opt, folder)["state"]["step"] == 2


def test_sigterm_to_the_whole_job_saves_a_loadable_checkpoint(tiny_llama, tiny_text, tmp_path):
    """As `kill -TERM -PGID` or a scheduler ending the job: torchrun gets SIGTERM and passes it to both ranks."""
    out = tmp_path / "out"
    ckpt = out.with_name("out.partial") / "train.dcp" / ".metadata"
    proc = _torchrun(tiny_llama, tiny_text, out, "--checkpoint-every", "1")
    t0 = time.monotonic()
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() - t0 < 90:
        time.sleep(0.01)
    assert ckpt.is_file(), "training did not start"
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, stderr = _finish(proc)
    step = _dcp_step(out)
    assert rc != 0 and 1 <= step < STEPS
    partial = out.with_name("out.partial")
    assert not list(partial.glob("*.tmp")) and not list(partial.glob(".*.tmp"))
    assert stderr.count(f"interrupted at step {step}/{STEPS}") == 2, stderr[-3000:]  # each rank's error, one step


def test_data_parallel_takes_the_buffer_keyword_the_installed_torch_knows():
    """torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers; 2.11 (the lent H200's) has only the old
    name, and passing the new one there was a TypeError under torchrun."""
    assert no_buffer_sync(["self", "module", "broadcast_buffers"]) == {"broadcast_buffers": False}
    assert no_buffer_sync(["self", "module", "broadcast_buffers", "forward_sync_buffers"]) == {
        "forward_sync_buffers": False
    }
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(8, 4)
        wrapped = data_parallel(torch.nn.Linear(8, 4), "cpu")
        wrapped.module.load_state_dict(plain.state_dict())
        x = torch.randn(3, 8)
        plain(x).square().sum().backward()
        wrapped(x).square().sum().backward()
        assert torch.allclose(plain.weight.grad, wrapped.module.weight.grad, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_a_dcp_save_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    """save_sharded fsyncs every file of train.dcp.tmp/ (all ranks' shards, .metadata, slim_edge.json) and the
    folder before renaming it to train.dcp/, and the parent after: a crash just after the rename cannot leave
    train.dcp/ naming files the disk never got whole (the previous one, train.dcp.old/, is gone by then)."""
    module = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(2, 8)).sum().backward()
    opt.step()
    folder = tmp_path / "p" / "train.dcp"
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for step in (1, 2):  # the second save renames the first aside
        events.clear()
        save_sharded(World(), module, opt, {"state": {"step": step}}, folder)
        tmp = str(folder.with_name("train.dcp.tmp"))
        done = next(i for i, e in enumerate(events) if e == ("replace", tmp, str(folder)))
        synced = {e[1] for e in events[:done] if e[0] == "fsync"}
        files = {str(p).replace(str(folder), tmp) for p in folder.iterdir()}
        assert files and files <= synced and tmp in synced, (files - synced, events)
        assert ("fsync", str(folder.parent)) in events[done:]
        assert json.loads((folder / DCP_META).read_text())["state"]["step"] == step
    assert sorted(p.name for p in folder.parent.iterdir()) == ["train.dcp"]
