"""Tequila (arXiv 2509.23809): absmean ternary whose dead weights (quantized to 0) feed a bias.

C_j = lambda * sum over dead i of w_ji, exported as a per-output-channel bias tensor.
"""

from . import Scheme

SCHEME = Scheme(
    "tequila",
    formats=("tq2_0", "q2_0"),
    values="ternary",
    tequila=True,
    doc="ternary + dead-weight bias -> tq2_0; q2_0 where rows are not a multiple of 256",
)
