"""--calib sources and training text sampled from the FP model (data-free distillation)."""

from types import SimpleNamespace

import pytest
import torch

from slim_edge import gendata
from slim_edge.checkpoint import read_meta
from slim_edge.corpora import get_text
from slim_edge.errors import SlimEdgeError
from slim_edge.gendata import (
    DEDUP_NGRAM,
    GREEDY_PREFIX,
    NUCLEUS_K,
    KVDecoder,
    Sampling,
    _sample,
    batch_seed,
    cached_samples,
    decoding_engine,
    drop_overlapping,
    interleave_batches,
    ngram_keys,
    nucleus,
    parse_calib,
    sampling_batch,
    teacher_tokens,
    training_tokens,
)
from slim_edge.models import load_model
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig
from tiny_models import make_tiny_model


def test_parse_calib():
    assert parse_calib("wiki") == [("wiki", None)]
    assert parse_calib("wiki, teacher:2M") == [("wiki", None), ("teacher", Sampling(2_000_000))]
    assert parse_calib("teacher:1.5k,corpus.txt") == [("teacher", Sampling(1500)), ("corpus.txt", None)]
    assert parse_calib("teacher") == [("teacher", Sampling(100_000))]
    assert parse_calib("wiki,teacher:4M:temp=0.7:top_p=0.9:prompt=16")[1] == (
        "teacher",
        Sampling(4_000_000, 0.7, 0.9, 16),
    )
    assert parse_calib("teacher:temp=0")[0] == ("teacher", Sampling(100_000, temperature=0.0))
    assert parse_calib("teacher:2M:batch=256")[0] == ("teacher", Sampling(2_000_000, batch=256))
    assert parse_calib("teacher:2M:cache=0")[0] == ("teacher", Sampling(2_000_000, cache=False))
    for bad, msg in [
        ("teacher:lots", "teacher:N"),
        ("wiki,,lee", "empty source"),
        ("", "empty source"),
        ("teacher:0", "no tokens"),
        ("teacher:1M:temperature=1", "unknown teacher option 'temperature'"),
        ("teacher:1M:top_p=0", "0 < top_p <= 1"),
        ("teacher:1M:temp=-1", "temp >= 0"),
        ("teacher:1M:prompt=x", "prompt='x' .* not a number"),
        ("teacher:1M:cache=yes", "cache='yes' .* not 0 or 1"),
        ("teacher:1M:batch=0", r"batch >= 1 \(got .*batch=0\)"),
    ]:
        with pytest.raises(SlimEdgeError, match=msg):
            parse_calib(bad)


