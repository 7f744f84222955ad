import json

import pytest
import typer
from typer.testing import CliRunner

from slim_edge.cli import eval_command
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.eval_cmd import evaluate, format_table


def test_evaluate_model_against_itself(tiny_llama, tiny_text):
    r = evaluate(
        [str(tiny_llama)],
        reference=str(tiny_llama),
        corpus=str(tiny_text),
        ctx=64,
        max_chunks=3,
        gen_tokens=8,
        progress=False,
    )
    assert (r["chunks"], r["scored_tokens"], r["ctx"]) == (3, 3 * 31, 64)
    assert r["provenance"].startswith(f"file {tiny_text}")
    ref, model = r["models"]
    assert ref["is_reference"] and not model["is_reference"]
    assert model["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert model["mean_kld"] == pytest.approx(0, abs=1e-9) and model["same_top_pct"] == 100.0
    assert 0 <= model["repeat_rate"] <= 1 and len(model["generation"]["continuations"]) == 4
    table = format_table(r)
    assert "(reference)" in table and "same top-1 %" in table and f"{3 * 31} scored tokens" in table
    json.dumps(r)  # JSON-ready


def test_cli_writes_json(tiny_llama, tiny_text, tmp_path):
    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "r.json"
    args = [str(tiny_llama), "--corpus", str(tiny_text), "--ctx", "32", "--chunks", "2", "--gen-tokens", "0"]
    res = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["scored_tokens"] == 2 * 15 and "mean_kld" not in data["models"][0]
    assert "PPL" in res.stdout


def test_cli_json_flag_is_json_on_stdout(tiny_llama, tiny_text, tmp_path):
    # issue 19: `eval --json F` took a path where every other command's --json is a flag
    app = typer.Typer()
    app.command()(eval_command)
    args = [str(tiny_llama), "--corpus", str(tiny_text), "--ctx", "32", "--chunks", "2", "--gen-tokens", "0"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # nothing but the JSON on stdout
    assert data["scored_tokens"] == 2 * 15 and data["chunks"] == 2
    assert "PPL" in res.stderr and "PPL" not in res.stdout
    old = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "r.json")])  # the old spelling
    assert isinstance(old.exception, SlimEdgeError)
    assert str(old.exception).startswith(f"MODEL {tmp_path / 'r.json'} is a .json file") and "-o " in str(old.exception)
    assert not (tmp_path / "r.json").exists()


def test_train_text_overlap_is_refused(tiny_llama, tiny_text):
    with pytest.raises(SlimEdgeError, match="are identical"):
        evaluate([str(tiny_llama)], corpus=str(tiny_text), train_text=str(tiny_text), progress=False)


def test_bad_model_inputs(tmp_path, tiny_text):
    with pytest.raises(SlimEdgeError, match="does not exist"):
        evaluate([str(tmp_path / "missing.gguf")], corpus=str(tiny_text), progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(SlimEdgeError, match=r"not a GGUF file \(starts with b'NOPE'\)"):
        evaluate([str(junk)], corpus=str(tiny_text), progress=False)
    with pytest.raises(SlimEdgeError, match="nothing to evaluate"):
        evaluate([], progress=False)


def test_checkpoint_folder_against_its_base(tiny_llama, tiny_text, tmp_path):
    from slim_edge.pipeline import run_quantize
    from slim_edge.quantize import QuantConfig

    out = tmp_path / "q"
    run_quantize(str(tiny_llama), QuantConfig(scheme="sherry", steps=0, calib=str(tiny_text)), out, progress=False)
    r = evaluate(
        [str(out)], reference=str(tiny_llama), corpus=str(tiny_text), ctx=64, max_chunks=2, gen_tokens=0, progress=False
    )
    q = r["models"][1]
    assert q["name"] == "q" and q["backend"] == "torch"
    assert q["mean_kld"] > 1e-4  # 1.25-bit weights do change the distribution
    assert q["ppl_base"] == pytest.approx(r["models"][0]["ppl"], rel=1e-12)
