"""Sherry 1.25-bit (arXiv 2601.07892): 3:4 sparse ternary, trained with the Arenas residual synapse.

Quads are taken in STQ1_0's stride-16 layout (the layout we export, so the exported model is the
trained model). The largest block that divides the row: stq1_0 (256, 1.31 bpw), else stq1_0_64 (one
stride-16 chunk with its own scale, 1.5 bpw). Stock q2_0 (block 64, holds {-1,0,1} exactly) only when
asked (--target q2_0).
"""

from . import Scheme

SCHEME = Scheme(
    "sherry",
    formats=("stq1_0", "stq1_0_64", "q2_0"),
    values="sherry",
    arenas=True,
    doc="3:4 ternary -> stq1_0 (1.31 bpw); stq1_0_64 (1.5 bpw) where rows are not a multiple of 256",
)
