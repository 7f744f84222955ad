"""What the pinned llama.cpp CPU runtime does to activations, reproduced in PyTorch.

A GGUF whose weights equal the PyTorch model's bit for bit still gives other logits, because the runtime
(ggml-cpu, patched tree, no flash attention: llama-cpp-python's default) rounds what it multiplies:

* every matmul first converts its activation rows to the weight type's `vec_dot_type`
  (ggml-cpu.c, `type_traits_cpu`, with runtime_patches applied), with that type's `from_float`:

      weight types                                   vec_dot_type   activation rows become
      F32                                            F32            unchanged
      F16 / BF16                                     F16 / BF16     rounded to half / bfloat16
      Q4_0 Q5_0 Q8_0 Q1_0 Q2_0 IQ4_NL MXFP4 NVFP4
      Q2_0C_64 STQ1_0_64                             Q8_0           32-blocks: q·fp16(d), |q| ≤ 127
      Q4_1 Q5_1                                      Q8_1           as Q8_0 (plus a block sum)
      K-quants, IQ2/IQ3/IQ1_*, IQ4_XS, TQ1_0, TQ2_0,
      STQ1_0, Q2_0C                                  Q8_K           256-blocks: q·d, d in f32

* Q8_0 (`quantize_row_q8_0`): amax = max|x| over 32 values, d = amax/127 stored as fp16, and
  q = round(x·id) from the fp32 id, never from the fp16 d. How id and the rounding are computed
  depends on the build: x86 AVX/AVX2 id = 127/amax, round half to even (`_mm256_round_ps`);
  ARM NEON id = 1/d, half to even (`vcvtnq_s32_f32`); the C reference (`quantize_row_q8_0_ref`,
  gguf-py) id = 1/d, `roundf` (half away from zero). The results differ only at ties and in the
  last bit of id, but they differ.
* Q8_K (`quantize_row_q8_K_ref`, every arch): m = the value of largest |x| in 256 (the first one on
  ties), iscale = -127/m, q = min(127, nearest_int(iscale·x)) (half to even, via the 1.5·2^23
  trick), d = 1/iscale in f32; bsums = 16 sums of 16 q. An all-zero block has d = 0, q = 0.
* the KV cache is F16: K and V are stored rounded to half; KQ = mul_mat(K, Q) rounds Q to half
  (F16's vec_dot_type), softmax runs in f32 (scale applied to KQ), and KQV = mul_mat(V, softmax)
  rounds the probabilities to half.
* rope angles are float32 products p·s·s·…·s with s = powf(base, -2/dim) (`ggml_rope_cache_init`),
  not HF's p·inv_freq: up to ~1e-5 rad apart at p = 500.

`simulate(model, types)` hooks these into an HF model: every nn.Linear's input goes through its weight
type's activation rounding, attention goes through `f16_kv_attention`, the rotary module returns
`ggml_rope_cos_sin`. What it cannot reproduce: which 8-bit codes float summation-order differences
(~1e-7 relative) flip. Those flips compound through the layers, so on a 30-layer model the simulation
matches the runtime only as well as it matches itself with its inputs jittered by 1e-7 (`jitter`):
see parity.py.
"""

from __future__ import annotations

import contextlib
import platform

import numpy as np
import torch

from slim_edge.errors import SlimEdgeError
from slim_edge.formats import BY_ID, get_format

Q8_0 = get_format("q8_0")  # the activation blocks are weight blocks of this format: its bytes, its block
QK8_0, QK_K = Q8_0.block_size, 256
ATTENTION = "slim_edge_f16kv"  # the name registered with transformers' AttentionInterface
# GGML type id -> vec_dot_type of its CPU matmul (ggml-cpu.c type_traits_cpu, pinned tree), for the stock
# types slim-edge has no format for; a format carries its own (Format.vec_dot): see `vec_dot_types`
STOCK_VEC_DOT = {
    0: "f32",
    30: "bf16",
    6: "q8_0",
    20: "q8_0",
    39: "q8_0",
    40: "q8_0",
    41: "q8_0",
    3: "q8_1",
    7: "q8_1",
    **{t: "q8_k" for t in (10, 11, 12, 13, 14, 16, 17, 18, 19, 21, 22, 23, 29)},
}