def test_teacher_tokens_are_the_models_own_seeded_samples(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    starts = torch.tensor([65, 66, 67])
    a = teacher_tokens(model, 200, 48, starts, device="cpu", seed=3, batch=3, progress=False)
    assert a.shape == (5 * 48,) and a.dtype == torch.int64  # ceil(200 / 48) sequences
    assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size
    seqs = a.view(5, 48)
    assert set(seqs[:, 0].tolist()) <= {65, 66, 67}
    assert torch.equal(a, teacher_tokens(model, 200, 48, starts, device="cpu", seed=3, batch=3, progress=False))
    assert not torch.equal(a, teacher_tokens(model, 200, 48, starts, device="cpu", seed=4, batch=3, progress=False))
    # the first GREEDY_PREFIX continuations are the argmax of a plain forward pass (KV cache = full recompute)
    with torch.no_grad():
        logits = model(seqs).logits
    greedy = logits[:, :GREEDY_PREFIX].argmax(-1)
    assert torch.equal(seqs[:, 1 : 1 + GREEDY_PREFIX], greedy)
    # and after them, sampling: not the argmax everywhere
    assert not torch.equal(seqs[:, 1 + GREEDY_PREFIX :], logits[:, GREEDY_PREFIX:-1].argmax(-1))


def test_shards_of_the_sampling_batches_join_into_the_one_process_draw(tiny_llama):
    model = load_model(str(tiny_llama))[0]
    starts, kw = torch.arange(10, 250), dict(device="cpu", seed=5, batch=2, progress=False, prompt=4)
    one = teacher_tokens(model, 7 * 24, 24, starts, **kw)  # 7 sequences: batches of 2, 2, 2, 1
    for ranks in (2, 3):
        shards = [teacher_tokens(model, 7 * 24, 24, starts, shard=(r, ranks), **kw) for r in range(ranks)]
        assert [len(x) // 24 for x in shards] == ([4, 3] if ranks == 2 else [3, 2, 2])
        assert torch.equal(interleave_batches(shards, 7, 24, 2), one)
    assert len(teacher_tokens(model, 7 * 24, 24, starts, shard=(4, 5), **kw)) == 0  # 4 batches, 5 ranks
    with pytest.raises(ValueError, match="not a draw of 7 in batches of 2"):
        interleave_batches(shards[:2], 7, 24, 2)
    # batch k's generator is its own: the first batch is the same whatever follows it
    assert torch.equal(teacher_tokens(model, 2 * 24, 24, starts, **kw), one[: 2 * 24])
    assert batch_seed(5, 1) not in (batch_seed(5, 0), batch_seed(6, 0), batch_seed(6, 1))


def test_sample_keeps_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(_sample(logits, 0.75, gen).flatten(), minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reach 0.75: the two tail tokens never come
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    assert torch.equal(_sample(logits, 1e-6, gen), torch.zeros(4000, 1, dtype=torch.long))  # argmax stays
    counts = torch.bincount(_sample(logits, 1.0, gen).flatten(), minlength=4)
    assert abs(counts[3] / 4000 - 0.05) < 0.015


def test_nucleus_from_the_top_k_equals_the_full_sort():
    # rows from sharp (the nucleus inside the top NUCLEUS_K) to flat (it reaches past them: the full sort)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(96, 5000, generator=gen) * torch.linspace(0.05, 12, 96)[:, None]
    probs = torch.softmax(logits, -1)
    for top_p in (0.3, 0.9, 0.99):
        p, idx = probs.sort(-1, descending=True)  # the definition: sort all, keep until the mass reaches top_p
        want = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(p.cumsum(-1) - p >= top_p, 0))
        wide = probs.topk(NUCLEUS_K, -1).values.sum(-1) < top_p
        assert 0 < int(wide.sum()) < len(probs)  # both paths are taken
        assert torch.equal(nucleus(probs, top_p), want)


def test_sampling_batch_sizes_the_kv_cache_to_the_free_memory():
    smollm2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    gib = 1 << 30
    # per 512-token sequence: k and v, 30 layers x 3 heads x 64 dims x 512 x 2 bytes x 2.25 = 26.5 MB
    assert sampling_batch(smollm2, 512, 139 * gib) == 2048  # an idle H200 (4096 peaked at 99 GiB there)
    assert sampling_batch(smollm2, 512, 19 * gib) == 512  # an H200 shared with three trainings
    assert sampling_batch(smollm2, 1024, 19 * gib) == 256
    assert sampling_batch(smollm2, 512, gib // 4) == 16 and sampling_batch(smollm2, 512, 1 << 42) == 4096


def test_sampling_batch_of_the_preallocated_cache():
    smollm2 = SimpleNamespace(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, vocab_size=49152
    )
    gib = 1 << 30
    # per 512-token sequence: the cache, 30 x 3 x 64 x 512 x 2 (k, v) x 2 bytes = 11.8 MB, once, plus 6 float32
    # rows of the vocabulary, 1.2 MB: 13.0 MB, against 26.5 MB for transformers' growing cache
    assert sampling_batch(smollm2, 512, 78 * gib, kv=True) == 4096  # an idle H100 (2048 with transformers)
    assert sampling_batch(smollm2, 512, 78 * gib) == 2048
    assert sampling_batch(smollm2, 512, 19 * gib, kv=True) == 1024
    assert sampling_batch(smollm2, 512, 9 * gib, kv=True) == 512  # 0.7 * 9 GiB / 13.0 MB = 520
    assert sampling_batch(smollm2, 512, int(8.8 * gib), kv=True) == 256  # 509 (the cache alone: 560)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "hunyuan-dense"])
def test_the_preallocated_kv_cache_decodes_as_the_models_forward(arch, tmp_path):
    model = load_model(str(make_tiny_model(tmp_path / arch, arch, layers=2, hidden=128, intermediate=256)))[0]
    model.eval()
    assert KVDecoder.supported(model, 24) and decoding_engine(model, 24, "cpu") == "kv"
    ids = torch.randint(256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        dec = KVDecoder(model, 3, 24, "cpu")
        got = [dec.step(ids[:, :5], 0)] + [dec.step(ids[:, t : t + 1], t) for t in range(5, 24)]
    # an opening of 5 tokens at once, then one at a time: each step's logits are the forward's at that position
    assert torch.allclose(torch.stack(got, 1), want[:, 4:], atol=1e-5, rtol=1e-5)
    assert KVDecoder.agrees(model, "cpu") < 1e-5
    # and the draws: every sampling mode gives the tokens that transformers' own cache gives (float32, CPU)
    starts = torch.arange(10, 250)
    for kw in (dict(temperature=0, prompt=8), dict(prompt=0), dict(top_p=0.9, prompt=4, temperature=0.8)):
        a = teacher_tokens(model, 100, 24, starts, device="cpu", seed=3, batch=3, progress=False, engine="kv", **kw)
        b = teacher_tokens(
            model, 100, 24, starts, device="cpu", seed=3, batch=3, progress=False, engine="transformers", **kw
        )
        assert torch.equal(a, b), kw
    with pytest.raises(ValueError, match="several tokens only at position 0"):
        dec.step(ids[:, :2], 3)
    with pytest.raises(SlimEdgeError, match="give auto, kv or transformers"):
        decoding_engine(model, 24, "cpu", "vllm")


def test_models_of_another_structure_sample_through_transformers(tiny_llama, monkeypatch, capsys):
    model = load_model(str(tiny_llama))[0]
    layer = model.model.layers[0]
    assert decoding_engine(model, 48, "cpu") == "kv"
    # a layer that computes what KVDecoder does not know: its forward shifts the residual stream (a hook runs
    # where the layer itself is called: the model's forward, not KVDecoder; a scale would vanish in the last norm)
    hook = layer.register_forward_hook(lambda m, args, out: out + 1.0)
    assert KVDecoder.supported(model, 48) and KVDecoder.agrees(model, "cpu") > 0.02
    assert decoding_engine(model, 48, "cpu") == "transformers"
    assert "differs from its forward by" in capsys.readouterr().err
    hook.remove()
    # a child KVDecoder does not run, and a sliding window shorter than the sequences
    layer.add_module("post_feedforward_layernorm", torch.nn.Identity())
    assert not KVDecoder.supported(model, 48) and decoding_engine(model, 48, "cpu") == "transformers"
    del layer.post_feedforward_layernorm
    assert KVDecoder.supported(model, 48)
    monkeypatch.setattr(model.config, "sliding_window", 32, raising=False)
    assert not KVDecoder.supported(model, 48) and KVDecoder.supported(model, 32)


def test_teacher_tokens_open_with_text_and_sample_sharper(tiny_llama):
    model, tok, _ = load_model(str(tiny_llama))
    text = torch.arange(10, 250)
    a = teacher_tokens(model, 4 * 40, 40, text, device="cpu", seed=1, batch=4, progress=False, prompt=8, temperature=0)
    seqs = a.view(4, 40)
    for s in seqs:  # 8 consecutive tokens of the text, then the model's argmax continuation
        o = int(s[0]) - 10
        assert torch.equal(s[:8], text[o : o + 8])
    with torch.no_grad():
        logits = model(seqs).logits
    assert torch.equal(seqs[:, 8:], logits[:, 7:-1].argmax(-1))
    with pytest.raises(SlimEdgeError, match="prompt=40 needs fewer than --seq-len 40"):
        teacher_tokens(model, 80, 40, text, device="cpu", seed=1, prompt=40, progress=False)


def test_training_tokens_joins_sources(tiny_llama, tiny_text):
    model, tok, _ = load_model(str(tiny_llama))
    text_ids, src = training_tokens(model, tok, str(tiny_text), 32, device="cpu", seed=0, progress=False)
    ids, src = training_tokens(model, tok, f"{tiny_text},teacher:64", 32, device="cpu", seed=0, progress=False)
    assert len(ids) == len(text_ids) + 1 + 64
    assert torch.equal(ids[: len(text_ids)], text_ids) and int(ids[len(text_ids)]) == tok.eos_token_id
    assert "64 tokens sampled from the FP model" in src
    # the text's unigram distribution seeds the samples: every first token occurs in the text
    firsts = ids[len(text_ids) + 1 :].view(2, 32)[:, 0]
    assert all(int(t) in set(text_ids.tolist()) for t in firsts)
    ids, src = training_tokens(
        model, tok, f"{tiny_text},teacher:64:temp=0.5:prompt=4", 32, device="cpu", seed=0, progress=False
    )
    assert "64 tokens sampled from the FP model (seed 1, temp 0.5, top-p 1, 4-token text prompts)" in src
    with pytest.raises(SlimEdgeError, match="no text source"):
        training_tokens(model, tok, "teacher:64:prompt=4", 32, device="cpu", seed=0, progress=False)
    # batch=N: N sequences at once (the draws follow the batches, so the samples are teacher_tokens' at batch N)
    ids, src = training_tokens(model, tok, "teacher:96:batch=1", 32, device="cpu", seed=0, progress=False)
    assert "96 tokens sampled from the FP model (seed 0, 1 at once)" in src
    starts = torch.tensor([i for i in range(model.config.vocab_size) if i not in set(tok.all_special_ids)])
    kw = dict(device="cpu", seed=0, progress=False)
    assert torch.equal(ids, teacher_tokens(model, 96, 32, starts, batch=1, **kw))
    assert not torch.equal(ids, teacher_tokens(model, 96, 32, starts, batch=16, **kw))


def test_quantize_data_free_and_resume_keeps_the_samples(tiny_llama, tmp_path):
    out = tmp_path / "o"
    # CE + KD: the loss check below reads CE + KD, which 4 steps of KD alone need not lower on a tiny random model
    config = QuantConfig(scheme="seq2", steps=4, calib="teacher:256", batch_size=2, seq_len=32, lr=1e-3, ce_weight=1.0)
    report = run_quantize(str(tiny_llama), config, out, progress=False, checkpoint_every=2)
    assert report["calibration"] == "256 tokens sampled from the FP model (seed 0)"
    assert read_meta(out)["calibration"] == report["calibration"]
    assert report["distill_loss"]["final"] < report["distill_loss"]["ptq"]
    # --resume trains on the cached samples, not a new draw
    partial = tmp_path / "p.partial"
    partial.mkdir()
    torch.save(
        {
            "calib": "teacher:256",
            "seq_len": 32,
            "seed": 0,
            "model": str(tiny_llama),
            "ids": torch.arange(300) % 200,
            "source": "cached",
        },
        partial / "tokens.pt",
    )
    report = run_quantize(str(tiny_llama), config, tmp_path / "p", progress=False, resume=True)
    assert report["calibration"] == "cached"


def test_ngram_keys_are_two_polynomial_hashes_of_each_window():
    m = (1 << 31) - 1
    ids = torch.randint(0, 300_000, (3, 40), generator=torch.Generator().manual_seed(0))
    keys = ngram_keys(ids)
    assert keys.shape == (3, 40 - DEDUP_NGRAM + 1) and keys.dtype == torch.int64
    for r, c in [(0, 0), (1, 7), (2, 27)]:
        h1 = h2 = 0
        for t in ids[r, c : c + DEDUP_NGRAM].tolist():
            h1, h2 = (h1 * 1_000_003 + t) % m, (h2 * 911_382_323 + t) % m
        assert int(keys[r, c]) == h1 * 2**31 + h2
    assert len(set(keys.flatten().tolist())) == keys.numel()  # random windows: no two keys alike
    assert torch.equal(ngram_keys(ids[1, 5:30]), keys[1:2, 5 : 30 - DEDUP_NGRAM + 1])  # a key is its window's
    assert ngram_keys(ids[:, : DEDUP_NGRAM - 1]).shape == (3, 0)


def test_drop_overlapping_drops_rows_that_share_a_13_token_span():
    g = torch.Generator().manual_seed(1)
    held = torch.randint(0, 49152, (300,), generator=g)
    rows = torch.randint(0, 49152, (4, 64), generator=g)
    rows[0, 20 : 20 + DEDUP_NGRAM] = held[100 : 100 + DEDUP_NGRAM]  # a 13-token span of the held-out text
    rows[1, 40 : 40 + DEDUP_NGRAM - 1] = held[100 : 100 + DEDUP_NGRAM - 1]  # 12 tokens only: kept
    rows[3, -DEDUP_NGRAM:] = held[-DEDUP_NGRAM:]  # at the very end of both
    kept, dropped = drop_overlapping(rows, torch.unique(ngram_keys(held)), chunk=3)
    assert dropped == 2 and torch.equal(kept, rows[[1, 2]])
    assert drop_overlapping(rows, held[:0])[1] == 0


def test_cached_samples_are_kept_and_read_back(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIM_EDGE_SAMPLES")  # conftest points it at the session's temp dir
    model, tok, _ = load_model(str(tiny_llama))
    calls, sample = [], gendata.teacher_tokens  # the draws: each sampled token is one KVDecoder step
    monkeypatch.setattr(gendata, "teacher_tokens", lambda *a, **k: calls.append(a[1]) or sample(*a, **k))
    starts = torch.tensor([65, 66, 67])
    kw = dict(device="cpu", seed=3, progress=False)
    a, dropped = cached_samples(model, tok, Sampling(200, batch=3), 48, starts, **kw)
    assert dropped == 0 and calls == [200]
    assert torch.equal(a, teacher_tokens(model, 200, 48, starts, batch=3, **kw))
    calls.clear()
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 1
    monkeypatch.setenv("SLIM_EDGE_SAMPLES", str(tmp_path / "elsewhere"))
    cached_samples(model, tok, Sampling(200, batch=3), 48, starts, **kw)
    assert len(list((tmp_path / "elsewhere").glob("*.pt"))) == 1 and calls == [200]  # a folder of its own
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SLIM_EDGE_SAMPLES", str(tmp_path / "file"))
    with pytest.raises(SlimEdgeError, match="SLIM_EDGE_SAMPLES=.*file is a file, not a folder"):
        cached_samples(model, tok, Sampling(200, batch=3), 48, starts, **kw)
    monkeypatch.delenv("SLIM_EDGE_SAMPLES")
    calls.clear()
    b, _ = cached_samples(model, tok, Sampling(200, batch=3), 48, starts, **kw)
    assert torch.equal(a, b) and b.dtype == torch.int64 and not calls  # from the cache, not drawn
    cached_samples(model, tok, Sampling(200, batch=3, cache=False), 48, starts, **kw)
    assert calls == [200]  # cache=0 samples anew
    for other in [dict(seed=4), dict(starts=torch.tensor([65, 66, 68]))]:
        calls.clear()
        c, _ = cached_samples(model, tok, Sampling(200, batch=3), 48, other.pop("starts", starts), **{**kw, **other})
        assert calls and not torch.equal(a, c)
    with torch.no_grad():  # another model: another draw, even from a one-weight change
        next(model.parameters()).view(-1)[0] += 1e-3
    calls.clear()
    cached_samples(model, tok, Sampling(200, batch=3), 48, starts, **kw)
    assert calls


def test_samples_that_continue_held_out_text_are_dropped(tiny_llama, tiny_text, tmp_path):
    model, tok, _ = load_model(str(tiny_llama))
    held = tmp_path / "lee_eval.txt"
    held.write_text(get_text("lee", "eval").text, encoding="utf-8")
    # prompts drawn from pydoc text and lee:eval joined: those that open with lee:eval are dropped
    sources = f"{tiny_text},{held}"
    text_len = len(training_tokens(model, tok, sources, 32, device="cpu", seed=0, progress=False)[0])
    ids, src = training_tokens(
        model, tok, f"{sources},teacher:1280:prompt=16:cache=0", 32, device="cpu", seed=0, progress=False
    )
    seqs = ids[text_len + 1 :].view(-1, 32)
    dropped = 40 - len(seqs)
    assert 5 <= dropped <= 35, src
    assert f"; {dropped} of 40 sequences dropped, sharing a 13-token span with lee:eval or wiki:eval" in src
    lee = set(
        ngram_keys(training_tokens(model, tok, str(held), 32, device="cpu", seed=0, progress=False)[0])
        .flatten()
        .tolist()
    )
    assert not lee & set(ngram_keys(seqs).flatten().tolist())  # what is left shares no 13-token span with it
    with pytest.raises(SlimEdgeError, match="all 20 sequences sampled from the FP model share a 13-token span"):
        training_tokens(model, tok, f"{held},teacher:640:prompt=16:cache=0", 32, device="cpu", seed=0, progress=False)
