from pathlib import Path

import pytest

CAPTURED = Path(__file__).resolve().parents[2] / "devices" / "captured"


def read_captured(name: str) -> str:
    """A file from devices/captured/ without its '#' provenance header."""
    lines = (CAPTURED / name).read_text().splitlines(keepends=True)
    return "".join(ln for ln in lines if not ln.startswith("#"))


@pytest.fixture
def captured():
    return read_captured
