"""The chunked distillation loss: its value and its closed-form gradient against autograd of the formulas."""

import pytest
import torch

from slim_edge.distill import distill_loss, distill_loss_reference


def _logits(seed, shape=(3, 7, 50), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return s, t, y


@pytest.mark.parametrize("kind", ["cakld", "kl", "none"])
@pytest.mark.parametrize("chunk", [1, 5, 21, None])  # 21 tokens in all: chunks that do and do not divide them
@pytest.mark.parametrize("ce_weight", [1.0, 0.4, 0.0])
def test_fused_loss_and_gradient_match_autograd(kind, chunk, ce_weight):
    s, t, y = _logits(0)
    if kind == "none" and ce_weight == 0:
        with pytest.raises(ValueError, match="no term"):
            distill_loss(s.clone().requires_grad_(True), t, y, kind, chunk=chunk, ce_weight=ce_weight)
        return
    a = s.clone().requires_grad_(True)
    ref, ref_ce, ref_kd = distill_loss_reference(a, t, y, kind, ce_weight=ce_weight)
    (ref * 1.7).backward()  # an upstream factor other than 1 reaches the gradient
    b = s.clone().requires_grad_(True)
    loss, ce, kd = distill_loss(b, t, y, kind, chunk=chunk, ce_weight=ce_weight)
    (loss * 1.7).backward()
    assert abs(float(loss) - float(ce_weight * ce + kd)) <= 1e-6 * abs(float(loss))  # ce is reported unweighted
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    assert abs(float(ce) - float(ref_ce)) <= 1e-5 * abs(float(ref_ce))
    assert abs(float(kd) - float(ref_kd)) <= 1e-5 * max(abs(float(ref_kd)), 1e-6)
    assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-7)
    if kind != "none":
        assert float(kd) > 0.1  # the KD term is really there


def test_no_grad_path_equals_the_fused_forward():
    s, t, y = _logits(1)
    with torch.no_grad():
        loss, ce, kd = distill_loss(s, t, y, "cakld", chunk=4)
    ref = distill_loss_reference(s, t, y, "cakld")
    assert abs(float(loss) - float(ref[0])) <= 1e-5 * float(ref[0])
    assert abs(float(kd) - float(ref[2])) <= 1e-5 * float(ref[2])


def test_bf16_logits_keep_a_bf16_gradient_close_to_fp32():
    s, t, y = _logits(2, dtype=torch.bfloat16)
    a = s.float().requires_grad_(True)
    distill_loss_reference(a, t.float(), y, "cakld")[0].backward()
    b = s.clone().requires_grad_(True)
    distill_loss(b, t, y, "cakld", chunk=8)[0].backward()
    assert b.grad.dtype == torch.bfloat16
    err = (b.grad.float() - a.grad).abs().max() / a.grad.abs().max()
    assert err < 1e-2


def test_unknown_kind_is_refused():
    s, t, y = _logits(3)
    with pytest.raises(ValueError, match="distillation kind"):
        distill_loss(s, t, y, "mse")


def test_ce_weight_zero_is_pure_distillation():
    """w = 0: the gradient is the KD term's alone, so a student equal to the teacher gets none at all."""
    s, _, y = _logits(4)
    a = s.clone().requires_grad_(True)
    loss, ce, kd = distill_loss(a, s, y, "kl", chunk=4, ce_weight=0.0)
    loss.backward()
    assert float(ce) > 1.0 and abs(float(loss)) < 1e-6
    assert float(a.grad.abs().max()) < 1e-7


def test_quant_config_refuses_an_empty_loss():
    from slim_edge.errors import SlimEdgeError
    from slim_edge.quantize import QuantConfig

    with pytest.raises(SlimEdgeError, match="--ce-weight 0.0 with --distill none"):
        QuantConfig(scheme="seq2", distill="none", ce_weight=0.0)
    with pytest.raises(SlimEdgeError, match="--ce-weight -1.0"):
        QuantConfig(scheme="seq2", ce_weight=-1.0)
    assert QuantConfig.from_json({**QuantConfig(scheme="seq2").to_json(), "ce_weight": 0.0}).ce_weight == 0.0
