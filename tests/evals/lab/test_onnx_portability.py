"""onnx_portability: logits saved on one onnxruntime, checked on another (evals/reports/onnx_portability.md)."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from slim_edge.errors import SlimEdgeError  # noqa: E402
from slim_edge.evals.lab import onnx_portability as port  # noqa: E402


def test_portability_check_reports_the_difference_from_saved_logits(both_attentions, tmp_path, capsys):
    """evals/lab/onnx_portability: save on one onnxruntime, check on another. On the same one the logits are
    equal bit for bit; saved logits moved by 0.25 are reported as 0.25 off; mistakes are one clear error."""
    _, exports = both_attentions
    gqa, plain = tmp_path / "gqa", tmp_path / "plain"  # named by folder: the fixture's are both "onnx"
    gqa.symlink_to(exports["gqa"][0])
    plain.symlink_to(exports["plain"][0])
    ref = tmp_path / "ref.npz"
    port.main(["save", str(gqa), str(plain), "-o", str(ref)])
    report = port.main(["check", str(gqa), str(plain), "--ref", str(ref), "-o", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == report
    for name in ("gqa", "plain"):
        m = report["models"][name]
        assert m["full_vs_reference"] == 0 and m["chunked_vs_reference"] == 0, (name, m)
        assert 0 < m["chunked_vs_full"] < 1e-4 and m["logit_scale"] > 1, (name, m)
    saved = dict(np.load(ref))
    saved["gqa/full"] = saved["gqa/full"] + np.float32(0.25)
    np.savez(tmp_path / "moved.npz", **saved)
    moved = port.check([gqa], tmp_path / "moved.npz")["models"]["gqa"]
    assert moved["full_vs_reference"] == pytest.approx(0.25, abs=1e-5) and moved["chunked_vs_reference"] == 0
    with pytest.raises(SlimEdgeError, match=r"already exists; pass --force"):
        port.main(["save", str(gqa), "-o", str(ref)])
    with pytest.raises(SlimEdgeError, match=r"holds no logits for an export named 'onnx' \(it has gqa, plain\)"):
        port.check([exports["gqa"][0]], ref)
    with pytest.raises(SlimEdgeError, match=r"repeat a name: onnx, onnx"):
        port.check([exports["gqa"][0], exports["plain"][0]], ref)
    with pytest.raises(SlimEdgeError, match=r"--ref .*missing.npz does not exist"):
        port.check([gqa], tmp_path / "missing.npz")
    # an export this onnxruntime refuses: its reason in the report, the others still checked, exit status 2
    refused = tmp_path / "refused" / "gqa"
    refused.mkdir(parents=True)
    model = onnx.load(str(exports["gqa"][0] / "model.onnx"))
    model.ir_version = 99
    onnx.save(model, str(refused / "model.onnx"))
    with pytest.raises(SlimEdgeError, match=r"1 of 2 exports did not run on onnxruntime [0-9.]+: gqa \(their"):
        port.main(["check", str(refused), str(plain), "--ref", str(ref), "-o", str(tmp_path / "c2.json")])
    partial = json.loads((tmp_path / "c2.json").read_text())["models"]
    assert "Unsupported model IR version: 99" in partial["gqa"]["error"]
    assert partial["plain"]["full_vs_reference"] == 0
