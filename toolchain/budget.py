"""`quantize --bits B`: a bit budget over the quantized linears, spent on Q4_0 where it buys the most.

Sensitivity is measured, not guessed: each planned linear alone takes the weights its plan gives it at PTQ
(the QuantLinear that quantize_ would build) while every other tensor stays float, and the mean
KL(teacher || that model) per token over a few windows of the training text is its cost. Promoting a tensor
to Q4_0 is assumed to buy all of it back (Q4_0's error is about 1/16 of a 2-bit grid's), for
rows * in * (4.5 - bpw) extra bits. The choice is greedy by KL per extra bit, skipping what no longer fits:
afterwards every tensor left out costs more than the bits that remain, so the plan is under B by less
than one tensor's promotion.

Bits are counted exactly, in whole blocks (rows * row_bytes * 8), over every entry of the plan (what
plan_summary reports); the budget is floor(B * weights).

Speed (SmolLM2-135M: 210 tensors): one batched forward per tensor on the teacher itself, one tensor swapped
in at a time; the decoder layers before the swapped one replay their recorded outputs instead of running.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from .errors import SlimEdgeError
from .formats import get_format
from .fsutil import cache_dir
from .qlinear import QuantLinear
from .quantize import MAX_BITS, PROMOTED, PlanEntry, QuantConfig, make_plan
from .schemes import get_scheme
from .train import decoder_layers

SENS_SEQS, SENS_LEN = 4, 128  # calibration windows of the training text per measurement
SENSITIVITY_VERSION = 1  # of the cached tables: bump when the measurement changes


def entry_bits(e: PlanEntry, fmt: str | None = None) -> int:
    """Bits a plan entry occupies in the file (whole blocks), in its own format or in `fmt`."""
    rows, k = e.shape
    return rows * get_format(fmt or e.format).row_bytes(k) * 8


def plan_bits(plan: list[PlanEntry]) -> tuple[int, int]:
    """(bits, weights) of a plan."""
    return sum(entry_bits(e) for e in plan), sum(e.shape[0] * e.shape[1] for e in plan)


def check_bits(plan: list[PlanEntry], bits: float, scheme: str) -> None:
    """B must lie in [the plan's own bits per weight, 4.5]; checked before anything is measured."""
    have, n = plan_bits(plan)
    low = have / n
    if not low - 1e-9 <= bits <= MAX_BITS:
        raise SlimEdgeError(
            f"--bits {bits}: {scheme} itself takes {low:.4f} bits per weight on this model's linears "
            f"and all-{PROMOTED} {MAX_BITS}; choose --bits between {math.ceil(low * 1e4) / 1e4} "
            f"and {MAX_BITS}, or leave it out"
        )


def promotable(e: PlanEntry) -> bool:
    return e.mode != "keep" and e.format != PROMOTED and e.shape[1] % get_format(PROMOTED).block_size == 0


def choose(table: list[dict], plan: list[PlanEntry], bits: float) -> dict[str, tuple[str, str]]:
    """make_plan overrides {name: ("q4_0", reason)}: greedy by KL per extra bit within floor(bits * weights).

    `table` rows need "name" and "kl"; ties go to the earlier tensor of the plan."""
    have, n = plan_bits(plan)
    left = math.floor(bits * n) - have
    kl = {r["name"]: r["kl"] for r in table}
    order = {e.name: i for i, e in enumerate(plan)}
    cand = [(e, entry_bits(e, PROMOTED) - entry_bits(e)) for e in plan if promotable(e) and e.name in kl]
    cand.sort(key=lambda c: (-kl[c[0].name] / c[1], order[c[0].name]))
    out = {}
    for e, cost in cand:
        if cost <= left and kl[e.name] > 0:
            out[e.name] = (PROMOTED, f"sensitive: KL +{kl[e.name]:.3g}")
            left -= cost
    return out


def calibration_windows(ids: torch.Tensor, n_seqs: int = SENS_SEQS, seq_len: int = SENS_LEN) -> torch.Tensor:
    """n_seqs windows of seq_len tokens spread evenly over the text: [n_seqs, seq_len]."""
    seq_len = min(seq_len, len(ids))
    starts = np.linspace(0, len(ids) - seq_len, n_seqs).astype(int)
    return torch.stack([ids[s : s + seq_len] for s in starts])


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns what the layer returned in the teacher's pass."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def _layer_of(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Decoder layer index of each module name (-1 outside the layers, or without model.layers)."""
    try:
        layers = decoder_layers(model)
    except SlimEdgeError:
        return {n: -1 for n in names}
    index = {id(m): i for i, m in enumerate(layers)}
    prefixes = {n + ".": index[id(m)] for n, m in model.named_modules() if id(m) in index}
    return {n: next((i for p, i in prefixes.items() if n.startswith(p)), -1) for n in names}


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    plan: list[PlanEntry],
    ids: torch.Tensor,
    config: QuantConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
    n_seqs: int = SENS_SEQS,
    seq_len: int = SENS_LEN,
) -> list[dict]:
    """One row per promotable entry: the mean KL(teacher || teacher with only this tensor at PTQ) per token.

    `model` (the float teacher) is used in place and restored."""
    from tqdm.auto import tqdm

    scheme = get_scheme(config.scheme)
    x = calibration_windows(ids, n_seqs, seq_len).to(device)
    entries = [e for e in plan if promotable(e)]
    layer_of = _layer_of(model, [e.name for e in entries])
    layers = decoder_layers(model) if any(i >= 0 for i in layer_of.values()) else []
    outs = [None] * len(layers)
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: outs.__setitem__(i, out)) for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        logp_t = torch.log_softmax(model(x, use_cache=False).logits.float(), dim=-1)
    finally:
        for h in hooks:
            h.remove()
    p_t = logp_t.exp()
    rows = []
    bar = tqdm(entries, disable=not progress, unit="tensor", file=sys.stderr, dynamic_ncols=True, desc="sensitivity")
    try:
        for e in bar:
            parent_name, _, child = e.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            q = (
                QuantLinear(linear, e.format, e.mode, tequila_lambda=config.tequila_lambda if scheme.tequila else 0.0)
                .to(device)
                .eval()
            )
            first = layer_of[e.name]
            saved = [layers[j] for j in range(max(first, 0))]
            setattr(parent, child, q)
            for j in range(len(saved)):
                layers[j] = _Replay(outs[j])
            try:
                logp_s = torch.log_softmax(model(x, use_cache=False).logits.float(), dim=-1)
            finally:
                setattr(parent, child, linear)
                for j, layer in enumerate(saved):
                    layers[j] = layer
            kl = float((p_t * (logp_t - logp_s)).sum(-1).mean())
            rows.append(
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "format": e.format,
                    "bpw": round(e.bits_per_weight, 4),
                    "kl": kl,
                    "extra_bits": entry_bits(e, PROMOTED) - entry_bits(e),
                }
            )
            bar.set_postfix(kl=f"{kl:.3g}")
    finally:
        bar.close()
        model.train(was_training)
    return rows


