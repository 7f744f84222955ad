"""GPTQ's wall time with and without `qlinear.frozen_quantized` (each weight quantized once per version, not at
every forward), side by side in one run on the first layers of a model, and whether the results are equal.

    python -m slim_edge.evals.lab.gptq_bench [--model smollm2-135m] [--scheme sherry] [--layers 2] [--rounds 2]

Prints one JSON line: seconds per round of each variant (interleaved), their ratio, and `identical`
(every latent and scale of the two students equal bit for bit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from slim_edge import ptq
from slim_edge.errors import run_main
from slim_edge.models import load_model
from slim_edge.pipeline import make_plan
from slim_edge.quantize import QuantConfig, quantize_
from slim_edge.train import calibration_tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="sherry")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2, help="the demo's")
    a = ap.parse_args(argv)
    model, tok, _ = load_model(a.model)
    model.model.layers = model.model.layers[: a.layers]
    model.config.num_hidden_layers = a.layers
    ids, _ = calibration_tokens(tok, "wiki")
    config = QuantConfig(
        scheme=a.scheme, steps=0, ptq="gptq", ptq_samples=a.samples, seq_len=256, batch_size=a.batch_size
    )
    plan = make_plan(model, config, None)
    frozen = ptq.frozen_quantized
    times = {"frozen": [], "plain": []}
    states = {}
    for _ in range(a.rounds):
        for variant in ("frozen", "plain"):
            ptq.frozen_quantized = frozen if variant == "frozen" else (lambda m: contextlib.nullcontext(m))
            student = copy.deepcopy(model)
            quantize_(student, config, plan)
            t0 = time.perf_counter()
            ptq.gptq_(student, ids, config, progress=False)
            times[variant].append(time.perf_counter() - t0)
            states[variant] = student.state_dict()
    ptq.frozen_quantized = frozen
    identical = all(torch.equal(states["frozen"][k], states["plain"][k]) for k in states["plain"])
    best = {k: min(v) for k, v in times.items()}
    report = {
        "model": a.model,
        "scheme": a.scheme,
        "layers": a.layers,
        "samples": a.samples,
        "batch_size": a.batch_size,
        "seconds": times,
        "best": best,
        "speedup": best["plain"] / best["frozen"],
        "identical": identical,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_main(main)
