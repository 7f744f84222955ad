"""`slim-edge export --onnx`: a checkpoint's trained codes as an ONNX Runtime decoder with a KV cache.

What the installed onnxruntime (1.32.0, CPUExecutionProvider, float32 activations) runs, measured by
`python -m slim_edge.evals.onnx_probe` (one-node models against a float64 numpy reference):

    | op                                         | blocks          | result                                  |
    |--------------------------------------------|-----------------|-----------------------------------------|
    | MatMulNBits bits=2, zp default/uint8/float | 16 .. 256       | exact                                   |
    | MatMulNBits bits=2, any zp                 | 512             | refused: "block_size must not exceed 256"|
    | MatMulNBits bits=4, zp default/uint8/float | 16 .. 512       | exact                                   |
    | MatMulNBits bits=8, zp default/uint8       | 16 .. 512       | exact                                   |
    | MatMulNBits bits=8, zp float               | 16 .. 512       | refused at session creation             |
    | DequantizeLinear u/int2 (opset 25)+MatMul | 16, 64, 256 | exact with session config              |
    | DequantizeLinear u/int4 (opset 21)+MatMul | 16, 64, 256 | "session.qdq_matmulnbits_accuracy_level" |
    |                                            |                 | = "0"; by default ORT fuses DQ+MatMul   |
    |                                            |                 | into MatMulNBits with int8 activations  |
    |                                            |                 | (rel. err ~6e-3: int4 all blocks, int2  |
    |                                            |                 | block 64)                               |
    | GatherBlockQuantized bits=4/8, zp default/uint8 | 16 .. 256  | exact                                   |

So every slim-edge format maps onto MatMulNBits exactly, and no DequantizeLinear fallback is needed.
The mapping is derived from each format's integer grid `levels` (weight = level * d):

    levels with a common step s (s = 2 for SEQ's odd grid {-3,-1,1,3}):  code = (level - lo) / s,
    scale = s * d, zero point = -lo / s; weight = (code - zp) * scale, computed exactly in float32.
    bits = the fewest of 2/4/8 holding the codes (at least --onnx-bits); 2-bit weights always carry float
    zero points (onnxruntime 1.32's fast 2-bit path; with the default or uint8 ones a 576 x 1536 matrix at
    one activation row took 13-25x longer); at 4 and 8 bits, levels that fit around the default zero point
    2^(bits-1) are the codes themselves (step 1, no zero-point tensor), else packed uint8 zp.

    q2_0c (SEQ)        2-bit, zp 1.5 float, scale 2d, block 256 (each 512-block's d written twice)
                       2 + 64/256 = 2.25 bpw; the code bytes are the checkpoint's qs bytes unchanged
    q2_0               2-bit, zp 1 float, block 64: 2 + 32/64 + 32/64 = 3 bpw; qs bytes unchanged
    tq2_0/tq1_0/stq1_0 ternary: 2-bit, zp 2 float (codes level + 2), block 256: 2.25 bpw (Sherry's
                       1.3125-bit slots have no ONNX kernel: its values are re-packed as 2-bit codes)
    --onnx-bits 4      every grid above as 4-bit codes level + 8, scale d, no zero points: 4 + 32/block bpw
                       (4.06 for SEQ's 512-blocks), decoded by onnxruntime's fast 4-bit kernel
    q4_0               4-bit, default zp 8, block 32: 5 bpw;  q8_0: 8-bit, default zp 128, block 32: 9 bpw
    embedding q8_0/q4_0: GatherBlockQuantized with the same codes, and a tied head MatMulNBits of the same
                       initializers (one copy in the file); q8_0's 8-bit codes as two 4-bit halves
                       (split_8bit: two gathers and two MatMulNBits, summed; +1 bpw for the second scale),
                       because the 8-bit head alone took 97 % of a decoded token

Scales are float32 (MatMulNBits takes the activation type), so every stored d costs 4 bytes, not 2.
Kept (float) tensors are float32 initializers: the checkpoint's values exactly.

The graph (Llama family, built with onnx.helper) follows the Optimum / onnxruntime-genai convention:
inputs input_ids, attention_mask, position_ids [batch, seq] int64 and past_key_values.{i}.key|value
[batch, kv_heads, past, head_dim]; outputs logits [batch, seq, vocab] and present.{i}.key|value.
Attention (--onnx-attention): "gqa" (default) runs each layer's attention as one com.microsoft
GroupQueryAttention (GQA heads, HF RoPE from cos/sin caches and the KV concat inside; past/present BNSH)
and the RMSNorms with their residual adds as SkipSimplifiedLayerNormalization: ~25 nodes a layer instead of
~60; "plain" keeps every step in standard ops. gqa takes at most max_position_embeddings tokens (its RoPE
caches) and derives positions from attention_mask (left-aligned masks, as OnnxLM and genai feed).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlimEdgeError
from ..formats import get_format
from ..formats.base import Format
from ..fsutil import atomic_dir, check_output_dir

ONNX_EXPORT_VERSION = 1
OPSET = 21
# the IR version that opset 21 came with (ONNX 1.16). helper.make_model stamps the installed onnx's newest
# (onnx 1.23: 14), which onnxruntime 1.30 refuses ("max supported IR version: 13"); the graph needs nothing newer
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
# the oldest onnxruntime that runs an export, by what its graph holds (measured on the CPU EP, session 21,
# evals/reports/onnx_portability.md): 1.24-1.26 load 2-bit MatMulNBits and fail in it at run time ("Only 4b
# quantization is supported for unpacked compute"); 1.20-1.22 refuse GatherBlockQuantized's `bits` attribute
# and 1.18 the op itself
MIN_ONNXRUNTIME_2BIT = "1.27"
MIN_ONNXRUNTIME_GATHER_BITS = "1.24"
MARKER = "slim_edge_onnx.json"  # what makes an output folder slim-edge's own (to replace with --force)
ONNX_BITS = (2, 4)  # --onnx-bits: the fewest bits per code for the quantized linears
MAX_BLOCK = {2: 256, 4: 512, 8: 512}  # the largest block MatMulNBits' CPU kernel takes per bit width
PROTOBUF_LIMIT = 2 << 30
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
ATTENTION = ("gqa", "plain")  # --onnx-attention; the first is the default (evals/reports/onnx_bench_host.md)


def min_onnxruntime(model) -> str | None:
    """The oldest onnxruntime version (measured) that runs `model`'s contrib ops, None if nothing needs one."""
    attrs = [(n.op_type, {a.name: a.i for a in n.attribute}) for n in model.graph.node if n.domain == MS_DOMAIN]
    if any(op == "MatMulNBits" and a.get("bits", 4) < 4 for op, a in attrs):
        return MIN_ONNXRUNTIME_2BIT
    if any(op == "GatherBlockQuantized" and "bits" in a for op, a in attrs):
        return MIN_ONNXRUNTIME_GATHER_BITS
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 27, 0) from "1.27.0" (a suffix such as "1.28.0.dev20260101" or "+cu12" is ignored)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def require_onnx():
    """(onnx, onnxruntime), or a SlimEdgeError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SlimEdgeError(
            f"ONNX export and eval need onnx and onnxruntime ({e}); install them with pip install 'slim-edge[onnx]'"
        ) from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class OnnxGrid:
    """How a format's values become MatMulNBits codes: weight = (code - zero_point) * step * d."""

    bits: int
    step: int
    zero_point: float  # the same for every block
    block: int  # the ONNX block size (the format's, split where the kernel limits it)
    float_zp: bool = False  # zero points as a float tensor even where they are whole

    @property
    def default_zp(self) -> bool:
        return not self.float_zp and self.zero_point == 1 << (self.bits - 1)

    @property
    def zp_kind(self) -> str:
        if self.default_zp:
            return "default"
        return "uint8" if float(self.zero_point).is_integer() and not self.float_zp else "float"