def vec_dot_types() -> dict[int, str]:
    """GGML type id -> the activation type its CPU matmul converts inputs to: stock types, then the formats'."""
    return STOCK_VEC_DOT | {f.type_id: f.vec_dot for f in BY_ID.values()}


# Q8_0 variants: (id from 127/amax rather than 1/d, round half to even rather than away from zero)
Q8_0_ROUNDING = {"x86": (True, True), "arm": (False, True), "ref": (False, False)}


def host_rounding() -> str:
    """The Q8_0 variant of a runtime built for this machine (x86: AVX2 path; aarch64: NEON)."""
    m = platform.machine().lower()
    return "x86" if m in ("x86_64", "amd64", "i686") else "arm" if m in ("aarch64", "arm64") else "ref"


def _div(a, b: torch.Tensor) -> torch.Tensor:
    """IEEE a / b elementwise where b != 0, else 0 (torch turns `scalar / tensor` into a reciprocal times
    the scalar, which is not the C division)."""
    a = torch.as_tensor(a, dtype=torch.float32, device=b.device).expand_as(b).contiguous()
    ok = b != 0
    return torch.where(ok, torch.div(a, torch.where(ok, b, torch.ones_like(b))), torch.zeros_like(b))


def _blocks(x: torch.Tensor, size: int, what: str) -> torch.Tensor:
    if x.shape[-1] % size:
        raise SlimEdgeError(
            f"{what}: row length {x.shape[-1]} is not a multiple of {size}; the runtime "
            f"could not use this activation type for it either"
        )
    return x.float().reshape(-1, size)


def quantize_q8_0(x: torch.Tensor, rounding: str = "x86") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x as Q8_0 blocks: (q int8 [n_blocks, 32], d float16 [n_blocks])."""
    if rounding not in Q8_0_ROUNDING:
        raise SlimEdgeError(f"Q8_0 rounding {rounding!r}: choose one of {', '.join(Q8_0_ROUNDING)}")
    id_from_amax, half_even = Q8_0_ROUNDING[rounding]
    b = _blocks(x, QK8_0, "Q8_0 activations")
    amax = b.abs().amax(dim=1)
    d = torch.div(amax, torch.full_like(amax, 127.0))
    inv = _div(127.0, amax) if id_from_amax else _div(1.0, d)
    v = b * inv[:, None]
    q = torch.round(v) if half_even else torch.sign(v) * torch.floor(v.abs() + 0.5)
    return q.clamp(-128, 127).to(torch.int8), d.to(torch.float16)


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x as Q8_K blocks: (q int8 [n_blocks, 256], d float32 [n_blocks])."""
    b = _blocks(x, QK_K, "Q8_K activations")
    m = b.gather(1, b.abs().argmax(dim=1, keepdim=True))[:, 0]  # argmax gives the first of equal |x|
    iscale = _div(-127.0, m)
    q = torch.round(iscale[:, None] * b).clamp(max=127)
    d = _div(1.0, iscale)
    return q.to(torch.int8), d


def q8_0_bytes(q: torch.Tensor, d: torch.Tensor) -> bytes:
    """block_q8_0 (formats/q8_0.py draws it) of Q8_0 activations (q int8 [n, 32], d float16 [n])."""
    return Q8_0.encode(q.numpy(), d.numpy()).tobytes()


