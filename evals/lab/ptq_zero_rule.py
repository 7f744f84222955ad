"""Sherry's quad zero in GPTQ, by magnitude or by GPTQ's cost, side by side on one model (issue 17, PTQ start).

    python -m slim_edge.evals.lab.ptq_zero_rule --out runs/ptqz [--scheme sherry] [--samples 64] [--chunks 40]
    python -m slim_edge.evals.lab.ptq_zero_rule --out runs/ptqz --layers 0,11,28     # minutes on a CPU

Full run (a GPU's job: on 2 CPU cores GPTQ takes over a minute per layer): `slim-edge quantize MODEL --scheme S
--steps 0 --ptq gptq --ptq-samples N` once per rule (ptq.SHERRY_ZERO), then the held-out perplexity and mean
KLD against the FP model (`held_out_ppl`, lee:eval), and OUT/ptq_zero_rule.json: per rule the perplexity, KLD,
the mean relative output error of the linears and the GPTQ fallback count.

`--layers`: the linears of those decoder layers alone, each with the Hessian of the FP model's own inputs
(not the sequential GPTQ's, so a proxy): the relative output error of each rule per linear, in
OUT/ptq_zero_rule_layers.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from slim_edge import ptq
from slim_edge.checkpoint import load_quantized
from slim_edge.errors import run_main
from slim_edge.evals.lab.qat_table import held_out_ppl
from slim_edge.fsutil import atomic_write
from slim_edge.models import load_model
from slim_edge.pipeline import make_plan, run_quantize
from slim_edge.ptq import gptq_quantize, rel_output_error, set_quantized
from slim_edge.qlinear import QuantLinear
from slim_edge.quantize import QuantConfig, quantize_
from slim_edge.train import calibration_tokens

RULES = ("magnitude", "cost")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="sherry")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", help="comma-separated decoder layers: the per-linear proxy instead of a full run")
    a = ap.parse_args(argv)
    fp, tok, _ = load_model(a.model, device=a.device)
    if a.layers:
        return per_linear(a, fp, tok, [int(x) for x in a.layers.split(",")])
    result = {
        "model": a.model,
        "scheme": a.scheme,
        "ptq_samples": a.samples,
        "seq_len": a.seq_len,
        "chunks": a.chunks,
        "rules": {},
    }
    for rule in a.rules.split(","):
        ptq.SHERRY_ZERO = rule
        folder = a.out / f"{a.scheme}-{rule}"
        t0 = time.perf_counter()
        report = run_quantize(
            a.model,
            QuantConfig(scheme=a.scheme, steps=0, ptq="gptq", ptq_samples=a.samples, seq_len=a.seq_len),
            folder,
            force=True,
            device=a.device,
        )
        seconds = time.perf_counter() - t0
        layers = report["ptq"]["layers"]
        model, _ = load_quantized(folder, device=a.device)
        r = held_out_ppl(model, tok, max_chunks=a.chunks, reference=fp)
        result["rules"][rule] = {
            **r,
            "quantize_seconds": round(seconds, 1),
            "rel_err_gptq_mean": sum(x["rel_err_gptq"] for x in layers) / len(layers),
            "fallback": sum(x["fallback"] for x in layers),
        }
        print(json.dumps({rule: result["rules"][rule]}), flush=True)
        atomic_write(a.out / "ptq_zero_rule.json", json.dumps(result, indent=1) + "\n")


@torch.no_grad()
def per_linear(a, fp, tok, layers: list[int]) -> None:
    ids, _ = calibration_tokens(tok, "wiki")
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - a.seq_len, (a.samples,), generator=g)
    batch = torch.stack([ids[s : s + a.seq_len] for s in starts]).to(a.device)
    config = QuantConfig(scheme=a.scheme)
    student = copy.deepcopy(fp)
    quantize_(student, config, make_plan(fp, config, None))
    linears = {
        n: m
        for n, m in student.named_modules()
        if isinstance(m, QuantLinear) and any(f"layers.{i}." in n for i in layers)
    }
    hessians, hooks, modules = {}, [], dict(fp.named_modules())
    for name in linears:

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + 2 * x.T @ x / len(x) / math.ceil(a.samples / 8)

        hooks.append(modules[name].register_forward_pre_hook(hook))
    for i in range(0, a.samples, 8):
        fp(batch[i : i + 8])
    for h in hooks:
        h.remove()
    rows = []
    for name, m in linears.items():
        w, row = m.weight.detach().clone(), {"name": name, "format": m.fmt.name}
        for rule in a.rules.split(","):
            set_quantized(m, *gptq_quantize(w, hessians[name], m.fmt, m.mode, m.quads, zero_rule=rule))
            row[rule] = rel_output_error(w, m.quantized().detach(), hessians[name])
            m.weight.copy_(w)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {rule: sum(r[rule] for r in rows) for rule in a.rules.split(",")}
    print(json.dumps({"sum": total}))
    atomic_write(
        a.out / "ptq_zero_rule_layers.json",
        json.dumps(
            {
                "model": a.model,
                "scheme": a.scheme,
                "samples": a.samples,
                "seq_len": a.seq_len,
                "layers": layers,
                "rows": rows,
                "sum": total,
            },
            indent=1,
        )
        + "\n",
    )


if __name__ == "__main__":
    run_main(main)