def onnx_grid(fmt: Format, what: str = "tensor", gather: bool = False, min_bits: int = 2) -> OnnxGrid:
    """The MatMulNBits (gather: GatherBlockQuantized) representation of `fmt` in at least `min_bits` bits, or
    a clear error."""
    lv = np.asarray(fmt.levels, np.int64)
    if fmt.block_size < 16 or len(lv) < 2:
        raise SlimEdgeError(
            f"{what}: format {fmt.name} (block {fmt.block_size}) has no ONNX MatMulNBits "
            f"mapping; keep it in float (quantize --keep) or choose another scheme"
        )
    if min_bits not in ONNX_BITS:
        raise SlimEdgeError(f"--onnx-bits {min_bits}: choose one of {', '.join(map(str, ONNX_BITS))}")
    step = int(np.gcd.reduce(np.diff(lv)))
    span = int((lv[-1] - lv[0]) // step)
    bits = next(b for b in ((4, 8) if gather else (2, 4, 8)) if span < 1 << b and b >= min_bits)
    half = 1 << (bits - 1)
    if bits > 2 and -half <= lv[0] and lv[-1] < half:
        step = 1  # the levels themselves are the codes around the default zero point: no zero-point tensor
    fits_default = lv[0] % step == 0 and -half <= lv[0] // step and lv[-1] // step < half
    # onnxruntime 1.32's CPU MatMulNBits runs 2 bits fast only with float zero points: at one activation row
    # 576 x 1536 takes 0.15 ms with them, 2.0 ms with the default and 3.7 ms with packed uint8 ones
    # (evals/reports/onnx_bench_host.md); the values are the same
    grid = OnnxGrid(
        bits, step, float(half) if fits_default else -int(lv[0]) / step, 0, float_zp=bits == 2 and not gather
    )
    if grid.zp_kind == "float" and (gather or bits == 8):
        op = "GatherBlockQuantized" if gather else "MatMulNBits"
        raise SlimEdgeError(
            f"{what}: {fmt.name}'s grid needs {bits}-bit codes with a fractional zero point, "
            f"which onnxruntime's {op} does not run; use q8_0, q4_0 or f16 there"
        )
    block = fmt.block_size
    while block > MAX_BLOCK[bits]:
        block //= 2
    if block & (block - 1) or fmt.block_size % block:
        raise SlimEdgeError(
            f"{what}: {fmt.name}'s block {fmt.block_size} is not a power of two; onnxruntime's MatMulNBits needs one"
        )
    return OnnxGrid(bits, step, grid.zero_point, block, grid.float_zp)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint codes [..., k] -> uint8 [..., k * bits / 8]: element j at bits (j % (8 / bits)) * bits, LSB first
    (MatMulNBits' layout; for 2 bits it is Q2_0's and Q2_0C's byte layout)."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint8) * bits), axis=-1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    c = (packed[..., None] >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)


@dataclass
class PackedWeight:
    """One weight [n, k] in MatMulNBits form: codes uint8 [n, k / block, block * bits / 8], scales float32
    [n * k / block], zero points (None = the default, packed uint8 [n, ...] or float32 [n * k / block])."""

    grid: OnnxGrid
    n: int
    k: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)

    def values(self) -> np.ndarray:
        """float32 [n, k]: what onnxruntime computes with, (code - zp) * scale in float32."""
        g = self.grid
        nb = self.k // g.block
        codes = unpack_codes(self.codes.reshape(self.n, -1), g.bits).astype(np.float32).reshape(self.n, nb, g.block)
        zp = np.float32(g.zero_point)
        if self.zero_points is not None:
            zp = (
                unpack_codes(self.zero_points, g.bits)[:, :nb]
                if self.zero_points.dtype == np.uint8
                else self.zero_points.reshape(self.n, nb)
            ).astype(np.float32)[:, :, None]
        return ((codes - zp) * self.scales.reshape(self.n, nb, 1)).reshape(self.n, self.k)


def pack_weight(
    fmt: Format, raw: np.ndarray, k: int, what: str = "tensor", gather: bool = False, min_bits: int = 2
) -> PackedWeight:
    """A checkpoint's packed rows (uint8 [n, row_bytes] of `fmt`) as MatMulNBits codes, value for value."""
    grid = onnx_grid(fmt, what, gather, min_bits)
    values, d = fmt.unpack(raw)
    n = values.shape[0]
    codes = (values.astype(np.float32) / grid.step + grid.zero_point).astype(np.uint8)
    rep = fmt.block_size // grid.block
    scales = (np.repeat(d.astype(np.float32), rep, axis=1) * np.float32(grid.step)).reshape(-1)
    nb = k // grid.block
    zps = None
    if grid.zp_kind == "uint8":
        per = 8 // grid.bits
        padded = np.zeros((n, -(-nb // per) * per), np.uint8)
        padded[:, :nb] = int(grid.zero_point)
        zps = pack_codes(padded, grid.bits)
    elif grid.zp_kind == "float":
        zps = np.full(n * nb, grid.zero_point, np.float32)
    return PackedWeight(grid, n, k, pack_codes(codes, grid.bits).reshape(n, nb, -1), scales, zps)


def split_8bit(pw: PackedWeight) -> list[PackedWeight]:
    """8-bit codes c (default zero point 128) as two 4-bit MatMulNBits weights whose sum is the same values:
    (c - 128) * s = (c >> 4 - 8) * 16s + (c & 15 - 0) * s, each term exact in float32 (16s is a power-of-two
    multiple; |c - 128| * s needs at most 8 + 11 significant bits). onnxruntime 1.32 runs 4-bit MatMulNBits
    at one activation row ~40x faster than 8-bit, so the q8_0 tied head costs 2 x 4-bit instead of 1 x 8-bit."""
    g = pw.grid
    if g.bits != 8 or not g.default_zp:
        raise ValueError(f"split_8bit needs 8-bit codes with the default zero point, not {g}")
    c = unpack_codes(pw.codes.reshape(pw.n, -1), 8)
    nb = pw.k // g.block
    per_row = -(-nb // 2) * 2
    zeros = pack_codes(np.zeros((pw.n, per_row), np.uint8), 4)
    hi = PackedWeight(
        OnnxGrid(4, g.step * 16, 8.0, g.block),
        pw.n,
        pw.k,
        pack_codes(c >> 4, 4).reshape(pw.n, nb, -1),
        pw.scales * np.float32(16),
        None,
    )
    lo = PackedWeight(
        OnnxGrid(4, g.step, 0.0, g.block),
        pw.n,
        pw.k,
        pack_codes(c & 15, 4).reshape(pw.n, nb, -1),
        pw.scales.copy(),
        zeros,
    )
    return [hi, lo]


# --- the graph ------------------------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers, each output named after its op and a counter."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.ops, self.names = [], [], {}, set()
        self.n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name given twice is the same constant."""
        if name not in self.names:
            self.names.add(name)
            arr = np.ascontiguousarray(array) if np.ndim(array) else np.asarray(array)  # keeps scalars 0-d
            self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
        self.n += 1
        out = f"/{op_type.lower()}_{self.n}"
        self.nodes.append(
            self.helper.make_node(op_type, list(inputs), [out], name=out[1:], domain=domain or None, **attrs)
        )
        self.ops[op_type] = self.ops.get(op_type, 0) + 1
        return out

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.asarray(values, np.int64))


@dataclass
class _Spec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    rope_theta: float
    tied: bool
    max_positions: int


def _spec(config: dict) -> _Spec:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SlimEdgeError(
            f"ONNX export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this checkpoint is {arch}: "
            f"export it with --gguf instead"
        )
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise SlimEdgeError(
            f"ONNX export: rope scaling {config.get('rope_scaling') or config.get('rope_parameters')} "
            f"is not supported yet (only the plain RoPE of SmolLM2 / Llama 2)"
        )
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    heads = config["num_attention_heads"]
    return _Spec(
        config["hidden_size"],
        heads,
        config.get("num_key_value_heads") or heads,
        config.get("head_dim") or config["hidden_size"] // heads,
        config["num_hidden_layers"],
        config["vocab_size"],
        config["rms_norm_eps"],
        float(theta),
        bool(config.get("tie_word_embeddings")),
        int(config.get("max_position_embeddings") or 2048),
    )


class _Weights:
    """The checkpoint's tensors as graph initializers: MatMulNBits codes for quantized linears, float32 for
    the rest. Records per weight its op, bits and bytes for the summary."""

    def __init__(self, g: _Graph, meta: dict, tensors: dict, bits: int = 2):
        from ..checkpoint import embedding_codes

        self.g, self.tensors, self.bits = g, tensors, bits
        self.plan = {e["name"]: e for e in meta["plan"]}
        self.emb = embedding_codes(meta, tensors)
        self.report: dict[str, dict] = {}
        self._emb_parts: dict[str, list[tuple[PackedWeight, list[str]]]] = {}

    def _packed(self, name: str, pw: PackedWeight) -> list[str]:
        ins = [self.g.const(f"{name}.qweight", pw.codes), self.g.const(f"{name}.scales", pw.scales)]
        if pw.zero_points is not None:
            ins.append(self.g.const(f"{name}.zero_points", pw.zero_points))
        return ins

    def linear(self, x: str, name: str) -> str:
        e = self.plan.get(name)
        if e is not None and e["mode"] != "keep":
            fmt = get_format(e["format"])
            n, k = e["shape"]
            pw = pack_weight(fmt, self.tensors[f"{name}.qweight"].numpy(), k, what=name, min_bits=self.bits)
            y = self.g.op(
                "MatMulNBits",
                x,
                *self._packed(name, pw),
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=pw.grid.bits,
                block_size=pw.grid.block,
                accuracy_level=0,
            )
            self._note(name, "MatMulNBits", fmt.name, pw.grid.bits, pw.nbytes, n * k)
        else:
            w = self.tensors[f"{name}.weight"].numpy().astype(np.float32)
            y = self.g.op("MatMul", x, self.g.const(f"{name}.weight_t", w.T))
            self._note(name, "MatMul", "f32", 32, w.nbytes, w.size)
        bias = self.tensors.get(f"{name}.bias")
        if bias is not None:
            y = self.g.op("Add", y, self.g.const(f"{name}.bias", bias.numpy().astype(np.float32)))
        return y

    def _embedding_parts(self, name: str) -> list[tuple[PackedWeight, list[str]]]:
        """The embedding's codes as initializers in MatMulNBits' shape, shared by the gather and the tied head
        (GatherBlockQuantized reads them through a Reshape that onnxruntime folds): one part, or for 8-bit codes
        the two 4-bit halves of split_8bit (the 8-bit head cost 120 ms a token, 97 % of the decode). Packed once:
        the gather and the head ask for the same parts."""
        if name not in self._emb_parts:
            _, fmt, raw = self.emb
            k = raw.shape[1] // fmt.type_size * fmt.block_size
            pw = pack_weight(fmt, raw, k, what=name, gather=True)
            parts = split_8bit(pw) if pw.grid.bits == 8 else [pw]
            self._emb_parts[name] = [
                (part, self._packed(f"{name}.{tag}" if len(parts) > 1 else name, part))
                for tag, part in zip(("hi", "lo"), parts)
            ]
        return self._emb_parts[name]

    def embedding(self, ids: str, name: str) -> str:
        if self.emb is not None:
            rows = []
            parts = self._embedding_parts(name)
            for i, (pw, (codes, scales, *zp)) in enumerate(parts):
                data = self.g.op("Reshape", codes, self.g.ints(f"{name}.codes_shape{i}", pw.n, -1))
                scales = self.g.op("Reshape", scales, self.g.ints(f"{name}.scales_shape{i}", pw.n, -1))
                rows.append(
                    self.g.op(
                        "GatherBlockQuantized",
                        data,
                        ids,
                        scales,
                        *zp,
                        domain=MS_DOMAIN,
                        gather_axis=0,
                        quantize_axis=1,
                        block_size=pw.grid.block,
                        bits=pw.grid.bits,
                    )
                )
            first = parts[0][0]
            self._note(
                name,
                "GatherBlockQuantized",
                self.emb[1].name,
                sum(pw.grid.bits for pw, _ in parts),
                sum(pw.nbytes for pw, _ in parts),
                first.n * first.k,
            )
            return rows[0] if len(rows) == 1 else self.g.op("Add", *rows)
        w = self.tensors[f"{name}.weight"].numpy().astype(np.float32)
        self._note(name, "Gather", "f32", 32, w.nbytes, w.size)
        return self.g.op("Gather", self.g.const(f"{name}.weight", w), ids, axis=0)

    def tied_head(self, x: str, name: str) -> str:
        """The output head from the embedding's own values: the same initializers (codes or float matrix)."""
        if self.emb is not None:
            ys = [
                self.g.op(
                    "MatMulNBits",
                    x,
                    *ins,
                    domain=MS_DOMAIN,
                    K=pw.k,
                    N=pw.n,
                    bits=pw.grid.bits,
                    block_size=pw.grid.block,
                    accuracy_level=0,
                )
                for pw, ins in self._embedding_parts(name)
            ]
            return ys[0] if len(ys) == 1 else self.g.op("Add", *ys)
        return self.g.op("MatMul", x, self.g.op("Transpose", f"{name}.weight", perm=[1, 0]))

    def _note(self, name, op, fmt, bits, nbytes, n):
        self.report[name] = {
            "op": op,
            "format": fmt,
            "bits": bits,
            "bytes": int(nbytes),
            "bits_per_weight": nbytes * 8 / n,
        }


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    # LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32
    var = g.op("ReduceMean", g.op("Mul", x, x), g.ints("/axes_last", -1), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(f"{name}.eps", np.float32(eps)))))
    return g.op("Mul", g.op("Mul", x, inv), g.const(f"{name}.weight", weight.astype(np.float32)))


def _rope(g: _Graph, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1) on the last axis (HF's RoPE)."""
    x1 = g.op("Slice", x, "/zero", "/half", "/axes_last")
    x2 = g.op("Slice", x, "/half", "/big", "/axes_last")
    rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))


def _kv_io(helper, TensorProto, s: _Spec, i: int) -> tuple[list, list]:
    """The graph inputs past_key_values.{i}.key|value and outputs present.{i}.key|value of layer i."""
    ins, outs = [], []
    for kind in ("key", "value"):
        ins.append(
            helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}",
                TensorProto.FLOAT,
                ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim],
            )
        )
        outs.append(
            helper.make_tensor_value_info(
                f"present.{i}.{kind}",
                TensorProto.FLOAT,
                ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim],
            )
        )
    return ins, outs


