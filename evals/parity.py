"""Runtime vs PyTorch parity on held-out tokens: mean KLD and same-top-1 %.

    python -m slim_edge.evals.parity CHECKPOINT_OR_HF_FOLDER FILE.gguf [--tokens 512]

The PyTorch side is the checkpoint (`load_quantized`) or the FP model; the runtime side is the GGUF
through llama-cpp-python bound to slim-edge's patched library.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from slim_edge.evals.backends import LlamaCppLM, TorchLM
from slim_edge.evals.corpora import get_text
from slim_edge.evals.kld import concat_stats, summarize, token_stats


def parity(torch_source: str, gguf: Path, n_tokens: int = 512, threads: int = 2) -> dict:
    from slim_edge.checkpoint import load_quantized
    from slim_edge.models import load_model

    if (Path(torch_source) / "quant_config.json").exists():
        model, tok = load_quantized(torch_source)
    else:
        model, tok, _ = load_model(torch_source)
    lm = TorchLM(model, tok)
    ids = lm.tokenize(get_text("lee", "eval").text)[:n_tokens]
    runtime = LlamaCppLM(gguf, n_ctx=n_tokens, n_threads=threads)
    a, b = lm.logits(ids), runtime.logits(ids)
    s = summarize(concat_stats([token_stats(a, b, np.array(ids[1:] + [0]))]))
    return {"torch": str(torch_source), "gguf": str(gguf), "tokens": len(ids), "mean_kld": s["mean_kld"],
            "same_top_pct": s["same_top_pct"]}


def main(torch_source: str, gguf: Path, tokens: int = 512):
    print(json.dumps(parity(torch_source, gguf, tokens)))


if __name__ == "__main__":
    typer.run(main)
