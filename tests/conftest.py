"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import make_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", layers=1)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """~60 KB of real English: CPython's pydoc topics (always installed)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:60_000], encoding="utf-8")
    return path