def build_model(meta: dict, tensors: dict, config: dict, bits: int = 2, attention: str = ATTENTION[0]):
    """The decoder as an onnx.ModelProto, the per-weight report and the op counts. attention "plain": every
    step in standard ops; "gqa": com.microsoft GroupQueryAttention (RoPE from cos/sin caches inside, the KV
    cache concatenated inside) and the fused RMSNorms SimplifiedLayerNormalization /
    SkipSimplifiedLayerNormalization (the residual add folded in)."""
    from onnx import TensorProto, helper

    if attention not in ATTENTION:
        raise SlimEdgeError(f"--onnx-attention {attention}: choose one of {', '.join(ATTENTION)}")
    s = _spec(config)
    g = _Graph()
    w = _Weights(g, meta, tensors, bits)
    t = tensors
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", s.vocab])]
    h = w.embedding("input_ids", "model.embed_tokens")
    layers = _plain_layers if attention == "plain" else _gqa_layers
    h = layers(g, w, t, s, h, inputs, outputs)
    if s.tied:
        logits = w.tied_head(h, "model.embed_tokens")
    else:
        logits = w.linear(h, "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(g.nodes, "slim-edge decoder", inputs, outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="slim-edge",
        ir_version=IR_VERSION,
    )
    return model, w.report, g.ops


