"""held_out_ppl: PyTorch PPL on lee:eval, and with a reference model the KLD the device runs report."""

import numpy as np
import pytest

from tiny_models import make_tiny_model


def _load(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(folder),
    )


def test_held_out_kld_matches_direct_computation(tmp_path):
    from slim_edge.corpora import get_text
    from slim_edge.evals.backends import TorchLM
    from slim_edge.evals.kld import kl_divergence
    from slim_edge.evals.lab.qat_table import held_out_ppl
    from slim_edge.evals.perplexity import make_chunks, scored_logits

    model, tok = _load(make_tiny_model(tmp_path / "a", hidden=64, intermediate=128, seed=1))
    ref, _ = _load(make_tiny_model(tmp_path / "b", hidden=64, intermediate=128, seed=2))
    plain = held_out_ppl(model, tok, max_chunks=2, ctx=128)
    self_ref = held_out_ppl(model, tok, max_chunks=2, ctx=128, reference=model)
    assert self_ref["mean_kld"] == pytest.approx(0.0, abs=1e-12)
    assert self_ref["same_top_pct"] == 100.0
    assert self_ref["ppl"] == pytest.approx(plain["ppl"], rel=1e-9)
    # llama-perplexity scores the second half of each chunk
    assert self_ref["tokens"] == plain["tokens"] == 2 * (128 - 1 - 64)

    r = held_out_ppl(model, tok, max_chunks=2, ctx=128, reference=ref)
    lm, lm_ref = TorchLM(model, tok), TorchLM(ref, tok)
    chunks = make_chunks(
        lm.tokenize(get_text("lee", split="eval").text), ctx=128, max_chunks=2, add_bos=lm.add_bos, bos_id=lm.bos_id
    )
    base = np.concatenate([scored_logits(lm_ref, c, chunks.first) for c in chunks.tokens])
    ours = np.concatenate([scored_logits(lm, c, chunks.first) for c in chunks.tokens])
    direct = kl_divergence(base, ours, chunks.targets.reshape(-1))
    assert r["mean_kld"] > 0.01
    assert r["mean_kld"] == pytest.approx(direct["mean_kld"], rel=1e-9)
    assert r["same_top_pct"] == pytest.approx(direct["same_top_pct"], rel=1e-9)
    assert r["ppl"] == pytest.approx(plain["ppl"], rel=1e-9)
