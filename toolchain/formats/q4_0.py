"""Q4_0: 4-bit baseline, block 32.

| d: fp16 | qs[16]: byte j = code j (low nibble) | code j+16 (high nibble) |   18 bytes = 4.5 bpw
weight = (code - 8) * d, code in 0..15
"""

import numpy as np

from .base import Format, fp16_bytes, fp16_from


class Q4_0(Format):
    def encode(self, values, d):
        c = (values.astype(np.int16) + 8).astype(np.uint8)
        return np.concatenate([fp16_bytes(d), c[:, :16] | (c[:, 16:] << 4)], axis=1)

    def decode(self, raw):
        qs = raw[:, 2:]
        c = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return (c.astype(np.int16) - 8).astype(np.int8), fp16_from(raw[:, :2])

    def quantize_blocks(self, blocks, weights=None):
        # quantize_row_q4_0_ref: d = (signed value of largest magnitude) / -8, truncating round
        imax = np.abs(blocks).argmax(axis=1)
        d = blocks[np.arange(len(blocks)), imax] / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        c = np.trunc(blocks * inv[:, None] + np.float32(8.5)).clip(0, 15)
        return self.encode((c - 8).astype(np.int8), d.astype(np.float16))


FORMAT = Q4_0(
    "q4_0",
    type_id=2,
    block_size=32,
    type_size=2 + 16,
    levels=tuple(range(-8, 8)),
    file_type=2,
    vec_dot="q8_0",
    embedding=True,
)
