"""Q8_0: 8-bit baseline, block 32.

| d: fp16 | qs[32]: int8 |      34 bytes / 32 weights = 8.5 bpw
weight j = qs[j] * d
"""

import numpy as np

from .base import Format, fp16_bytes, fp16_from


class Q8_0(Format):
    def encode(self, values, d):
        return np.concatenate([fp16_bytes(d), values.astype(np.int8).view(np.uint8)], axis=1)

    def decode(self, raw):
        return raw[:, 2:].view(np.int8), fp16_from(raw[:, :2])

    def quantize_blocks(self, blocks, weights=None):
        # ggml's quantize_row_q8_0_ref: round with the fp32 scale's reciprocal, store fp16
        d = np.abs(blocks).max(axis=1) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        x = blocks * inv[:, None]
        q = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
        return self.encode(q.astype(np.int8), d.astype(np.float16))


FORMAT = Q8_0(
    "q8_0",
    type_id=8,
    block_size=32,
    type_size=2 + 32,
    levels=tuple(range(-127, 128)),
    file_type=7,
    vec_dot="q8_0",
    embedding=True,
)
