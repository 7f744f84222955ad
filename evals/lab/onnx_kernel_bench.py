"""onnxruntime's CPU MatMulNBits per representation of the same weight, side by side in one run: which bit width,
zero-point kind and accuracy level it runs fast, at one activation row (decode) and at many (prefill).

    python -m slim_edge.evals.lab.onnx_kernel_bench [--n 1536 --k 576 --block 64 --threads 1 --rows 1,128]

Why it exists: `slim-edge export --onnx` picks the representation of each weight from these numbers (float zero
points at 2 bits, the q8_0 head as two 4-bit halves, `--onnx-bits 4`); rerun it on another onnxruntime version
or machine before changing those choices. The weights are random codes: speed does not depend on the values.
accuracy_level 4 (int8 activations) is timed for reference only: it changes the numbers, so export never uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

# (bits, zero-point kind, accuracy_level): the representations export can choose, and the int8 reference
CASES = [
    (2, "float", 0),
    (2, "default", 0),
    (2, "uint8", 0),
    (4, "default", 0),
    (4, "uint8", 0),
    (4, "float", 0),
    (8, "default", 0),
    (2, "default", 4),
    (4, "default", 4),
]


def session(bits: int, zp: str, acc: int, n: int, k: int, block: int, threads: int, seed: int = 0):
    import onnxruntime as ort
    from onnx import TensorProto as T, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nb = k // block
    inits = [
        numpy_helper.from_array(rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8), "w"),
        numpy_helper.from_array(rng.random(n * nb, dtype=np.float32), "s"),
    ]
    if zp == "uint8":
        inits.append(numpy_helper.from_array(np.full((n, -(-nb * bits // 8)), 0x55, np.uint8), "z"))
    elif zp == "float":
        inits.append(numpy_helper.from_array(np.full(n * nb, (1 << (bits - 1)) - 0.5, np.float32), "z"))
    node = helper.make_node(
        "MatMulNBits",
        ["x"] + [i.name for i in inits],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=acc,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", T.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def best_us(sess, x: np.ndarray, seconds: float = 0.4, rounds: int = 3) -> float:
    """Best of `rounds` mean run times over `seconds` each, in microseconds."""
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(rounds):
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {"x": x})
            reps += 1
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def main(argv=None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1536, help="output features (SmolLM2's up_proj: 1536)")
    ap.add_argument("--k", type=int, default=576, help="input features (SmolLM2's hidden size: 576)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,128", help="activation rows per call (1 = decode)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of the Markdown table")
    a = ap.parse_args(argv)
    rows = [int(r) for r in a.rows.split(",")]
    out = []
    rng = np.random.default_rng(1)
    for bits, zp, acc in CASES:
        sess = session(bits, zp, acc, a.n, a.k, a.block, a.threads)
        r = {"bits": bits, "zero_points": zp, "accuracy_level": acc}
        for m in rows:
            r[f"us_m{m}"] = round(best_us(sess, rng.standard_normal((m, a.k)).astype(np.float32)), 1)
        out.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    ref = out[0]
    if a.json:
        print(
            json.dumps(
                {
                    "onnxruntime": ort.__version__,
                    "n": a.n,
                    "k": a.k,
                    "block": a.block,
                    "threads": a.threads,
                    "rows": out,
                },
                indent=1,
            )
        )
        return 0
    print(
        f"MatMulNBits {a.n} x {a.k}, block {a.block}, {a.threads} thread(s), onnxruntime {ort.__version__}: "
        f"best microseconds per call (x = time / the first row's)\n"
    )
    print("| bits | zero points | accuracy_level | " + " | ".join(f"M={m} us | x" for m in rows) + " |")
    print("|---:|---|---:|" + "---:|---:|" * len(rows))
    for r in out:
        cells = " | ".join(f"{r[f'us_m{m}']:.1f} | {r[f'us_m{m}'] / ref[f'us_m{m}']:.2f}" for m in rows)
        print(f"| {r['bits']} | {r['zero_points']} | {r['accuracy_level']} | {cells} |")
    return 0


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: sys.exit(main()))
