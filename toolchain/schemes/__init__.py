"""Quantization schemes: which grid each weight trains on, its fallbacks, and the training extras.

One module per scheme; the module name is the `--scheme` value.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import SlimEdgeError
from ..formats import holding


@dataclass(frozen=True)
class Scheme:
    name: str
    formats: tuple[str, ...]  # primary first, then exact fallbacks in order of preference
    values: str  # "grid" (every level of the format), "ternary" ({-1,0,1}), "sherry" (3:4 ternary)
    arenas: bool = False  # Sherry's residual synapse during training
    tequila: bool = False  # dead weights feed a per-output-channel bias
    doc: str = ""

    def targets(self) -> tuple[str, ...]:
        """The --target values: the scheme's own formats, then every format that holds its values exactly."""
        return self.formats + tuple(f for f in holding(self.values) if f not in self.formats)


NAMES = ("seq2", "sherry", "tequila", "ternary", "q2")
SCHEMES: dict[str, Scheme] = {n: importlib.import_module(f".{n}", __name__).SCHEME for n in NAMES}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise SlimEdgeError(f"unknown scheme {name!r}; choose one of: {', '.join(NAMES)}") from None
