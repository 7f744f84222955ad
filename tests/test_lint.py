"""The tree passes the project's ruff rules (pyproject.toml: pycodestyle errors, pyflakes, import sorting,
pyupgrade, lines of at most 120 characters) and is laid out as `ruff format` lays it out, with the ruff that the
dev extra pins, so that CI lints with the tests (`make lint` runs the same checks alone; `make format` lays out)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("toolchain", "converters", "devices", "evals", "runtime_patches", "tests")


def test_ruff_passes_on_the_tree_with_the_pinned_version():
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.is_file(), f"{ruff} missing: pip install -e '.[dev]'"
    pinned = re.search(r'"ruff==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    version = subprocess.run([str(ruff), "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    assert version == pinned, f"ruff {version} installed, the dev extra pins {pinned}: make setup"
    proc = subprocess.run(
        [str(ruff), "check", "--no-cache", "--output-format", "concise", *FOLDERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.strip() == "All checks passed!"


def test_the_tree_is_laid_out_by_ruff_format():
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run(
        [str(ruff), "format", "--check", "--no-cache", *FOLDERS], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"run `make format`:\n{proc.stdout[-4000:]}"
