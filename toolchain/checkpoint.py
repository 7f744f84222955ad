"""The quantized checkpoint folder written by `slim-edge quantize`.

    OUT/
      quant_config.json   {"slim_edge_checkpoint": 1, "config": QuantConfig, "plan": [...], "summary", "training"}
      model.safetensors   <module>.qweight  uint8 [rows, row_bytes]: the GGUF blocks of the planned format
                          <embedding>.qweight uint8 [vocab, row_bytes]: the token embedding's blocks (quant_config's
                                            "embedding" names it and its format; also the tied head's weight)
                          <module>.bias     f32 [rows]: the linear's bias incl. Tequila's dead-weight bias
                          every other tensor (norms, embeddings) in f32, as in the HF state dict
      config.json, tokenizer files, chat template: copied from the base model
      report.md, report.json

The folder is built under a temporary name and renamed into place: it is whole or absent.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import SlimEdgeError
from .formats import get_format
from .fsutil import atomic_dir, check_free_space, check_output_dir
from .qlinear import QuantEmbedding, QuantLinear, activation_type, round_activations
from .quantize import PlanEntry, QuantConfig

CHECKPOINT_VERSION = 1
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "slim_edge_source.json",
)


def is_ours(folder: Path) -> bool:
    """A folder slim-edge wrote: a checkpoint (its quant_config.json says so) or a run's .partial folder."""
    folder = Path(folder)
    if folder.name.endswith(".partial"):
        return all(p.name in PARTIAL_FILES or p.suffix == ".tmp" for p in folder.iterdir())
    try:
        return "slim_edge_checkpoint" in json.loads((folder / "quant_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


# what an unfinished run keeps in OUT.partial (train.py's training state, pipeline's plan and sampled text)
# (train.dcp/: the training state, distributed.sharded_checkpoint; train.pt: an earlier version's)
PARTIAL_FILES = ("train.pt", "train.dcp", "train.dcp.old", "plan.json", "tokens.pt")


def check_output(out: Path, force: bool, inputs=()) -> None:
    """-o may be new, empty, or (with --force) a slim-edge checkpoint; never a file, a link, a folder of
    other files, the input model or a folder above it. Checked before any work starts."""
    check_output_dir(out, force, is_ours, inputs=inputs)
    partial = Path(out).with_name(Path(out).name + ".partial")
    if partial.exists() and (partial.is_symlink() or not partial.is_dir() or not is_ours(partial)):
        raise SlimEdgeError(
            f"{partial} is in the way of this run's training state and is not one slim-edge "
            f"wrote; move it away or choose another -o"
        )


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    skip = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            blob = mod.export()
            tensors[f"{name}.qweight"] = torch.from_numpy(blob["qweight"])
            if "bias" in blob:
                tensors[f"{name}.bias"] = torch.from_numpy(blob["bias"])
            skip.update({f"{name}.weight", f"{name}.bias", f"{name}.scale"})
        elif isinstance(mod, QuantEmbedding):
            tensors[f"{name}.qweight"] = torch.from_numpy(mod.export())
            skip.update({f"{name}.weight", f"{name}.scale"})
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        if v.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v.detach().float().cpu().contiguous()
    return tensors


def save_quantized(
    model: nn.Module,
    plan: list[PlanEntry],
    config: QuantConfig,
    base: Path,
    out: Path,
    extra: dict | None = None,
    force: bool = False,
    report_md: str = "",
) -> Path:
    meta = {
        "slim_edge_checkpoint": CHECKPOINT_VERSION,
        "config": config.to_json(),
        "plan": [e.to_json() for e in plan],
        "base_model": str(base),
        **(extra or {}),
    }
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            head = model.get_output_embeddings()
            meta["embedding"] = {
                "name": name,
                "shape": [mod.num_embeddings, mod.embedding_dim],
                "format": mod.fmt.name,
                "type_id": mod.fmt.type_id,
                "tied": head is not None and getattr(head, "_embedding", [None])[0] is mod,
            }
    return write_checkpoint(quantized_state(model), meta, base, out, force=force, report_md=report_md)


def write_checkpoint(
    tensors: dict[str, torch.Tensor], meta: dict, base: Path, out: Path, force: bool = False, report_md: str = ""
) -> Path:
    """Write a checkpoint folder atomically: the tensors, the base model's config/tokenizer files, meta as
    quant_config.json (and, as report.json, what it holds beyond config, plan and base model)."""
    from safetensors.torch import save_file

    check_output(out, force)
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out.parent, need)
    with atomic_dir(out) as tmp:
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "slim-edge"})
        except Exception as e:  # safetensors reports a full disk as its own error type, "... (os error 28)"
            if "os error 28" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device") from None
            raise
        for f in BASE_FILES:
            if (Path(base) / f).is_file():
                shutil.copy2(Path(base) / f, tmp / f)
        (tmp / "quant_config.json").write_text(json.dumps(meta, indent=1))
        report = {k: v for k, v in meta.items() if k not in ("slim_edge_checkpoint", "config", "plan", "base_model")}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(report_md)
    return out


