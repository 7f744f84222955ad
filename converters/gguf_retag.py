"""`slim-edge gguf retag`: rewrite the type id of tensors written by older AngelSlim exporters.

Their first 1.25-bit files store STQ1_0 as type 42, an id upstream later gave to Q2_0, so loaders
read the blocks with the wrong layout ("invalid ggml type" or garbage). The two layouts differ in
bytes per weight (STQ1_0: 42 bytes per 256 weights, Q2_0: 18 per 64), so each tensor's data span
says which one it holds. Only the u32 type fields of the STQ1_0 tensors change (see gguf_read for
where they sit); every other byte stays as it is.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimEdgeError
from ..formats import BY_ID
from ..fsutil import atomic_path, check_output_file
from .gguf_read import TensorEntry, read_tensor_table, require_file
from .inspect import load_problems


def _fits(t: TensorEntry, fmt, alignment: int) -> bool:
    """The tensor's data span is this format's size, up to the alignment padding."""
    if fmt is None or not t.shape or t.shape[0] % fmt.block_size:
        return False
    nbytes = t.n_elements // fmt.block_size * fmt.type_size
    return nbytes <= t.span < nbytes + alignment


@dataclass
class RetagPlan:
    path: Path
    from_id: int
    to_id: int
    retag: list[TensorEntry]
    keep: list[TensorEntry]  # carry from_id and have its layout: genuine, left alone

    def to_json(self) -> dict:
        return {
            "input": str(self.path),
            "from": self.from_id,
            "to": self.to_id,
            "retagged": [t.name for t in self.retag],
            "kept": [t.name for t in self.keep],
        }


def plan_retag(path: Path, from_id: int = 42, to_id: int = 43) -> RetagPlan:
    """Which tensors typed `from_id` are really `to_id`, told apart by bytes per element."""
    new, old = BY_ID.get(to_id), BY_ID.get(from_id)
    if new is None:
        raise SlimEdgeError(
            f"--to {to_id}: no known format has GGUF type id {to_id}, so its byte layout "
            f"cannot be checked; known ids: {sorted(_known_ids())}"
        )
    if from_id == to_id:
        raise SlimEdgeError(f"--from and --to are both {from_id}; nothing to retag")
    table = read_tensor_table(path)
    problems = load_problems(table)
    if problems:
        raise SlimEdgeError(
            f"{path}: {problems[0]}"
            + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
            + "; the file is damaged beyond a type id: nothing written, re-export it"
        )
    retag, keep = [], []
    for t in table.tensors:
        if t.type_id != from_id:
            continue
        is_new, is_old = _fits(t, new, table.alignment), _fits(t, old, table.alignment)
        if is_new and not is_old:
            retag.append(t)
        elif is_old and not is_new:
            keep.append(t)
        else:
            old_desc = f"{old.name} ({old.type_size} B / {old.block_size})" if old else f"type {from_id}"
            raise SlimEdgeError(
                f"{path}: tensor {t.name!r} (shape {list(t.shape)}, type {from_id}) spans {t.span} bytes, "
                f"which {'fits both' if is_new else 'fits neither'} {new.name} "
                f"({new.type_size} B / {new.block_size}) and {old_desc}; the file is not an AngelSlim "
                f"{new.name} export, left unchanged"
            )
    return RetagPlan(Path(path), from_id, to_id, retag, keep)


def _known_ids():
    return BY_ID.keys()


def retag(
    path: Path,
    out: Path | None = None,
    *,
    from_id: int = 42,
    to_id: int = 43,
    force: bool = False,
    in_place: bool = False,
    dry_run: bool = False,
) -> tuple[RetagPlan, Path | None]:
    """Rewrite the type field of every tensor `plan_retag` picks; nothing else changes, byte for byte.

    Writes a copy next to the output, patches it, fsyncs and renames it over the output (fsutil.atomic_path),
    so a crash never leaves a half-written file. A file llama.cpp would refuse for another reason (see
    inspect.load_problems) is not "fixed". Returns (plan, output path or None when nothing was written).
    """
    path = require_file(path)
    if in_place and out is not None and Path(out).resolve() != path.resolve():
        raise SlimEdgeError(f"--in-place and -o {out} disagree; give one of them")
    if in_place:
        out = path.resolve()  # through a symlink: the file it points to is rewritten, the link stays
    elif out is None:
        out = path.with_name(path.stem + "-retag" + path.suffix)
    out = Path(out)
    if not in_place and out.resolve() == path.resolve():
        raise SlimEdgeError(f"-o {out} is the input file; use --in-place to rewrite it")
    plan = plan_retag(path, from_id, to_id)
    if dry_run or not plan.retag:
        return plan, None
    if not in_place:
        check_output_file(out, force)
    with atomic_path(out) as tmp:
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        with open(tmp, "r+b") as f:
            for t in plan.retag:
                f.seek(t.type_pos)
                if struct.unpack("<I", f.read(4))[0] != from_id:
                    raise SlimEdgeError(f"{path} changed while retagging (type of {t.name!r}); run again")
                f.seek(t.type_pos)
                f.write(struct.pack("<I", to_id))
    return plan, out