def _inv_freq(s: _Spec) -> np.ndarray:
    return (
        1.0 / (s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.int64).astype(np.float32) / s.head_dim))
    ).astype(np.float32)


def _gqa_layers(g: _Graph, w: _Weights, t: dict, s: _Spec, h: str, inputs: list, outputs: list) -> str:
    """The decoder blocks with GroupQueryAttention and fused RMSNorms; returns the final norm's output.

    GroupQueryAttention (onnxruntime >= 1.17 inputs only: query, key, value [B, S, heads * D], past_key|value
    [B, kv_heads, P, D], seqlens_k int32 [B] = total length - 1, total_sequence_length int32 scalar, cos/sin
    caches [max_positions, D / 2]) takes both lengths from attention_mask, as onnxruntime-genai's builder does,
    and the positions from them: position i of the new tokens is seqlens_k + 1 - S + i, which is position_ids
    for the left-aligned masks OnnxLM and genai feed (position_ids is then an unused input)."""
    from onnx import TensorProto, helper

    g.ints("/axes_last", -1)
    g.ints("/axes1", 1)
    seqlens_k = g.op(
        "Cast",
        g.op("Sub", g.op("ReduceSum", "attention_mask", "/axes1", keepdims=0), g.const("/one_i64", np.int64(1))),
        to=TensorProto.INT32,
    )
    total = g.op("Cast", g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2)), to=TensorProto.INT32)
    # HF's float32 angles, position * inv_freq, for every position the model takes
    freqs = np.arange(s.max_positions, dtype=np.float32)[:, None] * _inv_freq(s)[None]
    cos, sin = g.const("/cos_cache", np.cos(freqs)), g.const("/sin_cache", np.sin(freqs))
    residual = None  # the input of the next fused norm's skip: the branch output to add to h
    for i in range(s.layers):
        p = f"model.layers.{i}"
        x, h = _fused_norm(g, h, residual, t[f"{p}.input_layernorm.weight"].numpy(), s.eps, f"{p}.input_layernorm")
        q, k, v = (w.linear(x, f"{p}.self_attn.{n}_proj") for n in "qkv")
        ins, outs = _kv_io(helper, TensorProto, s, i)
        inputs.extend(ins)
        outputs.extend(outs)
        node = f"/groupqueryattention_{i}"
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, ins[0].name, ins[1].name, seqlens_k, total, cos, sin],
                [node, outs[0].name, outs[1].name],
                name=node[1:],
                domain=MS_DOMAIN,
                num_heads=s.heads,
                kv_num_heads=s.kv_heads,
                scale=float(s.head_dim**-0.5),
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        g.ops["GroupQueryAttention"] = g.ops.get("GroupQueryAttention", 0) + 1
        x, h = _fused_norm(
            g,
            h,
            w.linear(node, f"{p}.self_attn.o_proj"),
            t[f"{p}.post_attention_layernorm.weight"].numpy(),
            s.eps,
            f"{p}.post_attention_layernorm",
        )
        gate = w.linear(x, f"{p}.mlp.gate_proj")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), w.linear(x, f"{p}.mlp.up_proj"))
        residual = w.linear(act, f"{p}.mlp.down_proj")
    return _fused_norm(g, h, residual, t["model.norm.weight"].numpy(), s.eps, "model.norm")[0]


