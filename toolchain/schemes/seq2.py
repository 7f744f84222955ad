"""SEQ 2-bit (AngelSlim HY-1.8B-2Bit): levels {-3,-1,1,3}*d, no zero point, learned scales.

The largest block that divides the row: q2_0c (512, 2.03 bpw), else q2_0c_64 (the same grid per 64, 2.25
bpw). Stock q2_0 ({-1,0,1,2}*d per 64) only when asked (--target q2_0): its block never beats q2_0c_64's.
"""

from . import Scheme

SCHEME = Scheme(
    "seq2",
    formats=("q2_0c", "q2_0c_64", "q2_0"),
    values="grid",
    doc="SEQ 2-bit -> q2_0c (block 512); q2_0c_64 (block 64) where rows are not a multiple of 512",
)
