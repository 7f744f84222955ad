"""`slim-edge eval`: perplexity, KL divergence against a reference, and a generation check, for GGUF
files (through the runtime) and checkpoints (through PyTorch), on the same tokens.

All models see the same token ids: the text is tokenized once, by the reference's tokenizer (else the
first model's), and cut into chunks as llama-perplexity does (see perplexity.py). Models are loaded
together and every chunk is run through each of them, so only one chunk of logits per model is held.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from slim_edge import corpora
from slim_edge.checkpoint import refuse_damaged_checkpoint
from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.inspect import inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.backends import LlamaCppLM, OnnxLM, TorchLM
from slim_edge.evals.generation import generation_check
from slim_edge.evals.kld import concat_stats, summarize, token_stats
from slim_edge.evals.perplexity import chunk_nll, make_chunks, ppl_from_nll, scored_logits
from slim_edge.fsutil import atomic_write, check_output_file, path_kind
from slim_edge.memory import check_model_config, tokenize_in_pieces
from slim_edge.models import resolve

# the loop check needs a few hundred tokens; the runtime's context (and its KV cache) grows with this
MAX_GEN_TOKENS = 4096


def _is_gguf_file(path: Path) -> bool:
    """True for an existing GGUF file, False for a path that is not a file; any other file is refused."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SlimEdgeError(
            f"{path} is not a GGUF file (starts with {magic!r}); pass a .gguf file, a "
            f"checkpoint folder or an HF model folder"
        )
    return True


def _onnx_folder(path: Path) -> Path | None:
    """The export folder of an ONNX model (a model.onnx file or a `slim-edge export --onnx` folder), else None."""
    from slim_edge.converters.onnx_export import is_onnx_export

    if path.suffix == ".onnx":
        if not path.is_file():
            raise SlimEdgeError(f"ONNX file {path} does not exist; export one with slim-edge export --onnx")
        return path.parent
    return path if path.is_dir() and is_onnx_export(path) else None


def preflight(spec: str) -> int | None:
    """Check a model before anything is loaded; returns its training context (None where unknown).

    A GGUF goes through slim-edge's own reader first, so a truncated, legacy or damaged file is told as
    such rather than as the runtime's generic load failure; a folder's config.json is checked against RAM."""
    path = Path(spec).expanduser()
    if _is_gguf_file(path):
        info = inspect_gguf(path, "patched")
        if not info["loads"]:
            raise SlimEdgeError(f"{path} cannot be loaded: " + "; ".join(info["advice"]))
        meta = read_tensor_table(path, metadata=True, array_limit=16).metadata
        n = meta.get(f"{meta.get('general.architecture')}.context_length")
        return n if isinstance(n, int) else None
    if path.suffix == ".gguf":
        kind = path_kind(path, "")
        raise SlimEdgeError(
            f"GGUF file {path} does not exist; export one with slim-edge export"
            if kind is None
            else f"{path} is {kind}, not a GGUF file; pass a regular .gguf file"
        )
    onnx_dir = _onnx_folder(path)
    if onnx_dir is not None:
        genai = onnx_dir / "genai_config.json"
        n = json.loads(genai.read_text())["model"].get("context_length") if genai.is_file() else None
        return n if isinstance(n, int) else None
    folder = refuse_damaged_checkpoint(resolve(spec))
    check_model_config(folder)
    n = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    return n if isinstance(n, int) else None


def load_lm(spec: str, ctx: int = 512, threads: int = 2):
    """A GGUF file (runtime), an ONNX export (onnxruntime), a slim-edge checkpoint folder, an HF folder or an
    embedded model name."""
    path = Path(spec).expanduser()
    if _is_gguf_file(path):
        return LlamaCppLM(path, n_ctx=ctx, n_threads=threads)
    if _onnx_folder(path) is not None:
        return OnnxLM(path, n_threads=threads)
    if path.suffix == ".gguf":
        raise SlimEdgeError(f"GGUF file {path} does not exist; export one with slim-edge export")
    import torch

    torch.set_num_threads(threads)
    if (path / "quant_config.json").is_file():
        from slim_edge import load_quantized

        model, tok = load_quantized(path)
        return TorchLM(model, tok, name=path.name)
    from slim_edge.models import load_model

    model, tok, _ = load_model(spec)
    return TorchLM(model, tok, name=spec if not path.exists() else path.name)


