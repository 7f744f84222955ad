"""A tiny random-weight llama GGUF that the pinned llama.cpp loads, for tests and smoke benchmarks.

Dimensions default to multiples of 256, so Q4_0/Q8_0 (blocks of 32), K-quants and TQ1_0/TQ2_0/STQ1_0
(256) quantize without fallbacks; pass hidden=512 for Q2_0C's 512-weight blocks. The
vocabulary is a SentencePiece-style ("llama") one: <unk> <s> </s>, the 256 byte tokens that let any
text tokenize, then printable characters and a few words. Weights are random normal (never zero: a
zero matrix would be timed on a fast path real models never take).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

# gguf-py token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_WORDS = (
    "the",
    "and",
    "of",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "are",
    "this",
    "be",
    "at",
    "have",
    "or",
    "from",
    "model",
    "phone",
    "token",
    "fast",
    "small",
)


def tiny_vocab(size: int = 512) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    pieces = ["\u2581" + w for w in _WORDS] + [w for w in _WORDS]
    pieces += ["\u2581"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += ["\u2581" + c for c in string.ascii_letters]
    for p in pieces:
        if len(tokens) >= size:
            break
        if p not in tokens:
            tokens.append(p)
            types.append(_NORMAL)
    i = 0
    while len(tokens) < size:  # pad with unused two-letter pieces
        p = "\u2581" + string.ascii_lowercase[i // 26 % 26] + string.ascii_lowercase[i % 26]
        i += 1
        if p not in tokens:
            tokens.append(p)
            types.append(_NORMAL)
    scores = [0.0, 0.0, 0.0] + [-1000.0] * 256 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens, scores, types


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    hidden: int = 256,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 512,
    vocab_size: int = 512,
    context: int = 2048,
    seed: int = 0,
    name: str = "slim-edge tiny llama",
) -> Path:
    """Write an F16 llama GGUF with random normal weights; returns the path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    head_dim = hidden // n_heads
    kv_dim = head_dim * n_kv_heads

    def w(rows: int, cols: int) -> np.ndarray:  # (out, in) as PyTorch stores it
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.01 * rng.standard_normal(hidden)).astype(np.float32)

    tokens, scores, types = tiny_vocab(vocab_size)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    add_llama_tensors(writer, w, norm, n_layers, hidden, kv_dim, ffn, len(tokens))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_models(out_dir: str | Path, kinds: tuple[str, ...] = ("q4_0",), **dims) -> dict[str, Path]:
    """The tiny F16 model plus llama-quantize'd copies ({"f16": path, "q4_0": path, ...}); needs the
    host runtime (slim_edge.runtime_patches.runtime) for llama-quantize. Existing files are reused."""
    from slim_edge.evals.bench import build_baselines

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "tiny-f16.gguf"
    if not f16.is_file():
        write_tiny_llama_gguf(f16, **dims)
    built = build_baselines(f16, [k for k in kinds if k != "f16"], out_dir)
    return {"f16": f16, **dict(zip([k for k in kinds if k != "f16"], built))}


def add_llama_tensors(writer, w, norm, n_layers: int, hidden: int, kv_dim: int, ffn: int, vocab: int) -> None:
    """The llama architecture's tensors in llama.cpp's names; `w(rows, cols)` and `norm()` make the data."""
    writer.add_tensor("token_embd.weight", w(vocab, hidden))
    for i in range(n_layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", norm())
        writer.add_tensor(p + "attn_q.weight", w(hidden, hidden))
        writer.add_tensor(p + "attn_k.weight", w(kv_dim, hidden))
        writer.add_tensor(p + "attn_v.weight", w(kv_dim, hidden))
        writer.add_tensor(p + "attn_output.weight", w(hidden, hidden))
        writer.add_tensor(p + "ffn_norm.weight", norm())
        writer.add_tensor(p + "ffn_gate.weight", w(ffn, hidden))
        writer.add_tensor(p + "ffn_up.weight", w(ffn, hidden))
        writer.add_tensor(p + "ffn_down.weight", w(hidden, ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", w(vocab, hidden))
