"""GPTQ (Frantar et al. 2022) on slim-edge's grids: a PTQ start that compensates rounding error.

Per linear, with H = 2 X^T X / n from calibration inputs X, the columns are rounded left to right and each
column's error e_j = (w_j - q_j) / U_jj is pushed onto the columns not yet rounded through the upper Cholesky
factor U of H^-1 (damped by 1 % of the mean diagonal; dead inputs, H_jj = 0, get weight 0 and H_jj = 1 as in
the paper's code). Updates are applied lazily per batch of 128 columns; blocks (32..512) either fit in a batch
or start at a batch start, so a block's scale, chosen at its first column, sees every update made before it.

Layers are processed sequentially (GPTQ's "true sequential" order): the inputs of decoder layer i are the
outputs of the already quantized layers 0..i-1, and inside a layer each group of linears that reads one
input (q/k/v, then o, then gate/up, then down) is quantized before the next group's input is collected.

Every value is what the QuantLinear forward computes: `grid_values(latent / fp16(scale))`, with the latent
the compensated weight just before its rounding; Sherry's 3:4 quad decides its zero (smallest |w|) when the
quad's first column is reached, from the current compensated weights of the whole quad.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

from .errors import SlimEdgeError
from .formats.base import Format
from .qlinear import (
    FP16_MAX,
    FP16_TINY,
    QuantLinear,
    frozen_quantized,
    grid_quads,
    grid_rule,
    grid_top,
    grid_values,
    init_scale,
    round_activations,
)
from .quantize import QuantConfig
from .train import _batches, _layer_inputs, _layer_out, decoder_layers

PERCDAMP = 0.01
LAZY_BATCH = 128
WEIGHTED_SCALE = True  # block scales by the column-cost-weighted search (weighted_scale), not init_scale
# a Sherry quad's zero: "cost" (the lane whose zeroing costs least in GPTQ's error, see gptq_quantize) or "magnitude"
# (smallest |w|). cost: SmolLM2-135M sherry at 0 steps 11,082 vs 18,910 held-out PPL, KLD 5.99 vs 6.55 (H100,
# 128 x 512 samples, `python -m slim_edge.evals.lab.ptq_zero_rule`, evals/reports/ptq_smollm2.md, session 22)
SHERRY_ZERO = "cost"


class _Stop(Exception):
    """Raised by the hook that has collected a group's input, to stop the layer's forward there."""


def _fp16(d: torch.Tensor) -> torch.Tensor:
    return d.clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(torch.float32)


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 in float64; the damping grows tenfold until H is positive."""
    damp = percdamp * float(h.diagonal().mean())
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * torch.eye(len(h), dtype=h.dtype, device=h.device))
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        damp *= 10
    raise SlimEdgeError(
        f"GPTQ: the calibration Hessian stays singular with damping {damp:.3g}; use more --ptq-samples or --ptq rtn"
    )


