"""The format registry: one module per format, the module name is the CLI value."""
from __future__ import annotations

import importlib

from ..errors import SlimEdgeError
from .base import Format

NAMES = ("f16", "q8_0", "q4_0", "q2_0", "tq1_0", "tq2_0", "stq1_0", "q2_0c", "q2_0c_64", "stq1_0_64")
FORMATS: dict[str, Format] = {n: importlib.import_module(f".{n}", __name__).FORMAT for n in NAMES}
BY_ID: dict[int, Format] = {f.type_id: f for f in FORMATS.values()}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise SlimEdgeError(f"unknown format {name!r}; known formats: {', '.join(NAMES)}") from None
