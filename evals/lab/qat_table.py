"""QAT quality table: PyTorch perplexity on held-out text at PTQ (0 steps) and after QAT, per scheme.

    python -m slim_edge.evals.lab.qat_table --schemes seq2,sherry --steps 150 -o evals/reports/qat_cpu

Trains on `--calib` (default wiki:train), measures on lee:eval, which training never sees; writes
<out>.md and <out>.json with the commands, step counts and wall times. Checkpoints land in --runs.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import typer

from slim_edge.checkpoint import load_quantized
from slim_edge.corpora import get_text
from slim_edge.evals.backends import TorchLM
from slim_edge.evals.kld import concat_stats, summarize, token_stats
from slim_edge.evals.perplexity import make_chunks, perplexity, scored_logits
from slim_edge.models import load_model
from slim_edge.pipeline import pick_device, run_quantize
from slim_edge.quantize import QuantConfig


def held_out_ppl(model, tok, max_chunks: int, ctx: int = 512, reference=None) -> dict:
    """PPL on lee:eval in PyTorch; with a `reference` model (the FP one) also its mean KLD and same-top-1 %
    against it on the same tokens (the numbers `slim-edge eval -r` gives through the runtime)."""
    lm = TorchLM(model, tok)
    text, _ = get_text("lee", split="eval")
    chunks = make_chunks(lm.tokenize(text), ctx=ctx, max_chunks=max_chunks, add_bos=lm.add_bos, bos_id=lm.bos_id)
    if reference is None:
        r = perplexity(lm, chunks, progress=False)
        return {"ppl": r["ppl"], "ppl_err": r["ppl_err"], "tokens": r["tokens"]}
    ref = TorchLM(reference, tok)
    r = summarize(
        concat_stats(
            [
                token_stats(scored_logits(ref, c, chunks.first), scored_logits(lm, c, chunks.first), t)
                for c, t in zip(chunks.tokens, chunks.targets)
            ]
        )
    )
    return {k: r[k] for k in ("ppl", "ppl_err", "tokens", "mean_kld", "mean_kld_err", "same_top_pct")}


def main(
    model: str = "smollm2-135m",
    schemes: str = "seq2,sherry",
    steps: int = 150,
    batch_size: int = 4,
    seq_len: int = 256,
    lr: float = 5e-5,
    scale_lr: float = 3e-2,
    calib: str = "wiki",
    max_chunks: int = 30,
    device: str = "auto",
    runs: Path = Path("runs/qat"),
    output: Path = typer.Option(Path("evals/reports/qat"), "-o"),
    ptq: bool = True,
):
    device = pick_device(device)
    rows = []
    fp_model, tok, _ = load_model(model)
    fp = held_out_ppl(fp_model, tok, max_chunks)
    rows.append(
        {"model": "FP32 (dequantized Q4_1)", "scheme": "-", "steps": 0, "bpw": 32.0, **fp, "train_seconds": 0.0}
    )
    del fp_model
    for scheme in schemes.split(","):
        for n in ([0] if ptq else []) + ([steps] if steps else []):
            cfg = QuantConfig(
                scheme=scheme, steps=n, batch_size=batch_size, seq_len=seq_len, lr=lr, scale_lr=scale_lr, calib=calib
            )
            out = runs / f"{scheme}-{n}"
            t0 = time.perf_counter()
            rep = run_quantize(model, cfg, out, force=True, device=device, progress=sys.stderr.isatty())
            wall = time.perf_counter() - t0
            m, t = load_quantized(out)
            r = held_out_ppl(m, t, max_chunks)
            cmd = (
                f"slim-edge quantize {model} --scheme {scheme} --steps {n} --batch-size {batch_size} "
                f"--seq-len {seq_len} --lr {lr} --scale-lr {scale_lr} --calib {calib} -o {out}"
            )
            rows.append(
                {
                    "model": f"slim-edge {scheme}",
                    "scheme": scheme,
                    "steps": n,
                    "bpw": rep["plan_summary"]["bits_per_weight"],
                    **r,
                    "distill_loss": rep["distill_loss"],
                    "train_seconds": rep["training"]["seconds"],
                    "wall_seconds": round(wall, 1),
                    "device": device,
                    "command": cmd,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
            write_report(model, rows, device, max_chunks, calib, output)
    write_report(model, rows, device, max_chunks, calib, output)


def write_report(model, rows, device, max_chunks, calib, output: Path):
    env = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "eval": f"lee:eval, ctx 512, <= {max_chunks} chunks, 2nd half scored",
        "calib": calib,
        "argv": " ".join(shlex.quote(a) for a in sys.argv),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [
        f"# QAT quality: {model}",
        "",
        f"Environment: {json.dumps(env)}",
        "",
        "| model | steps | bits/weight (linears) | PPL lee:eval | distill loss PTQ -> end | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dl = r.get("distill_loss")
        dls = f"{dl['ptq']:.3f} -> {dl['final']:.3f}" if dl else "-"
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['bpw']:.3f} | {r['ppl']:.2f} ± {r['ppl_err']:.2f} | "
            f"{dls} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows if "command" in r]
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: typer.run(main))