def weighted_scale(
    wb: torch.Tensor, s: torch.Tensor, fmt: Format, mode: str, quads=None, n_grid: int = 24
) -> torch.Tensor:
    """`init_scale`'s search (d = c * absmax / top, then a least-squares refit) for one block wb [rows, block],
    each column's squared error weighted by s [block]: GPTQ's cost of an error in column j once the columns
    after it compensate, 1 / [H^-1]_jj. Equal weights give init_scale's scale."""
    s = (s / s.max()).float()
    if grid_rule(fmt, mode) == "sherry":
        v = grid_values(wb[:, None, :], fmt, mode, quads)[:, 0]
        return ((s * v * wb).sum(-1) / (s * v * v).sum(-1).clamp_min(1e-30)).clamp_min(FP16_TINY)
    top = grid_top(fmt, mode)
    amax = wb.abs().amax(-1).clamp_min(1e-8)
    best_err = torch.full_like(amax, math.inf)
    best = amax / top

    def cost(d):
        return ((grid_values((wb / d[:, None])[:, None], fmt, mode, None)[:, 0] * d[:, None] - wb) ** 2 * s).sum(-1)

    for c in torch.linspace(0.15, 1.0, n_grid):  # the steps of init_scale, so that equal weights agree with it
        d = (amax / top * c).to(torch.float16).float().clamp_min(FP16_TINY)
        err = cost(d)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, d, best)
    v = grid_values((wb / best[:, None])[:, None], fmt, mode, None)[:, 0]
    num, den = (s * v * wb).sum(-1), (s * v * v).sum(-1)
    refit = torch.where(den > 0, num / den.clamp_min(1e-12), best)
    err_refit = cost(refit.clamp_min(FP16_TINY))
    return torch.where((refit > 0) & (err_refit <= best_err), refit, best).clamp_min(FP16_TINY)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: Format,
    mode: str,
    quads: torch.Tensor | None = None,
    percdamp: float = PERCDAMP,
    lazy: int = LAZY_BATCH,
    weighted: bool | None = None,
    zero_rule: str | None = None,
):
    """GPTQ rounding of w [rows, k] on the grid of (fmt, mode) with Hessian h [k, k].

    Returns (latent [rows, k] float32, scale [rows, k // block] fp16-exact float32, values [rows, k]):
    grid_values(latent / scale) == values, except where Sherry's quad zero moved (see `set_quantized`)."""
    rows, k = w.shape
    bs = fmt.block_size
    sherry = grid_rule(fmt, mode) == "sherry"
    weighted = WEIGHTED_SCALE if weighted is None else weighted
    zero_rule = SHERRY_ZERO if zero_rule is None else zero_rule
    H = h.detach().to(torch.float64).clone()
    W = w.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky(H, percdamp).float()
    # a block must lie inside one lazy batch or start at a batch start, so that its scale sees every update
    step = lazy if lazy % bs == 0 or bs % lazy == 0 else bs * math.ceil(lazy / bs)
    WT = W.T.contiguous()  # columns as contiguous rows
    latent, values = torch.empty_like(WT), torch.empty_like(WT)
    scale = torch.empty(rows, k // bs, dtype=torch.float32, device=W.device)
    if sherry:  # block-local lane 0 of each quad -> its 4 lanes
        quads = grid_quads(fmt, mode).to(W.device) if quads is None else quads
        quad_of = {int(q[0]): q for q in quads}
        is_zero = torch.zeros(bs, rows, dtype=torch.bool, device=W.device)
        rows_idx = torch.arange(rows, device=W.device)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            p = col % bs  # position inside the block
            if p == 0:
                blk = WT[col : col + bs].T
                d = _fp16(
                    weighted_scale(blk, 1.0 / U[col : col + bs, col : col + bs].diagonal() ** 2, fmt, mode, quads)
                    if weighted
                    else init_scale(blk, fmt, mode, quads)[:, 0]
                )
                scale[:, col // bs] = d
                if sherry:
                    is_zero.zero_()
            wj = W1[j].clone()
            z = wj / d
            if sherry:
                if p in quad_of:
                    lanes = quad_of[p]
                    wq = WT[col - p + lanes]  # [4, rows]
                    if zero_rule == "cost":  # zeroing lane j instead of rounding it to +-d, in GPTQ's cost
                        u2 = U[col - p + lanes, col - p + lanes] ** 2
                        pick = ((2 * wq.abs() - d[None, :]) / u2[:, None]).argmin(dim=0)
                    else:
                        pick = (wq / d[None, :]).abs().argmin(dim=0)
                    is_zero[lanes[pick], rows_idx] = True
                v = torch.where(is_zero[p], 0.0, torch.where(z >= 0, 1.0, -1.0))
            else:
                v = grid_values(z[:, None, None], fmt, mode, None)[:, 0, 0]
            e = (wj - v * d) / U1[j, j]
            W1[j + 1 :].addr_(U1[j, j + 1 :], e, alpha=-1.0)
            err[j] = e
            latent[col], values[col] = wj, v
        WT[i2:] -= U[i1:i2, i2:].T @ err
    return latent.T.contiguous(), scale, values.T.contiguous()


@torch.no_grad()
def set_quantized(m: QuantLinear, latent: torch.Tensor, scale: torch.Tensor, values: torch.Tensor) -> int:
    """Load GPTQ's result into m so that its forward computes exactly `values`; returns how many weights
    fell back to v*d. Sherry: where later compensation made another lane of a quad smaller than the chosen
    zero, the zero lane's latent takes v*d = 0 first, then (if still needed) the whole quad v*d."""
    m.weight.copy_(latent.to(m.weight.dtype))
    m.scale.copy_(scale.to(m.scale.dtype))
    rows, k, bs = *latent.shape, m.fmt.block_size
    vd = (values.reshape(rows, k // bs, bs) * scale[..., None]).reshape(rows, k)
    fallback = 0
    for attempt in range(3):
        got = m.quantized(return_values=True)[1]
        bad = got != values
        if not bad.any():
            return fallback
        if attempt == 2:
            raise RuntimeError(f"GPTQ: {int(bad.sum())} weights of {m} do not round to their values")
        if m.quads is not None:  # a quad's values change together: mark whole quads
            qb = bad.reshape(rows, k // bs, bs)[:, :, m.quads].any(-1, keepdim=True)
            full = torch.zeros(rows, k // bs, bs, dtype=torch.bool, device=bad.device)
            full[:, :, m.quads] = qb.expand(-1, -1, -1, 4)
            bad = full.reshape(rows, k)
            if attempt == 0:
                bad &= values == 0
        fallback += int(bad.sum())
        m.weight.copy_(torch.where(bad, vd, m.weight))
    return fallback


def rel_output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """||XW^T - XQ^T||_F^2 / ||XW^T||_F^2 from H = X^T X (any positive factor): tr(D H D^T) / tr(W H W^T),
    D = W - Q (the bias cancels in the difference and is left out of the norm)."""
    w, dq, h = w.double(), (w - q).double(), h.double()
    return float(((dq @ h) * dq).sum() / ((w @ h) * w).sum().clamp_min(1e-300))


def _input_groups(layer, x, kwargs) -> list[list[tuple[str, QuantLinear]]]:
    """The QuantLinears of `layer` grouped by the input tensor they read, in the order the forward calls
    them (Llama: q/k/v, o, gate/up, down)."""
    seen: dict[int, list] = {}
    keep = []
    handles = []
    for name, m in layer.named_modules():
        if isinstance(m, QuantLinear):

            def hook(mod, args, name=name):
                keep.append(args[0])
                seen.setdefault(id(args[0]), []).append((name, mod))

            handles.append(m.register_forward_pre_hook(hook))
    try:
        _layer_out(layer, x, kwargs)
    finally:
        for hd in handles:
            hd.remove()
    return list(seen.values())


def _same_grid(group):
    """Split a group of linears by (format, mode): those round on one grid, so their rows can be stacked."""
    out: dict[tuple, list] = {}
    for name, m in group:
        out.setdefault((m.fmt.name, m.mode, m.in_features), []).append((name, m))
    return list(out.values())


def _hessian(layer, xs, kwargs, first: QuantLinear) -> torch.Tensor:
    """H = 2 X^T X / n (float64) over the input of `first` (as its matmul sees it), for every batch."""
    acc = {"h": None, "n": 0}

    def hook(mod, args):
        x = args[0]
        if mod.act:
            x = round_activations(x, mod.act)
        x = x.reshape(-1, x.shape[-1]).float()
        hb = (x.T @ x).double()
        acc["h"] = hb if acc["h"] is None else acc["h"] + hb
        acc["n"] += x.shape[0]
        raise _Stop

    handle = first.register_forward_pre_hook(hook)
    try:
        for x in xs:
            try:
                _layer_out(layer, x, kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc["h"] * (2.0 / acc["n"])


def calibration_batches(config: QuantConfig) -> int:
    """Batches of config.batch_size sequences that hold (about) config.ptq_samples sequences."""
    return max(1, config.ptq_samples // config.batch_size)


def summary_line(rows: list[dict], seconds: float, config: QuantConfig) -> str:
    n = max(len(rows), 1)
    rtn, gptq = (sum(r[k] for r in rows) / n for k in ("rel_err_rtn", "rel_err_gptq"))
    return (
        f"slim-edge: GPTQ on {len(rows)} linears ({calibration_batches(config) * config.batch_size} x "
        f"{config.seq_len} tokens): mean relative output error RTN {rtn:.4f} -> GPTQ {gptq:.4f}, "
        f"{sum(r['fallback'] for r in rows):,} weights set to v*d ({seconds:.0f} s)"
    )


@torch.no_grad()
def gptq_(
    student, ids: torch.Tensor, config: QuantConfig, device: str = "cpu", progress: bool = True, log=None
) -> list[dict]:
    """Rewrite every QuantLinear in the decoder layers of a `quantize_`d student with GPTQ rounding, in place.

    Calibration: config.ptq_samples sequences of config.seq_len tokens of `ids`. Returns one row per linear:
    its relative output error for RTN (the scale-search init) and for GPTQ, and the fallback count."""
    from tqdm.auto import tqdm

    try:
        layers = decoder_layers(student)
    except SlimEdgeError:
        raise SlimEdgeError(
            f"--ptq gptq needs a decoder with model.layers (Llama-like); "
            f"{type(student).__name__} has none: use --ptq rtn"
        ) from None
    n_batches = calibration_batches(config)
    stream = _batches(ids, config.batch_size, config.seq_len, np.random.default_rng(config.seed + 2))
    xs, kwargs = _layer_inputs(student, [next(stream)[0] for _ in range(n_batches)], device)
    rows = []
    bar = tqdm(total=len(layers), disable=not progress, unit="layer", file=sys.stderr, dynamic_ncols=True, desc="gptq")
    try:
        with frozen_quantized(student):  # each layer's forwards reuse its quantized weights until GPTQ sets them
            _gptq_layers(layers, xs, kwargs, rows, bar, log)
    finally:
        bar.close()
    return rows


def _gptq_layers(layers, xs, kwargs, rows: list[dict], bar, log) -> None:
    """GPTQ of each decoder layer in turn (see gptq_); xs: the first layer's inputs, per batch."""
    for i, layer in enumerate(layers):
        for group in _input_groups(layer, xs[0], kwargs):
            h = _hessian(layer, xs, kwargs, group[0][1])
            for mods in _same_grid(group):  # one H: stacked rows round as they would one linear at a time
                t0 = time.perf_counter()
                ws = [m.weight.detach().clone() for _, m in mods]
                rtn = [rel_output_error(w, m.quantized().detach(), h) for w, (_, m) in zip(ws, mods)]
                m0 = mods[0][1]
                out = gptq_quantize(torch.cat(ws), h, m0.fmt, m0.mode, m0.quads)
                sizes = [len(w) for w in ws]
                seconds = round(time.perf_counter() - t0, 2)
                for (name, m), w, e, parts in zip(mods, ws, rtn, zip(*(t.split(sizes) for t in out))):
                    row = {
                        "layer": i,
                        "name": name,
                        "format": m.fmt.name,
                        "rel_err_rtn": e,
                        "fallback": set_quantized(m, *parts),
                        "seconds": seconds,
                    }
                    row["rel_err_gptq"] = rel_output_error(w, m.quantized().detach(), h)
                    rows.append(row)
                    if log is not None:
                        log(row)
            last = rows[-1]
            bar.set_postfix(layer=i, rtn=f"{last['rel_err_rtn']:.3g}", gptq=f"{last['rel_err_gptq']:.3g}")
        xs = [_layer_out(layer, x, kwargs) for x in xs]
        bar.update(1)
