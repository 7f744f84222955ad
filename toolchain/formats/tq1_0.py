"""TQ1_0: stock llama.cpp ternary, 1.6875 bpw, block 256.

| qs[48] | qh[4] | d: fp16 |   2 + 4*13 = 54 bytes / 256 weights
trits t = value + 1 in 0..2, five per byte as a base-3 fixed-point fraction:
  byte = ceil(256 * (81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) / 243); trit k = ((byte * 3^k) mod 256) * 3 >> 8
qs[0:32]:  byte m holds weights m + 32k        (k = 0..4, weights 0..159)
qs[32:48]: byte m holds weights 160 + m + 16k  (k = 0..4, weights 160..239)
qh[0:4]:   byte m holds weights 240 + m + 4k   (k = 0..3, weights 240..255; a fifth trit of 0)
"""

import numpy as np

from .base import Format, absmax_roundf, fp16_bytes, fp16_from

_POW5 = np.array([81, 27, 9, 3, 1], np.uint16)


def _pack_trits(t: np.ndarray, stride: int, k: int) -> np.ndarray:
    n = t.shape[0]
    t = t.reshape(n, -1, k, stride).astype(np.uint16)
    s = (t * _POW5[:k].reshape(1, 1, k, 1)).sum(axis=2).reshape(n, -1)
    return ((s * 256 + 242) // 243).astype(np.uint8)


def _unpack_trits(b: np.ndarray, stride: int, k: int) -> np.ndarray:
    n = b.shape[0]
    pw = np.array([1, 3, 9, 27, 81], np.uint16)[:k]
    q = (b.reshape(n, -1, 1, stride).astype(np.uint16) * pw.reshape(1, 1, k, 1)) & 0xFF
    return ((q * 3) >> 8).reshape(n, -1)


class TQ1_0(Format):
    def encode(self, values, d):
        t = values.astype(np.int16) + 1
        parts = [
            _pack_trits(t[:, :160], 32, 5),
            _pack_trits(t[:, 160:240], 16, 5),
            _pack_trits(t[:, 240:], 4, 4),
            fp16_bytes(d),
        ]
        return np.concatenate(parts, axis=1)

    def decode(self, raw):
        t = np.concatenate(
            [
                _unpack_trits(raw[:, :32], 32, 5),
                _unpack_trits(raw[:, 32:48], 16, 5),
                _unpack_trits(raw[:, 48:52], 4, 4),
            ],
            axis=1,
        )
        return (t.astype(np.int8) - 1), fp16_from(raw[:, 52:])

    def quantize_blocks(self, blocks, weights=None):
        return self.encode(*absmax_roundf(blocks))


FORMAT = TQ1_0(
    "tq1_0",
    type_id=34,
    block_size=256,
    type_size=2 + 4 * 13,
    levels=(-1, 0, 1),
    file_type=36,
    vec_dot="q8_k",
    holds=("ternary",),
)
