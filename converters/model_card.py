"""The model card (README.md) written beside an exported GGUF."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlimEdgeError
from ..fsutil import atomic_write, check_output_file, path_kind

MARK = "Made by slim-edge from"  # the line that tells a card slim-edge wrote from anyone's README.md


def _card_of(card: Path, gguf: Path) -> bool:
    """`card` is the card slim-edge wrote for this very GGUF file name."""
    try:
        head = card.read_text(encoding="utf-8", errors="replace")[:4000].splitlines()
    except OSError:
        return False
    return len(head) > 2 and head[0] == f"# {gguf.name}" and head[2].startswith(MARK)


def card_path(gguf: Path, force: bool = False) -> Path:
    """Where the card of `gguf` goes: the folder's README.md when it is free (or, with --force, slim-edge's
    card of this same file), else <name>.README.md. A README.md slim-edge did not write is never replaced;
    call this before exporting, so that a refusal comes before the work."""
    gguf = Path(gguf)
    path_kind(gguf, "--gguf")  # a path too long to look up is one line, before the README look-ups
    readme = gguf.parent / "README.md"
    if not readme.exists() and not readme.is_symlink():
        return readme
    if force and readme.is_file() and not readme.is_symlink() and _card_of(readme, gguf):
        return readme
    card = gguf.with_name(gguf.stem + ".README.md")
    check_output_file(card, force, "model card")
    if card.exists() and not _card_of(card, gguf):
        raise SlimEdgeError(
            f"{card} exists and is not slim-edge's card of {gguf.name}; it is left alone: "
            f"move it away or export to another folder"
        )
    return card


def write_card(
    gguf: Path, summary: dict, source: str, force: bool = False, extra: str = "", card: Path | None = None
) -> Path:
    gguf = Path(gguf)
    card = card or card_path(gguf, force)
    needs = summary.get("needs_patched_runtime")
    bpw = summary.get("linear_bits_per_weight")
    lines = [
        f"# {gguf.name}",
        "",
        f"Made by slim-edge from `{source}`" + (f", scheme `{summary['scheme']}`." if summary.get("scheme") else "."),
        "",
        f"- size: {summary['bytes'] / 2**20:.1f} MiB",
        f"- bits per weight in the quantized linear layers: {bpw:.3f}" if bpw else f"- type: {summary.get('type')}",
        "- runtime: "
        + (
            f"slim-edge patched llama.cpp (custom types: {', '.join(summary.get('custom_types', []))})"
            if needs
            else "stock llama.cpp / llama-cpp-python 0.3.36"
        ),
        *(
            [
                "- trained through the runtime's attention: keep llama.cpp's default F16 KV cache and leave flash "
                "attention off (no `-ctk`/`-ctv`/`-fa`); other settings change what it computes"
            ]
            if (summary.get("trained_for") or {}).get("runtime_attention")
            else []
        ),
        "",
        "## Run it",
        "",
        "```",
        *(
            [
                "slim-edge runtime build            # once: the patched llama.cpp",
                f"$(slim-edge runtime where --tool llama-completion) -m {gguf.name} -p 'Hello' -n 64",
            ]
            if needs
            else [f"llama-completion -m {gguf.name} -p 'Hello' -n 64"]
        ),
        f"slim-edge eval {gguf.name} --reference smollm2-135m    # perplexity and KL divergence against FP",
        "```",
        "",
        extra,
    ]
    atomic_write(card, "\n".join(lines) + "\n")
    return card
