"""STQ1_0_64: Sherry 3:4 ternary on 64-weight blocks, 1.5 bpw — for rows that are not a multiple of 256.

| qs[8]: 16 four-bit slot codes | sign[2]: 16 sign bits | d: fp16 |   8 + 2 + 2 = 12 bytes / 64 = 1.5 bpw

One STQ1_0 chunk of 64 with its own scale: group g (0..15) = weights {g + 16*p : p = 0..3} (the
stride-16 quads, so kernels load activations at offsets 0/16/32/48 as for STQ1_0);
slot(g) = nibble (g & 1) of qs[g // 2] (low nibble first); sign(g) = bit (g % 8) of sign[g // 8];
the value of lane p is bits 2p..2p+1 of stq1_0.CODEBOOK[(sign << 4) | slot], minus 1, times d.

slim-edge's own type (no upstream counterpart): GGML type id 46, llama_ftype 45
(LLAMA_FTYPE_MOSTLY_STQ1_0_64), activations Q8_0 (a row of 576 is not whole Q8_K blocks of 256).
Reference quantizer: STQ1_0's — zero the smallest |x| of each quad (first on ties), signs of the
other three, d = sum(w*|x|) / sum(w) over the kept weights, in weight order in fp32.
"""

from .stq1_0 import STQ1_0

FORMAT = STQ1_0(
    "stq1_0_64",
    type_id=46,
    block_size=64,
    type_size=64 // 8 + 64 // 32 + 2,
    levels=(-1, 0, 1),
    stock=False,
    file_type=45,
    vec_dot="q8_0",
    holds=("sherry",),
)
