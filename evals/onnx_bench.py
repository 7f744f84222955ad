"""Prefill and decode speed of an ONNX export in onnxruntime on the host, measured the way llama-bench
measures a GGUF (pp<N>: N random prompt tokens into an empty cache; tg<N>: N tokens decoded one at a time
from an empty cache, after one warm-up run), and returned as llama-bench's JSON rows, so that bench's
tables, TTFT and plots treat both runtimes alike."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from slim_edge.converters.onnx_export import MARKER
from slim_edge.errors import SlimEdgeError


def is_onnx_model(path: Path) -> bool:
    path = Path(path)
    return (path.suffix == ".onnx" and path.is_file()) or (path.is_dir() and (path / MARKER).is_file())


def onnx_file_size(path: Path) -> int:
    path = Path(path)
    model = path / "model.onnx" if path.is_dir() else path
    return sum(f.stat().st_size for f in (model, model.with_name(model.name + ".data")) if f.is_file())


def _prefill_ns(lm, n: int, rng) -> int:
    ids = rng.integers(0, lm.n_vocab, n)
    t0 = time.perf_counter_ns()
    lm.step(ids, lm.empty_cache(), 0)
    return time.perf_counter_ns() - t0


def _decode_ns(lm, n: int, rng) -> int:
    cache, tok = lm.empty_cache(), int(rng.integers(0, lm.n_vocab))
    t0 = time.perf_counter_ns()
    for pos in range(n):
        logits, cache = lm.step([tok], cache, pos)
        tok = int(np.argmax(logits[-1]))
    return time.perf_counter_ns() - t0


def _row(kind: str, n: int, threads: int, samples_ns: list[int], ort_version: str) -> dict:
    ts = [n / (s / 1e9) for s in samples_ns]
    return {"n_prompt": n if kind == "pp" else 0, "n_gen": n if kind == "tg" else 0, "n_threads": threads,
            "avg_ts": float(np.mean(ts)), "stddev_ts": float(np.std(ts, ddof=1)) if len(ts) > 1 else 0.0,
            "samples_ns": samples_ns, "samples_ts": ts, "model_type": "onnx", "build_commit": f"onnxruntime {ort_version}",
            "backends": "onnxruntime CPUExecutionProvider"}


def onnx_bench_rows(path: Path, prompt_lengths: list[int], n_gen: int, threads: int, repetitions: int,
                    seed: int = 0) -> list[dict]:
    """llama-bench-style rows (pp per prompt length, then tg) for the ONNX model at `path`."""
    import onnxruntime

    from slim_edge.evals.backends import OnnxLM

    if repetitions < 1:
        raise SlimEdgeError(f"--repetitions {repetitions}: need at least 1")
    lm = OnnxLM(path, n_threads=threads)
    rng = np.random.default_rng(seed)
    rows = []
    for p in prompt_lengths:
        _prefill_ns(lm, p, rng)  # warm-up: onnxruntime allocates and packs on the first run of a shape
        rows.append(_row("pp", p, threads, [_prefill_ns(lm, p, rng) for _ in range(repetitions)],
                         onnxruntime.__version__))
    _decode_ns(lm, min(n_gen, 4), rng)
    rows.append(_row("tg", n_gen, threads, [_decode_ns(lm, n_gen, rng) for _ in range(repetitions)],
                     onnxruntime.__version__))
    return rows
