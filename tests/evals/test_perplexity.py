import math

import numpy as np
import pytest

from slim_edge.errors import SlimEdgeError
from slim_edge.evals.backends import TorchLM
from slim_edge.evals.perplexity import make_chunks, perplexity, ppl_from_nll


class _Tok:
    bos_token_id, eos_token_id = 1, 2

    def __init__(self, add_bos):
        self.add_bos = add_bos

    def encode(self, text, add_special_tokens=True):
        ids = [3 + (b % 60) for b in text.encode()]
        return ([1] if self.add_bos and add_special_tokens else []) + ids


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_chunking_counts_and_bos():
    toks = np.arange(1000) % 50 + 3
    c = make_chunks(toks, ctx=64)
    assert (c.n_chunk, c.first, c.n_scored, c.n_text_tokens) == (15, 32, 15 * 31, 1000)
    np.testing.assert_array_equal(c.tokens[1], toks[64:128])
    np.testing.assert_array_equal(c.targets[1], toks[64 + 33 : 128])
    b = make_chunks(toks, ctx=64, max_chunks=4, add_bos=True, bos_id=1)
    # BOS goes in front of the text, and replaces the first token of every chunk (llama-perplexity)
    assert b.n_chunk == 4 and b.n_text_tokens == 1001 and (b.tokens[:, 0] == 1).all()
    np.testing.assert_array_equal(b.tokens[1, 1:], toks[64:127])
    np.testing.assert_array_equal(b.targets[1], toks[63 + 33 : 127])


def test_too_short_and_bad_ctx():
    with pytest.raises(SlimEdgeError, match="only 100 tokens; a context of 64 needs at least 128"):
        make_chunks(np.zeros(100, dtype=int), ctx=64)
    with pytest.raises(SlimEdgeError, match="context 63"):
        make_chunks(np.zeros(1000, dtype=int), ctx=63)
    with pytest.raises(SlimEdgeError, match="max_chunks must be at least 1"):
        make_chunks(np.zeros(1000, dtype=int), ctx=64, max_chunks=0)


@pytest.mark.parametrize("add_bos", [False, True])
def test_ppl_matches_direct_computation(tiny, add_bos):
    import torch

    lm = TorchLM(tiny, _Tok(add_bos), "tiny")
    assert lm.add_bos == add_bos
    toks = np.random.default_rng(0).integers(3, 64, size=300)
    chunks = make_chunks(toks, ctx=32, add_bos=add_bos, bos_id=1)
    got = perplexity(lm, chunks, progress=False)

    nll, n = 0.0, 0
    ids = ([1] if add_bos else []) + toks.tolist()
    for i in range(len(ids) // 32):
        x = torch.tensor(ids[i * 32 : (i + 1) * 32])
        if add_bos:
            x[0] = 1
        with torch.no_grad():
            logits = tiny(x[None]).logits[0].double()
        nll += torch.nn.functional.cross_entropy(logits[16:31], x[17:32], reduction="sum").item()
        n += 15
    assert got["tokens"] == n == chunks.n_chunk * 15
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_ppl_error_formula():
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    ppl, err = ppl_from_nll(nll)
    assert ppl == pytest.approx(math.exp(2.5))
    assert err == pytest.approx(math.exp(2.5) * math.sqrt((7.5 - 6.25) / 3))


def test_greedy_with_cache_matches_full_recompute(tiny):
    import torch

    lm = TorchLM(tiny, _Tok(False), "tiny")
    prompt = [5, 9, 11, 3]
    got = lm.greedy(prompt, 12, stop_at_eos=False)
    ids = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(torch.argmax(tiny(torch.tensor([ids])).logits[0, -1])))
    assert got == ids[len(prompt) :]
