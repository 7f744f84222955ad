"""qlinear's gradients against the analytic LSQ derivative, on constructed blocks of every training grid.

With z = w / d, [lo, hi] the grid's end levels and L = sum(G * q) for a fixed random G:
  inside  (lo <= z <= hi): dL/dw = G,  dL/dd = sum G * (v - z)
  clipped (z beyond the end level the weight took): dL/dw = 0,  dL/dd = sum G * v   (q = v * d exactly there)
The analytic side below computes the levels itself (nearest level, Sherry's 3:4 rule) in numpy.
"""

import math
import zlib

import numpy as np
import pytest
import torch

from slim_edge.formats import get_format
from slim_edge.formats.stq1_0 import quad_layout
from slim_edge.qlinear import fake_quant
from slim_edge.quantize import QuantConfig
from slim_edge.train import _optimizer, _step

D = 0.5  # exact in fp16, so d16 == d
# (format, mode, end levels, levels)
GRIDS = [
    ("q2_0c", "grid", (-3, 3), (-3, -1, 1, 3)),
    ("q2_0", "grid", (-1, 2), (-1, 0, 1, 2)),
    ("tq2_0", "ternary", (-1, 1), (-1, 0, 1)),
    ("q2_0", "ternary", (-1, 1), (-1, 0, 1)),
    ("stq1_0", "sherry", (-1, 1), (-1, 0, 1)),
    ("q2_0c_64", "grid", (-3, 3), (-3, -1, 1, 3)),
    ("stq1_0_64", "sherry", (-1, 1), (-1, 0, 1)),
]
IDS = [f"{f}-{m}" for f, m, *_ in GRIDS]


def _z_block(kind: str, n: int, ends, levels, rng) -> np.ndarray:
    """z values of one block: all inside the clip range, all clipped, or half and half (shuffled).

    Inside values stay 0.1 away from the rounding midpoints, so the nearest level is unambiguous."""
    lo, hi = ends
    lv = np.asarray(levels, np.float64)
    inside = rng.choice(lv, n) + rng.uniform(-0.4, 0.4, n) * (lv[1] - lv[0])
    inside = np.clip(inside, lo + 0.05, hi - 0.05)
    clipped = np.where(rng.random(n) < 0.5, hi + rng.uniform(0.2, 3, n), lo - rng.uniform(0.2, 3, n))
    if kind == "inside":
        return inside
    if kind == "clipped":
        return clipped
    return np.where(rng.permutation(n) % 2 == 0, inside, clipped)


def _levels_of(z: np.ndarray, mode: str, levels, block: int) -> np.ndarray:
    if mode != "sherry":
        lv = np.asarray(levels, np.float64)
        return lv[np.abs(z[..., None] - lv).argmin(-1)]
    v = np.sign(z)
    quads = quad_layout(block)  # [groups, 4] indices inside the block
    for row in range(z.shape[0]):
        q = z[row, quads]
        zero = np.abs(q).argmin(-1)
        v[row, quads[np.arange(len(quads)), zero]] = 0
    return v


def _analytic(z, v, g, ends, ste_clipped=False):
    lo, hi = ends
    clipped = ((z > hi) & (v == hi)) | ((z < lo) & (v == lo))
    gw = g if ste_clipped else np.where(clipped, 0.0, g)
    gd = (g * np.where(clipped, v, v - z)).sum(-1)
    return gw, gd


def _autograd(fmt, mode, z, g, **kw):
    block = fmt.block_size
    w = torch.tensor(z * D, dtype=torch.float32, requires_grad=True)
    d = torch.full((z.shape[0], 1), D, dtype=torch.float32, requires_grad=True)
    quads = torch.as_tensor(quad_layout(block)) if mode == "sherry" else None
    q, v = fake_quant(w, d, fmt, mode, quads, return_values=True, **kw)
    (q * torch.tensor(g, dtype=torch.float32)).sum().backward()
    return q.detach().numpy(), v.numpy(), w.grad.numpy(), d.grad.numpy()[:, 0]


@pytest.mark.parametrize("kind", ["inside", "clipped", "mixed"])
@pytest.mark.parametrize("name,mode,ends,levels", GRIDS, ids=IDS)
def test_gradients_are_lsq(name, mode, ends, levels, kind):
    fmt = get_format(name)
    rng = np.random.default_rng(zlib.crc32(f"{name}{mode}{kind}".encode()))
    rows, n = 3, fmt.block_size
    z = np.stack([_z_block(kind, n, ends, levels, rng) for _ in range(rows)])
    z = (z * D).astype(np.float32).astype(np.float64) / D  # z as the float32 weights give it
    g = rng.normal(size=z.shape)
    q, v, gw, gd = _autograd(fmt, mode, z, g)
    v_ref = _levels_of(z, mode, levels, n)
    assert np.array_equal(v, v_ref)
    assert np.array_equal(q, (v_ref * D).astype(np.float32))  # the forward is the exported value, exactly
    gw_ref, gd_ref = _analytic(z, v_ref, g, ends)
    np.testing.assert_allclose(gw, gw_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gd, gd_ref, rtol=1e-5, atol=1e-4)
    if kind == "clipped" and mode != "sherry":
        assert not gw.any()  # the output does not depend on these weights


