"""Carry a trained checkpoint back from a machine that returns only small files.

`slim-edge quantize` checkpoints hold the FP32 token embedding (113 MB for SmolLM2-135M) that training never
changes; everything training does change (packed codes, scales, norms) is ~30 MB. `pack` writes that part
as safetensors split into parts of at most --part-mb, plus the checkpoint's JSON; `unpack` joins the parts
with the frozen tensors of the same base model here into a complete checkpoint.

    python -m slim_edge.evals.lab.ckpt_parts pack runs/seq2 $OUT/seq2 --part-mb 15
    python -m slim_edge.evals.lab.ckpt_parts unpack FETCHED/seq2 runs/gpu/seq2 [--model smollm2-135m]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from slim_edge.checkpoint import read_meta
from slim_edge.errors import SlimEdgeError

FROZEN = ("embed_tokens", "lm_head")
META_FILES = ("quant_config.json",)  # it holds the report too
app = typer.Typer(add_completion=False, no_args_is_help=True)


def _frozen(name: str) -> bool:
    return any(f in name for f in FROZEN)


@app.command()
def pack(checkpoint: Path, out: Path, part_mb: float = 15.0):
    """Write the trained tensors of CHECKPOINT (all but the frozen embedding/head) in parts under OUT."""
    from safetensors.torch import load_file, save_file

    read_meta(checkpoint)
    tensors = {k: v for k, v in load_file(str(checkpoint / "model.safetensors")).items() if not _frozen(k)}
    out.mkdir(parents=True, exist_ok=True)
    limit = int(part_mb * (1 << 20)) - (1 << 16)  # room for the safetensors header
    parts: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if n > limit:
            raise SlimEdgeError(f"tensor {k} alone is {n >> 20} MiB, over --part-mb {part_mb}; raise --part-mb")
        if size + n > limit:
            parts.append({})
            size = 0
        parts[-1][k] = tensors[k]
        size += n
    for i, p in enumerate(parts):
        save_file(p, str(out / f"part{i}.safetensors"))
    for f in META_FILES:
        if (checkpoint / f).is_file():
            shutil.copy2(checkpoint / f, out / f)
    print(f"{len(tensors)} tensors in {len(parts)} parts under {out}")


@app.command()
def unpack(parts: Path, out: Path, model: str = "smollm2-135m", force: bool = False):
    """Join the parts under PARTS with the frozen tensors of MODEL (loaded here) into checkpoint OUT."""
    import torch
    from safetensors.torch import load_file

    from slim_edge.checkpoint import check_output, write_checkpoint
    from slim_edge.models import load_model

    check_output(out, force)
    files = sorted(parts.glob("part*.safetensors"))
    if not files or not (parts / "quant_config.json").is_file():
        raise SlimEdgeError(f"{parts} holds no part*.safetensors + quant_config.json; make it with `pack`")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    fp, _, folder = load_model(model)
    meta = json.loads((parts / "quant_config.json").read_text())
    embedding_type = meta.get("config", {}).get("embedding_type", "f16")
    for k, v in fp.state_dict().items():
        if _frozen(k) and k not in tensors and not (k == "lm_head.weight" and fp.config.tie_word_embeddings):
            if embedding_type != "f16" and k.endswith("embed_tokens.weight"):
                # a quantized embedding trains frozen: its codes are the FP embedding's, rebuilt here exactly
                from slim_edge.qlinear import QuantEmbedding

                codes = QuantEmbedding(fp.get_input_embeddings(), embedding_type).export()
                tensors[k.removesuffix("weight") + "qweight"] = torch.from_numpy(codes)
                continue
            tensors[k] = v.detach().float().contiguous()
    meta["base_model"] = str(folder)
    write_checkpoint(tensors, meta, Path(folder), out, force=force)
    print(f"wrote {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(app)