def _fused_norm(g: _Graph, h: str, branch: str | None, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(RMSNorm(h + branch), h + branch) in one SkipSimplifiedLayerNormalization; without a branch (the first
    norm) RMSNorm(h) in standard ops and h: SimplifiedLayerNormalization is onnxruntime's op in the standard
    domain, which onnx's checker refuses."""
    if branch is None:
        return _rms_norm(g, h, weight, eps, name), h
    g.n += 1
    out = f"/skipsimplifiedlayernormalization_{g.n}"
    g.nodes.append(
        g.helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [branch, h, g.const(f"{name}.weight", weight.astype(np.float32))],
            [out, "", "", out + "_sum"],
            name=out[1:],
            domain=MS_DOMAIN,
            epsilon=float(eps),
        )
    )
    g.ops["SkipSimplifiedLayerNormalization"] = g.ops.get("SkipSimplifiedLayerNormalization", 0) + 1
    return out, out + "_sum"


def _plain_layers(g: _Graph, w: _Weights, t: dict, s: _Spec, h: str, inputs: list, outputs: list) -> str:
    """The decoder blocks in standard ONNX ops (HF's LlamaDecoderLayer step by step); returns the final norm's
    output."""
    from onnx import TensorProto, helper

    g.ints("/axes_last", -1)
    g.ints("/zero", 0)
    g.ints("/half", s.head_dim // 2)
    g.ints("/big", 1 << 62)
    g.ints("/axis1", 1)

    # shapes: B batch, S new tokens, P past tokens, T = P + S
    ids_shape = g.op("Shape", "input_ids")
    total = g.op("Shape", "attention_mask", start=1, end=2)
    seq = g.op("Shape", "input_ids", start=1, end=2)
    past = g.op("Sub", total, seq)

    # RoPE angles: position_ids [B, S] x inv_freq [D/2] -> cos/sin [B, 1, S, D]
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), "/axes_last")
    freqs = g.op("Mul", pos, g.const("/inv_freq", _inv_freq(s)))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), "/axis1")
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)

    # additive mask [B, 1, S, T]: key j is visible to query i (absolute position P + i) when j <= P + i and
    # attention_mask[b, j] = 1
    g.const("/step", np.int64(1))
    q_pos = g.op("Range", g.op("Squeeze", past), g.op("Squeeze", total), "/step")
    k_pos = g.op("Range", g.const("/zero_s", np.int64(0)), g.op("Squeeze", total), "/step")
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.ints("/axes0", 0)), g.op("Unsqueeze", q_pos, "/axes_last"))
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.ints("/axes12", 1, 2)), to=TensorProto.BOOL)
    mask = g.op(
        "Where",
        g.op("And", causal, keep),
        g.const("/zero_f", np.float32(0)),
        g.const("/min_f", np.float32(np.finfo(np.float32).min)),
    )

    batch = g.op("Gather", ids_shape, g.const("/idx0", np.int64(0)), axis=0)
    batch1 = g.op("Unsqueeze", batch, "/axes0")
    q_shape = g.op("Concat", batch1, seq, g.ints("/qhd", s.heads, s.head_dim), axis=0)
    kv_shape = g.op("Concat", batch1, seq, g.ints("/kvhd", s.kv_heads, s.head_dim), axis=0)
    out_shape = g.op("Concat", batch1, seq, g.ints("/hid", s.hidden), axis=0)
    rep = s.heads // s.kv_heads
    scale = g.const("/attn_scale", np.float32(s.head_dim**-0.5))
    for i in range(s.layers):
        p = f"model.layers.{i}"
        x = _rms_norm(g, h, t[f"{p}.input_layernorm.weight"].numpy(), s.eps, f"{p}.input_layernorm")
        heads = lambda y, shape: g.op("Transpose", g.op("Reshape", y, shape), perm=[0, 2, 1, 3])  # noqa: E731
        q = _rope(g, heads(w.linear(x, f"{p}.self_attn.q_proj"), q_shape), cos, sin)
        k = _rope(g, heads(w.linear(x, f"{p}.self_attn.k_proj"), kv_shape), cos, sin)
        v = heads(w.linear(x, f"{p}.self_attn.v_proj"), kv_shape)
        ins, outs = _kv_io(helper, TensorProto, s, i)
        inputs.extend(ins)
        outputs.extend(outs)
        for past_kv, present, new in zip(ins, outs, (k, v)):
            g.nodes.append(
                helper.make_node(
                    "Concat", [past_kv.name, new], [present.name], axis=2, name=present.name.replace(".", "_")
                )
            )
        k_all, v_all = f"present.{i}.key", f"present.{i}.value"
        if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
            k_all, v_all = (_repeat_kv(g, y, rep, batch1, s) for y in (k_all, v_all))
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k_all, perm=[0, 1, 3, 2])), scale), mask)
        attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), v_all)
        attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), out_shape)
        h = g.op("Add", h, w.linear(attn, f"{p}.self_attn.o_proj"))
        x = _rms_norm(g, h, t[f"{p}.post_attention_layernorm.weight"].numpy(), s.eps, f"{p}.post_attention_layernorm")
        gate = w.linear(x, f"{p}.mlp.gate_proj")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), w.linear(x, f"{p}.mlp.up_proj"))
        h = g.op("Add", h, w.linear(act, f"{p}.mlp.down_proj"))
    return _rms_norm(g, h, t["model.norm.weight"].numpy(), s.eps, "model.norm")


