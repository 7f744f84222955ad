"""TQ2_0: stock llama.cpp ternary, 2 bits per weight, block 256.

| qs[64] | d: fp16 |   66 bytes / 256 weights = 2.0625 bpw
within each 128-weight half h, byte 32*h + m holds weights 128*h + m + 32*i at bits 2*i (i = 0..3)
weight = (code - 1) * d, code in 0..2
"""

import numpy as np

from .base import Format, absmax_roundf, fp16_bytes, fp16_from, pack_2bit, unpack_2bit


class TQ2_0(Format):
    def encode(self, values, d):
        return np.concatenate([pack_2bit(values.astype(np.int16) + 1, lanes=32), fp16_bytes(d)], axis=1)

    def decode(self, raw):
        return (unpack_2bit(raw[:, :64], lanes=32).astype(np.int8) - 1), fp16_from(raw[:, 64:])

    def quantize_blocks(self, blocks, weights=None):
        # quantize_row_tq2_0_ref: d = absmax, roundf(x / d)
        return self.encode(*absmax_roundf(blocks))


FORMAT = TQ2_0(
    "tq2_0",
    type_id=35,
    block_size=256,
    type_size=64 + 2,
    levels=(-1, 0, 1),
    file_type=37,
    vec_dot="q8_k",
    holds=("ternary",),
)
