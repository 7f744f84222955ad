"""The format registry: one module per format, the module name is the CLI value.

Adding a GGUF type is one new module here (its `FORMAT` holds every fact about it: ids, block, bytes,
llama_ftype, activation type, the torch grid, the schemes' values it holds exactly) and one entry in
NAMES. Everything else reads the registry: FORMATS / BY_ID are the live tables that `register` fills.
"""

from __future__ import annotations

import importlib

from ..errors import SlimEdgeError
from .base import Format

NAMES = ("f16", "q8_0", "q4_0", "q2_0", "tq1_0", "tq2_0", "stq1_0", "q2_0c", "q2_0c_64", "stq1_0_64")
FORMATS: dict[str, Format] = {}
BY_ID: dict[int, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format; a name, GGML type id or llama_ftype that another format already has is refused."""
    for what, mine in (("name", "name"), ("GGML type id", "type_id"), ("llama_ftype", "file_type")):
        clash = next((f for f in FORMATS.values() if getattr(f, mine) == getattr(fmt, mine)), None)
        if clash is not None:
            raise SlimEdgeError(
                f"format {fmt.name!r} has {what} {getattr(fmt, mine)!r}, which format "
                f"{clash.name!r} already has; give {fmt.name!r} an unused {what}"
            )
    if fmt.file_type < 0 or not fmt.vec_dot:
        raise SlimEdgeError(
            f"format {fmt.name!r}: file_type {fmt.file_type!r} / vec_dot {fmt.vec_dot!r} are not "
            f"set; give its FORMAT the llama_ftype and the runtime's activation type"
        )
    FORMATS[fmt.name] = fmt
    BY_ID[fmt.type_id] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format registered by `register` (tests that add a format take it out again)."""
    fmt = get_format(name)
    del FORMATS[fmt.name], BY_ID[fmt.type_id]


def get_format(name: str) -> Format:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise SlimEdgeError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def embedding_types() -> tuple[str, ...]:
    """The --embedding-type / --output-tensor-type values: formats that token_embd rows may take."""
    return tuple(f.name for f in FORMATS.values() if f.embedding)


def holding(values: str) -> tuple[str, ...]:
    """Formats that hold a scheme's `values` ("ternary", "sherry") exactly besides their own grid."""
    return tuple(f.name for f in FORMATS.values() if values in f.holds)


for _name in NAMES:
    register(importlib.import_module(f".{_name}", __name__).FORMAT)
