"""onnx_bench: ONNX exports timed side by side, interleaved (evals/reports/onnx_bench_host.md)."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from slim_edge.evals.lab.onnx_bench import compare, compare_markdown  # noqa: E402


def test_onnx_bench_compare_interleaves_the_models(both_attentions):
    _, exports = both_attentions
    paths = [exports["plain"][0], exports["gqa"][0]]
    result = compare(paths, [8], n_gen=3, depths=[0, 16], threads=1, repetitions=2)
    assert [(r["test"], r["model"]) for r in result["rows"]] == [
        (t, str(p)) for t in ("pp8", "tg3", "tg3@d16") for p in paths
    ]
    for r in result["rows"]:
        assert len(r["tps"]) == 2 and r["tps_median"] == pytest.approx(float(np.median(r["tps"])))
    assert [r["x_first_paired_median"] for r in result["rows"][::2]] == [1.0, 1.0, 1.0]
    assert compare_markdown(result).count("\n| ") == 7  # the header and six rows
