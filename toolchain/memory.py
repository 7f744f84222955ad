"""Sizes checked before anything is allocated: a model's config.json against the RAM there is, so that a
hostile or mistyped config (hidden_size 2^20) is one message, not an allocation that takes the machine down;
and text tokenized in pieces, so that a 100 MB corpus does not need gigabytes in one tokenizer call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import SlimEdgeError

SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def available_ram() -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def config_params(config: dict) -> int:
    """Weights a decoder-only transformer of this config holds (embedding, attention, MLP, untied head)."""
    v, h, f, n = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    head = 0 if config.get("tie_word_embeddings", True) else v * h
    return v * h + head + n * (attn + 3 * h * f)


def check_model_config(folder: Path, copies: int = 1, ram: int | None = None) -> int:
    """Refuse a config.json whose sizes are not positive integers or whose `copies` float32 copies of the
    weights do not fit the available RAM; returns the parameter count."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimEdgeError(f"cannot read {path} ({e}); pass a Hugging Face model folder") from None
    if not isinstance(config, dict):
        raise SlimEdgeError(
            f"{path} holds a JSON {type(config).__name__}, not a model config; pass a Hugging Face model folder"
        )
    for k in SIZE_KEYS:
        value = config.get(k)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SlimEdgeError(f"{path}: {k} is {value!r}; it must be a positive integer: the config is damaged")
    try:
        params = config_params(config)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise SlimEdgeError(f"{path}: its sizes do not make a model ({e}); the config is damaged") from None
    ram = available_ram() if ram is None else ram
    need = 4 * params * copies
    if ram is not None and need > ram:
        raise SlimEdgeError(
            f"{path}: a model of {params / 1e9:.3g} G weights needs {need / 2**30:.1f} GiB in "
            f"float32 ({copies} cop{'y' if copies == 1 else 'ies'}), {ram / 2**30:.1f} GiB of RAM "
            f"is available; check hidden_size/vocab_size or use a machine with more memory"
        )
    return params


PIECE_CHARS = 1 << 16  # text is tokenized in pieces of about this many characters (bounded memory)


def _cut(text: str, at: int, window: int = 4096) -> int:
    """A place at or after `at` where tokenizers of the GPT-2 and Llama-3 kind split the text into pre-tokens
    anyway, so that tokenizing the two sides apart gives the ids of tokenizing them together: where a run of
    whitespace starts right after a letter or digit (their regexes end a word or number there, and no
    alternative starts with it). Past `window` characters without one, the piece is cut where it is."""
    end = min(len(text), at + window)
    for i in range(at, end):
        if text[i].isspace() and text[i - 1].isalnum():
            return i
    return end


def tokenize_in_pieces(tokenize, text: str, piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """tokenize(text) as int32, one piece of about `piece_chars` at a time: a 100 MB text would need
    gigabytes in one call (the tokenizer's offsets and a Python list of every id)."""
    parts, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= piece_chars else _cut(text, start + piece_chars)
        parts.append(np.asarray(tokenize(text[start:end]), dtype=np.int32))
        start = end
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