def evaluate(
    models: list[str],
    reference: str | None = None,
    corpus: str = "lee",
    split: str = "eval",
    ctx: int = 512,
    max_chunks: int | None = None,
    gen_tokens: int = 64,
    threads: int = 2,
    train_text: str | None = None,
    progress: bool = True,
) -> dict:
    """PPL of each model (and of the reference), and with a reference its KLD, ΔPPL and same-top-1 %,
    on `split` of `corpus`; plus a greedy generation check of `gen_tokens` tokens (0 = skip).

    `train_text` (the corpus or file a model was trained on) is checked to share no text with the
    evaluation text. Returns a JSON-ready dict.
    """
    if not models and reference is None:
        raise SlimEdgeError("nothing to evaluate: pass at least one MODEL")
    if threads < 1:
        raise SlimEdgeError(f"--threads {threads}: need at least 1 CPU thread")
    if not 0 <= gen_tokens <= MAX_GEN_TOKENS:
        raise SlimEdgeError(
            f"--gen-tokens {gen_tokens}: give 0 (skip) to {MAX_GEN_TOKENS}; the loop check needs a few hundred at most"
        )
    if ctx < 4 or ctx % 2:
        raise SlimEdgeError(f"--ctx {ctx} is not usable; pass an even context of at least 4, e.g. 512")
    if max_chunks is not None and max_chunks < 1:
        raise SlimEdgeError(f"--chunks {max_chunks}: evaluate at least 1 chunk")
    specs = ([reference] if reference is not None else []) + list(models)
    need = max(ctx, gen_tokens + 64)  # the runtime's context must also hold a prompt and its generated tokens
    for spec in specs:
        n_ctx = preflight(spec)
        if n_ctx is not None and need > n_ctx:
            raise SlimEdgeError(
                f"--ctx {ctx} with --gen-tokens {gen_tokens} needs a context of {need} tokens; "
                f"{spec} was trained for {n_ctx}: lower --ctx (or --gen-tokens)"
            )
    text = corpora.get_text(corpus, split)
    if train_text is not None:
        train = corpora.get_text(train_text, "train")
        corpora.check_disjoint(train, text)
    lms = [load_lm(s, need, threads) for s in specs]
    ref = lms[0] if reference is not None else None
    tokenizer_lm = lms[0]
    for lm, spec in zip(lms[1:], specs[1:]):
        if lm.n_vocab != tokenizer_lm.n_vocab:
            raise SlimEdgeError(
                f"{spec} has a vocabulary of {lm.n_vocab} tokens, {specs[0]} of "
                f"{tokenizer_lm.n_vocab}: models compared on the same tokens need the same tokenizer"
            )
    ids = tokenize_in_pieces(tokenizer_lm.tokenize, text.text)
    _check_tokenizers(lms, tokenizer_lm, text.text)
    used = ids if max_chunks is None else ids[: max(max_chunks, 2) * ctx]  # make_chunks copies what it gets
    chunks = make_chunks(used, ctx, max_chunks, tokenizer_lm.add_bos, tokenizer_lm.bos_id)
    n_text_tokens = len(ids) + int(bool(tokenizer_lm.add_bos))

    nll = [[] for _ in lms]
    stats = [[] for _ in lms]
    from tqdm.auto import tqdm

    for i in tqdm(range(chunks.n_chunk), desc="eval", unit="chunk", disable=not progress, file=sys.stderr):
        base = None
        for j, lm in enumerate(lms):
            logits = scored_logits(lm, chunks.tokens[i], chunks.first)
            nll[j].append(chunk_nll(logits, chunks.targets[i]))
            if ref is not None:
                if j == 0:
                    base = logits
                else:
                    stats[j].append(token_stats(base, logits, chunks.targets[i]))
            del logits

    rows = []
    for j, (lm, spec) in enumerate(zip(lms, specs)):
        ppl, err = ppl_from_nll(np.concatenate(nll[j]))
        row = {
            "model": spec,
            "name": lm.name,
            "backend": lm.kind,
            "is_reference": ref is not None and j == 0,
            "ppl": ppl,
            "ppl_err": err,
        }
        if stats[j]:
            s = summarize(concat_stats(stats[j]))
            row.update({k: v for k, v in s.items() if k not in ("tokens", "ppl", "ppl_err")})
        if gen_tokens > 0:
            g = generation_check(lm, gen_tokens, progress=progress)
            row["repeat_rate"] = g["repeat_rate"]
            row["loops"] = g["loops"]
            row["generation"] = g
        rows.append(row)
    return {
        "corpus": text.name,
        "split": text.split,
        "provenance": text.provenance,
        "corpus_sha256": text.sha256,
        "ctx": ctx,
        "chunks": chunks.n_chunk,
        "text_tokens": n_text_tokens,
        "scored_tokens": chunks.n_scored,
        "tokenized_by": specs[0],
        "add_bos": chunks.add_bos,
        "reference": reference,
        "models": rows,
    }


