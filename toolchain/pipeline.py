"""`slim-edge quantize` as a library call: load, plan, PTQ-initialise, QAT, save."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .budget import SENS_LEN, SENS_SEQS, budget_plan, check_bits, format_sensitivity, overrides_of
from .checkpoint import (
    check_output,
    init_from_checkpoint,
    is_checkpoint,
    read_meta,
    refuse_damaged_checkpoint,
    save_quantized,
)
from .distributed import (
    World,
    barrier,
    broadcast,
    joined,
    meta_copy,
    quiet,
    rank_device,
    sharded_checkpoint,
    sharding,
    unsharded,
    world_from_env,
)
from .errors import SlimEdgeError
from .fsutil import atomic_path, check_free_space
from .gendata import parse_calib, training_tokens
from .memory import check_model_config
from .memplan import available_memory, check_fits, choose_shard, format_memory_plan, plan_memory
from .models import architecture_of, load_model, resolve
from .ptq import gptq_, summary_line as gptq_summary
from .quantize import QuantConfig, format_plan, get_scheme, make_plan, plan_summary, quantize_
from .train import _batches, calib_file, distill_loss, reconstruct_blocks, seed_everything, train


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise SlimEdgeError(
            f"--device {device!r} is not a device slim-edge trains on; use auto, cpu, cuda (or cuda:N) or mps"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimEdgeError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    return device


@torch.no_grad()
def distill_eval(student, teacher, ids, config: QuantConfig, device: str, n_batches: int = 4) -> float:
    """Mean distillation loss on fixed batches (seeded apart from training's stream)."""
    rng = np.random.default_rng(10_000 + config.seed)
    batches = _batches(ids, config.batch_size, config.seq_len, rng)
    kind = "kl" if config.distill == "none" else config.distill
    total = 0.0
    for _ in range(n_batches):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        total += float(distill_loss(student(x).logits, teacher(x).logits, y, kind)[0])
    return total / n_batches


def continue_from(folder: Path, config: QuantConfig, teacher_model: str | None) -> str:
    """Check that `config` can continue checkpoint `folder`; the teacher to distil from."""
    meta = read_meta(folder)
    base = QuantConfig.from_json(meta["config"])
    for field in ("scheme", "target", "keep", "bits", "embedding_type"):
        if getattr(config, field) != getattr(base, field):
            raise SlimEdgeError(
                f"{folder} was made with {field} {getattr(base, field)!r}, not "
                f"{getattr(config, field)!r}; continue it with the same {field}, or start from the "
                f"full-precision model"
            )
    for field, what in (("act_quant", "rounds activations"), ("runtime_attention", "attends as the runtime does")):
        if getattr(base, field) and not getattr(config, field):
            flag = "--" + field.replace("_", "-")
            raise SlimEdgeError(f"{folder} was trained with {flag} (its model {what}); pass {flag} to continue it")
    if get_scheme(base.scheme).tequila:
        raise SlimEdgeError(
            f"{folder} is a {base.scheme} checkpoint: its dead-weight bias comes from latent "
            f"weights a checkpoint does not keep; start from the full-precision model"
        )
    teacher = teacher_model or meta.get("model")
    if not teacher:
        raise SlimEdgeError(f"{folder} does not say which model it was made from; pass --teacher MODEL")
    return teacher


# Past a few passes over one text, QAT on SmolLM2 overfits it (issue 17: 16 and 160 passes of wiki:train)
MAX_PASSES = 4


def _training_tokens(
    teacher, tok, config: QuantConfig, partial: Path, device: str, progress: bool, world: World = World()
):
    """The training tokens; sampled ones are kept in the .partial folder so that --resume trains on the same.
    Under torchrun rank 0 reads the kept tokens and the text; with teacher samples every rank reads the text that
    opens them and samples its share (gendata.cached_samples); rank 0's result goes to all."""
    cache = partial / "tokens.pt"
    key = {
        "calib": config.calib,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "model": getattr(teacher.config, "name_or_path", ""),
    }
    kept = None
    if world.main and cache.is_file():
        blob = torch.load(cache, weights_only=True)
        if [blob.get(k) for k in key] == list(key.values()):
            kept = blob["ids"], blob["source"]
    kept = broadcast(world, kept)
    if kept is not None:
        return kept
    sampled = any(n is not None for _, n in parse_calib(config.calib))
    args = (teacher, tok, config.calib, config.seq_len)
    kw = dict(device=device, seed=config.seed, progress=progress)
    if not sampled:  # text alone: rank 0 reads it
        return broadcast(world, training_tokens(*args, **kw) if world.main else None)
    ids, source = training_tokens(*args, **kw, world=world)  # every rank reads the text that opens the samples
    if world.main:  # sampled: not reproducible for free
        with atomic_path(cache) as tmp:
            torch.save({**key, "ids": ids, "source": source}, tmp)
    return broadcast(world, (ids, source))


def disk_need(model, config: QuantConfig) -> int:
    """Bytes a run writes beside -o at its peak, an upper bound: the training state in OUT.partial (train.dcp/:
    the student's fp32 state and AdamW's two moments, every parameter counted as trained), twice while a save
    replaces the last one (train.dcp/ and train.dcp.tmp/, then train.dcp.old/ and train.dcp/: save_sharded removes a
    train.dcp.old/ that a crash left beside a whole train.dcp/ before it writes, so never three), the teacher's
    samples (int64), and the checkpoint (every tensor counted in fp32)."""
    params = sum(p.numel() for p in model.parameters())
    state = 2 * (4 + 8) * params if config.steps > 0 else 0
    samples = 8 * sum(n.tokens for _, n in parse_calib(config.calib) if n is not None)
    return state + samples + 4 * params + (16 << 20)


def _sensitivity_tokens(teacher, tok, config: QuantConfig, ids: torch.Tensor | None, device: str) -> torch.Tensor:
    """The text --bits measures sensitivity on: the text sources of --calib alone, so that a dry run (which
    samples nothing) plans what the real run will; the teacher's samples only when there is no text, and
    then in a dry run a sample of the size the measurement reads (its plan can differ from the real run's)."""
    texts = [name for name, n in parse_calib(config.calib) if n is None]
    if not texts and ids is None:
        print(
            "slim-edge: dry run: --bits measures on one short teacher sample; the real run measures on all "
            "of them and may plan differently",
            file=sys.stderr,
        )
        return training_tokens(
            teacher,
            tok,
            f"teacher:{SENS_SEQS * SENS_LEN}",
            config.seq_len,
            device=device,
            seed=config.seed,
            progress=False,
        )[0]
    if not texts or (ids is not None and len(texts) == len(parse_calib(config.calib))):
        return ids
    return training_tokens(
        teacher, tok, ",".join(texts), config.seq_len, device=device, seed=config.seed, progress=False
    )[0]


def check_distributed(world: World, config: QuantConfig, measure: bool) -> None:
    """The phases that run per rank without sharing their results, refused under torchrun."""
    if world.size == 1:
        return
    for on, flag, what in (
        (config.block_steps > 0, f"--block-steps {config.block_steps}", "--block-steps 0"),
        (config.ptq == "gptq", "--ptq gptq", "--ptq rtn"),
        (measure, f"--bits {config.bits}", "no --bits"),
    ):
        if on:
            raise SlimEdgeError(
                f"{flag} is not done under torchrun yet (WORLD_SIZE {world.size}): run that phase "
                f"in one process with --steps 0 -o DIR, then train DIR under torchrun with {what}"
            )


def trained(partial: Path) -> bool:
    """The partial folder holds a training state: train.dcp/ (or the train.pt of an earlier version)."""
    return (partial / "train.pt").is_file() or sharded_checkpoint(partial / "train.pt") is not None


def run_quantize(
    model: str,
    config: QuantConfig,
    out: Path,
    *,
    force: bool = False,
    resume: bool = False,
    device: str | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    dry_run: bool = False,
    time_limit: float | None = None,
    teacher_model: str | None = None,
    memory_check: bool = True,
) -> dict:
    """time_limit: seconds for the whole run; QAT stops there and the model trained so far is saved.

    `model` may be a slim-edge checkpoint: training continues from its codes and scales, with the same plan,
    distilling from `teacher_model` (default: the model it was made from).

    Under torchrun (WORLD_SIZE in the environment) it trains data-parallel, one rank per process (distributed.py);
    rank 0 logs and writes, and every rank returns the report."""
    world = world_from_env()
    measure = config.bits is not None and not is_checkpoint(model)
    check_distributed(world, config, measure)
    config.accumulation(world.size)  # a global batch the ranks cannot split is refused before anything loads
    device = rank_device(world, pick_device(device))
    with joined(world, device), quiet(world):
        return _run_quantize(
            model,
            config,
            out,
            world=world,
            force=force,
            resume=resume,
            device=device,
            checkpoint_every=checkpoint_every,
            progress=progress and world.main,
            dry_run=dry_run,
            time_limit=time_limit,
            teacher_model=teacher_model,
            memory_check=memory_check,
        )


def plan_run_memory(
    folder: Path, config: QuantConfig, world: World, device: str, check: bool, dry_run: bool = False
) -> QuantConfig:
    """Print the memory plan of the QAT phase (memplan.py) from config.json, before anything is allocated, and
    refuse a run that will not fit the device (check; a dry run says so and goes on); --shard auto becomes ddp or
    fsdp by what fits. Returns the config with the shard chosen."""
    cfg = json.loads((folder / "config.json").read_text())
    available = broadcast(world, available_memory(device))  # rank 0's: every rank decides the same
    if config.shard == "auto" and world.size > 1 and available is not None:
        shard = choose_shard(cfg, config, world.size, available, device)
        print(f"slim-edge: --shard auto: {shard}", file=sys.stderr)
        config = dataclasses.replace(config, shard=shard)
    shard = sharding(world, config.shard)
    plan = plan_memory(cfg, config, device=device, world=world.size, shard=shard)
    if check and available is not None:
        try:
            check_fits(cfg, config, available, device=device, world=world.size, shard=shard)
        except SlimEdgeError as e:
            if not dry_run:
                raise
            print(f"slim-edge: dry run: the real run would stop here: {str(e).splitlines()[0]}", file=sys.stderr)
    print(format_memory_plan(plan, available), file=sys.stderr)
    return config


def _run_quantize(
    model: str,
    config: QuantConfig,
    out: Path,
    *,
    world: World,
    force: bool,
    resume: bool,
    device: str,
    checkpoint_every: int,
    progress: bool,
    dry_run: bool,
    time_limit: float | None,
    teacher_model: str | None,
    memory_check: bool = True,
) -> dict:
    out = Path(out)
    if dry_run and resume:
        raise SlimEdgeError(
            "--dry-run with --resume: a dry run trains nothing, so it resumes nothing; give one of them"
        )
    init = None
    if is_checkpoint(model):
        init, model = Path(model), continue_from(Path(model), config, teacher_model)
    elif teacher_model is not None:
        raise SlimEdgeError(
            f"--teacher {teacher_model}: a teacher is only chosen when MODEL is a slim-edge checkpoint "
            f"to continue; {model} is itself the full-precision model it distils from: leave "
            f"--teacher out"
        )
    deadline = None if not time_limit else time.monotonic() + time_limit
    partial = out.with_name(out.name + ".partial")
    # --resume without a partial run is a fresh run: it replaces nothing without --force
    check_output(
        out,
        force or (resume and partial.is_dir()),
        inputs=[p for p in (model, init) if p is not None and Path(p).exists()],
    )
    # a partial run that trained has a train.dcp/; one that failed before (bad input, Ctrl-C in GPTQ) holds at most
    # its teacher samples, which the next run with the same --calib, --seq-len, --seed and model reuses
    for item, sampling in parse_calib(config.calib):  # a missing file or bad syntax: before any loading
        if sampling is None:
            calib_file(item)
    started = trained(partial)
    if started and not resume and not force:
        raise SlimEdgeError(f"{partial} holds an unfinished run; pass --resume to continue it or --force to start over")
    check_model_config(refuse_damaged_checkpoint(resolve(model)), copies=2)  # teacher and student
    if config.steps > 0:
        config = plan_run_memory(resolve(model), config, world, device, memory_check, dry_run)
    seed_everything(config.seed)
    t_start = time.perf_counter()
    teacher, tok, folder = load_model(model, device=device)
    arch = architecture_of(teacher.config)
    # a continued checkpoint keeps its plan (--bits promotions included); --bits measures a new one
    plan = make_plan(teacher, config, None if init is None else overrides_of(read_meta(init)["plan"]))
    measure = config.bits is not None and init is None
    if not dry_run:  # before the slow parts, not at save time after all the training
        check_free_space(next(d for d in (out.parent, *out.parent.parents) if d.exists()), disk_need(teacher, config))
    if measure:
        check_bits(plan, config.bits, config.scheme)  # before the slow parts
    else:
        print(format_plan(plan), file=sys.stderr)
        if dry_run:
            return {"plan": [e.to_json() for e in plan], "summary": plan_summary(plan)}
    if partial.exists() and force and not resume and not dry_run and world.main:  # --force: start over
        shutil.rmtree(partial)
    barrier(world)
    had_partial = partial.exists()
    student = copy.deepcopy(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    sampled = any(n is not None for _, n in parse_calib(config.calib))
    if dry_run and sampled:  # a dry run samples nothing: minutes of a GPU, hours of a CPU
        ids = None
        print(f"slim-edge: dry run: the teacher samples of --calib {config.calib} are not drawn", file=sys.stderr)
    else:
        ids, source = _training_tokens(teacher, tok, config, partial, device, progress, world)
        print(f"slim-edge: training text: {source} ({len(ids):,} tokens)", file=sys.stderr)
    budget = None
    if measure:
        plan, budget = budget_plan(
            teacher, config, _sensitivity_tokens(teacher, tok, config, ids, device), device=device, progress=progress
        )
        print(format_plan(plan), file=sys.stderr)
        print(format_sensitivity(budget), file=sys.stderr)
        if dry_run:
            if not had_partial:
                shutil.rmtree(partial, ignore_errors=True)
            return {"plan": [e.to_json() for e in plan], "summary": plan_summary(plan), "budget": budget}
    quantize_(student, config, plan)
    if init is not None:
        init_from_checkpoint(student, init, seed=config.seed)
        print(f"slim-edge: continuing {init} (distilling from {model})", file=sys.stderr)
    batch = config.global_batch(world.size)  # --batch-size is per rank and pass
    seen = config.steps * batch * config.seq_len
    passes = seen / len(ids)  # windows are drawn uniformly from the joined text: every source alike
    if config.steps > 0:
        how = "" if batch == config.batch_size else f" ({config.batch_text(world.size)})"
        print(
            f"slim-edge: {config.steps} steps x {batch}{how} x {config.seq_len} = "
            f"{seen:,} tokens seen, {passes:.3g} passes over "
            f"every source (windows are drawn uniformly from the joined text)",
            file=sys.stderr,
        )
        if passes > MAX_PASSES:
            print(
                f"slim-edge: warning: {passes:.3g} passes over the same text (more than {MAX_PASSES}): the "
                f"student learns the text, not the teacher; add text (a file, or on a GPU the teacher's own: "
                f"--calib wiki,teacher:4M:temp=0.7:top_p=0.9:prompt=16) or lower --steps",
                file=sys.stderr,
            )
    ptq_rows, t_gptq = [], 0.0
    if config.ptq == "gptq" and init is None and not trained(partial):  # a resumed run is past it
        t0 = time.perf_counter()
        ptq_rows = gptq_(student, ids, config, device=device, progress=progress)
        t_gptq = time.perf_counter() - t0
        print(gptq_summary(ptq_rows, t_gptq, config), file=sys.stderr)
    t_ptq = time.perf_counter() - t_start
    # the evaluations and the writes are rank 0's: the replicas are identical
    loss_ptq = distill_eval(student, teacher, ids, config, device) if world.main else None
    log_lines = []
    if world.main:
        partial.mkdir(parents=True, exist_ok=True)
        with atomic_path(partial / "plan.json") as tmp:
            tmp.write_text(json.dumps([e.to_json() for e in plan], indent=1))
    barrier(world)
    state, blocks, loss_blocks, t_blocks = None, [], None, 0.0
    if config.block_steps > 0 and not trained(partial):  # a resumed run is past this phase
        t0 = time.perf_counter()
        blocks = reconstruct_blocks(student, teacher, ids, config, device=device, progress=progress)
        t_blocks = time.perf_counter() - t0
        loss_blocks = distill_eval(student, teacher, ids, config, device)
        print(
            f"slim-edge: block-wise reconstruction: relative error of the last layer "
            f"{blocks[-1]['rel_err_before']:.4f} -> {blocks[-1]['rel_err_after']:.4f}; distillation loss "
            f"{loss_ptq:.4f} -> {loss_blocks:.4f} ({t_blocks:.0f} s)",
            file=sys.stderr,
        )
    if config.steps > 0:
        # QAT's teacher only runs forward, under bf16 autocast anyway: on a GPU a bf16 copy saves the casts
        fast_teacher = copy.deepcopy(teacher).to(torch.bfloat16) if device.startswith("cuda") else teacher
        fsdp = sharding(world, config.shard) == "fsdp"
        if fsdp and config.shard_teacher and fast_teacher is teacher:
            fast_teacher = copy.deepcopy(teacher)  # train() shards it; the evaluations need it whole
        skeleton = meta_copy(student) if fsdp and world.main else None  # before train() shards the student
        state = train(
            student,
            fast_teacher,
            ids,
            config,
            ckpt_path=partial / "train.pt",
            every=checkpoint_every,
            device=device,
            progress=progress,
            log=log_lines.append,
            deadline=deadline,
            world=world,
        )
        if fsdp:
            student = unsharded(student, skeleton, device)
    if not world.main:
        barrier(world)  # while rank 0 evaluates and writes the folder
        return {}
    loss_qat = (
        distill_eval(student, teacher, ids, config, device)
        if config.steps > 0
        else loss_blocks
        if loss_blocks is not None
        else loss_ptq
    )
    if not math.isfinite(loss_qat):
        raise SlimEdgeError(
            f"the trained model's distillation loss is {loss_qat} (PTQ start: {loss_ptq:.4f}): "
            f"training diverged and nothing was written; run again with --force and a lower --lr (now "
            f"{config.lr}) or --scale-lr (now {config.scale_lr})"
        )
    summary = plan_summary(plan)
    report = {
        # a folder is stored absolute: continuing from another working directory must find the same teacher
        "model": str(Path(model).resolve()) if Path(model).exists() else str(model),
        "continued_from": None if init is None else str(init.resolve()),
        "architecture": arch.hf_name,
        "scheme": config.scheme,
        "device": device,
        "calibration": source,
        "plan_summary": summary,
        "budget": budget,
        "ranks": world.size,
        "shard": sharding(world, config.shard),
        "global_batch": batch,
        "distill_loss": {"ptq": loss_ptq, "blocks": loss_blocks, "final": loss_qat},
        "ptq": {"method": config.ptq, "samples": config.ptq_samples, "seconds": round(t_gptq, 1), "layers": ptq_rows},
        "blocks": {
            "steps_per_layer": config.block_steps,
            "samples": config.block_samples,
            "seconds": round(t_blocks, 1),
            "layers": blocks,
        },
        "training": {
            "steps": config.steps,
            "steps_done": state.step if state else 0,
            "seconds": round(state.seconds, 1) if state else 0.0,
            "tokens": state.tokens if state else 0,
            "text_tokens": len(ids),
            "passes": round((state.tokens if state else 0) / len(ids), 3),  # what the steps done saw
            "planned_passes": round(passes, 3),
            "ptq_seconds": round(t_ptq, 1),
            "log": log_lines[:: max(1, len(log_lines) // 200)],
        },
    }
    bits_note = (
        "" if budget is None else (f" (--bits {config.bits}: {budget['promoted']} tensors in {budget['promoted_to']})")
    )
    md = (
        f"# slim-edge quantize: {model} -> {config.scheme}\n\n"
        f"- calibration text: {source}\n- device: {device}, steps: {config.steps}\n"
        f"- block-wise reconstruction: {config.block_steps} steps per layer"
        f"{f', distillation loss after it {loss_blocks:.4f}' if loss_blocks is not None else ''}\n"
        f"- distillation loss: PTQ {loss_ptq:.4f} -> final {loss_qat:.4f}\n"
        f"- {summary['bits_per_weight']:.3f} bits per weight over {summary['weights'] / 1e6:.1f} M weights"
        f"{bits_note}\n\n"
        f"```\n{format_plan(plan)}\n```\n"
    )
    save_quantized(student.cpu(), plan, config, folder, out, extra=report, force=True, report_md=md)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"slim-edge: distillation loss PTQ {loss_ptq:.4f} -> {loss_qat:.4f}; wrote {out}", file=sys.stderr)
    barrier(world)
    return report