def _repeat_kv(g: _Graph, y: str, rep: int, batch1: str, s: _Spec) -> str:
    """[B, kvh, T, D] -> [B, kvh * rep, T, D], each KV head repeated rep times in place (HF's repeat_kv)."""
    t_len = g.op("Shape", y, start=2, end=3)
    d = g.ints("/head_dim", s.head_dim)
    five = g.op("Concat", batch1, g.ints("/kv_rep", s.kv_heads, rep), t_len, d, axis=0)
    four = g.op("Concat", batch1, g.ints("/heads", s.heads), t_len, d, axis=0)
    return g.op("Reshape", g.op("Expand", g.op("Unsqueeze", y, g.ints("/axes2", 2)), five), four)


# --- the folder -----------------------------------------------------------------------------------------


def is_onnx_export(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def genai_config(config: dict, spec: _Spec, tok_config: dict) -> dict:
    """onnxruntime-genai's genai_config.json for the decoder (its names for our inputs and outputs)."""
    eos = config.get("eos_token_id", tok_config.get("eos_token_id"))
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": config.get("pad_token_id", eos),
            "context_length": config.get("max_position_embeddings"),
            "type": "llama",
            "vocab_size": spec.vocab,
            "decoder": {
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden,
                "num_attention_heads": spec.heads,
                "num_key_value_heads": spec.kv_heads,
                "num_hidden_layers": spec.layers,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": config.get("max_position_embeddings"),
            "do_sample": False,
            "num_beams": 1,
            "past_present_share_buffer": False,
        },
    }  # past and present are separate tensors of P and P + S


