"""Sherry 1.25-bit (arXiv 2601.07892): 3:4 sparse ternary, trained with the Arenas residual synapse.

Quads are taken in STQ1_0's stride-16 layout (the layout we export, so the exported model is the
trained model). Rows that are not a multiple of 256 keep the same 3:4 ternary values in stock Q2_0
(block 64 = one stride-16 chunk), which holds {-1,0,1} exactly.
"""
from . import Scheme

SCHEME = Scheme("sherry", formats=("stq1_0", "q2_0"), values="sherry", arenas=True,
                doc="3:4 ternary -> stq1_0 (1.31 bpw); q2_0 where rows are not a multiple of 256")
