"""Plain absmean ternary (BitNet b1.58 style): {-1,0,1}*d per block, stock TQ2_0 (or TQ1_0)."""

from . import Scheme

SCHEME = Scheme(
    "ternary",
    formats=("tq2_0", "q2_0"),
    values="ternary",
    doc="ternary -> tq2_0 (or --target tq1_0); q2_0 where rows are not a multiple of 256",
)
