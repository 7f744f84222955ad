"""Runtime vs PyTorch parity on held-out tokens: mean KLD and same-top-1 %, with the runtime's roundings
added to the PyTorch side one at a time, so each gap has a name.

    python -m slim_edge.evals.parity CHECKPOINT_OR_HF_FOLDER FILE.gguf [--tokens 512] [--windows 1] [--json]

--windows N scores N consecutive windows of --tokens each (from an empty context each): same-top-1 on 512
tokens has a standard error of about 1 point, on 8 x 512 about 0.35.

The runtime side is the GGUF through llama-cpp-python bound to slim-edge's patched library (F16 KV
cache, no flash attention). The PyTorch side, cumulatively:

    weights     the checkpoint (`load_quantized`: the trained codes, FP embedding/head) or the FP model;
                a checkpoint trained with --act-quant / --runtime-attention rounds as the runtime does already
                (with both it is the act+kv+rope simulation, and the later variants apply it a second time)
    file        + every weight the GGUF holds, dequantized: the Q8_0 embedding/head of an export (its
                linears are bit-exact already), or every tensor of a baseline such as a Q8_0 file
    act         + each matmul's input rounded to its weight type's vec_dot_type (Q8_0 / Q8_K / F16)
    act+kv      + the F16 KV cache (K, V, Q and the attention probabilities rounded to half)
    act+kv+rope + ggml's rotary angles (float32 products p * s^i, not HF's p * inv_freq)

and a noise floor: the last variant against itself with every rounded input jittered by 1e-7
(relative), the size of float summation-order differences. Rounding activations to 8 bits is
discontinuous, so such differences flip a few codes per token and the flips compound over 30 layers:
a reference can reproduce the runtime's roundings, not which codes its float noise flips. Runtime vs
simulation at the floor means the runtime computes what the simulation models.

`--kv-cache f32` runs the runtime with an F32 KV cache (llama.cpp's -ctk f32 -ctv f32) instead of its default
F16 one. The variants that model the F16 cache then do not apply; what is left between the runtime and the
`weights`, `file` and `act` variants is the export, the 8-bit activations and ggml's rope angles.

See runtime_patches/runtime_sim.py for what the runtime does and where in ggml it does it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from slim_edge.corpora import get_text
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.backends import LlamaCppLM, TorchLM, kv_cache_type
from slim_edge.evals.kld import concat_stats, summarize, token_stats
from slim_edge.runtime_patches.runtime_sim import host_rounding, rope_supported, simulate

VARIANTS = ("weights", "file", "act", "act+kv", "act+kv+rope")
FLOOR_JITTER = 1e-7
FLOOR_SEEDS = (1, 2, 3)


def _row_orders(rows: int, config) -> list[np.ndarray]:
    """Identity, then convert_hf_to_gguf's llama rope permutations of q/k rows (by head count)."""
    from slim_edge.converters.gguf_export import _permutation

    out = [np.arange(rows)]
    for heads in (getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)):
        if heads and rows % (2 * heads) == 0:
            out.append(_permutation(rows, heads))
    return out


def _as_hf(values: torch.Tensor, current: torch.Tensor, config) -> torch.Tensor:
    """The GGUF tensor in the HF parameter's row order: the candidate order closest to the current weights."""
    if values.shape != current.shape:
        raise SlimEdgeError(
            f"GGUF tensor of shape {tuple(values.shape)} does not fit the model's "
            f"{tuple(current.shape)}; pass the checkpoint or model this file was exported from"
        )
    if values.dim() == 1:
        return values
    best, best_err = None, None
    for perm in _row_orders(values.shape[0], config):
        hf = torch.empty_like(values)
        hf[torch.from_numpy(perm)] = values
        err = float((hf - current).abs().max())
        if best_err is None or err < best_err:
            best, best_err = hf, err
    return best


