"""--calib sources and training text sampled from the FP model (data-free distillation)."""
import pytest
import torch

from slim_edge.checkpoint import read_meta
from slim_edge.errors import SlimEdgeError
from slim_edge.gendata import GREEDY_PREFIX, parse_calib, teacher_tokens, training_tokens
from slim_edge.models import load_model
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig


def test_parse_calib():
    assert parse_calib("wiki") == [("wiki", None)]
    assert parse_calib("wiki, teacher:2M") == [("wiki", None), ("teacher", 2_000_000)]
    assert parse_calib("teacher:1.5k,corpus.txt") == [("teacher", 1500), ("corpus.txt", None)]
    assert parse_calib("teacher") == [("teacher", 100_000)]
    for bad, msg in [("teacher:lots", "teacher:N"), ("wiki,,lee", "empty source"), ("", "empty source"),
                     ("teacher:0", "no tokens")]:
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
    assert torch.equal(seqs[:, 1:1 + GREEDY_PREFIX], greedy)
    # and after them, sampling: not the argmax everywhere
    assert not torch.equal(seqs[:, 1 + GREEDY_PREFIX:], logits[:, GREEDY_PREFIX:-1].argmax(-1))


def test_training_tokens_joins_sources(tiny_llama, tiny_text):
    model, tok, _ = load_model(str(tiny_llama))
    text_ids, src = training_tokens(model, tok, str(tiny_text), 32, device="cpu", seed=0, progress=False)
    ids, src = training_tokens(model, tok, f"{tiny_text},teacher:64", 32, device="cpu", seed=0, progress=False)
    assert len(ids) == len(text_ids) + 1 + 64
    assert torch.equal(ids[:len(text_ids)], text_ids) and int(ids[len(text_ids)]) == tok.eos_token_id
    assert "64 tokens sampled from the FP model" in src
    # the text's unigram distribution seeds the samples: every first token occurs in the text
    firsts = ids[len(text_ids) + 1:].view(2, 32)[:, 0]
    assert all(int(t) in set(text_ids.tolist()) for t in firsts)


def test_quantize_data_free_and_resume_keeps_the_samples(tiny_llama, tmp_path):
    out = tmp_path / "o"
    config = QuantConfig(scheme="seq2", steps=4, calib="teacher:256", batch_size=2, seq_len=32, lr=1e-3)
    report = run_quantize(str(tiny_llama), config, out, progress=False, checkpoint_every=2)
    assert report["calibration"] == "256 tokens sampled from the FP model (seed 0)"
    assert read_meta(out)["calibration"] == report["calibration"]
    assert report["distill_loss"]["final"] < report["distill_loss"]["ptq"]
    # --resume trains on the cached samples, not a new draw
    partial = tmp_path / "p.partial"
    partial.mkdir()
    torch.save({"calib": "teacher:256", "seq_len": 32, "ids": torch.arange(300) % 200, "source": "cached"},
               partial / "tokens.pt")
    report = run_quantize(str(tiny_llama), config, tmp_path / "p", progress=False, resume=True)
    assert report["calibration"] == "cached"