def export_onnx(
    ckpt: Path,
    out: Path,
    force: bool = False,
    external_data: bool | None = None,
    bits: int = 2,
    attention: str = ATTENTION[0],
) -> dict:
    """Write checkpoint `ckpt` as OUT/model.onnx (+ model.onnx.data, by default only past protobuf's 2 GB
    limit), its tokenizer files and genai_config.json; returns the summary that OUT/slim_edge_onnx.json
    also holds. attention: "gqa" (fused contrib ops) or "plain" (standard ops), see build_model."""
    from ..checkpoint import BASE_FILES
    from ..converters.gguf_export import trained_for

    onnx, _ = require_onnx()
    ckpt, meta, tensors = _load_source(ckpt)
    out = Path(out)
    check_output_dir(out, force, is_onnx_export, flag="--onnx", inputs=[ckpt])
    config = json.loads((ckpt / "config.json").read_text())
    spec = _spec(config)
    onnx_grid(get_format("q8_0"), min_bits=bits)  # a bad --onnx-bits fails before anything is read
    if attention not in ATTENTION:
        raise SlimEdgeError(f"--onnx-attention {attention}: choose one of {', '.join(ATTENTION)}")
    model, report, ops = build_model(meta, tensors, config, bits, attention)
    model.metadata_props.extend(
        [
            onnx.StringStringEntryProto(key="slim_edge.scheme", value=meta["config"]["scheme"]),
            onnx.StringStringEntryProto(
                key="slim_edge.formats", value=json.dumps({k: v["format"] for k, v in report.items()})
            ),
        ]
    )
    big = model.ByteSize() > PROTOBUF_LIMIT - (64 << 20) if external_data is None else external_data
    with atomic_dir(out) as tmp:
        onnx.save_model(
            model,
            str(tmp / "model.onnx"),
            save_as_external_data=big,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
        )
        onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)
        for f in BASE_FILES:
            if (ckpt / f).is_file():
                shutil.copy2(ckpt / f, tmp / f)
        tok_config = (
            json.loads((ckpt / "tokenizer_config.json").read_text())
            if (ckpt / "tokenizer_config.json").is_file()
            else {}
        )
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(config, spec, tok_config), indent=1))
        size = sum(f.stat().st_size for f in tmp.glob("model.onnx*"))
        lin = {k: v for k, v in report.items() if k in meta_linear_names(meta)}
        n_lin = sum(v["bytes"] * 8 / v["bits_per_weight"] for v in lin.values())
        summary = {
            "slim_edge_onnx": ONNX_EXPORT_VERSION,
            "file": str(out / "model.onnx"),
            "bytes": size,
            "external_data": big,
            "scheme": meta["config"]["scheme"],
            "onnx_bits": bits,
            "attention": attention,
            # gqa's RoPE caches hold this many positions (onnxruntime refuses past them); plain: no limit
            "max_positions": spec.max_positions if attention == "gqa" else None,
            "opset": OPSET,
            "ops": ops,
            "min_onnxruntime": min_onnxruntime(model),
            "linear_bits_per_weight": sum(v["bytes"] * 8 for v in lin.values()) / n_lin if lin else 32.0,
            "weights": report,
            "trained_for": trained_for(meta["config"]),
            "source": str(ckpt),
        }
        (tmp / MARKER).write_text(json.dumps(summary, indent=1))
    return summary


def _load_source(source) -> tuple[Path, dict, dict]:
    """(folder, checkpoint metadata, tensors) of a checkpoint, or of an HF model / embedded name as the
    float32 baseline (an empty plan: every weight a float initializer)."""
    from ..checkpoint import is_checkpoint, read_meta, read_tensors
    from ..models import load_model

    if is_checkpoint(source):
        return Path(source), read_meta(Path(source)), read_tensors(Path(source))
    model, _, folder = load_model(str(source))
    return folder, {"plan": [], "config": {"scheme": "fp32"}}, model.state_dict()


def meta_linear_names(meta: dict) -> set[str]:
    return {e["name"] for e in meta["plan"]}


# --- inspect --------------------------------------------------------------------------------------------


