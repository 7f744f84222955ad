"""Q2_0C: SEQ 2-bit (HY-1.8B-2Bit), block 512, no zero point.

    | d: fp16 | qs[128]: code j at bits 2*(j%4) of qs[j/4] |   2 + 128 = 130 bytes / 512 weights = 2.03 bpw
    weight = (2*code - 3) * d, code in 0..3, i.e. levels {-3, -1, +1, +3} * d  (SEQ's {+-0.25, +-0.75} * s, s = 4d)

The value formula and block size follow llama.cpp PR #19357; the order of the fields (scale first,
as in block_q2_0) is slim-edge's. slim-edge gives it type id 44 (the PR's id is not settled):
the id map is written into every file's metadata.

Reference quantizer: d0 = absmax / 3, then two Lloyd steps — codes = nearest odd level of x/d,
d = sum(w*x*v) / sum(w*v*v) (fp32, summed in weight order) — and final codes against the fp16 d.
"""

import numpy as np

from .base import Format, fp16_bytes, fp16_from, pack_2bit, unpack_2bit


class Q2_0C(Format):
    rule = "odd"  # levels {-3,-1,1,3}: 2*floor(z/2)+1

    def encode(self, values, d):
        return np.concatenate([fp16_bytes(d), pack_2bit((values.astype(np.int16) + 3) // 2, lanes=1)], axis=1)

    def decode(self, raw):
        return (unpack_2bit(raw[:, 2:], lanes=1).astype(np.int8) * 2 - 3), fp16_from(raw[:, :2])

    def reference_scale(self, blocks, weights):
        w = np.ones_like(blocks) if weights is None else weights
        d = (np.abs(blocks).max(axis=1) / np.float32(3)).astype(np.float32)
        for _ in range(2):
            v = _odd_levels(blocks, d).astype(np.float32)
            num = np.cumsum(w * blocks * v, axis=1, dtype=np.float32)[:, -1]
            den = np.cumsum(w * v * v, axis=1, dtype=np.float32)[:, -1]
            d = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1), d).astype(np.float32)
        return d.astype(np.float16)

    def round_values(self, blocks, d):
        return _odd_levels(blocks, d.astype(np.float32))


def _odd_levels(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest of {-3,-1,1,3}: 2*floor(x / 2d) + 1, clamped (x / 2d computed as x * (0.5 / d))."""
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(0.5) / np.where(d == 0, 1, d)).astype(np.float32)
    k = np.floor(x * inv[:, None]).clip(-2, 1)
    return (2 * k + 1).astype(np.int8)


FORMAT = Q2_0C(
    "q2_0c",
    type_id=44,
    block_size=512,
    type_size=2 + 512 // 4,
    levels=(-3, -1, 1, 3),
    stock=False,
    file_type=43,
    vec_dot="q8_k",
)
