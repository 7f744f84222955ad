"""QAT with distillation from the full-precision model.

Loss = CE + KD, with KD from CAKLD (confidence-aware KL, BitDistiller): per token,
conf = p_teacher(label); kd = conf * KL(student || teacher) + (1 - conf) * KL(teacher || student).
Sherry's Arenas weight λ_t ramps linearly 0 -> λ_max over the warm-up, then cosine-decays to 0 at
the last step, so the final model has no residual branch.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .distill import distill_loss  # noqa: F401  (re-exported: the loss lives in distill.py)
from .distributed import (
    World,
    agree,
    barrier,
    data_parallel,
    fully_sharded,
    global_mean,
    load_optimizer,
    load_sharded,
    save_sharded,
    sharded_checkpoint,
    sharded_teacher,
    sharding,
)
from .errors import SlimEdgeError
from .fsutil import path_kind
from .qlinear import QuantLinear, compiled_kernels
from .quantize import QuantConfig
from .schemes import get_scheme


def arenas_lambda(step: int, total: int, lam_max: float, warmup_frac: float) -> float:
    if total <= 0 or lam_max == 0:
        return 0.0
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return lam_max * step / warm
    if step >= total - 1:
        return 0.0
    t = (step - warm) / max(1, total - 1 - warm)
    return lam_max * 0.5 * (1 + math.cos(math.pi * t))


def schedule_step(step: int, total: int, start_step: int, time_frac: float | None) -> int:
    """The step that the lr and Arenas schedules see.

    Without a time limit it is the real step. With one it is the real step or, when further, the share of the
    time budget that will have passed by the end of this step mapped onto the steps left: a run that the
    limit cuts short still ends its schedules, so Arenas reaches 0 and the saved model needs no residual."""
    if time_frac is None:
        return step
    return max(step, min(total - 1, start_step + int(time_frac * (total - start_step))))


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def calib_file(calib: str) -> Path | None:
    """The file a --calib text source names (refused when there is none), or None for a built-in corpus name."""
    path = Path(calib).expanduser()
    if not (path.suffix or path.exists() or os.sep in calib):
        return None
    kind = path_kind(path, "--calib")
    if kind != "a file":
        raise SlimEdgeError(
            f"--calib {calib}: {'no such file' if kind is None else 'it is ' + kind}; pass a UTF-8 "
            f"text file or a built-in corpus name (wiki, lee, pydoc, pydocs)"
        )
    size = path.stat().st_size
    # an empty (or blank) file was refused only after the model had loaded, when it came to be tokenized
    if size == 0 or (size < 1 << 16 and not path.read_bytes().strip()):
        raise SlimEdgeError(
            f"--calib {calib}: the file is empty ({size} bytes); pass a UTF-8 text file of at "
            f"least a few thousand tokens"
        )
    return path


def calibration_tokens(tokenizer, calib: str) -> tuple[torch.Tensor, str]:
    """Token ids of the training text, and where it came from."""
    path = calib_file(calib)
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlimEdgeError(f"--calib {calib}: cannot read it as UTF-8 text ({e})") from None
        source = f"file {path}"
    else:
        from .corpora import get_text

        text, source = get_text(calib, split="train")
    from .memory import tokenize_in_pieces  # a 100 MB --calib file in one tokenizer call needs > 8 GB

    ids = torch.from_numpy(
        tokenize_in_pieces(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], text).astype(np.int64)
    )
    if len(ids) < 64:
        raise SlimEdgeError(f"--calib {calib}: only {len(ids)} tokens; give at least a few thousand")
    return ids, source


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None


def _batches(
    ids: torch.Tensor, batch: int, seq: int, rng: np.random.Generator, world: World = World(), accumulation: int = 1
):
    """Steps of `accumulation` micro-batches of `batch` sequences per rank: the global batch of
    world.size * accumulation * batch is drawn on every rank and each takes its own rows, cut into micro-batches, so
    the stream does not depend on how many ranks share it or how many passes each rank makes (accumulation 1: each
    step is one (x, y))."""
    seq = min(seq, len(ids) - 1)
    per_rank = batch * accumulation
    lo = world.rank * per_rank
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, size=per_rank * world.size)[lo : lo + per_rank]
        x = torch.stack([ids[s : s + seq + 1] for s in starts])
        micro = [(x[i : i + batch, :-1], x[i : i + batch, 1:]) for i in range(0, per_rank, batch)]
        yield micro[0] if accumulation == 1 else micro


def _quant_params(qlayers):
    """(latent weights and biases, block scales) of the QuantLinear layers."""
    weights = [m.weight for m in qlayers] + [m.bias for m in qlayers if m.bias is not None]
    return weights, [m.scale for m in qlayers]


def _trained(student, qlayers):
    """(latent weights and biases, block scales, other trained parameters: the norms; the embedding and head
    stay frozen)."""
    weights, scales = _quant_params(qlayers)
    qparams = {id(p) for p in weights + scales}
    others = [
        p for n, p in student.named_parameters() if id(p) not in qparams and "embed" not in n and "lm_head" not in n
    ]
    return weights, scales, others


def _checkpoint(ckpt_path: Path | None, device: str) -> dict | None:
    """The training state in ckpt_path, or None when there is none."""
    if ckpt_path is None or not ckpt_path.is_file():
        return None
    try:  # tensors and plain numbers only: a crafted pickle in OUT.partial/ must not run code on --resume
        return torch.load(ckpt_path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SlimEdgeError(
            f"{ckpt_path}: refusing to resume from it: it holds more than tensors and numbers "
            f"({first}); delete it to start over"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated: torch's zip reader fails, or a pickle ends early
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SlimEdgeError(
            f"{ckpt_path}: cannot resume from it ({first}): it is damaged; run with --force "
            f"instead of --resume to start over"
        ) from None


def _optimizer(weights, others, scales, config: QuantConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with two groups: latent weights (+ other trained parameters) at lr, block scales at scale_lr.
    fused: one CUDA kernel for all parameters (the same update as the default per-tensor loops)."""
    return torch.optim.AdamW(
        [
            {"params": weights + others, "lr": config.lr, "weight_decay": 0.0},
            {"params": scales, "lr": config.scale_lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.95),
        fused=fused or None,
    )


def _step(opt, scales, config: QuantConfig) -> None:
    """One optimizer step; with scale_update "relative" the scales take Adam's step in log space.

    d = exp(u): dL/du = d * dL/dd, and Adam's step du becomes d <- d * exp(du), so the step is a fraction
    of the scale (at most ~scale_lr) for a scale of 1e-3 as for one of 0.3, and d stays positive."""
    if config.scale_update != "relative":
        opt.step()
        return
    live = [s for s in scales if s.grad is not None]
    with torch.no_grad():
        before = torch._foreach_mul(live, 1.0)
        torch._foreach_mul_([s.grad for s in live], live)
    opt.step()
    with torch.no_grad():
        step = torch._foreach_sub(live, before)
        torch._foreach_exp_(step)
        torch._foreach_mul_(step, before)
        for s, v in zip(live, step):
            s.copy_(v)


def _schedule(opt, step: int, total: int, warmup: int, config: QuantConfig) -> None:
    for g, base in zip(opt.param_groups, (config.lr, config.scale_lr)):
        g["lr"] = learning_rate(step, total, base, warmup)


def train_step(
    student,
    teacher,
    x,
    y,
    opt,
    clipped,
    scales,
    config: QuantConfig,
    device: str,
    loss_fn=distill_loss,
    micro: list | None = None,
):
    """One QAT step: teacher forward, student forward and backward, clip, optimizer step; (loss, ce, kd).

    micro: the step's micro-batches [(x, y), ...] instead of x, y (gradient accumulation): each backward adds
    1/len(micro) of its loss's gradient, so the step's gradient is the mean over all of them as one batch's would be
    (equal micro-batches, a loss that is a mean over tokens); under DDP only the last one all-reduces (_gradient_sync).
    The losses returned are the micro-batches' mean."""
    micro = micro or [(x, y)]
    opt.zero_grad(set_to_none=True)
    total = []
    for i, (xi, yi) in enumerate(micro):
        last = i == len(micro) - 1
        with _gradient_sync(student, last):
            # bf16 autocast on GPUs speeds training; exactness lives in the exported values, not here
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                with torch.no_grad():
                    t_logits = teacher(xi).logits if config.distill != "none" else None
                s_logits = student(xi).logits
            parts = loss_fn(s_logits, t_logits, yi, config.distill, ce_weight=config.ce_weight)
            del s_logits, t_logits
            (parts[0] / len(micro)).backward()  # / 1 is exact: one pass is the plain step
        total.append([p.detach() for p in parts])
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    _step(opt, scales, config)
    return tuple(torch.stack(col).mean() for col in zip(*total))


@contextlib.contextmanager
def _gradient_sync(model, sync: bool):
    """DDP: no all-reduce in this backward unless `sync` (no_sync; the gradients add up locally). FSDP2 reduce-scatters
    every pass: skipping it would hold unsharded gradients (the full model's, what fsdp is there to avoid) until the
    last pass, and the memory plan counts 1/N. One process: nothing to skip."""
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield


def train(
    student,
    teacher,
    ids: torch.Tensor,
    config: QuantConfig,
    ckpt_path: Path | None = None,
    every: int = 0,
    device: str = "cpu",
    progress: bool = True,
    log=None,
    deadline: float | None = None,
    clock=time.monotonic,
    world: World = World(),
) -> TrainState:
    """QAT for config.steps steps; resumes from ckpt_path when it exists. Ctrl-C or SIGTERM saves and stops.

    Under torchrun (world.size > 1) DDP (or FSDP2's reduce-scatter, config.shard "fsdp") averages the gradients
    before the clip and the optimizer step, each rank trains on its rows of the global batch (_batches), and rank 0
    alone writes. Under fsdp `student` is left sharded; distributed.unsharded gathers it.

    At `deadline` (a `clock()` time) it stops early and returns; state.step tells how far it got. The lr and
    Arenas schedules then run on time (schedule_step), so they end at the deadline, not at config.steps."""
    from tqdm.auto import tqdm

    qlayers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    weights, scales, others = _trained(student, qlayers)
    trained = {id(p) for p in weights + scales + others}
    for p in student.parameters():
        p.requires_grad_(id(p) in trained)
    shard = sharding(world, config.shard)
    folder = None if ckpt_path is None else sharded_checkpoint(ckpt_path)
    blob = None if folder is not None else _checkpoint(ckpt_path, device)
    if blob is not None:  # into the plain student: FSDP then shards the resumed weights
        student.load_state_dict(blob["model"], strict=False)
    if config.activation_checkpointing:  # each decoder layer recomputes its forward in the backward
        recompute_layers(student)
    model = student
    if shard == "ddp":
        model = data_parallel(student, device)
    elif shard == "fsdp":  # the parameters become sharded DTensors: the optimizer takes those
        fully_sharded(student, decoder_layers(student), config.fsdp_precision)
        weights, scales, others = _trained(student, qlayers)
        if config.shard_teacher and teacher is not student:
            sharded_teacher(teacher, decoder_layers(teacher))
    opt = _optimizer(weights, others, scales, config, fused=device.startswith("cuda"))
    state = TrainState()
    rng = np.random.default_rng(config.seed)
    saved = None
    if folder is not None:  # each rank reads the rows it holds, whatever the world size and sharding that wrote it
        extra = load_sharded(student, opt, folder)
        state, saved = TrainState(**extra["state"]), extra["global_batch"]
        rng.bit_generator.state = extra["rng"]
    elif blob is not None:  # a train.pt of an earlier version (rank 0's replica): read, never written
        if shard == "fsdp":
            load_optimizer(student, opt, blob["optimizer"])
        else:
            opt.load_state_dict(blob["optimizer"])
        state, saved = TrainState(**blob["state"]), blob.get("global_batch")
        rng.bit_generator.state = blob["rng"]
    if folder is not None or blob is not None:
        where = ckpt_path if folder is None else folder
        print(f"slim-edge: resumed from {where} at step {state.step}", file=sys.stderr)
        if saved is not None and saved != config.global_batch(world.size):
            print(
                f"slim-edge: warning: {where} trained on a global batch of {saved} sequences, this run on "
                f"{config.global_batch(world.size)} ({config.batch_text(world.size)}): the data "
                f"stream differs from the uninterrupted run's",
                file=sys.stderr,
            )
    total = config.steps
    warmup = config.warmup or max(1, total // 20)
    accumulation = config.accumulation(world.size)
    batches = _batches(ids, config.batch_size, config.seq_len, rng, world, accumulation)
    teacher.eval()
    student.train()

    def save():
        """Every rank writes into train.dcp/ (distributed.save_sharded): under fsdp its own shards; under ddp DCP
        writes each replicated tensor once, spread over the ranks; one process writes all. Any world size and
        sharding resumes it. A train.pt (the layout before DCP, still read above) is removed once it is saved."""
        if ckpt_path is None:
            return
        extra = {"state": vars(state), "rng": rng.bit_generator.state, "global_batch": config.global_batch(world.size)}
        save_sharded(world, student, opt, extra, ckpt_path.with_suffix(".dcp"))
        if world.main and ckpt_path.exists():
            ckpt_path.unlink()

    interrupted = []
    old = {sig: signal.signal(sig, lambda *_: interrupted.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total, initial=state.step, disable=not progress, unit="step", file=sys.stderr, dynamic_ncols=True)
    t_start, step0 = clock(), state.step
    kernels = compiled_kernels(config.compile and device.startswith("cuda"))
    kernels.__enter__()
    stop = False
    try:
        while state.step < total:
            now = clock()
            time_frac = None
            late = deadline is not None and now >= deadline
            if deadline is not None and not late:
                per_step = (now - t_start) / (state.step - step0) if state.step > step0 else 0.0
                time_frac = (now + per_step - t_start) / max(deadline - t_start, 1e-9)
            # every rank stops at the same step (a signal to one is a stop for all) on rank 0's clock
            stop, late, time_frac = agree(world, bool(interrupted), late, time_frac, device)
            if stop:
                break
            if late:
                print(
                    f"slim-edge: time limit reached at step {state.step}/{total}; the lr and Arenas "
                    f"schedules ran on time and have ended: keeping what is trained",
                    file=sys.stderr,
                )
                break
            pos = schedule_step(state.step, total, step0, time_frac)
            # replay the data stream up to the resumed step is unnecessary: the rng state was saved
            micro = next(batches)
            micro = [(x.to(device), y.to(device)) for x, y in (micro if accumulation > 1 else [micro])]
            lam = arenas_lambda(pos, total, config.arenas_lambda, config.arenas_warmup)
            scheme = get_scheme(config.scheme)
            for m in qlayers:
                m.arenas = lam if scheme.arenas and m.mode == scheme.values else 0.0
            _schedule(opt, pos, total, warmup, config)
            t0 = time.perf_counter()
            loss, ce, kd = train_step(
                model, teacher, None, None, opt, weights + others, scales, config, device, micro=micro
            )
            val, ce, kd = global_mean(world, [loss, ce, kd], device)
            state.seconds += time.perf_counter() - t0
            state.step += 1
            state.tokens += sum(x.numel() for x, _ in micro) * world.size
            if not math.isfinite(val):
                raise SlimEdgeError(
                    f"training diverged at step {state.step} (loss {val}); "
                    f"lower --lr (now {config.lr}) or --scale-lr (now {config.scale_lr})"
                )
            state.first_loss = val if state.first_loss is None else state.first_loss
            state.last_loss = val
            bar.set_postfix(
                loss=f"{val:.3f}",
                ce=f"{float(ce):.3f}",
                kd=f"{float(kd):.3f}",
                lr=f"{opt.param_groups[0]['lr']:.1e}",
                tok_s=f"{state.tokens / state.seconds:.0f}",
            )
            bar.update(1)
            if log is not None:
                log(
                    {
                        "step": state.step,
                        "loss": val,
                        "ce": float(ce),
                        "kd": float(kd),
                        "arenas": lam,
                        "lr": opt.param_groups[0]["lr"],
                    }
                )
            if every and state.step % every == 0:
                save()
    finally:
        kernels.__exit__()
        bar.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for m in qlayers:
            m.arenas = 0.0
    if stop:
        save()
        barrier(world)  # no rank exits (and has torchrun end the others) before rank 0 has saved
        raise SlimEdgeError(
            f"interrupted at step {state.step}/{total}; the training state is saved in "
            f"{ckpt_path.with_suffix('.dcp')}: run the same "
            f"command with --resume to continue"
        )
    student.eval()
    return state


def recompute_layers(model) -> None:
    """--activation-checkpointing: each decoder layer runs under torch.utils.checkpoint (non-reentrant, so FSDP2's
    hooks gather the layer again for the recompute), through transformers' own per-layer switch."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name; the old one is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Captured(Exception):
    """Raised by the hook that grabs the first decoder layer's inputs, to stop the forward there."""


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise SlimEdgeError(
            f"block-wise reconstruction needs a decoder with model.layers (Llama-like); "
            f"{type(model).__name__} has none: use --block-steps 0"
        )
    return layers


def _layer_out(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _layer_inputs(model, batches: list[torch.Tensor], device: str):
    """Hidden states entering decoder layer 0 for each batch, and the keyword arguments (rotary embeddings,
    mask, positions) the model hands every layer, captured from a real forward pass."""
    seen = []

    def grab(_mod, args, kwargs):
        kw = dict(kwargs)
        seen.append((args[0] if args else kw.pop("hidden_states"), kw))
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return [h.detach() for h, _ in seen], seen[0][1]


def reconstruct_blocks(
    student, teacher, ids: torch.Tensor, config: QuantConfig, device: str = "cpu", progress: bool = True, log=None
) -> list[dict]:
    """Block-wise reconstruction before end-to-end QAT (EfficientQAT's Block-AP): layer by layer, the
    student's decoder layer learns, from the quantized model's own hidden states, to reproduce the FP
    layer's outputs (MSE); weights, block scales and norms train, config.block_steps steps per layer.

    Returns per layer the relative error ||out - target||^2 / ||target||^2 before and after."""
    from tqdm.auto import tqdm

    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    rng = np.random.default_rng(config.seed + 1)
    stream = _batches(ids, config.batch_size, config.seq_len, rng)
    batches = [next(stream)[0] for _ in range(max(1, config.block_samples // config.batch_size))]
    q_in, kwargs = _layer_inputs(student, batches, device)
    fp_in = list(q_in)

    def rel_err(layer, xs, targets):
        num = sum(float((_layer_out(layer, x, kwargs).float() - t.float()).pow(2).sum()) for x, t in zip(xs, targets))
        return num / max(sum(float(t.float().pow(2).sum()) for t in targets), 1e-30)

    rows = []
    bar = tqdm(
        total=len(s_layers) * config.block_steps,
        disable=not progress,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        desc="blocks",
    )
    try:
        for i, (sl, tl) in enumerate(zip(s_layers, t_layers)):
            with torch.no_grad():
                targets = [_layer_out(tl, x, kwargs) for x in fp_in]
                before = rel_err(sl, q_in, targets)
            qlayers = [m for m in sl.modules() if isinstance(m, QuantLinear)]
            weights, scales = _quant_params(qlayers)
            quant_ids = {id(p) for p in weights + scales}
            others = [p for p in sl.parameters() if id(p) not in quant_ids]
            for p in sl.parameters():
                p.requires_grad_(True)
            opt = _optimizer(weights, others, scales, config)
            steps = config.block_steps if qlayers else 0
            for step in range(steps):
                _schedule(opt, step, steps, max(1, steps // 20), config)
                j = int(rng.integers(len(q_in)))
                loss = F.mse_loss(_layer_out(sl, q_in[j], kwargs).float(), targets[j].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(weights + others, 1.0)
                _step(opt, scales, config)
                if not math.isfinite(loss.item()):
                    raise SlimEdgeError(
                        f"block-wise reconstruction diverged in layer {i} (loss {loss.item()}); "
                        f"lower --lr (now {config.lr}) or --scale-lr (now {config.scale_lr})"
                    )
                bar.set_postfix(layer=i, mse=f"{loss.item():.3g}")
                bar.update(1)
            for p in sl.parameters():
                p.requires_grad_(False)
            with torch.no_grad():
                after = rel_err(sl, q_in, targets)
                q_in = [_layer_out(sl, x, kwargs) for x in q_in]
            fp_in = targets
            rows.append({"layer": i, "rel_err_before": before, "rel_err_after": after, "steps": steps})
            if log is not None:
                log(rows[-1])
    finally:
        bar.close()
    return rows
