"""Do ONNX exports compute the same on another onnxruntime? `save` runs each export on fixed random tokens
(one forward over all of them, then the same tokens again in chunks over the KV cache) and keeps the logits
with this onnxruntime's version; `check`, on the other machine, runs the same and reports per export the
largest logit difference from the saved ones, as JSON (an export this onnxruntime refuses gets its reason
in the report, and `check` then exits with status 2). For a user whose onnxruntime is not the one the
export was tested with (CI and this box: 1.32; the GPU machine: 1.30).

    python -m slim_edge.evals.lab.onnx_portability save runs/onnx/seq2 runs/onnx/seq2-plain -o ref.npz
    python -m slim_edge.evals.lab.onnx_portability check runs/onnx/seq2 runs/onnx/seq2-plain --ref ref.npz -o c.json

The exports are named by their folder's name in both steps. Beside each difference, `chunked_vs_full` says
how far this runtime's cached decoding is from its own full forward (the GroupQueryAttention path's
seqlens and RoPE offsets are where versions differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import atomic_path, atomic_write, check_output_file

CHUNKS = (0, 5, 6, 7, 16, 33, 64)  # a prompt, single tokens, then longer chunks on top of a past


def run_export(path: Path, n_tokens: int = CHUNKS[-1], seed: int = 0, threads: int = 2) -> dict[str, np.ndarray]:
    """{"full": logits of one forward [n_tokens, vocab], "chunked": the same tokens fed in CHUNKS over the cache}."""
    from slim_edge.evals.backends import OnnxLM

    lm = OnnxLM(path, n_threads=threads)
    bounds = [b for b in CHUNKS if b < n_tokens] + [n_tokens]
    ids = np.random.default_rng(seed).integers(0, lm.n_vocab, n_tokens)
    cache, rows = lm.empty_cache(), []
    for a, b in zip(bounds, bounds[1:]):
        logits, cache = lm.step(ids[a:b], cache, a)
        rows.append(logits)
    return {"full": lm.logits(ids), "chunked": np.concatenate(rows)}


def _names(paths: list[Path]) -> list[str]:
    names = [Path(p).absolute().name for p in paths]
    if len(set(names)) != len(names):
        raise SlimEdgeError(
            f"exports are named by their folder, and these repeat a name: {', '.join(names)}; "
            f"give each export its own folder name"
        )
    return names


def save(paths: list[Path], out: Path, force: bool = False) -> dict:
    import onnxruntime as ort

    check_output_file(out, force)
    names = _names(paths)
    arrays = {"onnxruntime": np.array(ort.__version__)}
    for name, path in zip(names, paths):
        for kind, logits in run_export(path).items():
            arrays[f"{name}/{kind}"] = logits
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # np.savez on a path would add .npz to its name
        np.savez(f, **arrays)
    return {"onnxruntime": ort.__version__, "models": names, "file": str(out)}


def check(paths: list[Path], ref: Path) -> dict:
    """Per export: the largest |logit| difference of the full forward and of the chunked decoding from the
    saved ones, and chunked vs full on this runtime."""
    import onnxruntime as ort

    if not Path(ref).is_file():
        raise SlimEdgeError(
            f"--ref {ref} does not exist; write it with `python -m slim_edge.evals."
            f"onnx_portability save EXPORT... -o {ref}` on the reference machine"
        )
    saved = np.load(ref)
    report = {"onnxruntime": ort.__version__, "reference_onnxruntime": str(saved["onnxruntime"]), "models": {}}
    for name, path in zip(_names(paths), paths):
        if f"{name}/full" not in saved:
            held = sorted({k.split("/")[0] for k in saved.files if "/" in k})
            raise SlimEdgeError(
                f"{ref} holds no logits for an export named {name!r} (it has {', '.join(held)}); "
                f"save them under the same folder name"
            )
        try:
            got = run_export(path, n_tokens=saved[f"{name}/full"].shape[0])
        except SlimEdgeError as e:  # this runtime refuses the export: its reason is the finding
            report["models"][name] = {"error": str(e)}
            continue
        report["models"][name] = {
            "full_vs_reference": float(np.abs(got["full"] - saved[f"{name}/full"]).max()),
            "chunked_vs_reference": float(np.abs(got["chunked"] - saved[f"{name}/chunked"]).max()),
            "chunked_vs_full": float(np.abs(got["chunked"] - got["full"]).max()),
            "logit_scale": float(np.abs(saved[f"{name}/full"]).max()),
        }
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m slim_edge.evals.lab.onnx_portability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("mode", choices=("save", "check"), help="save: reference logits; check: compare against them")
    ap.add_argument("exports", nargs="+", type=Path, help="folders written by slim-edge export --onnx")
    ap.add_argument("-o", "--output", type=Path, help="save: the .npz to write; check: a JSON report (else stdout)")
    ap.add_argument("--ref", type=Path, help="check: the .npz that save wrote")
    ap.add_argument("--force", action="store_true", help="replace an existing output file")
    a = ap.parse_args(argv)
    if a.mode == "save":
        if a.output is None:
            raise SlimEdgeError("save needs -o FILE.npz, the reference logits to write")
        report = save(a.exports, a.output, a.force)
    else:
        if a.ref is None:
            raise SlimEdgeError("check needs --ref FILE.npz, the logits that save wrote on the reference machine")
        if a.output is not None:
            check_output_file(a.output, a.force)
        report = check(a.exports, a.ref)
        if a.output is not None:
            atomic_write(a.output, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1), file=sys.stdout)
    failed = [name for name, r in report["models"].items() if "error" in r] if a.mode == "check" else []
    if failed:
        raise SlimEdgeError(
            f"{len(failed)} of {len(report['models'])} exports did not run on onnxruntime "
            f"{report['onnxruntime']}: {', '.join(failed)} (their reasons are in the report)"
        )
    return report


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(main)
