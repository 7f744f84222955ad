"""QAT step throughput and peak GPU memory, per scheme and per step variant, side by side in one run.

    python -m slim_edge.evals.lab.qat_throughput --schemes seq2,sherry --batch-size 32 --seq-len 512 \
        -o evals/reports/qat_throughput

One step = teacher forward + student forward/backward + loss + clip + optimizer step: `train.train_step`,
the function `slim-edge quantize` runs. Variants (each on a fresh student, same batches):
- `session10`: the loss through autograd of log_softmax (`distill_loss_reference`), fp32 teacher under
  autocast, eager fake quantization, per-tensor AdamW: the step of session 10
- `loss`: the chunked closed-form loss (toolchain/distill.py)
- `loss+bf16t`: and the teacher's weights held in bf16
- `loss+bf16t+kernels`: and fake quantization and the loss chunks through torch.compile, AdamW fused: what
  `slim-edge quantize` runs on a GPU (`--compile`, the default)
- `loss+bf16t+kernels+ddp`: and the student wrapped in DistributedDataParallel as `slim-edge quantize` wraps it
  under torchrun, with its per-step collectives (stop/clock agreement, the loss mean): under
  `torchrun --nproc-per-node N` the process group is torchrun's (nccl on CUDA, gloo on CPU), alone a one-rank
  group; at N=1 it is the cost of the distributed path itself, which `slim-edge quantize` skips at N=1
Speed does not depend on the values: batches are random token ids (seeded), and `--random` builds the model
with random weights in the named shape (no model file needed, as kernel benchmarks use random weights). Tokens/s counts
one rank's student tokens (batch x seq_len) per second of wall time, synchronised.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from torch.distributed.elastic.multiprocessing.errors import record

from slim_edge.distill import distill_loss, distill_loss_reference
from slim_edge.distributed import World, agree, backend, data_parallel, global_mean, rank_device, world_from_env
from slim_edge.models import load_model
from slim_edge.pipeline import pick_device
from slim_edge.qlinear import QuantLinear, compiled_kernels
from slim_edge.quantize import QuantConfig, make_plan, quantize_
from slim_edge.train import _optimizer, _quant_params, train_step

# Llama bodies by name, for --random: SmolLM2-135M's own shape and the 1B-class shape of issue 21
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
VARIANTS = ("session10", "loss", "loss+bf16t", "loss+bf16t+kernels", "loss+bf16t+kernels+ddp")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(base, scheme: str, variant: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    config = QuantConfig(scheme=scheme, steps=steps + warmup, batch_size=batch, seq_len=seq)
    teacher = copy.deepcopy(base)
    student = copy.deepcopy(base)
    quantize_(student, config, make_plan(student, config))
    for p in teacher.parameters():
        p.requires_grad_(False)
    if "bf16t" in variant:
        teacher.to(torch.bfloat16)
    qlayers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    weights, scales = _quant_params(qlayers)
    qids = {id(p) for p in weights + scales}
    others = [p for n, p in student.named_parameters() if id(p) not in qids and "embed" not in n and "lm_head" not in n]
    for n, p in student.named_parameters():
        p.requires_grad_(id(p) in qids or any(p is o for o in others))
    kernels = "kernels" in variant and device.startswith("cuda")
    opt = _optimizer(weights, others, scales, config, fused=kernels)
    model, world = student, World()
    if variant.endswith("+ddp"):
        world = _process_group(device)
        model = data_parallel(student, device)
    loss_fn = distill_loss_reference if variant == "session10" else distill_loss
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(min(4, steps + warmup))]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    student.train()
    losses = []
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t_first = time.perf_counter() - t_compile
            t0 = time.perf_counter()
        xy = data[i % len(data)].to(device)
        if model is not student:
            agree(world, False, False, 0.5, device)
        with compiled_kernels(kernels):
            loss, ce, kd = train_step(
                model, teacher, xy[:, :-1], xy[:, 1:], opt, weights + others, scales, config, device, loss_fn=loss_fn
            )
        if model is not student:
            loss = global_mean(world, [loss, ce, kd], device)[0]
        losses.append(float(loss))
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del teacher, student, opt, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "scheme": scheme,
        "variant": variant,
        "tokens_per_s": round(batch * seq * steps / dt),
        "step_s": round(dt / steps, 4),
        "peak_gib": None if peak is None else round(peak, 2),
        "warmup_s": round(t_first, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "losses": [round(v, 6) for v in losses],
    }


def _process_group(device: str) -> World:
    """torchrun's process group, or a one-rank group of this process (nccl on CUDA, gloo on CPU)."""
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend(device))
        else:
            dist.init_process_group(backend(device), store=dist.HashStore(), rank=0, world_size=1)
    # the World the collectives see: at one rank they are skipped, as in `slim-edge quantize`
    return World(dist.get_rank(), dist.get_world_size())


def random_model(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise typer.BadParameter(f"--random {shape!r}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).to(device).eval()


# under torchrun, a rank's traceback goes into torchrun's failure summary (without it only the exit code shows)
@record
def main(
    model: str = "smollm2-135m",
    random: bool = typer.Option(
        False, help="random weights in the shape named by --model (smollm2-135m, llama-1b, tiny): no model file"
    ),
    schemes: str = "seq2,sherry",
    variants: str = ",".join(VARIANTS),
    batch_size: int = 32,
    seq_len: int = 512,
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    output: Path = typer.Option(Path("evals/reports/qat_throughput"), "-o"),
):
    world = world_from_env()
    device = rank_device(world, pick_device(device))
    base = random_model(model, device) if random else load_model(model, device=device)[0]
    rows = []
    for scheme in schemes.split(","):
        for variant in variants.split(","):
            if variant not in VARIANTS:
                raise typer.BadParameter(f"variant {variant!r}; choose from {', '.join(VARIANTS)}")
            try:
                r = measure(base, scheme, variant, batch_size, seq_len, steps, warmup, device)
            except torch.cuda.OutOfMemoryError as e:
                r = {"scheme": scheme, "variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    base_rate = {r["scheme"]: r.get("tokens_per_s") for r in rows if r["variant"] == VARIANTS[0]}
    for r in rows:
        b = base_rate.get(r["scheme"])
        r["speedup"] = round(r["tokens_per_s"] / b, 2) if b and r.get("tokens_per_s") else None
    if dist.is_initialized():
        dist.destroy_process_group()
    if not world.main:
        return
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    info = {
        "command": "python -m slim_edge.evals.lab.qat_throughput " + shlex.join(sys.argv[1:]),
        "device": gpu,
        "torch": torch.__version__,
        "model": model + (" (random weights)" if random else ""),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "world_size": world.size,
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    lines = [
        f"# QAT step throughput: {info['model']}, {batch_size} x {seq_len} tokens per step, {gpu}",
        "",
        f"`{info['command']}` (torch {torch.__version__}; {steps} timed steps after {warmup} warm-up)",
        "",
        "| scheme | variant | tokens/s | x session10 | s/step | peak GiB | warm-up s | loss first→last |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['variant']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['scheme']} | {r['variant']} | {r['tokens_per_s']:,} | {r['speedup']} | {r['step_s']} | "
            f"{r['peak_gib']} | {r['warmup_s']} | {r['first_loss']}→{r['last_loss']} |"
        )
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: typer.run(main))
