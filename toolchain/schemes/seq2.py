"""SEQ 2-bit (AngelSlim HY-1.8B-2Bit): levels {-3,-1,1,3}*d, no zero point, learned scales.

Rows that are not a multiple of 512 train on stock Q2_0's asymmetric grid {-1,0,1,2}*d instead.
"""
from . import Scheme

SCHEME = Scheme("seq2", formats=("q2_0c", "q2_0"), values="grid",
                doc="SEQ 2-bit -> q2_0c (block 512); q2_0 where rows are not a multiple of 512")
