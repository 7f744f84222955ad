"""The README's main command, `slim-edge demo`, end to end on the embedded SmolLM2-135M (short settings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slim_edge.demo import run_demo
from slim_edge.errors import SlimEdgeError


@pytest.mark.slow
@pytest.mark.runtime
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cli = Path(sys.executable).with_name("slim-edge")
    cmd = [str(cli), "demo", "--steps", "1", "--ptq", "rtn", "--eval-chunks", "1", "--bench-reps", "1", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"seq2", "sherry", "f16", "q8_0", "q4_0", "q4_k_m"}
    # the FP16 file is the real model (Lee news, one chunk): the 8-bit copy agrees closely with it
    assert 10 < rows["f16"]["ppl"] < 60, rows["f16"]
    assert rows["q8_0"]["mean_kld"] < 0.02 and rows["q8_0"]["same_top_pct"] > 90, rows["q8_0"]
    assert rows["q4_0"]["ppl"] < 2 * rows["f16"]["ppl"]
    # the trained files carry slim-edge's types at their planned sizes: SmolLM2's 576-wide rows take the
    # 64-blocks (sherry 1.4531 bpw over the linears, seq2 2.1953; stock Q2_0 would make both 2.5)
    assert 1.40 < rows["sherry"]["linear_bpw"] < 1.50 and 2.15 < rows["seq2"]["linear_bpw"] < 2.25
    assert rows["sherry"]["mib"] < rows["seq2"]["mib"] < rows["q4_0"]["mib"] < rows["f16"]["mib"]
    for name, row in rows.items():
        assert row["ppl"] > 1, row
        if name != "q8_0":  # benched on the host beside Q4_0 (Q8_0 is the eval yardstick only)
            assert row["decode_ts"] > 0 and row["prefill_512_ts"] > 0 and row["ttft_512_ms"] > 0, row
    md = (out / "summary.md").read_text()
    assert md.count("\n| ") == 7 and "sherry" in md  # header + 6 rows
    assert (out / "bench" / "bench.json").is_file()


def test_a_bad_demo_option_is_refused_before_any_folder_or_build(tmp_path, monkeypatch):
    # `demo --ptq foo` built the runtime and made results/demo, then failed at the first quantize
    import slim_edge.runtime_patches.runtime as runtime

    monkeypatch.setattr(runtime, "ensure_runtime", lambda *a, **k: pytest.fail("the runtime was built first"))
    with pytest.raises(SlimEdgeError, match=r"--ptq 'foo': choose rtn"):
        run_demo(out=tmp_path / "demo", ptq="foo")
    assert list(tmp_path.iterdir()) == []
