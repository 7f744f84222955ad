"""Asymmetric 2-bit on stock llama.cpp Q2_0: levels {-1,0,1,2}*d per block of 64."""

from . import Scheme

SCHEME = Scheme("q2", formats=("q2_0",), values="grid", doc="2-bit {-1,0,1,2} -> stock q2_0 (block 64)")
