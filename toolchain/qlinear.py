"""The torch side of a format: fake quantization that equals the exported bytes exactly.

Forward value: float32(v) * float32(fp16(d)), the same product `Format.dequantize` computes, so the
trained model *is* the exported model.

Gradients (LSQ, Esser et al. 2020, as ParetoQ uses it), with z = w / d and [lo, hi] the grid's end levels:

    inside  lo <= z <= hi:  dq/dw = 1 (straight through)      dq/dd = v - z
    clipped z > hi, z < lo: dq/dw = 0 (the output ignores w)  dq/dd = v  (= hi or lo: q = v*d exactly)

A weight that Sherry's 3:4 rule zeroes is never clipped (its value comes from the selection, not a clamp).
`ste_clipped=True` keeps the straight-through weight gradient for clipped weights (the pre-LSQ behaviour);
`grad_scale` multiplies the scale gradient (LSQ's 1 / sqrt(block_size * hi); Adam cancels a constant factor,
so it only matters for optimizers that do not normalise).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SlimEdgeError
from .formats import get_format
from .formats.base import Format
from .formats.stq1_0 import quad_layout
from .runtime_patches.runtime_sim import fake_activation, host_rounding, vec_dot_types

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24


# a scheme's values (Scheme.values) other than "grid" (every level of the format): the rule that takes the
# place of the format's own and the clip range; "sherry" needs the stride-16 quads of stq1_0's layout
VALUES = {"ternary": ("round", (-1.0, 1.0)), "sherry": ("sherry", (-1.0, 1.0))}


def grid_ends(fmt: Format, mode: str) -> tuple[float, float]:
    """The outermost levels (lo, hi) a weight of this format and mode can take: the clip range of z."""
    return VALUES[mode][1] if mode in VALUES else (float(fmt.levels[0]), float(fmt.levels[-1]))


def grid_top(fmt: Format, mode: str) -> float:
    """The largest |level|: what absmax maps to."""
    return max(abs(v) for v in grid_ends(fmt, mode))


def grid_rule(fmt: Format, mode: str) -> str:
    """How z = w / d becomes a grid value (Format.rule): "sherry" (3:4 ternary), "odd" ({-3,-1,1,3}) or "round"."""
    return VALUES[mode][0] if mode in VALUES else fmt.rule


def grid_quads(fmt: Format, mode: str) -> torch.Tensor | None:
    """The quads [block / 4, 4] the sherry rule selects in, None for the other rules."""
    return torch.as_tensor(quad_layout(fmt.block_size)) if grid_rule(fmt, mode) == "sherry" else None


def rule_values(z: torch.Tensor, rule: str, lo: float, hi: float, quads: torch.Tensor | None) -> torch.Tensor:
    if rule == "sherry":
        rows, nb, b = z.shape
        q = z.reshape(rows, nb, b)[:, :, quads]  # [rows, blocks, groups, 4]
        zero = q.abs().argmin(dim=-1, keepdim=True)
        v = torch.where(q >= 0, 1.0, -1.0).scatter(-1, zero, 0.0)
        out = torch.empty_like(z)
        out[:, :, quads] = v
        return out
    if rule == "odd":  # odd levels {-3,-1,1,3}: 2*floor(z/2)+1
        return (2 * torch.floor(z * 0.5) + 1).clamp(lo, hi)
    # round half away from zero, like C's roundf
    return (torch.sign(z) * torch.floor(z.abs() + 0.5)).clamp(lo, hi)


def grid_values(z: torch.Tensor, fmt: Format, mode: str, quads: torch.Tensor | None) -> torch.Tensor:
    """Integer grid values (as float) for z = w / d, shape [rows, blocks, block]."""
    return rule_values(z, grid_rule(fmt, mode), *grid_ends(fmt, mode), quads)


def lsq_grad_scale(fmt: Format, mode: str) -> float:
    """LSQ's scale-gradient factor 1 / sqrt(weights per scale * top level)."""
    return 1.0 / math.sqrt(fmt.block_size * grid_top(fmt, mode))


def _forward_math(w, d, block: int, rule: str, lo: float, hi: float, quads):
    """(q, v, d16): the stored scale fp16(clamp(d)), the grid values of w / d16 and q = v * d16."""
    d16 = d.clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(torch.float32)
    wb = w.reshape(w.shape[0], -1, block)
    v = rule_values(wb / d16[..., None], rule, lo, hi, quads)
    return (v * d16[..., None]).reshape(w.shape), v.reshape(w.shape), d16


