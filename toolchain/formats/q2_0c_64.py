"""Q2_0C_64: SEQ 2-bit on 64-weight blocks, 2.25 bpw — for rows that are not a multiple of 512.

    | d: fp16 | qs[16]: code j at bits 2*(j%4) of qs[j/4] |   2 + 64/4 = 18 bytes / 64 weights = 2.25 bpw
    weight = (2*code - 3) * d, code in 0..3, i.e. levels {-3, -1, +1, +3} * d

Q2_0C's grid and byte order with one scale per 64 weights (the size of stock Q2_0's block, whose
grid {-1, 0, 1, 2} is not SEQ's). slim-edge's own type (no upstream counterpart): GGML type id 45,
llama_ftype 44 (LLAMA_FTYPE_MOSTLY_Q2_0C_64), activations Q8_0 (a row of 576 is not whole Q8_K blocks).
Reference quantizer: Q2_0C's — d0 = absmax / 3, two Lloyd steps, final codes against the fp16 d.

Why 64 and not also 32: on SmolLM2-135M's weights (attn_q/attn_v/ffn_gate/ffn_down of blocks 0, 10, 20, 29)
this reference leaves a relative RMS error of 0.3933 per 512, 0.3816 per 64 and 0.3685 per 32: block 32 buys
3.4 % less error for 11 % more bits (2.5 bpw), less than those bits buy spent on Q4_0 tensors (--bits). Stock
Q2_0's absmax reference leaves 0.7229 on the same rows.
"""

from .q2_0c import Q2_0C

FORMAT = Q2_0C(
    "q2_0c_64",
    type_id=45,
    block_size=64,
    type_size=2 + 64 // 4,
    levels=(-3, -1, 1, 3),
    stock=False,
    file_type=44,
    vec_dot="q8_0",
)
