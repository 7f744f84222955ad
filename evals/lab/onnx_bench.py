"""ONNX exports side by side in onnxruntime on the host, interleaved so that a shared machine's load falls on
all of them alike (evals/reports/onnx_bench_host.md). The timing is `slim-edge bench`'s for one ONNX export
(evals/bench.py: pp<N> into an empty cache, tg<N> one token at a time), with tg<N>@d<D> after an untimed
prefill of D tokens."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from slim_edge.converters.onnx_export import MARKER
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.bench import _prefill_ns, is_onnx_model
from slim_edge.fsutil import atomic_write, check_output_file


def _decode_at_ns(lm, n: int, depth: int, rng) -> int:
    """n tokens decoded one at a time after an untimed prefill of `depth` random tokens (tg<n>@d<depth>)."""
    cache, tok = lm.empty_cache(), int(rng.integers(0, lm.n_vocab))
    if depth:
        _, cache = lm.step(rng.integers(0, lm.n_vocab, depth), cache, 0)
    t0 = time.perf_counter_ns()
    for pos in range(depth, depth + n):
        logits, cache = lm.step([tok], cache, pos)
        tok = int(np.argmax(logits[-1]))
    return time.perf_counter_ns() - t0


def compare(
    paths: list[Path],
    prompt_lengths: list[int],
    n_gen: int,
    depths: list[int],
    threads: int,
    repetitions: int,
    seed: int = 0,
) -> dict:
    """ONNX models side by side in one run, interleaved: each repetition times every model once per test, the
    model order rotating, so that a shared machine's load falls on all of them alike. Returns per test and model
    the tokens/s of each repetition, and the ratio to the first model paired within each repetition."""
    from slim_edge.evals.backends import OnnxLM

    if repetitions < 1:
        raise SlimEdgeError(f"--repetitions {repetitions}: need at least 1")
    lms = [OnnxLM(p, n_threads=threads, name=str(p)) for p in paths]
    rng = np.random.default_rng(seed)
    tests = [("pp", p, 0) for p in prompt_lengths] + [("tg", n_gen, d) for d in depths]
    tps = {(kind, n, d): [[] for _ in lms] for kind, n, d in tests}
    for lm in lms:  # warm-up: onnxruntime allocates and packs on the first run of a shape
        for kind, n, d in tests:
            _prefill_ns(lm, n, rng) if kind == "pp" else _decode_at_ns(lm, min(n, 4), d, rng)
    for r in range(repetitions):
        for kind, n, d in tests:
            for j in [(r + i) % len(lms) for i in range(len(lms))]:
                ns = _prefill_ns(lms[j], n, rng) if kind == "pp" else _decode_at_ns(lms[j], n, d, rng)
                tps[kind, n, d][j].append(n / (ns / 1e9))
    out = []
    for (kind, n, d), per in tps.items():
        for j, lm in enumerate(lms):
            out.append(
                {
                    "test": f"{kind}{n}" + (f"@d{d}" if d else ""),
                    "model": lm.name,
                    "tps": per[j],
                    "tps_median": float(np.median(per[j])),
                    "x_first_paired_median": float(np.median(np.asarray(per[j]) / np.asarray(per[0]))),
                }
            )
    return {"threads": threads, "repetitions": repetitions, "rows": out}


def compare_markdown(result: dict) -> str:
    lines = [
        f"{result['threads']} threads, {result['repetitions']} interleaved repetitions; t/s = median over them, "
        f"x first = median of the per-repetition ratios to the first model",
        "",
        "| test | model | t/s median | t/s min .. max | x first |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['test']} | {row['model']} | {row['tps_median']:.1f} | {min(row['tps']):.1f} .. "
            f"{max(row['tps']):.1f} | {row['x_first_paired_median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m slim_edge.evals.lab.onnx_bench", description=compare.__doc__)
    ap.add_argument("models", nargs="+", type=Path, help="ONNX export folders (the first is the reference)")
    ap.add_argument("-p", "--prompt-lengths", default="128,512")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-d", "--depths", default="0,512", help="decode after an untimed prefill of this many tokens")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-o", "--json", type=Path, help="write the samples as JSON here")
    ap.add_argument("--force", action="store_true", help="overwrite the -o file")
    a = ap.parse_args(argv)
    if a.json:
        check_output_file(a.json, a.force)
    for m in a.models:
        if not is_onnx_model(m):
            raise SlimEdgeError(
                f"{m} is not an ONNX export (no {MARKER}); write one with slim-edge export CKPT --onnx DIR"
            )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    result = compare(a.models, ints(a.prompt_lengths), a.n_gen, ints(a.depths), a.threads, a.repetitions)
    if a.json:
        atomic_write(a.json, json.dumps(result, indent=1))
    print(compare_markdown(result), file=sys.stdout)


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(main)
