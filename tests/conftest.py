"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slim_edge.converters.onnx_export import export_onnx
from tiny_models import make_tiny_model, quantized_exports

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _samples_of_this_session(tmp_path_factory):
    """Teacher samples drawn by tests go to a folder of this session, not the user's cache: a draw kept there by
    one test (or an earlier run) let a later test read it instead of sampling, so tests that count draws passed
    or failed with the order they ran in. Set in os.environ, so the CLI's subprocesses see it too."""
    old = os.environ.get("SLIM_EDGE_SAMPLES")
    os.environ["SLIM_EDGE_SAMPLES"] = str(tmp_path_factory.mktemp("samples"))
    yield
    if old is None:
        os.environ.pop("SLIM_EDGE_SAMPLES", None)
    else:
        os.environ["SLIM_EDGE_SAMPLES"] = old


@pytest.fixture(autouse=True)
def _patched_runtime_first(request):
    """Tests marked `runtime` get the patched host runtime built (or found in the cache) before they start.
    llama_cpp binds its library once per process: a runtime test that reached `bindings()` before any build
    (a fresh cache) bound the stock library for the whole session, and every later test of a custom type
    failed to load (CI on a fresh cache: tests/converters/test_export.py ran before the first build)."""
    if request.node.get_closest_marker("runtime"):
        from slim_edge.runtime_patches.runtime import ensure_runtime

        ensure_runtime("host")


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


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory) -> Path:
    """Two decoder layers, so that the KV cache of a layer feeds a later one."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny2") / "llama", "llama", layers=2)


@pytest.fixture(scope="session")
def onnx_exports(tiny2, tiny_text, tmp_path_factory):
    """scheme -> (checkpoint, ONNX folder, summary) at PTQ on the tiny model, made on first use (needs onnx:
    tests/converters/test_onnx_export.py, and the lab's ONNX scripts in tests/evals/lab/)."""
    return quantized_exports(tmp_path_factory, tiny2, tiny_text, 0, "onnx", export_onnx)


@pytest.fixture(scope="session")
def both_attentions(onnx_exports, tmp_path_factory):
    """(checkpoint, {attention: (folder, summary)}) of the sherry checkpoint exported both ways."""
    ckpt, out, summary = onnx_exports("sherry")
    plain = tmp_path_factory.mktemp("plain") / "onnx"
    return ckpt, {"gqa": (out, summary), "plain": (plain, export_onnx(ckpt, plain, attention="plain"))}