def load_file_weights(model, gguf: Path) -> dict:
    """Set every parameter the GGUF holds to its dequantized tensor, in place. Returns the GGUF type id of
    each nn.Linear's weight (the head's included; a missing output.weight means token_embd, as in
    llama.cpp) and which parameters changed value."""
    import gguf as gguf_py

    from slim_edge.converters.gguf_read import read_tensor_table
    from slim_edge.converters.gguf_types import tensor_values

    table = read_tensor_table(gguf, metadata=True)
    arch_name = table.metadata.get("general.architecture")
    arch = next((k for k, v in gguf_py.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise SlimEdgeError(f"{gguf}: general.architecture {arch_name!r} is not an architecture gguf-py knows")
    config = model.config
    name_map = gguf_py.get_tensor_name_map(arch, config.num_hidden_layers)
    in_file = {t.name: t for t in table.tensors}

    def gguf_name(hf: str) -> str | None:
        g = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g == "output.weight" and g not in in_file:
            g = "token_embd.weight"  # tied head: llama.cpp multiplies by the token embedding
        return g if g in in_file else None

    params = dict(model.named_parameters())
    head = model.get_output_embeddings()
    if head is not None and not any(p is head.weight for p in params.values()):
        params["lm_head.weight"] = head.weight
    names = {hf: gguf_name(hf) for hf in params}
    missing = [hf for hf, g in names.items() if g is None]
    if missing:
        raise SlimEdgeError(
            f"{gguf} holds no tensor for {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; pass the checkpoint or model it was exported from"
        )
    changed = []
    with torch.no_grad():
        for hf, p in params.items():
            values = _as_hf(torch.from_numpy(np.array(tensor_values(gguf, names[hf], table))), p.detach(), config)
            if not torch.equal(values, p):
                changed.append(hf)
                p.copy_(values)
    types = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = gguf_name(name + ".weight")
            if g is not None:
                types[name] = in_file[g].type_id
    return {"types": types, "changed": changed, "n_params": len(params)}


def _load_torch(torch_source: str):
    from slim_edge.checkpoint import load_quantized
    from slim_edge.models import load_model

    if (Path(torch_source) / "quant_config.json").exists():
        return load_quantized(torch_source)
    model, tok, _ = load_model(torch_source)
    return model, tok


def parity(
    torch_source: str,
    gguf: Path,
    n_tokens: int = 512,
    threads: int = 2,
    variants: tuple[str, ...] = VARIANTS,
    rounding: str | None = None,
    floor: bool = True,
    windows: int = 1,
    kv_cache: str = "f16",
) -> dict:
    """Mean KLD and same-top-1 % of the runtime against each PyTorch variant, on `windows` consecutive
    windows of `n_tokens` of lee:eval (each evaluated from an empty context), and (`floor`) of the fullest
    simulation against itself with 1e-7 jitter (mean over FLOOR_SEEDS)."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SlimEdgeError(f"unknown parity variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    kv_cache_type(kv_cache)  # an unknown type fails here, before the slow part
    if kv_cache != "f16" and any("kv" in v for v in variants):
        raise SlimEdgeError(
            f"variants {', '.join(v for v in variants if 'kv' in v)} model the runtime's F16 KV "
            f"cache, which --kv-cache {kv_cache} turns off; ask for weights, file or act"
        )
    rounding = rounding or host_rounding()
    torch.set_num_threads(threads)
    model, tok = _load_torch(torch_source)
    lm = TorchLM(model, tok)
    text = lm.tokenize(get_text("lee", "eval").text)
    if windows < 1 or windows * n_tokens > len(text):
        raise SlimEdgeError(
            f"{windows} window(s) of {n_tokens} tokens do not fit lee:eval ({len(text)} tokens); "
            f"ask for at most {len(text) // n_tokens}"
        )
    chunks = [text[w * n_tokens : (w + 1) * n_tokens] for w in range(windows)]
    runtime = LlamaCppLM(gguf, n_ctx=n_tokens, n_threads=threads, kv_cache=kv_cache)
    theirs = [runtime.logits(ids) for ids in chunks]
    targets = [np.array(ids[1:] + [0]) for ids in chunks]

    def stats(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict:
        parts = [token_stats(a, b, t) for a, b, t in zip(ours, ref, targets)]
        s = summarize(concat_stats(parts))
        r = {k: s[k] for k in ("mean_kld", "mean_kld_err", "p99_kld", "same_top_pct")}
        if windows > 1:
            r["same_top_pct_per_window"] = [float(100 * p["same_top"].mean()) for p in parts]
        return r

    out = {
        "torch": str(torch_source),
        "gguf": str(gguf),
        "tokens": windows * n_tokens,
        "windows": windows,
        "rounding": rounding,
        "kv_cache": kv_cache,
        "variants": {},
    }
    if "act+kv+rope" in variants and not rope_supported(model.config):
        print("slim-edge parity: this model's rope is not plain rope; leaving out act+kv+rope", file=sys.stderr)
        variants = tuple(v for v in variants if v != "act+kv+rope")
    info, last = None, None
    for v in VARIANTS:
        if v == "file":
            info = load_file_weights(model, gguf)
            out["file_weights_changed"] = info["changed"]
            out["linear_types"] = sorted({t for t in info["types"].values()})
        if v not in variants:
            continue
        last = dict(activations=v.startswith("act"), kv_f16="kv" in v, rope="rope" in v)
        with simulate(model, info["types"] if info else {}, rounding=rounding, **last):
            ours = [lm.logits(ids) for ids in chunks]
        out["variants"][v] = s = stats(ours, theirs)
        print(
            f"slim-edge parity: {v:12s} KLD {s['mean_kld']:.5f}  same top-1 {s['same_top_pct']:.2f} %",
            file=sys.stderr,
            flush=True,
        )
    if floor and last is not None and last["activations"]:
        runs = []
        for seed in FLOOR_SEEDS:
            with simulate(model, info["types"], rounding=rounding, jitter=FLOOR_JITTER, seed=seed, **last):
                runs.append(stats(ours, [lm.logits(ids) for ids in chunks]))
        out["floor"] = s = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if not k.endswith("_per_window")}
        s.update(
            jitter=FLOOR_JITTER,
            of=next(reversed(out["variants"])),
            runs=runs,
            same_top_range=[min(r["same_top_pct"] for r in runs), max(r["same_top_pct"] for r in runs)],
        )
        print(
            f"slim-edge parity: floor        KLD {s['mean_kld']:.5f}  same top-1 {s['same_top_pct']:.2f} % "
            f"({s['of']} vs itself, inputs jittered by {FLOOR_JITTER:g}, mean of {len(runs)})",
            file=sys.stderr,
            flush=True,
        )
    return out


def format_table(r: dict) -> str:
    lines = [
        f"{r['torch']} vs {r['gguf']} ({r['tokens']} tokens of lee:eval, Q8_0 rounding {r['rounding']}, "
        f"{r.get('kv_cache', 'f16').upper()} KV cache)",
        "",
        "| PyTorch side | mean KLD | same top-1 % |",
        "|---|---:|---:|",
    ]
    for v, s in r["variants"].items():
        lines.append(f"| {v} | {s['mean_kld']:.5f} ± {s['mean_kld_err']:.5f} | {s['same_top_pct']:.2f} |")
    if "floor" in r:
        s = r["floor"]
        lo, hi = s["same_top_range"]
        lines.append(
            f"| noise floor ({s['of']} vs itself, {s['jitter']:g} jitter, mean of {len(s['runs'])}) | "
            f"{s['mean_kld']:.5f} ± {s['mean_kld_err']:.5f} | {s['same_top_pct']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(lines)


def main(
    torch_source: Annotated[str, typer.Argument(help="slim-edge checkpoint, HF folder or 'smollm2-135m'")],
    gguf: Annotated[Path, typer.Argument(help="the GGUF exported from it")],
    tokens: Annotated[int, typer.Option(help="held-out tokens of lee:eval per window")] = 512,
    windows: Annotated[int, typer.Option(help="consecutive windows of --tokens to score")] = 1,
    threads: Annotated[int, typer.Option(help="threads for both sides")] = 2,
    variants: Annotated[str, typer.Option(help=f"comma-separated, of {', '.join(VARIANTS)}")] = ",".join(VARIANTS),
    rounding: Annotated[
        str | None, typer.Option(help="Q8_0 activation rounding: x86 | arm | ref (default: this machine's)")
    ] = None,
    floor: Annotated[bool, typer.Option(help="also measure the simulation's noise floor")] = True,
    kv_cache: Annotated[str, typer.Option(help="the runtime's KV cache type: f16 (llama.cpp's default) | f32")] = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of the table")] = False,
):
    """Where the runtime and PyTorch part: KLD and same-top-1 % per PyTorch variant (see the module doc)."""
    try:
        r = parity(
            torch_source,
            gguf,
            tokens,
            threads,
            tuple(v for v in variants.split(",") if v),
            rounding,
            floor,
            windows,
            kv_cache,
        )
    except SlimEdgeError as e:
        print(f"slim-edge: error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    print(json.dumps(r, indent=1) if as_json else format_table(r))


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: typer.run(main))
