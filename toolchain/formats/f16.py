"""F16: IEEE half precision, the unquantized baseline (block 1, 2 bytes)."""

import numpy as np

from .base import Format


class F16(Format):
    def quantize(self, x, weights=None):
        return np.ascontiguousarray(x, np.float32).astype(np.float16).view(np.uint8)

    def dequantize(self, raw, n_per_row=None):
        return np.ascontiguousarray(raw, np.uint8).view(np.float16).astype(np.float32)


FORMAT = F16("f16", type_id=1, block_size=1, type_size=2, levels=(), file_type=1, vec_dot="f16", embedding=True)