def inspect_onnx(path: Path) -> dict:
    """Operators, per-weight bits and bytes, and size of an ONNX model, read from the file itself."""
    onnx, _ = require_onnx()
    path = Path(path)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise SlimEdgeError(f"{path} does not exist; pass a model.onnx or a folder written by slim-edge export --onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise SlimEdgeError(f"{path} is not a readable ONNX model ({e})") from None
    sizes = {i.name: _init_bytes(i) for i in model.graph.initializer}
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in sizes}
    gathered = {source.get(n.input[0]) for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    ops: dict[str, int] = {}
    weights = []
    for n in model.graph.node:
        ops[n.op_type if not n.domain else f"{n.domain}.{n.op_type}"] = (
            ops.get(n.op_type if not n.domain else f"{n.domain}.{n.op_type}", 0) + 1
        )
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            ins = [source.get(i, i) for i in n.input]
            data = ins[1] if n.op_type == "MatMulNBits" else ins[0]
            nbytes = sizes[data] + sum(sizes[i] for i in ins[2:] if i in sizes)
            count = (
                attrs["N"] * attrs["K"]
                if n.op_type == "MatMulNBits"
                else shapes[data][0] * shapes[data][2] * attrs["block_size"]
            )
            tied = n.op_type == "MatMulNBits" and data in gathered
            weights.append(
                {
                    "name": "lm_head (tied: the embedding's codes)" if tied else data.removesuffix(".qweight"),
                    "op": n.op_type,
                    "bits": attrs.get("bits", 4),
                    "block_size": attrs["block_size"],
                    "weights": count,
                    "bytes": 0 if tied else nbytes,
                    "bits_per_weight": nbytes * 8 / count,
                    "linear": n.op_type == "MatMulNBits" and not tied,
                }
            )
        elif n.op_type in ("MatMul", "Gather") and any(i in sizes and len(shapes[i]) == 2 for i in n.input):
            w = next(i for i in n.input if i in sizes and len(shapes[i]) == 2)
            count = shapes[w][0] * shapes[w][1]
            weights.append(
                {
                    "name": w.removesuffix(".weight_t").removesuffix(".weight"),
                    "op": n.op_type,
                    "bits": 32,
                    "block_size": 0,
                    "weights": count,
                    "bytes": sizes[w],
                    "bits_per_weight": sizes[w] * 8 / count,
                    "linear": False,
                }
            )
    files = [path] + ([path.with_name(path.name + ".data")] if path.with_name(path.name + ".data").is_file() else [])
    quant = [w for w in weights if w["linear"]]
    return {
        "file": str(path),
        "bytes": sum(f.stat().st_size for f in files),
        "external_data": len(files) > 1,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ops": ops,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "metadata": {p.key: p.value for p in model.metadata_props},
        "weights": weights,
        "attention": _attention_ops(model.graph.node, ops),
        "linear_bits_per_weight": sum(w["bytes"] * 8 for w in quant) / max(sum(w["weights"] for w in quant), 1),
    }


FUSED_OPS = (
    "GroupQueryAttention",
    "MultiHeadAttention",
    "Attention",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)


def _attention_ops(nodes, ops: dict) -> dict:
    """How the model attends: "gqa" with GroupQueryAttention's heads and RoPE, else "plain" (standard ops), and
    the counts of the fused ops and of plain attention's Softmax."""
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    r = {
        "kind": "gqa" if gqa else "plain",
        "ops": {k: v for k, v in ops.items() if k.split(".")[-1] in FUSED_OPS + ("Softmax",)},
    }
    if gqa:
        attrs = {a.name: a.i for a in gqa[0].attribute if a.type == a.INT}
        r.update(
            num_heads=attrs.get("num_heads"),
            kv_num_heads=attrs.get("kv_num_heads"),
            rotary_inside=bool(attrs.get("do_rotary", 0)),
        )
    return r


def _init_bytes(t) -> int:
    from onnx import TensorProto

    if t.raw_data:
        return len(t.raw_data)
    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * {TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT64: 8}.get(t.data_type, 4)


def _attention_line(a: dict) -> str:
    ops = ", ".join(f"{k} x{v}" for k, v in a["ops"].items())
    if a["kind"] == "gqa":
        return (
            f"attention: gqa, {a['num_heads']} query / {a['kv_num_heads']} KV heads, RoPE "
            f"{'inside' if a['rotary_inside'] else 'outside'} ({ops})"
        )
    return f"attention: plain, standard ops ({ops})"


def format_onnx_report(r: dict) -> str:
    lines = [
        f"{r['file']}: {r['bytes'] / 2**20:.2f} MiB{' (+ external data)' if r['external_data'] else ''}, "
        f"opsets {r['opset']}",
        f"inputs: {', '.join(r['inputs'][:5])}{' ...' if len(r['inputs']) > 5 else ''} ({len(r['inputs'])})",
        "operators: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1])),
        _attention_line(r["attention"]),
        f"{'weight':<40} {'op':<21} {'bits':>4} {'block':>5} {'bpw':>7} {'KiB':>9}",
    ]
    for w in r["weights"]:
        lines.append(
            f"{w['name']:<40} {w['op']:<21} {w['bits']:>4} {w['block_size']:>5} "
            f"{w['bits_per_weight']:>7.3f} {w['bytes'] / 1024:>9.1f}"
        )
    lines.append(f"{r['linear_bits_per_weight']:.3f} bits per weight in the quantized linears")
    for k, v in r["metadata"].items():
        lines.append(f"{k}: {v[:100]}")
    return "\n".join(lines)
