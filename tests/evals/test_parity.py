"""Parity's PyTorch references: the GGUF's own weights loaded back in HF order, and the runtime simulation
closing the gap to the runtime on a tiny model."""

import shutil

import gguf
import numpy as np
import pytest
import torch

from slim_edge.converters.gguf_export import _permutation
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.parity import load_file_weights
from slim_edge.formats import get_format
from tiny_models import make_tiny_model

Q8 = get_format("q8_0")
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(path, model, skip=()):
    """The model's weights as convert_hf_to_gguf lays them out (q/k rows in rope order), linears and the
    embedding as Q8_0, norms as F32, written with gguf-py (no tokenizer: nothing here runs it)."""
    cfg = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)

    def q8(name, x):
        w.add_tensor(name, Q8.quantize(x), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, g in GGUF_NAMES.items():
            if g in skip:
                continue
            x = sd[p + hf + ".weight"]
            if g in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads
                x = x[_permutation(x.shape[0], heads)]
            q8(f"blk.{i}.{g}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_file_weights_are_the_dequantized_tensors_in_hf_order(tiny, tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, tiny)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    info = load_file_weights(tiny, path)
    after = tiny.state_dict()
    for k, v in before.items():
        if k.endswith("norm.weight"):
            assert torch.equal(after[k], v), k  # F32 in the file: unchanged
        else:  # Q8_0 in the file: the dequantized values, in the HF row order
            want = Q8.dequantize(Q8.quantize(v.numpy()), v.shape[-1])
            assert np.array_equal(after[k].numpy(), want), k
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    assert set(info["changed"]) == {k for k in before if not k.endswith("norm.weight") and k != "lm_head.weight"}
    linears = {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)}
    assert info["types"] == {n: 8 for n in linears}  # the tied head takes token_embd's type


def test_a_tensor_missing_from_the_file_is_named(tiny, tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, tiny, skip=("ffn_down",))
    with pytest.raises(SlimEdgeError, match=r"holds no tensor for model\.layers\.0\.mlp\.down_proj\.weight"):
        load_file_weights(tiny, path)


@pytest.mark.runtime
def test_simulation_closes_the_gap_to_the_runtime(tmp_path):
    """A tiny llama with SmolLM2's tokenizer, converted to F32 and Q8_0 by the pinned converter."""
    from slim_edge.converters.gguf_export import run_converter
    from slim_edge.evals.parity import parity
    from slim_edge.models import resolve

    folder = tmp_path / "m"
    make_tiny_model(folder, "llama", layers=2, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(resolve("smollm2-135m") / f, folder / f)
    r = {}
    for t in ("f32", "q8_0"):
        run_converter(folder, tmp_path / f"{t}.gguf", t)
        r[t] = parity(str(folder), tmp_path / f"{t}.gguf", n_tokens=128)
    f32, q8 = r["f32"]["variants"], r["q8_0"]["variants"]
    # F32 weights: only the F16 KV cache and rope angles differ, and the simulation removes them
    assert f32["act+kv+rope"]["mean_kld"] < f32["weights"]["mean_kld"] / 10
    # Q8_0: the file's weights, then the 8-bit activations, each take a share of the gap
    assert q8["file"]["mean_kld"] < q8["weights"]["mean_kld"]
    assert q8["act+kv+rope"]["mean_kld"] < q8["file"]["mean_kld"] / 1.5
    assert r["q8_0"]["linear_types"] == [8] and r["q8_0"]["file_weights_changed"]
    # windows: consecutive chunks, each from an empty context; the first is the one-window measurement
    one = parity(str(folder), tmp_path / "q8_0.gguf", n_tokens=64, variants=("weights",), floor=False)
    two = parity(str(folder), tmp_path / "q8_0.gguf", n_tokens=64, variants=("weights",), floor=False, windows=2)
    w = two["variants"]["weights"]
    assert two["tokens"] == 128 and len(w["same_top_pct_per_window"]) == 2
    assert w["same_top_pct_per_window"][0] == pytest.approx(one["variants"]["weights"]["same_top_pct"])
    assert w["same_top_pct"] == pytest.approx(np.mean(w["same_top_pct_per_window"]))
    with pytest.raises(SlimEdgeError, match=r"do not fit lee:eval .* ask for at most \d+"):
        parity(str(folder), tmp_path / "q8_0.gguf", n_tokens=512, variants=("weights",), floor=False, windows=10**4)
    # --kv-cache f32: the runtime keeps K and V in F32, so on the F32 file only the rope angles remain
    kv32 = parity(str(folder), tmp_path / "f32.gguf", n_tokens=128, variants=("weights",), floor=False, kv_cache="f32")
    assert kv32["kv_cache"] == "f32" and r["f32"]["kv_cache"] == "f16"
    assert kv32["variants"]["weights"]["mean_kld"] < f32["weights"]["mean_kld"] / 1000  # 8e-12 against 3e-7
    with pytest.raises(SlimEdgeError, match="act\\+kv model the runtime's F16 KV cache"):
        parity(str(folder), tmp_path / "f32.gguf", n_tokens=64, variants=("weights", "act+kv"), kv_cache="f32")
    with pytest.raises(SlimEdgeError, match="KV cache type 'q8' is not one of f16, f32"):
        parity(str(folder), tmp_path / "f32.gguf", kv_cache="q8")