def budget_plan(
    model: nn.Module, config: QuantConfig, ids: torch.Tensor, *, device: str = "cpu", progress: bool = True
) -> tuple[list[PlanEntry], dict]:
    """The plan for config.bits: measure every linear's sensitivity on `model` (the float teacher) over
    windows of `ids` (the training text), promote greedily. Returns (plan, report) where the report holds
    the sensitivity table (every promotable tensor, most sensitive first) and the bits reached."""
    base = make_plan(model, config)
    check_bits(base, config.bits, config.scheme)
    t0 = time.perf_counter()
    cache = cache_dir("sensitivity", f"{_key(model, base, ids, config)}.json")
    if cache.is_file():
        table = json.loads(cache.read_text())
        print(f"slim-edge: sensitivity of {len(table)} tensors from {cache}", file=sys.stderr)
    else:
        table = measure_sensitivity(model, base, ids, config, device=device, progress=progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, cache)
    overrides = choose(table, base, config.bits)
    plan = make_plan(model, config, overrides)
    for r in table:
        r["kl_per_mbit"] = r["kl"] / r["extra_bits"] * 1e6
        r["promoted"] = r["name"] in overrides
    table.sort(key=lambda r: -r["kl"])
    have, n = plan_bits(plan)
    report = {
        "bits": config.bits,
        "bits_per_weight": have / n,
        "base_bits_per_weight": plan_bits(base)[0] / n,
        "promoted": len(overrides),
        "promoted_to": PROMOTED,
        "sequences": SENS_SEQS,
        "seq_len": SENS_LEN,
        "seconds": round(time.perf_counter() - t0, 1),
        "sensitivity": table,
    }
    return plan, report


def _key(model: nn.Module, plan: list[PlanEntry], ids: torch.Tensor, config: QuantConfig) -> str:
    """What a sensitivity table depends on: the planned weights, their formats, the windows, the scheme."""
    h = hashlib.sha256(
        json.dumps(
            [
                SENSITIVITY_VERSION,
                SENS_SEQS,
                SENS_LEN,
                config.scheme,
                config.tequila_lambda,
                [(e.name, e.format, e.mode) for e in plan],
            ]
        ).encode()
    )
    h.update(calibration_windows(ids).numpy().tobytes())
    for e in plan:
        h.update(model.get_submodule(e.name).weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def format_sensitivity(report: dict, top: int = 12) -> str:
    """The most sensitive tensors and what the budget did."""
    lines = [f"{'tensor':42} {'format':>7} {'KL':>9} {'KL/Mbit':>9}  promoted"]
    for r in report["sensitivity"][:top]:
        lines.append(
            f"{r['name']:42} {r['format']:>7} {r['kl']:9.4g} {r['kl_per_mbit']:9.4g}  {'yes' if r['promoted'] else ''}"
        )
    lines.append(
        f"--bits {report['bits']}: {report['promoted']} of {len(report['sensitivity'])} tensors in "
        f"{report['promoted_to']}, {report['base_bits_per_weight']:.4f} -> {report['bits_per_weight']:.4f} "
        f"bits per weight ({report['seconds']:.0f} s to measure)"
    )
    return "\n".join(lines)


def overrides_of(plan_json: list[dict]) -> dict[str, tuple[str, str]]:
    """make_plan overrides that reproduce a saved plan (a checkpoint's): every entry's format and reason."""
    return {e["name"]: (e["format"], e.get("reason", "")) for e in plan_json}
