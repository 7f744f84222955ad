"""KL divergence between a base model's and a quantized model's next-token distributions.

The convention of `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp, pinned tree):
per scored token, KLD = Σ_v p_base(v)·(log p_base(v) − log p_q(v)) = KL(base ‖ q); "same top" counts
tokens where argmax(logits_q) == argmax(logits_base) (first index on ties); Δp = p_q(target) −
p_base(target); ΔPPL = PPL(q) − PPL(base) with the error of a difference of correlated means.
Uncertainties are the standard errors llama.cpp prints (zero for fewer than 11 tokens).

Two deliberate differences: llama.cpp stores the base log-probabilities as 16-bit integers over a
16-nat window and skips vocabulary entries with p_base < e^-16; here both distributions are exact
float64 log-softmax over the whole vocabulary.
"""

from __future__ import annotations

import math

import numpy as np

from slim_edge.errors import SlimEdgeError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_stats(base_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Per-token arrays for a [n_tokens, n_vocab] pair of logits: kld, same_top, and, with the
    target token ids, nll, nll_base and p_diff. Concatenate these over chunks, then `summarize`."""
    base_logits = np.asarray(base_logits)
    logits = np.asarray(logits)
    if base_logits.ndim != 2 or base_logits.shape != logits.shape:
        raise SlimEdgeError(
            f"logit arrays must both be [tokens, vocab]; got {base_logits.shape} and "
            f"{logits.shape}: compare models with the same vocabulary on the same tokens"
        )
    lp_base = log_softmax(base_logits)
    lp = log_softmax(logits)
    p_base = np.exp(lp_base)
    out = {
        "kld": (p_base * (lp_base - lp)).sum(axis=-1),
        "same_top": np.argmax(logits, axis=-1) == np.argmax(base_logits, axis=-1),
    }
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        if t.shape != (logits.shape[0],):
            raise SlimEdgeError(f"need one target token per row of logits ({logits.shape[0]}); got {t.shape}")
        rows = np.arange(len(t))
        out["nll"] = -lp[rows, t]
        out["nll_base"] = -lp_base[rows, t]
        out["p_diff"] = np.exp(-out["nll"]) - np.exp(-out["nll_base"])
    return out


def concat_stats(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean ± standard error: sqrt((E[x²] − E[x]²)/(n − 1)), zero when n ≤ 10."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    f = v.sum() / n
    df = (v * v).sum() / n - f * f
    return float(f), float(math.sqrt(df / (n - 1))) if df > 0 and n > 10 else 0.0


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = a.size
    if n < 10:
        return 0.0
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    # perplexity.cpp's linear interpolation (float index into the sorted values)
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (sorted_values.size - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, sorted_values.size - 1)])


def summarize(stats: dict) -> dict:
    """The numbers llama-perplexity --kl-divergence prints, from (concatenated) `token_stats`."""
    kld = stats["kld"]
    n = int(kld.size)
    if n == 0:
        raise SlimEdgeError("no tokens to compare: the evaluation text is too short for one chunk")
    s = np.sort(kld)
    mean_kld, kld_err = mean_and_uncertainty(kld)
    same = float(stats["same_top"].mean())
    out = {
        "tokens": n,
        "mean_kld": mean_kld,
        "mean_kld_err": kld_err,
        "median_kld": float(0.5 * (s[n // 2] + s[n // 2 - 1]) if n % 2 == 0 else s[n // 2]),
        "p90_kld": _percentile(s, 0.90),
        "p99_kld": _percentile(s, 0.99),
        "max_kld": float(s[-1]),
        "same_top_pct": 100.0 * same,
        "same_top_pct_err": 100.0 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    }
    if "nll" in stats:
        nll, nll_base = stats["nll"], stats["nll_base"]
        lp, lp_err = mean_and_uncertainty(nll)
        lb, lb_err = mean_and_uncertainty(nll_base)
        cov = _covariance(nll, nll_base)
        ppl, ppl_base = math.exp(lp), math.exp(lb)
        ppl_err, ppl_base_err = ppl * lp_err, ppl_base * lb_err
        diff_var = ppl_err**2 + ppl_base_err**2 - 2.0 * ppl * ppl_base * cov
        ratio_var = lp_err**2 + lb_err**2 - 2.0 * cov
        msq, msq_err = mean_and_uncertainty(stats["p_diff"] ** 2)
        out.update(
            {
                "ppl": ppl,
                "ppl_err": ppl_err,
                "ppl_base": ppl_base,
                "ppl_base_err": ppl_base_err,
                "delta_ppl": ppl - ppl_base,
                "delta_ppl_err": math.sqrt(max(diff_var, 0.0)),
                "ln_ppl_ratio": lp - lb,
                "ln_ppl_ratio_err": math.sqrt(max(ratio_var, 0.0)),
                "rms_dp_pct": 100.0 * math.sqrt(msq),
                "rms_dp_pct_err": 100.0 * 0.5 / math.sqrt(msq) * msq_err if msq > 0 else 0.0,
            }
        )
    return out


def kl_divergence(base_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Compare two [n_tokens, n_vocab] logit arrays (torch or runtime, either side): mean/median/99th
    percentile KLD, same-top-1 %, and with `targets` PPL, ΔPPL and RMS Δp. See `summarize`."""
    return summarize(token_stats(base_logits, logits, targets))