def _backward_math(g, w, d, d16, v8, block: int, lo: float, hi: float, ste_clipped: bool, grad_scale: float):
    """(dL/dw, dL/dd) by the rules in the module docstring; the scale's clamp passes the gradient inside only."""
    shape = (w.shape[0], -1, block)
    gb, v = g.reshape(shape).float(), v8.reshape(shape).float()
    z = w.reshape(shape) / d16[..., None]
    clipped = ((z > hi) & (v == hi)) | ((z < lo) & (v == lo))
    gw = gb if ste_clipped else gb.masked_fill(clipped, 0.0)
    gd = (gb * torch.where(clipped, v, v - z)).sum(-1) * grad_scale
    gd = gd * ((d >= FP16_TINY) & (d <= FP16_MAX))
    return gw.reshape(w.shape), gd


# torch.compile'd copies of the two functions above (and of distill's loss chunk), used inside
# `compiled_kernels(True)`: on a GPU each fake-quant becomes a few fused kernels instead of ~25 launches
_COMPILED: dict = {}
_USE_COMPILED = [False]


def compiled(fn):
    if not _USE_COMPILED[0]:
        return fn
    if fn not in _COMPILED:
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one graph per (shape, grid): ~10 for a model
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


class compiled_kernels:
    """`with compiled_kernels(enabled):` fake quantization and the distillation loss run torch.compile'd.
    The values are the same formulas; the export and the reloaded model always take the eager path."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.before = _USE_COMPILED[0]
        _USE_COMPILED[0] = self.enabled

    def __exit__(self, *exc):
        _USE_COMPILED[0] = self.before


class _FakeQuant(torch.autograd.Function):
    """q = v * fp16(d) with the LSQ gradients drawn in the module docstring; v is saved as int8."""

    @staticmethod
    def forward(ctx, w, d, block, rule, lo, hi, quads, ste_clipped, grad_scale):
        q, v, d16 = compiled(_forward_math)(w, d, block, rule, lo, hi, quads)
        ctx.save_for_backward(w, d, d16, v.to(torch.int8))
        ctx.args = (block, lo, hi, ste_clipped, grad_scale)
        ctx.mark_non_differentiable(v)
        return q, v

    @staticmethod
    def backward(ctx, g, _gv):
        w, d, d16, v8 = ctx.saved_tensors
        gw, gd = compiled(_backward_math)(g, w, d, d16, v8, *ctx.args)
        return gw.to(w.dtype), gd.to(d.dtype), None, None, None, None, None, None, None


def fake_quant(
    w: torch.Tensor,
    d: torch.Tensor,
    fmt: Format,
    mode: str,
    quads=None,
    return_values: bool = False,
    ste_clipped: bool = False,
    grad_scale: float = 1.0,
):
    lo, hi = grid_ends(fmt, mode)
    q, v = _FakeQuant.apply(w, d, fmt.block_size, grid_rule(fmt, mode), lo, hi, quads, ste_clipped, grad_scale)
    return (q, v) if return_values else q


def init_scale(w: torch.Tensor, fmt: Format, mode: str, quads=None, n_grid: int = 24) -> torch.Tensor:
    """PTQ scale per block: MSE search over d = c * absmax / max_level, then one closed-form refit."""
    rows, k = w.shape
    wb = w.detach().float().reshape(rows, k // fmt.block_size, fmt.block_size)
    if grid_rule(fmt, mode) == "sherry":  # the values do not depend on d: the kept-weight mean is L2-optimal
        v = grid_values(wb, fmt, mode, quads)
        return ((v * wb).sum(-1) / (v * v).sum(-1).clamp_min(1)).clamp_min(FP16_TINY)
    top = grid_top(fmt, mode)
    amax = wb.abs().amax(-1).clamp_min(1e-8)
    best_err = torch.full_like(amax, math.inf)
    best = amax / top
    for c in torch.linspace(0.15, 1.0, n_grid):
        d = (amax / top * c).to(torch.float16).float().clamp_min(FP16_TINY)
        v = grid_values(wb / d[..., None], fmt, mode, quads)
        err = ((v * d[..., None] - wb) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, d, best)
    # least-squares scale for the chosen values (optimal for fixed values)
    v = grid_values(wb / best[..., None], fmt, mode, quads)
    num, den = (v * wb).sum(-1), (v * v).sum(-1)
    refit = torch.where(den > 0, num / den.clamp_min(1e-12), best)
    err_refit = (
        (grid_values(wb / refit.clamp_min(FP16_TINY)[..., None], fmt, mode, quads) * refit[..., None] - wb) ** 2
    ).sum(-1)
    return torch.where((refit > 0) & (err_refit <= best_err), refit, best).clamp_min(FP16_TINY)


def activation_type(type_id: int) -> str:
    """The runtime's activation type (vec_dot_type) for weights of GGML type `type_id`."""
    return vec_dot_types()[type_id]


