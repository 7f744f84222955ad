"""`slim-edge inspect`: what a GGUF holds and which runtime can load it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import SlimEdgeError
from ..formats import BY_ID
from .gguf_read import GGUFTable, LongArray, read_tensor_table, require_file
from .gguf_types import LEGACY_IDS

STOCK_MAX_ID = 42  # GGML_TYPE_COUNT = 43 in the pinned tree
PATCHED_MAX_ID = max(BY_ID)  # 46 (STQ1_0_64): GGML_TYPE_COUNT = 47 with runtime_patches/0010
OTHER_TYPES = {
    0: ("F32", 32.0),
    1: ("F16", 16.0),
    12: ("Q4_K", 4.5),
    14: ("Q6_K", 6.5625),
    10: ("Q2_K", 2.625),
    11: ("Q3_K", 3.4375),
    13: ("Q5_K", 5.5),
    3: ("Q4_1", 5.0),
    30: ("BF16", 16.0),
    24: ("I8", 8.0),
}


SHOWN_ITEMS = 16  # longer metadata arrays (the vocabulary, merges) are shown, and read, as their length


def _shown(value):
    """Metadata as inspect prints it: long arrays (the tokenizer's vocabulary, merges) by their length."""
    if isinstance(value, LongArray) or (isinstance(value, list) and len(value) >= SHOWN_ITEMS):
        return f"[{value.count if isinstance(value, LongArray) else len(value)} items]"
    return value


def printable(text) -> str:
    """`text` with control characters escaped: a file's strings must not drive the terminal."""
    s = str(text)
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def load_problems(table: GGUFTable) -> list[str]:
    """What makes llama.cpp's loader refuse a file that slim-edge's reader can still parse: duplicate tensor
    names, zero-size tensors, data offsets off the alignment, rows that are not whole blocks."""
    problems, seen = [], set()
    for t in table.tensors:
        name = printable(t.name)
        if t.name in seen:
            problems.append(f"tensor name {name!r} appears twice")
        seen.add(t.name)
        if t.n_elements == 0:
            problems.append(f"tensor {name!r} has a zero dimension (shape {list(t.shape)})")
        if t.offset % table.alignment:
            problems.append(
                f"tensor {name!r} starts at data offset {t.offset}, not a multiple of the alignment {table.alignment}"
            )
        fmt = BY_ID.get(t.type_id)
        if fmt is not None and t.shape and t.shape[0] % fmt.block_size:
            problems.append(
                f"tensor {name!r}: rows of {t.shape[0]} weights are not whole {fmt.name.upper()} "
                f"blocks of {fmt.block_size}"
            )
    return problems


def inspect_gguf(path: Path, runtime: str = "stock") -> dict:
    path = require_file(path)
    if runtime not in ("stock", "patched"):
        raise SlimEdgeError(f"--runtime {runtime!r}: choose stock or patched")
    table = read_tensor_table(path, metadata=True, array_limit=SHOWN_ITEMS)
    tensors, unknown, legacy = [], [], []
    total_bits = total_n = 0
    for t in table.tensors:
        fmt = BY_ID.get(t.type_id)
        name, bpw = (
            (fmt.name.upper(), fmt.bits_per_weight) if fmt else OTHER_TYPES.get(t.type_id, (f"type {t.type_id}", None))
        )
        is_legacy = (
            t.type_id in LEGACY_IDS
            and fmt is not None
            and t.n_elements > 0
            and abs(t.span * 8 / t.n_elements - fmt.bits_per_weight) > 0.5
        )
        if bpw is None:
            bpw = t.span * 8 / max(t.n_elements, 1)
        elif t.span * 8 < bpw * t.n_elements and not is_legacy:
            raise SlimEdgeError(
                f"{path}: tensor {printable(t.name)!r} ({name}, {t.n_elements} weights) needs "
                f"{math.ceil(bpw * t.n_elements / 8)} bytes of data, the file holds {t.span}; "
                f"the file is truncated (re-download or re-export it)"
            )
        known = t.type_id <= (STOCK_MAX_ID if runtime == "stock" else PATCHED_MAX_ID)
        if is_legacy:
            legacy.append(t.name)
        if not known:
            unknown.append(t.name)
        tensors.append(
            {
                "name": t.name,
                "shape": list(t.shape),
                "type": name,
                "type_id": t.type_id,
                "bpw": round(bpw, 4),
                "bytes": t.span,
            }
        )
        total_bits += bpw * t.n_elements
        total_n += t.n_elements
    meta = {k: _shown(v) for k, v in table.metadata.items()}
    needs = (
        "stock llama.cpp"
        if not any(x["type_id"] > STOCK_MAX_ID for x in tensors)
        else "slim-edge's patched llama.cpp (slim-edge runtime build)"
    )
    problems = load_problems(table)
    advice = [f"llama.cpp refuses it: {p}" for p in problems[:5]]
    if len(problems) > 5:
        advice.append(f"... and {len(problems) - 5} more such problems")
    if legacy:
        advice.append(
            f"{len(legacy)} tensors carry type 42 with STQ1_0's byte layout (an older AngelSlim file): "
            f"run `slim-edge gguf retag {path}`"
        )
    if unknown:
        advice.append(f"{len(unknown)} tensors use types the {runtime} runtime does not know; it needs {needs}")
    return {
        "file": str(path),
        "bytes": table.file_size,
        "tensors": tensors,
        "n_tensors": len(tensors),
        "bits_per_weight": total_bits / max(total_n, 1),
        "metadata": meta,
        "needs": needs,
        "runtime": runtime,
        "loads": not unknown and not legacy and not problems,
        "problems": problems,
        "advice": advice,
    }


def format_report(r: dict) -> str:
    counts: dict[str, int] = {}
    for t in r["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    lines = [
        f"{r['file']}: {r['bytes'] / 2**20:.1f} MiB, {r['n_tensors']} tensors, "
        f"{r['bits_per_weight']:.3f} bits per weight overall",
        "types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
        f"needs: {r['needs']}",
        f"loads in the {r['runtime']} runtime: {'yes' if r['loads'] else 'no'}",
    ]
    lines += [f"  ! {printable(a)}" for a in r["advice"]]
    lines.append("")
    lines.append(f"metadata ({len(r['metadata'])} keys; --json prints them whole):")
    for k, v in r["metadata"].items():
        v = printable(v)
        lines.append(f"  {printable(k)}: {v if len(v) <= 100 else v[:80] + f'... ({len(v)} chars)'}")
    lines.append("")
    lines.append(f"{'tensor':40} {'type':>8} {'bpw':>7}  shape")
    for t in r["tensors"]:
        lines.append(f"{printable(t['name']):40} {t['type']:>8} {t['bpw']:7.3f}  {t['shape']}")
    return "\n".join(lines)


def dumps(r: dict) -> str:
    return json.dumps(r, indent=1, default=str)


def linear_bpw(path) -> float:
    """Bits per weight over the 2-D tensors of the transformer blocks (the linear layers), weighted by size."""
    info = inspect_gguf(path, "patched")
    lin = [t for t in info["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2]
    n = sum(t["shape"][0] * t["shape"][1] for t in lin)
    return sum(t["bpw"] * t["shape"][0] * t["shape"][1] for t in lin) / max(n, 1)