def _check_tokenizers(lms, tokenizer_lm, text: str, probe_chars: int = 4000) -> None:
    """Warn when a model's own tokenizer splits the text differently from the one used for all."""
    probe = text[:probe_chars]
    want = tokenizer_lm.tokenize(probe)
    for lm in lms:
        if lm is not tokenizer_lm and lm.tokenize(probe) != want:
            print(
                f"slim-edge: note: {lm.name}'s own tokenizer splits the text differently from "
                f"{tokenizer_lm.name}'s; all models are scored on {tokenizer_lm.name}'s tokens",
                file=sys.stderr,
            )


def format_table(result: dict) -> str:
    """llama-perplexity-style summary, one row per model."""
    head = (
        f"corpus {result['provenance']}\n"
        f"{result['text_tokens']} tokens (by {result['tokenized_by']}'s tokenizer), {result['chunks']} chunks of "
        f"{result['ctx']}, {result['scored_tokens']} scored tokens (second half of each chunk)\n"
    )
    has_kld = any("mean_kld" in r for r in result["models"])
    has_gen = any("repeat_rate" in r for r in result["models"])
    cols = ["model", "backend", "PPL", "± err"]
    if has_kld:
        cols += ["ΔPPL", "± err", "mean KLD", "median KLD", "p99 KLD", "same top-1 %"]
    if has_gen:
        cols += ["repeat-4 %", "loops"]
    table = [cols]
    for r in result["models"]:
        name = r["name"] + (" (reference)" if r["is_reference"] else "")
        row = [name, r["backend"], f"{r['ppl']:.4f}", f"{r['ppl_err']:.4f}"]
        if has_kld:
            if "mean_kld" in r:
                row += [
                    f"{r['delta_ppl']:+.4f}",
                    f"{r['delta_ppl_err']:.4f}",
                    f"{r['mean_kld']:.6f}",
                    f"{r['median_kld']:.6f}",
                    f"{r['p99_kld']:.6f}",
                    f"{r['same_top_pct']:.3f}",
                ]
            else:
                row += ["—"] * 6
        if has_gen:
            row += (
                [f"{100 * r['repeat_rate']:.1f}", f"{r['loops']}/{len(r['generation']['continuations'])}"]
                if "repeat_rate" in r
                else ["—", "—"]
            )
        table.append(row)
    widths = [max(len(t[c]) for t in table) for c in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(t, widths))) for t in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return head + "\n".join(lines)


def check_results_file(path: Path, specs: list[str], force: bool, option: str = "-o") -> None:
    """Refuse the results file before the evaluation, not after it: an existing file without `force`, or one
    of the models themselves."""
    check_output_file(path, force, option)
    if any(Path(m).exists() and Path(m).resolve() == Path(path).resolve() for m in specs):
        raise SlimEdgeError(f"{option} {path} is one of the models; choose another file for the results")


def write_results(result: dict, path: Path) -> None:
    """`evaluate`'s result as JSON, written atomically."""
    atomic_write(path, json.dumps(result, indent=1) + "\n")