def q8_k_bytes(q: torch.Tensor, d: torch.Tensor) -> bytes:
    """block_q8_K: | d: f32 | qs[256]: int8 | bsums[16]: int16 (sums of 16 qs) |, 292 bytes per block."""
    bsums = q.to(torch.int16).reshape(-1, QK_K // 16, 16).sum(dim=2, dtype=torch.int16)
    parts = [
        d.numpy().astype("<f4").view(np.uint8).reshape(-1, 4),
        q.numpy().view(np.uint8),
        bsums.numpy().astype("<i2").view(np.uint8).reshape(-1, 32),
    ]
    return np.concatenate(parts, axis=1).tobytes()


def q8_k_reference(x: np.ndarray) -> bytes:
    """numpy port of ggml's quantize_row_q8_K_ref, block by block, for testing the torch version."""
    blocks = np.ascontiguousarray(x, np.float32).reshape(-1, QK_K)
    out = bytearray()
    for blk in blocks:
        j = int(np.argmax(np.abs(blk)))  # first index of the largest |x|, as the C loop's strict '>'
        if blk[j] == 0:
            out += bytes(4 + QK_K + 2 * QK_K // 16)
            continue
        iscale = np.float32(-127.0) / blk[j]
        # nearest_int: (v + 12582912.f) read as int, i.e. round half to even in float32
        q = np.minimum((iscale * blk + np.float32(12582912.0)) - np.float32(12582912.0), 127).astype(np.int8)
        out += np.float32(np.float32(1.0) / iscale).astype("<f4").tobytes() + q.tobytes()
        out += q.astype(np.int16).reshape(16, 16).sum(axis=1).astype("<i2").tobytes()
    return bytes(out)


def fake_activation(x: torch.Tensor, kind: str, rounding: str = "x86") -> torch.Tensor:
    """x as the runtime's matmul sees it after converting it to `kind` (a vec_dot_types() value), in x's shape."""
    if kind == "f32":
        return x
    if kind == "f16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if kind in ("q8_0", "q8_1"):
        q, d = quantize_q8_0(x, rounding)
        return (q.float() * d.float()[:, None]).reshape(x.shape).to(x.dtype)
    if kind == "q8_k":
        q, d = quantize_q8_k(x)
        return (q.float() * d[:, None]).reshape(x.shape).to(x.dtype)
    raise SlimEdgeError(f"unknown activation type {kind!r}; known: f32, f16, bf16, q8_0, q8_1, q8_k")


def _half(x: torch.Tensor) -> torch.Tensor:
    """x rounded to half, as float32. Under autograd straight-through: a plain cast would also round the
    gradient to half, and attention's small gradients underflow there (training then drifts)."""
    r = x.to(torch.float16).float()
    if torch.is_grad_enabled() and x.requires_grad:
        x = x.float()
        return x + (r - x).detach()  # r - x is exact (Sterbenz), so the value is r bit for bit
    return r


def f16_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as the runtime computes it with an F16 KV cache and without flash attention
    (transformers AttentionInterface signature; q/k/v are [batch, heads, tokens, head_dim])."""
    groups = query.shape[1] // key.shape[1]
    k = _half(key).repeat_interleave(groups, dim=1)
    v = _half(value).repeat_interleave(groups, dim=1)
    q = _half(query)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if attention_mask is None:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(_half(probs), v)
    return out.transpose(1, 2).contiguous().to(query.dtype), probs


def ggml_rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., dim] of ggml's rope (ops.cpp `ggml_rope_cache_init`), in HF's rotate-half layout.

    ggml walks the frequencies with theta = p, then theta *= powf(base, -2/dim) in float32 for each pair,
    so angle i is p * s^i rounded i times; HF computes p * (1 / base^(2i/dim)) once. The two differ by up
    to ~1e-5 rad at p = 500, enough to flip a few 8-bit activation roundings downstream.
    """
    scale = torch.tensor(
        float(np.float32(base)) ** float(np.float32(-2.0) / np.float32(dim)), dtype=torch.float64
    ).float()  # powf, correctly rounded
    theta = positions.float()
    angles = []
    for _ in range(dim // 2):
        angles.append(theta)
        theta = theta * scale
    a = torch.stack(angles, dim=-1).double()
    cos, sin = a.cos().float(), a.sin().float()  # rounded from double: within glibc cosf/sinf's ulp
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def rope_supported(config) -> bool:
    """Plain rope over the whole head (no scaling, no partial rotary): what `ggml_rope_cos_sin` models."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_type", "default") == "default" and getattr(config, "partial_rotary_factor", 1.0) == 1.0


def _rope_hook(config, fix: str):
    if not rope_supported(config):
        raise SlimEdgeError(
            f"rope simulation covers plain rope only; this model's rope is "
            f"{getattr(config, 'rope_parameters', None)}: {fix}"
        )
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def hook(module, args, kwargs, output):
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        cos, sin = ggml_rope_cos_sin(position_ids, dim, base)
        return cos.to(output[0].dtype), sin.to(output[1].dtype)

    return hook


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, f16_kv_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def hook_rope(model, fix: str = "run without the rope variant") -> list:
    """Make every rotary module of `model` return ggml's angles (`ggml_rope_cos_sin`); the hook handles.
    A rope it does not model is an error that ends with `fix`, what the caller's user should do instead."""
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    if not rotary:
        raise SlimEdgeError(f"{type(model).__name__} has no rotary_emb module to simulate ggml's rope on")
    hook = _rope_hook(model.config, fix)
    return [m.register_forward_hook(hook, with_kwargs=True) for m in rotary]


def use_f16_kv_attention(model) -> str:
    """Switch `model` to `f16_kv_attention`; the attention implementation it had."""
    _register_attention()
    old = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    return old


def use_runtime_attention(model) -> None:
    """From now on `model` attends as the runtime does: F16 KV cache (`f16_kv_attention`) and ggml's rope
    angles. What `slim-edge quantize --runtime-attention` trains with and its checkpoints reload with."""
    hook_rope(model, fix="train without --runtime-attention")
    use_f16_kv_attention(model)


@contextlib.contextmanager
def simulate(
    model,
    types: dict[str, int],
    activations: bool = True,
    kv_f16: bool = True,
    rope: bool = False,
    rounding: str | None = None,
    jitter: float = 0.0,
    seed: int = 0,
):
    """Inside the block, `model` rounds like the runtime: each nn.Linear named in `types` (module name ->
    GGML type id of its weight in the GGUF) gets its input converted to that type's vec_dot_type, with
    `kv_f16` attention uses the F16 KV cache, with `rope` the rotary angles are ggml's. Undone on exit.

    `jitter` multiplies every rounded input by (1 + jitter * N(0, 1)) first: at ~1e-7, the size of
    the float summation-order differences between any two implementations, it measures how far the
    roundings alone move the logits (the noise floor no reference can get under)."""
    rounding = rounding or host_rounding()
    handles, old_attn = [], None
    gen = torch.Generator().manual_seed(seed)

    def rounded(x, kind):
        if jitter:
            x = x * (1 + jitter * torch.randn(x.shape, generator=gen, dtype=x.dtype))
        return fake_activation(x, kind, rounding)

    try:
        if rope:
            handles += hook_rope(model)
        if activations:
            for name, mod in model.named_modules():
                if name not in types:
                    continue
                kind = vec_dot_types().get(types[name])
                if kind is None:
                    raise SlimEdgeError(
                        f"{name}: GGUF type {types[name]} has no known vec_dot_type; add it to "
                        "slim_edge.runtime_patches.runtime_sim.STOCK_VEC_DOT (or its format's "
                        "vec_dot) from ggml-cpu.c's type_traits_cpu"
                    )
                handles.append(
                    mod.register_forward_pre_hook(lambda m, args, kind=kind: (rounded(args[0], kind), *args[1:]))
                )
        if kv_f16:
            old_attn = use_f16_kv_attention(model)
        yield model
    finally:
        for h in handles:
            h.remove()
        if old_attn is not None:
            model.set_attn_implementation(old_attn)