@pytest.mark.parametrize("name,mode,ends,levels", GRIDS, ids=IDS)
def test_ste_clipped_and_lsq_grad_scale(name, mode, ends, levels):
    fmt = get_format(name)
    rng = np.random.default_rng(7)
    z = np.stack([_z_block("mixed", fmt.block_size, ends, levels, rng) for _ in range(2)])
    z = (z * D).astype(np.float32).astype(np.float64) / D
    g = rng.normal(size=z.shape)
    v_ref = _levels_of(z, mode, levels, fmt.block_size)
    _, _, gw, gd = _autograd(fmt, mode, z, g, ste_clipped=True, grad_scale=0.25)
    gw_ref, gd_ref = _analytic(z, v_ref, g, ends, ste_clipped=True)
    np.testing.assert_allclose(gw, gw_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gd, 0.25 * gd_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,mode,ends,levels", GRIDS, ids=IDS)
def test_clipped_scale_gradient_is_the_finite_difference(name, mode, ends, levels):
    """Where every weight is clipped, q = v * d is linear in d: the gradient is the true derivative."""
    fmt = get_format(name)
    rng = np.random.default_rng(3)
    z = np.stack([_z_block("clipped", fmt.block_size, ends, levels, rng) for _ in range(2)])
    w = torch.tensor(z * D, dtype=torch.float32)
    # a weight Sherry's rule zeroes is 0 for any d; LSQ gives it the rounding term -z, not its derivative 0
    keep = _levels_of(z, mode, levels, fmt.block_size) != 0
    g = torch.tensor(rng.normal(size=z.shape) * keep, dtype=torch.float64)
    quads = torch.as_tensor(quad_layout(fmt.block_size)) if mode == "sherry" else None
    h = 2.0**-8  # 0.5 + h is exact in fp16

    def loss(d):
        return float((fake_quant(w, torch.full((2, 1), d), fmt, mode, quads).double() * g).sum())

    d = torch.full((2, 1), D, requires_grad=True)
    (fake_quant(w, d, fmt, mode, quads).double() * g).sum().backward()
    fd = (loss(D + h) - loss(D - h)) / (2 * h)
    assert math.isclose(float(d.grad.sum()), fd, rel_tol=1e-5, abs_tol=1e-4)


def test_lsq_grad_factor_is_one_over_sqrt_block_times_top():
    from slim_edge.qlinear import lsq_grad_scale

    assert lsq_grad_scale(get_format("q2_0c"), "grid") == 1 / math.sqrt(512 * 3)
    assert lsq_grad_scale(get_format("q2_0"), "grid") == 1 / math.sqrt(64 * 2)
    assert lsq_grad_scale(get_format("stq1_0"), "sherry") == 1 / math.sqrt(256)


@pytest.mark.parametrize("update", ["relative", "absolute"])
def test_scale_step_is_relative_to_the_scale(update):
    """One Adam step at scale_lr moves a scale of 1e-3 and one of 0.3 by the same fraction (relative),
    or by the same amount (absolute)."""
    config = QuantConfig(scheme="seq2", lr=1e-4, scale_lr=1e-2, scale_update=update)
    scales = torch.nn.Parameter(torch.tensor([1e-3, 0.3, 0.3]))
    w = torch.nn.Parameter(torch.ones(2))
    opt = _optimizer([w], [], [scales], config)
    scales.grad = torch.tensor([2.0, -5.0, 1e-3])
    w.grad = torch.ones(2)
    before = scales.detach().clone()
    _step(opt, [scales], config)
    if update == "relative":
        # Adam's first step is lr * sign(grad) in log space
        np.testing.assert_allclose((scales / before).detach().numpy(), np.exp([-1e-2, 1e-2, -1e-2]), rtol=1e-5)
    else:
        np.testing.assert_allclose((scales - before).detach().numpy(), [-1e-2, 1e-2, -1e-2], rtol=1e-4)


@pytest.mark.parametrize(
    "fmt,mode,tequila", [("q2_0c", "grid", 0.0), ("stq1_0", "sherry", 0.0), ("tq2_0", "ternary", 0.3)]
)
def test_frozen_quantized_quantizes_once_per_weight_version(fmt, mode, tequila, monkeypatch):
    """Inside frozen_quantized a no-grad forward reuses the quantized weight (and Tequila bias) until the weight
    or scale changes in place; its output equals the plain forward's bit for bit; with autograd on, nothing is
    kept (the gradient still reaches the latent weight); outside it, every forward quantizes."""
    from torch import nn

    from slim_edge import qlinear

    torch.manual_seed(0)
    m = qlinear.QuantLinear(nn.Linear(512, 16, bias=True), fmt, mode, tequila_lambda=tequila)
    x = torch.randn(3, 512)
    calls = []
    real = qlinear.fake_quant
    monkeypatch.setattr(qlinear, "fake_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        plain = m(x)
        with qlinear.frozen_quantized(m):
            n0 = len(calls)
            a, b = m(x), m(x)
            assert len(calls) == n0 + 1 and torch.equal(a, plain) and torch.equal(b, plain)
            m.weight.copy_(torch.randn_like(m.weight) * m.weight.std())  # in place: quantized again
            c = m(x)
            assert len(calls) == n0 + 2 and not torch.equal(c, plain)
            m.scale.mul_(0.5)
            m(x)
            m.bias.add_(1.0)
            m(x)
            assert len(calls) == n0 + 4
        fresh = m(x)  # outside: the plain path, which agrees with the last frozen output
        assert torch.equal(fresh, m(x)) and len(calls) == n0 + 6
    with qlinear.frozen_quantized(m):
        m(x).sum().backward()
        m(x)
    assert len(calls) == n0 + 8 and m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert m._qcache is None