def read_meta(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / "quant_config.json"
    if not path.is_file():
        raise SlimEdgeError(
            f"{folder} is not a slim-edge checkpoint (no quant_config.json); "
            f"make one with `slim-edge quantize MODEL -o {folder}`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimEdgeError(f"{path} is corrupt ({e}); re-run slim-edge quantize") from None
    if not isinstance(meta, dict):
        raise SlimEdgeError(
            f"{path} is damaged: it holds a JSON {type(meta).__name__}, not the checkpoint's "
            f"object; re-run slim-edge quantize"
        )
    if meta.get("slim_edge_checkpoint") != CHECKPOINT_VERSION:
        raise SlimEdgeError(
            f"{path}: checkpoint version {meta.get('slim_edge_checkpoint')!r} is not "
            f"supported (expected {CHECKPOINT_VERSION})"
        )
    _check_meta(meta, path)
    return meta


def _check_meta(meta: dict, path: Path) -> None:
    """The shape of quant_config.json that the readers rely on, so that damage is one message, not a
    KeyError deep inside export or eval."""

    def bad(what, value):
        return SlimEdgeError(f"{path} is damaged: {what} is {value!r}; re-run slim-edge quantize")

    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("scheme"), str):
        raise bad("config", meta.get("config"))
    if not isinstance(meta.get("plan"), list) or not meta["plan"]:
        raise bad("plan", meta.get("plan"))
    for i, e in enumerate(meta["plan"]):
        if (
            not isinstance(e, dict)
            or not all(isinstance(e.get(k), str) for k in ("name", "format", "mode"))
            or not isinstance(e.get("type_id"), int)
        ):
            raise bad(f"plan entry {i}", e)
        shape = e.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise bad(f"the shape of plan entry {i} ({e['name']})", shape)
        if e["mode"] != "keep":
            get_format(e["format"])  # an unknown format is its own SlimEdgeError


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise SlimEdgeError(f"{path} is missing or corrupt ({e}); re-run slim-edge quantize") from None


def _quantized_codes(meta: dict, tensors: dict[str, torch.Tensor]):
    """(plan entry, format, raw code bytes) of every quantized linear, checked against the plan."""
    for e in meta["plan"]:
        if e["mode"] == "keep":
            continue
        key = f"{e['name']}.qweight"
        if key not in tensors:
            raise SlimEdgeError(
                f"checkpoint has no tensor {key} although its plan lists it; "
                f"the folder is incomplete: re-run slim-edge quantize"
            )
        fmt = get_format(e["format"])
        raw = tensors[key].numpy()
        rows, k = e["shape"]
        if raw.shape != (rows, fmt.row_bytes(k)):
            raise SlimEdgeError(
                f"{key}: {raw.shape} bytes do not match the plan ({rows} rows x "
                f"{fmt.row_bytes(k)} bytes of {fmt.name}); the checkpoint does not match its config"
            )
        yield e, fmt, raw


def embedding_codes(meta: dict, tensors: dict[str, torch.Tensor]):
    """(module name, format, raw code bytes) of a quantized token embedding, or None for a float one."""
    e = meta.get("embedding")
    if not e:
        return None
    key = f"{e['name']}.qweight"
    fmt = get_format(e["format"])
    raw = tensors.get(key)
    rows, k = e["shape"]
    if raw is None or tuple(raw.shape) != (rows, fmt.row_bytes(k)):
        raise SlimEdgeError(
            f"{key}: {None if raw is None else tuple(raw.shape)} bytes do not match the embedding "
            f"({rows} rows x {fmt.row_bytes(k)} bytes of {fmt.name}); re-run slim-edge quantize"
        )
    return e["name"], fmt, raw.numpy()


def dequantized_weights(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float weights of every quantized linear, exactly as the exported GGUF stores them."""
    return {
        e["name"]: torch.from_numpy(fmt.dequantize(raw, e["shape"][1]))
        for e, fmt, raw in _quantized_codes(meta, tensors)
    }


def is_checkpoint(path) -> bool:
    return (Path(path) / "quant_config.json").is_file()


def refuse_damaged_checkpoint(folder: Path) -> Path:
    """A folder slim-edge wrote that lost its quant_config.json would load as an HF model whose quantized
    linears are missing, i.e. random weights: refuse it. Returns `folder`."""
    folder = Path(folder)
    if is_checkpoint(folder) or not (folder / "model.safetensors").is_file():
        return folder
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            ours = (f.metadata() or {}).get("format") == "slim-edge" or any(k.endswith(".qweight") for k in f.keys())
    except Exception:  # a damaged file is for the loader to report
        return folder
    if ours:
        raise SlimEdgeError(
            f"{folder} is a slim-edge checkpoint without its quant_config.json (its weights are "
            f"packed codes, not an HF model's); restore the file or re-run slim-edge quantize"
        )
    return folder


LATENT_SPREAD = 0.4  # latent weights start at (v + U(-0.4, 0.4)) * d: inside v's bin (half-width >= 0.5)


def init_from_checkpoint(student: nn.Module, folder, seed: int = 0) -> None:
    """Continue a checkpoint: each QuantLinear of `student` (quantized with the checkpoint's plan) takes the
    stored scales, and latent weights spread uniformly inside the bins of the stored values, so they
    re-quantize to the same codes; the other trained tensors (norms) load as saved. The student then equals
    the checkpoint.

    Why spread: latents exactly on the grid (w = v*d) zero the scale's LSQ gradient sum((v - w/d) * g), and
    after the first updates its residuals are the updates themselves, so with steady gradients the sign of
    the scale gradient no longer changes and AdamW moves every scale by the full scale lr per step. On the
    H200 (batch 32 x 512) 91 % of seq2g's scales shrank and training diverged. A trained model's latents sit
    spread inside their bins, and that spread is what keeps the scale gradients balanced."""
    meta = read_meta(Path(folder))
    tensors = read_tensors(Path(folder))
    codes = {e["name"]: (fmt, raw) for e, fmt, raw in _quantized_codes(meta, tensors)}
    qnames = {n for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    if qnames != set(codes):
        raise SlimEdgeError(
            f"{folder}: its plan quantizes {len(codes)} linears, this model {len(qnames)}; "
            f"continue it with the settings it was made with"
        )
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(qnames):
        mod = student.get_submodule(name)
        fmt, raw = codes[name]
        if mod.fmt.name != fmt.name:
            raise SlimEdgeError(
                f"{folder}: {name} is {fmt.name} there, {mod.fmt.name} here; continue it "
                f"with the settings it was made with"
            )
        v, d = mod.fmt.unpack(raw)
        d = torch.from_numpy(d.astype("float32"))
        u = (torch.rand(v.shape, generator=gen) * 2 - 1) * LATENT_SPREAD
        with torch.no_grad():
            mod.weight.copy_((torch.from_numpy(v).float() + u) * d.repeat_interleave(mod.fmt.block_size, dim=1))
            mod.scale.copy_(d)
            if mod.bias is not None:
                mod.bias.copy_(tensors[f"{name}.bias"])
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in codes}
    emb = embedding_codes(meta, tensors)
    if emb is not None:
        name, fmt, raw = emb
        del rest[f"{name}.qweight"]
        mod = student.get_submodule(name)
        here = mod.fmt.name if isinstance(mod, QuantEmbedding) else "f16"
        if here != fmt.name:
            raise SlimEdgeError(
                f"{folder}: its embedding is {fmt.name}, this model's {here}; continue it with "
                f"--embedding-type {fmt.name}"
            )
        mod.load_codes(raw)
    _, unexpected = student.load_state_dict(rest, strict=False)
    if unexpected:
        raise SlimEdgeError(f"{folder}: tensors {unexpected[:3]} do not belong to this model")


def load_quantized(folder, device: str = "cpu"):
    """(model, tokenizer): the quantized model as plain nn.Linear layers holding the exact weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    qconfig = QuantConfig.from_json(meta["config"])
    type_ids = {e["name"]: e["type_id"] for e in meta["plan"]}
    tensors = read_tensors(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = dequantized_weights(meta, tensors)
    for name, w in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = tensors.get(f"{name}.bias")
        lin = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        if qconfig.act_quant:  # trained with the runtime's activation rounding: it is part of the model
            kind = activation_type(type_ids[name])
            lin.register_forward_pre_hook(lambda m, args, kind=kind: (round_activations(args[0], kind), *args[1:]))
        setattr(parent, child, lin)
    rest = {k: v for k, v in tensors.items() if not k.endswith(".qweight") and k.rpartition(".")[0] not in weights}
    emb = embedding_codes(meta, tensors)
    if emb is not None:  # the values the codes hold; a tied head takes them below
        name, fmt, raw = emb
        rest[f"{name}.weight"] = torch.from_numpy(fmt.dequantize(raw, meta["embedding"]["shape"][1]))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [
        m
        for m in missing
        if m.rpartition(".")[0] not in weights and not (m == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise SlimEdgeError(
            f"checkpoint does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; re-run slim-edge quantize"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if qconfig.runtime_attention:  # trained attending as the runtime does: part of the model too
        from .runtime_patches.runtime_sim import use_runtime_attention

        use_runtime_attention(model)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok
