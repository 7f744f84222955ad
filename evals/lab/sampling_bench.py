"""Speed of `teacher:N` sampling (gendata.teacher_tokens), side by side in one run:

    python -m slim_edge.evals.lab.sampling_bench -o evals/reports/sampling_zen3            # CPU, this machine
    python -m slim_edge.evals.lab.sampling_bench --device cuda --batches 512,2048 -o OUT   # a GPU

1. The top-p step alone, on the model's own next-token distributions (real text prompts, temperature 0.7):
   `nucleus` (the nucleus looked for among the top NUCLEUS_K tokens, rows that need more sorted in full)
   against sorting the whole vocabulary per row (the sampler before session 14), same rows, and a check
   that both give the same distribution bit for bit.
2. Whole sampling, tokens/s, per decoding engine (`--engines`: gendata.KVDecoder's preallocated cache, kv, against
   transformers' own cache) and sampling batch (sequences generated at once; on a GPU each engine's default,
   gendata.sampling_batch of the free memory, is added), with peak GPU memory and whether the engines drew the
   same tokens at the same batch.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
import typer

from slim_edge.evals.lab.qat_throughput import _sync
from slim_edge.fsutil import atomic_path
from slim_edge.gendata import NUCLEUS_K, decoding_engine, keep_nucleus, nucleus, sampling_batch, teacher_tokens
from slim_edge.models import load_model
from slim_edge.pipeline import pick_device
from slim_edge.train import calibration_tokens


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The sampler before session 14: sort every row's whole vocabulary."""
    return keep_nucleus(probs, *probs.sort(-1, descending=True), top_p)


def _time(fn, device: str, repeat: int) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeat


def main(
    model: str = "smollm2-135m",
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
    batches: str = typer.Option("16,64", help="sampling batches to time whole sampling at"),
    engines: str = typer.Option("kv,transformers", help="decoding engines to time (gendata.teacher_tokens)"),
    rows: int = typer.Option(256, help="distributions the top-p step is timed on"),
    tokens: int = typer.Option(4096, help="tokens sampled per whole-sampling measurement"),
    seq_len: int = 512,
    temp: float = 0.7,
    top_p: float = 0.9,
    prompt: int = 16,
    output: Path = typer.Option(Path("evals/reports/sampling_bench"), "-o"),
):
    device = pick_device(device)
    m, tok = load_model(model, device=device)[:2]
    m.eval()
    ids, source = calibration_tokens(tok, "wiki")
    gen = torch.Generator().manual_seed(0)
    # the model's next-token distributions after real text windows of prompt..seq_len tokens
    pos = torch.randint(len(ids) - seq_len, (rows,), generator=gen)
    cut = torch.randint(prompt, seq_len, (rows,), generator=gen)
    probs = []
    with torch.no_grad():
        for p, c in zip(pos.tolist(), cut.tolist()):
            x = ids[p : p + c][None].to(device)
            probs.append(torch.softmax(m(x).logits[0, -1].float() / temp, -1))
    probs = torch.stack(probs)
    same = torch.equal(nucleus(probs, top_p), full_sort_nucleus(probs, top_p))
    wide = int((probs.topk(NUCLEUS_K, -1).values.sum(-1) < top_p).sum())
    t_new = _time(lambda: nucleus(probs, top_p), device, 20)
    t_old = _time(lambda: full_sort_nucleus(probs, top_p), device, 20)
    step = {
        "rows": rows,
        "vocab": probs.shape[-1],
        "top_p": top_p,
        "temperature": temp,
        "rows_past_top_k": wide,
        "nucleus_k": NUCLEUS_K,
        "identical": same,
        "full_sort_ms": round(t_old * 1e3, 3),
        "top_k_ms": round(t_new * 1e3, 3),
        "speedup": round(t_old / t_new, 2),
    }
    print(json.dumps(step), file=sys.stderr, flush=True)
    runs, drawn = [], {}
    cuda = device.startswith("cuda")
    for engine in [e for e in engines.split(",") if e]:
        decoding_engine(m, seq_len, device, engine)  # refuses an unknown engine before any timing
        sizes = [int(b) for b in batches.split(",") if b]
        if cuda:
            sizes.append(sampling_batch(m.config, seq_len, torch.cuda.mem_get_info(device)[0], kv=engine == "kv"))
        for b in dict.fromkeys(sizes):
            n = max(tokens, b * seq_len) if cuda else tokens
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t = time.perf_counter()
            out = teacher_tokens(
                m,
                n,
                seq_len,
                ids,
                device=device,
                seed=0,
                batch=b,
                progress=False,
                temperature=temp,
                top_p=top_p,
                prompt=prompt,
                engine=engine,
            )
            _sync(device)
            dt = time.perf_counter() - t
            first = drawn.setdefault((b, n), out)
            r = {
                "engine": engine,
                "batch": b,
                "tokens": len(out),
                "seconds": round(dt, 2),
                "tokens_per_s": round(len(out) / dt),
                "same_tokens_as_first_engine_pct": round(100 * float((first == out).double().mean()), 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            }
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    info = {
        "model": model,
        "device": where,
        "torch": torch.__version__,
        "text": source,
        "seq_len": seq_len,
        "prompt": prompt,
        "top_p_step": step,
        "sampling": runs,
        "command": " ".join(sys.argv),
    }
    lines = [
        f"# teacher:N sampling speed: {model}, {where}",
        "",
        f"`{info['command']}`",
        "",
        f"Top-p step on {rows} of the model's next-token distributions (temperature {temp}, top-p {top_p}, "
        f"vocabulary {step['vocab']}; {wide} rows need more than the top {NUCLEUS_K}): full sort "
        f"{step['full_sort_ms']} ms, top-{NUCLEUS_K} first {step['top_k_ms']} ms = {step['speedup']}x; "
        f"the same distribution bit for bit: {same}.",
        "",
        "| engine | sampling batch | tokens | seconds | tokens/s | peak GiB | same tokens as the first engine % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['engine']} | {r['batch']} | {r['tokens']:,} | {r['seconds']} | {r['tokens_per_s']:,} | "
        f"{r['peak_gib'] or '-'} | {r['same_tokens_as_first_engine_pct']} |"
        for r in runs
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(info, indent=1) + "\n"), (".md", "\n".join(lines) + "\n")):
        with atomic_path(output.with_suffix(suffix)) as tmp:
            Path(tmp).write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: typer.run(main))
