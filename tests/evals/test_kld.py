import math

import numpy as np
import pytest

from slim_edge.errors import SlimEdgeError
from slim_edge.evals.kld import kl_divergence, mean_and_uncertainty, token_stats

L2 = math.log(2)
# row 0: base p = (1/2, 1/4, 1/4), q uniform          -> KL = ½ln(3/2) + ½ln(3/4) = ½ln(9/8); same top (index 0)
# row 1: identical distributions                      -> KL = 0; same top
# row 2: base p = (1/2, 1/2, 0+), q = (1/4, 1/4, 1/2)  -> KL = ln 2 exactly in the limit; top differs
BASE = np.array([[L2, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1e4]])
Q = np.array([[0.0, 0.0, 0.0], [5.0, 6.0, 5.0], [0.0, 0.0, L2]])
TARGETS = np.array([1, 1, 0])


def test_token_stats_by_hand():
    s = token_stats(BASE, Q, TARGETS)
    np.testing.assert_allclose(s["kld"], [0.5 * math.log(9 / 8), 0.0, L2], rtol=1e-12, atol=1e-15)
    assert s["same_top"].tolist() == [True, True, False]
    e = math.e
    np.testing.assert_allclose(s["nll"], [math.log(3), -math.log(e / (2 + e)), math.log(4)], rtol=1e-12)
    np.testing.assert_allclose(s["nll_base"], [math.log(4), -math.log(e / (2 + e)), L2], rtol=1e-12)
    np.testing.assert_allclose(s["p_diff"], [1 / 3 - 1 / 4, 0.0, 1 / 4 - 1 / 2], atol=1e-15)


def test_summary_by_hand():
    r = kl_divergence(BASE, Q, TARGETS)
    k = [0.5 * math.log(9 / 8), 0.0, L2]
    assert r["tokens"] == 3
    assert r["mean_kld"] == pytest.approx(sum(k) / 3, rel=1e-12)
    assert r["median_kld"] == pytest.approx(k[0], rel=1e-12)
    # perplexity.cpp's percentile: linear between sorted values at index 0.99·(n−1) = 1.98
    assert r["p99_kld"] == pytest.approx(0.02 * k[0] + 0.98 * k[2], rel=1e-12)
    assert r["max_kld"] == pytest.approx(L2, rel=1e-12)
    assert r["same_top_pct"] == pytest.approx(200 / 3)
    assert r["same_top_pct_err"] == pytest.approx(100 * math.sqrt((2 / 3) * (1 / 3) / 2))
    assert r["mean_kld_err"] == 0.0  # llama.cpp reports no error below 11 tokens
    e = math.e
    nll = [math.log(3), -math.log(e / (2 + e)), math.log(4)]
    nll_base = [math.log(4), -math.log(e / (2 + e)), L2]
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-12)
    assert r["ppl_base"] == pytest.approx(math.exp(sum(nll_base) / 3), rel=1e-12)
    assert r["delta_ppl"] == pytest.approx(math.exp(sum(nll) / 3) - math.exp(sum(nll_base) / 3), rel=1e-12)
    assert r["rms_dp_pct"] == pytest.approx(100 * math.sqrt(((1 / 12) ** 2 + 0 + (1 / 4) ** 2) / 3), rel=1e-12)


def test_identical_logits_give_zero():
    x = np.random.default_rng(0).normal(size=(40, 97)).astype(np.float32)
    r = kl_divergence(x, x, np.arange(40) % 97)
    assert r["mean_kld"] == pytest.approx(0, abs=1e-12) and r["same_top_pct"] == 100.0
    assert r["delta_ppl"] == pytest.approx(0, abs=1e-9) and r["delta_ppl_err"] == pytest.approx(0, abs=1e-6)


def test_kld_matches_torch():
    import torch

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 50)) * 3, rng.normal(size=(30, 50)) * 3
    want = (
        torch.nn.functional.kl_div(
            torch.log_softmax(torch.tensor(b), -1),
            torch.log_softmax(torch.tensor(a), -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .numpy()
    )
    np.testing.assert_allclose(token_stats(a, b)["kld"], want, rtol=1e-10)


def test_mean_and_uncertainty_matches_llama_cpp():
    v = np.arange(20, dtype=np.float64)
    m, e = mean_and_uncertainty(v)
    assert m == 9.5 and e == pytest.approx(math.sqrt((np.mean(v * v) - 9.5**2) / 19))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(SlimEdgeError, match=r"got \(2, 3\) and \(2, 4\)"):
        token_stats(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(SlimEdgeError, match="one target token per row"):
        token_stats(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0]))
