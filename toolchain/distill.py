"""The distillation loss, computed over the vocabulary in chunks of tokens with its gradient in closed form.

Per token, with s = log_softmax(student logits), t = log_softmax(teacher logits), ps = exp(s), pt = exp(t):

    CE     = -s[label]                                 dCE/da     = ps - onehot(label)
    KL_ts  = sum pt (t - s)   KL(teacher || student)   dKL_ts/da  = ps - pt
    KL_st  = sum ps (s - t)   KL(student || teacher)   dKL_st/da  = ps * ((s - t) - KL_st)
    CAKLD  = conf KL_st + (1 - conf) KL_ts, conf = pt[label] (BitDistiller; conf is the teacher's, a constant)

loss = mean over tokens of w CE + KD, w = `ce_weight` (1 in these functions, 0 in `QuantConfig`; 0 is pure distillation,
which does not fit the training text itself: on a small text repeated many times CE makes the student learn the text,
not the teacher). Autograd through log_softmax keeps several fp32 [tokens, vocab] tensors alive (for SmolLM2 at 32 x 512
tokens one is 3.2 GB: 25-40 GB a step); here the gradient is written, chunk by chunk, into one buffer of the logits'
dtype during the forward pass, and the backward pass only scales it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import compiled

KINDS = ("cakld", "kl", "none")
CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 128 M fp32 = 512 MB per temporary


def distill_loss_reference(student_logits, teacher_logits, labels, kind: str, ce_weight: float = 1.0):
    """Autograd through the formulas above; the fused version is tested against it."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    ce = F.nll_loss(s.flatten(0, 1), labels.flatten())
    if kind == "none":
        return ce_weight * ce, ce.detach(), torch.zeros(())
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl_ts = (t.exp() * (t - s)).sum(-1)
    if kind == "kl":
        kd = kl_ts.mean()
    else:
        kl_st = (s.exp() * (s - t)).sum(-1)
        conf = t.gather(-1, labels[..., None]).squeeze(-1).exp()
        kd = (conf * kl_st + (1 - conf) * kl_ts).mean()
    return ce_weight * ce + kd, ce.detach(), kd.detach()


def _chunk(a, b, y, kind: str, want_grad: bool, ce_weight: float = 1.0):
    """(sum of CE, sum of KD, d(w CE + KD)/da summed-not-averaged or None) for one chunk of tokens."""
    s = F.log_softmax(a.float(), dim=-1)
    ps = s.exp()
    ce = -s.gather(-1, y[:, None]).squeeze(-1)
    grad = None
    if want_grad:
        grad = ps * ce_weight
        grad.scatter_add_(-1, y[:, None], torch.full_like(ce[:, None], -ce_weight))
    if kind == "none":
        return ce.sum(), torch.zeros((), device=a.device), grad
    t = F.log_softmax(b.float(), dim=-1)
    pt = t.exp()
    kl_ts = (pt * (t - s)).sum(-1)
    if kind == "kl":
        kd = kl_ts
        if want_grad:
            grad += ps - pt
    else:
        diff = s - t
        kl_st = (ps * diff).sum(-1)
        conf = pt.gather(-1, y[:, None]).squeeze(-1)
        kd = conf * kl_st + (1 - conf) * kl_ts
        if want_grad:
            c = conf[:, None]
            grad += c * ps * (diff - kl_st[:, None]) + (1 - c) * (ps - pt)
    return ce.sum(), kd.sum(), grad


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, chunk, ce_weight):
        a = student_logits.reshape(-1, student_logits.shape[-1])
        b = None if teacher_logits is None else teacher_logits.reshape(a.shape)
        y = labels.reshape(-1)
        n = a.shape[0]
        grad = torch.empty_like(a)
        ce = torch.zeros((), dtype=torch.float32, device=a.device)
        kd = torch.zeros((), dtype=torch.float32, device=a.device)
        for i in range(0, n, chunk):
            c, k, g = compiled(_chunk)(
                a[i : i + chunk], None if b is None else b[i : i + chunk], y[i : i + chunk], kind, True, ce_weight
            )
            ce, kd = ce + c, kd + k
            grad[i : i + chunk] = g / n
        ctx.save_for_backward(grad)
        ctx.shape = student_logits.shape
        ce, kd = ce / n, kd / n
        ctx.mark_non_differentiable(ce, kd)
        return ce_weight * ce + kd, ce, kd

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss.to(grad.dtype)).reshape(ctx.shape), None, None, None, None, None


def distill_loss(student_logits, teacher_logits, labels, kind: str, chunk: int | None = None, ce_weight: float = 1.0):
    """Mean over tokens of w CE + KD (w = ce_weight); returns (loss, ce, kd) with ce unweighted, kd = 0 for
    kind == 'none'. Differentiable in the student logits; memory: one extra [tokens, vocab] buffer of the
    logits' dtype plus one chunk in fp32."""
    if kind not in KINDS:
        raise ValueError(f"distillation kind {kind!r}; expected one of {KINDS}")
    if ce_weight < 0 or (kind == "none" and ce_weight == 0):
        raise ValueError(f"ce_weight {ce_weight} with distillation {kind!r}: the loss would have no term")
    vocab = student_logits.shape[-1]
    chunk = chunk or max(1, CHUNK_ELEMENTS // vocab)
    if kind == "none":
        teacher_logits = None
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _FusedDistill.apply(student_logits, teacher_logits, labels, kind, chunk, ce_weight)
    a = student_logits.reshape(-1, vocab)
    b = None if teacher_logits is None else teacher_logits.reshape(a.shape)
    y = labels.reshape(-1)
    ce = kd = 0.0
    for i in range(0, a.shape[0], chunk):
        c, k, _ = _chunk(a[i : i + chunk], None if b is None else b[i : i + chunk], y[i : i + chunk], kind, False)
        ce, kd = ce + c, kd + k
    ce, kd = ce / a.shape[0], kd / a.shape[0]
    return ce_weight * ce + kd, ce, torch.as_tensor(kd)
