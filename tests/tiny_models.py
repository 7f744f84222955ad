"""Tiny random HF models (dimensions multiples of every block size, 512) and a byte tokenizer."""

from __future__ import annotations

from pathlib import Path


def _byte_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with 256 byte tokens and no merges, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0], bos_token=sorted(alphabet)[1])
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(
    folder: Path,
    arch: str = "llama",
    hidden: int = 512,
    layers: int = 2,
    seed: int = 0,
    intermediate: int = 1024,
    vocab: int = 256,
) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        from transformers import LlamaConfig as C

        config = C(**common)
    elif arch == "qwen2":
        from transformers import Qwen2Config as C

        config = C(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config as C

        config = C(head_dim=hidden // 4, **common)
    elif arch == "hunyuan-dense":
        from transformers import HunYuanDenseV1Config as C

        config = C(head_dim=hidden // 4, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so that quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _byte_tokenizer(folder)
    return folder


def make_tiny_smol(folder: Path, layers: int = 1, hidden: int = 512, intermediate: int = 1024) -> Path:
    """A tiny random llama with SmolLM2's real tokenizer (the GGUF converter must recognise it)."""
    import shutil

    from slim_edge.models import resolve

    make_tiny_model(folder, "llama", hidden=hidden, layers=layers, intermediate=intermediate, vocab=49152)
    base = resolve("smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            shutil.copy2(base / f, folder / f)
    return folder


def quantized_exports(tmp_path_factory, model: Path, text: Path, steps: int, name: str, export):
    """scheme -> (checkpoint, exported path, export's summary) after `steps` QAT steps of `model` on `text`
    (batch 1 x 32), made on first use: `export(checkpoint, path)` writes `name` beside the checkpoint."""
    from slim_edge.pipeline import run_quantize
    from slim_edge.quantize import QuantConfig

    made = {}

    def get(scheme: str):
        if scheme not in made:
            d = tmp_path_factory.mktemp(f"{Path(name).stem}-{scheme}")
            run_quantize(
                str(model),
                QuantConfig(scheme=scheme, steps=steps, batch_size=1, seq_len=32, calib=str(text)),
                d / "ckpt",
                progress=False,
            )
            made[scheme] = (d / "ckpt", d / name, export(d / "ckpt", d / name))
        return made[scheme]

    return get
