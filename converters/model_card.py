"""The model card (README.md) written beside an exported GGUF."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import SlimEdgeError


def write_card(gguf: Path, summary: dict, source: str, force: bool = False, extra: str = "") -> Path:
    gguf = Path(gguf)
    card = gguf.parent / "README.md"
    if card.exists() and not force:
        card = gguf.with_suffix(".README.md")
        if card.exists() and not force:
            raise SlimEdgeError(f"{card} exists; pass --force to replace it")
    needs = summary.get("needs_patched_runtime")
    bpw = summary.get("linear_bits_per_weight")
    lines = [
        f"# {gguf.name}", "",
        f"Made by slim-edge from `{source}`" + (f", scheme `{summary['scheme']}`." if summary.get("scheme") else "."),
        "",
        f"- size: {summary['bytes'] / 2**20:.1f} MiB",
        f"- bits per weight in the quantized linear layers: {bpw:.3f}" if bpw else f"- type: {summary.get('type')}",
        f"- runtime: {'slim-edge patched llama.cpp (custom types: ' + ', '.join(summary.get('custom_types', [])) + ')' if needs else 'stock llama.cpp / llama-cpp-python 0.3.36'}",
        *( ["- trained through the runtime's attention: keep llama.cpp's default F16 KV cache and leave flash "
            "attention off (no `-ctk`/`-ctv`/`-fa`); other settings change what it computes"]
           if (summary.get("trained_for") or {}).get("runtime_attention") else []),
        "", "## Run it", "",
        "```",
        *( ["slim-edge runtime build            # once: the patched llama.cpp",
            f"$(slim-edge runtime where --tool llama-completion) -m {gguf.name} -p 'Hello' -n 64"] if needs else
           [f"llama-completion -m {gguf.name} -p 'Hello' -n 64"]),
        f"slim-edge eval {gguf.name} --reference smollm2-135m    # perplexity and KL divergence against FP",
        "```", "", extra,
    ]
    tmp = card.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, card)
    return card
