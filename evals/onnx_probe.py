"""What the installed onnxruntime's CPU execution provider really runs, found by running it.

Each row is a one-node model built with onnx.helper, fed random codes, scales and activations, and
compared with a float64 numpy reference of the op's documented meaning (code - zero point) * scale.
"exact" means the outputs agree to float32 rounding of the dot products (rel. err < 1e-5); a failure
prints the first line of onnxruntime's error. `python -m slim_edge.evals.onnx_probe` prints the table
that converters/onnx_export.py's docstring records.
"""

from __future__ import annotations

import numpy as np

MS = "com.microsoft"
BLOCKS = (16, 32, 64, 128, 256, 512)


def _session(graph, opset: int, config: dict | None = None):
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint codes [..., k] -> uint8 [..., k * bits / 8], element j at bits (j % (8/bits)) * bits (LSB first)."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint8) * bits), axis=-1).astype(np.uint8)


def _case(rng, n, k, bits, block, zp):
    codes = rng.integers(0, 1 << bits, (n, k))
    nb = k // block
    scales = (rng.random((n, nb)) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    if zp == "none":
        zpv = np.full((n, nb), 1 << (bits - 1), np.float64)
    elif zp == "uint8":
        zpv = rng.integers(0, 1 << bits, (n, nb)).astype(np.float64)
    else:  # float zero point: a half-integer, as SEQ's grid needs
        zpv = rng.integers(0, 1 << bits, (n, nb)) - 0.5
    w = (codes - np.repeat(zpv, block, axis=1)) * np.repeat(scales, block, axis=1)
    return codes, scales, zpv, w


def _failure(e: Exception) -> str:
    """The reason in onnxruntime's message (after the source location), shortened."""
    text = str(e).strip().splitlines()[0]
    return "fails: " + (text.rpartition(" was false. ")[2] or text)[:90]


def _compare(got, ref) -> str:
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    return "exact" if err < 1e-5 else f"WRONG (rel. err {err:.2g})"


def probe_matmulnbits(bits: int, block: int, zp: str, n=64, k=1024, seed=0) -> str:
    from onnx import TensorProto as T, helper, numpy_helper

    rng = np.random.default_rng(seed)
    codes, scales, zpv, w = _case(rng, n, k, bits, block, zp)
    a = rng.standard_normal((3, k)).astype(np.float32)
    b = pack_codes(codes, bits).reshape(n, k // block, block * bits // 8)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales.reshape(-1), "S")]
    inputs = ["A", "B", "S"]
    if zp == "uint8":
        nb = k // block
        padded = np.zeros((n, -(-nb * bits // 8) * 8 // bits), np.uint8)
        padded[:, :nb] = zpv
        inits.append(numpy_helper.from_array(pack_codes(padded, bits), "Z"))
        inputs.append("Z")
    elif zp == "float":
        inits.append(numpy_helper.from_array(zpv.astype(np.float32).reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain=MS, K=k, N=n, bits=bits, block_size=block)
    g = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", T.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", T.FLOAT, [3, n])],
        inits,
    )
    try:
        got = _session(g, 21).run(None, {"A": a})[0]
    except Exception as e:  # onnxruntime's own error types: the row records the message
        return _failure(e)
    return _compare(got, a.astype(np.float64) @ w.T)


# by default onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with int8 activations
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}


def probe_dequantize_linear(dtype: str, block: int, n=64, k=512, seed=0, config=None) -> str:
    """DequantizeLinear with blocked scales along K of a [K, N] weight, then MatMul."""
    from onnx import TensorProto as T, helper, numpy_helper

    bits = {"uint2": 2, "int2": 2, "uint4": 4, "int4": 4}[dtype]
    signed = dtype.startswith("int")
    rng = np.random.default_rng(seed)
    lo = -(1 << (bits - 1)) if signed else 0
    q = rng.integers(lo, lo + (1 << bits), (k, n))
    nb = k // block
    scales = (rng.random((nb, n)) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    zpv = rng.integers(lo, lo + (1 << bits), (nb, n))
    w = (q - np.repeat(zpv, block, axis=0)) * np.repeat(scales, block, axis=0)
    ttype = getattr(T, dtype.upper())
    inits = [
        helper.make_tensor("Q", ttype, [k, n], q.reshape(-1).tolist()),
        numpy_helper.from_array(scales, "S"),
        helper.make_tensor("Z", ttype, [nb, n], zpv.reshape(-1).tolist()),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["Q", "S", "Z"], ["W"], axis=0, block_size=block),
        helper.make_node("MatMul", ["A", "W"], ["Y"]),
    ]
    g = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("A", T.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", T.FLOAT, [3, n])],
        inits,
    )
    a = rng.standard_normal((3, k)).astype(np.float32)
    for opset in (21, 23, 25):
        try:
            got = _session(g, opset, config).run(None, {"A": a})[0]
            return f"{_compare(got, a.astype(np.float64) @ w)} (opset {opset})"
        except Exception as e:  # try the next opset; the last error is the row's
            err = e
    return _failure(err)


def probe_gather_block_quantized(bits: int, block: int, zp: str, vocab=64, k=512, seed=0) -> str:
    """GatherBlockQuantized on uint8 data (bits=4: two codes per byte; bits=8: one)."""
    from onnx import TensorProto as T, helper, numpy_helper

    rng = np.random.default_rng(seed)
    codes, scales, zpv, w = _case(rng, vocab, k, bits, block, "uint8" if zp == "uint8" else "none")
    inits = [numpy_helper.from_array(pack_codes(codes, bits), "D"), numpy_helper.from_array(scales, "S")]
    inputs = ["D", "I", "S"]
    if zp == "uint8":
        inits.append(numpy_helper.from_array(pack_codes(zpv.astype(np.uint8), bits), "Z"))
        inputs.append("Z")
    node = helper.make_node(
        "GatherBlockQuantized", inputs, ["Y"], domain=MS, gather_axis=0, quantize_axis=1, block_size=block, bits=bits
    )
    g = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("I", T.INT64, [5])],
        [helper.make_tensor_value_info("Y", T.FLOAT, [5, k])],
        inits,
    )
    idx = rng.integers(0, vocab, 5)
    try:
        got = _session(g, 21).run(None, {"I": idx})[0]
    except Exception as e:  # onnxruntime's own error types: the row records the message
        return _failure(e)
    return _compare(got, w[idx])


def rows():
    for bits in (2, 4, 8):
        for zp in ("none", "uint8", "float"):
            for block in BLOCKS:
                yield f"MatMulNBits bits={bits} zp={zp}", block, probe_matmulnbits(bits, block, zp)
    for dtype in ("uint2", "int2", "uint4", "int4"):
        for block in (16, 64, 256):
            yield f"DequantizeLinear {dtype} + MatMul", block, probe_dequantize_linear(dtype, block)
            yield "  the same, qdq accuracy level 0", block, probe_dequantize_linear(dtype, block, config=EXACT_QDQ)
    for bits in (4, 8):
        for zp in ("none", "uint8"):
            for block in (16, 32, 64, 128, 256):
                yield f"GatherBlockQuantized bits={bits} zp={zp}", block, probe_gather_block_quantized(bits, block, zp)


def main() -> None:
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, float32 activations")
    print(f"| {'op':<36} | block | result |\n|{'-' * 38}|-------|--------|")
    for op, block, result in rows():
        print(f"| {op:<36} | {block:>5} | {result} |")


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(main)