def round_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as the runtime's matmul sees it (8-bit blocks), exact without autograd; straight-through with it."""
    q = fake_activation(x.detach().float(), kind, host_rounding()).to(x.dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return x + (q - x).detach()


@contextmanager
def frozen_quantized(model: nn.Module):
    """Inside it, no-grad forwards of `model`'s QuantLinears quantize each weight once (until it changes)
    instead of at every call: GPTQ's and evaluation's many forwards over unchanged weights. Costs one float
    copy of the quantized weights while it lasts."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in mods:
        m._qcache = {}
    try:
        yield model
    finally:
        for m in mods:
            m._qcache = None


class QuantLinear(nn.Module):
    """nn.Linear whose weight trains on a format's grid; `arenas` is Sherry's residual weight λ_t."""

    def __init__(
        self,
        linear: nn.Linear,
        fmt: str,
        mode: str,
        tequila_lambda: float = 0.0,
        act: str | None = None,
        ste_clipped: bool = False,
        lsq_grad: bool = False,
    ):
        super().__init__()
        self.ste_clipped = ste_clipped
        self.act = act  # None, or the runtime activation type its input is rounded to (round_activations)
        self.fmt = get_format(fmt)
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone().float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone().float())
        quads = grid_quads(self.fmt, mode)
        self.register_buffer("quads", quads, persistent=False)
        self.scale = nn.Parameter(init_scale(self.weight, self.fmt, mode, quads))
        self.tequila_lambda = tequila_lambda
        self.grad_scale = lsq_grad_scale(self.fmt, mode) if lsq_grad else 1.0
        self.arenas = 0.0

    def quantized(self, return_values: bool = False):
        return fake_quant(
            self.weight, self.scale, self.fmt, self.mode, self.quads, return_values, self.ste_clipped, self.grad_scale
        )

    def tequila_bias(self, values: torch.Tensor) -> torch.Tensor | None:
        if not self.tequila_lambda:
            return None
        return self.tequila_lambda * (self.weight * (values == 0)).sum(dim=1)

    def effective_bias(self, values):
        tb = self.tequila_bias(values)
        if tb is None:
            return self.bias
        return tb if self.bias is None else self.bias + tb

    _qcache: dict | None = None  # {} inside frozen_quantized(): the no-grad forward's weight and bias, kept

    def _forward_weights(self):
        """(quantized weight, bias) for the forward; inside frozen_quantized() and without autograd, computed
        once per version of the weight and scale (an in-place update, e.g. GPTQ's or an optimizer's, bumps it)."""
        if self._qcache is None or torch.is_grad_enabled():
            wq, values = self.quantized(return_values=True)
            return wq, self.effective_bias(values)
        key = (
            self.weight._version,
            self.scale._version,
            self.weight.data_ptr(),
            self.scale.data_ptr(),
            self.tequila_lambda,
            self.bias._version if self.bias is not None else None,
        )
        if self._qcache.get("key") != key:
            wq, values = self.quantized(return_values=True)
            # the storages are held so that their addresses, part of the key, cannot be reused meanwhile
            self._qcache.update(
                key=key,
                w=wq,
                b=self.effective_bias(values),
                keep=(self.weight.untyped_storage(), self.scale.untyped_storage()),
            )
        return self._qcache["w"], self._qcache["b"]

    def forward(self, x):
        wq, b = self._forward_weights()
        if self.act:
            x = round_activations(x, self.act)
        # the same call nn.Linear makes, so a reloaded model gives identical logits
        y = F.linear(x, wq.to(x.dtype), None if b is None else b.to(x.dtype))
        if self.arenas:
            y = y + self.arenas * F.linear(x, self.weight.to(x.dtype))
        return y

    @torch.no_grad()
    def export(self) -> dict[str, np.ndarray]:
        """Packed blocks (the GGUF bytes), the fp16 scales and the Tequila bias (if any)."""
        _, values = self.quantized(return_values=True)
        d16 = self.scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16)
        out = {"qweight": self.fmt.pack(values.to(torch.int8).cpu().numpy(), d16.cpu().numpy())}
        tb = self.effective_bias(values)
        if tb is not None:
            out["bias"] = tb.detach().float().cpu().numpy()
        return out

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, format={self.fmt.name}, mode={self.mode}" + (
            f", act={self.act}" if self.act else ""
        )


# --- the token embedding and the tied output head ------------------------------------------------------


def embedding_scale(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Block scales of an embedding: q8_0 takes its reference's absmax / 127 (what the converter and
    llama-quantize write, and for SmolLM2's embedding, shipped in Q8_0, the exact scale); coarser grids
    take init_scale's MSE search."""
    if fmt.name == "q8_0":
        blocks = w.detach().float().reshape(-1, fmt.block_size).cpu().numpy()
        _, d = fmt.unpack(fmt.quantize_blocks(blocks))
        return torch.from_numpy(d.astype(np.float32)).reshape(w.shape[0], -1).to(w.device)
    return init_scale(w, fmt, "grid")


class QuantEmbedding(nn.Module):
    """nn.Embedding on a format's grid, blocks along the hidden dimension: the rows the GGUF's token_embd
    holds, and through a TiedHead the tied output head's weight.

    The latent weight and the scales stay frozen (train.py trains no "embed" parameter): q8_0 holds
    SmolLM2's embedding exactly, so there is nothing to recover there, and updating 28 M shared
    embedding/head weights from a few passes of one text moves the teacher's head towards that text. The
    student's linears learn to work with the embedding's rounding instead (it matters for q4_0)."""

    def __init__(self, embedding: nn.Embedding, fmt: str):
        super().__init__()
        self.fmt = get_format(fmt)
        self.mode = "grid"
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        if self.embedding_dim % self.fmt.block_size:
            raise SlimEdgeError(
                f"--embedding-type {fmt}: the embedding's row length {self.embedding_dim} is not a "
                f"multiple of {fmt}'s block {self.fmt.block_size}; use --embedding-type f16"
            )
        self.weight = nn.Parameter(embedding.weight.detach().clone().float(), requires_grad=False)
        self.scale = nn.Parameter(embedding_scale(self.weight, self.fmt), requires_grad=False)
        self._cache = None

    def quantized(self, return_values: bool = False):
        """The fake-quantized weight (and its grid values); cached while weight and scale are unchanged."""
        if torch.is_grad_enabled() and (self.weight.requires_grad or self.scale.requires_grad):
            return fake_quant(self.weight, self.scale, self.fmt, self.mode, None, return_values)
        key = (self.weight.data_ptr(), self.weight._version, self.scale.data_ptr(), self.scale._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                q, v = fake_quant(self.weight, self.scale, self.fmt, self.mode, None, True)
            self._cache = (key, q, v.to(torch.int8))
        _, q, v = self._cache
        return (q, v.float()) if return_values else q

    def forward(self, ids):
        return F.embedding(ids, self.quantized(), self.padding_idx)

    @torch.no_grad()
    def export(self) -> np.ndarray:
        """The packed blocks: the GGUF's token_embd bytes, [num_embeddings, row_bytes]."""
        _, values = self.quantized(return_values=True)
        d16 = self.scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16)
        return self.fmt.pack(values.to(torch.int8).cpu().numpy(), d16.cpu().numpy())

    @torch.no_grad()
    def load_codes(self, raw: np.ndarray) -> None:
        """Take stored codes: the latent weight becomes their values (v * d, exact in float32) and the scale
        d, so the forward reproduces them."""
        v, d = self.fmt.unpack(raw)
        d32 = torch.from_numpy(d.astype(np.float32))
        w = torch.from_numpy(v).float() * d32.repeat_interleave(self.fmt.block_size, dim=1)
        self.weight.copy_(w)
        self.scale.copy_(d32)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"


class TiedHead(nn.Module):
    """The output head tied to a QuantEmbedding: logits = x @ (its quantized weight)^T, as llama.cpp
    multiplies by token_embd when a file has no output.weight. The embedding is referenced, not a
    submodule: its weight lives (and is stored) once, under the embedding."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._embedding = [embedding]
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].quantized()

    def forward(self, x):
        return F.linear(x, self._embedding[0].quantized().to(x.dtype))


def quantize_embedding_(model: nn.Module, fmt: str) -> str:
    """Put the model's token embedding on `fmt` in place, and a tied nn.Linear head on a TiedHead (an untied
    head is left alone); returns the embedding's module name."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise SlimEdgeError(
            f"--embedding-type {fmt}: the input embedding is a {type(emb).__name__}, not an "
            f"nn.Embedding; use --embedding-type f16"
        )
    q = QuantEmbedding(emb, fmt).to(emb.weight.device)
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight and head.bias is None
    model.set_input_embeddings(q)
    if tied:
        model.set_output_embeddings(TiedHead(q))
    return next(n for n, m in model.named_modules() if m is q)
