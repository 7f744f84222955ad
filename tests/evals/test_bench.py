"""slim-edge bench: pure pieces on captured llama-bench output, and the host end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from slim_edge.devices import parse
from slim_edge.devices.base import DeviceInfo
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.bench import (
    BenchConfig,
    BenchResult,
    ModelResult,
    compare_to,
    llama_bench_argv,
    pin_masks,
    summarize_rows,
    wait_cool,
    write_results,
)

CAPTURED = Path(__file__).resolve().parents[2] / "devices" / "captured"


def _jsonl(name):
    return "".join(ln for ln in (CAPTURED / name).read_text().splitlines(keepends=True) if not ln.startswith("#"))


def test_llama_bench_argv():
    cfg = BenchConfig(prompt_lengths=[128, 512], n_gen=64, threads=[1, 4], repetitions=3, delay=5)
    assert llama_bench_argv("/w/bin/llama-bench", "/w/models/m.gguf", cfg, 4, "0xf0") == [
        "/w/bin/llama-bench",
        "-m",
        "/w/models/m.gguf",
        "-p",
        "128,512",
        "-n",
        "64",
        "-t",
        "4",
        "-r",
        "3",
        "-o",
        "jsonl",
        "--delay",
        "5",
        "-C",
        "0xf0",
        "--cpu-strict",
        "1",
    ]
    assert llama_bench_argv("lb", "m", BenchConfig(), 2, None) == [
        "lb",
        "-m",
        "m",
        "-p",
        "128,256,512,1024",
        "-n",
        "128",
        "-t",
        "2",
        "-r",
        "5",
        "-o",
        "jsonl",
    ]


def test_pin_masks_are_exactly_the_fastest_cores():
    """Strict pinning puts threads on the mask's lowest cores first, so each thread count gets a mask of
    exactly that many of the fastest cores (cpufreq captured on a Pixel 8 and a Galaxy S9)."""
    pixel8 = parse.parse_max_freqs(_jsonl("cpufreq_pixel8_tensor_g3.txt"))  # 4x1.70, 4x2.37, 1x2.91 GHz
    assert pin_masks(pixel8, [1, 2, 4, 8]) == {1: "0x100", 2: "0x110", 4: "0x170", 8: "0x1f7"}
    s9 = parse.parse_max_freqs(_jsonl("cpufreq_galaxy_s9_sdm845.txt"))  # 4x1.77, 4x2.80 GHz
    assert pin_masks(s9, [1, 2, 4, 8]) == {1: "0x10", 2: "0x30", 4: "0xf0"}  # 8 threads: every core, no mask
    assert pin_masks({0: 2400000, 1: 2400000}, [1]) == {}  # one cluster: nothing to prefer
    assert pin_masks({}, [1, 2]) == {}


@pytest.mark.runtime
def test_pinned_llama_bench_takes_the_strict_mask(tmp_path):
    """The argv run by the pinned llama-bench: it accepts -C/--cpu-strict and reports both in its rows."""
    import subprocess

    from slim_edge.evals.tiny_gguf import write_tiny_llama_gguf
    from slim_edge.runtime_patches.runtime import ensure_runtime

    bench = str(ensure_runtime("host").tool("llama-bench"))
    model = write_tiny_llama_gguf(tmp_path / "tiny-f16.gguf", n_layers=1)
    cfg = BenchConfig(prompt_lengths=[16], n_gen=4, threads=[1], repetitions=1)
    p = subprocess.run(llama_bench_argv(bench, str(model), cfg, 1, "0x1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = parse.parse_llama_bench(p.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 4)]
    assert {(r["cpu_mask"], r["cpu_strict"], r["n_threads"]) for r in rows} == {("0x1", True, 1)}


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"prompt_lengths": [0]}, "Prompt lengths"),
        ({"threads": []}, "Thread counts"),
        ({"repetitions": 0}, "repetitions"),
        ({"delay": -1}, "delay"),
        ({"cool_to": 400.0}, "cool-to"),
    ],
)
def test_config_refuses_bad_values(kw, msg):
    with pytest.raises(SlimEdgeError, match=msg):
        BenchConfig(**kw)


def _result_from_capture(emulated=False):
    rows = parse.parse_llama_bench(_jsonl("llama_bench_host_tiny.jsonl"))
    models = {}
    for r in rows:
        name = Path(r["model_filename"]).name[:-5]
        models.setdefault(name, ModelResult(name=name, path=r["model_filename"], file_size=r["model_size"]))
        models[name].rows.append(r)
    for m in models.values():
        m.prefill, m.decode = summarize_rows(m.rows)
    info = DeviceInfo(device="host", arch="x86_64", soc="test", emulated=emulated)
    return BenchResult(
        device=info,
        config=BenchConfig(),
        models=list(models.values()),
        runtime={"target": "host", "build_commit": rows[0]["build_commit"]},
    )


def test_parse_and_summarize_captured_llama_bench():
    rows = parse.parse_llama_bench(_jsonl("llama_bench_host_tiny.jsonl"))
    assert [(Path(r["model_filename"]).name, r["n_prompt"], r["n_gen"]) for r in rows] == [
        ("tiny-q4_0.gguf", 16, 0),
        ("tiny-q4_0.gguf", 32, 0),
        ("tiny-q4_0.gguf", 0, 8),
    ]
    assert all(len(r["samples_ns"]) == 3 for r in rows)
    prefill, decode = summarize_rows(rows)
    p16 = prefill[0]
    assert p16["n_prompt"] == 16 and p16["n_threads"] == rows[0]["n_threads"]
    assert p16["samples_ns"] == [float(x) for x in rows[0]["samples_ns"]]
    assert p16["ttft_ms_mean"] == pytest.approx(np.mean(rows[0]["samples_ns"]) / 1e6)
    assert p16["ttft_ms_std"] == pytest.approx(np.std(rows[0]["samples_ns"], ddof=1) / 1e6)
    # each TTFT sample is prompt length / that sample's prefill rate
    assert p16["ttft_ms_samples"] == pytest.approx([16 / ts * 1e3 for ts in rows[0]["samples_ts"]], rel=1e-4)
    assert p16["tps_mean"] == rows[0]["avg_ts"] and decode[0]["tps_std"] == rows[2]["stddev_ts"]
    # JSON array form (-o json) gives the same rows
    assert parse.parse_llama_bench(json.dumps(rows)) == rows


def test_markdown_and_compare_from_capture():
    result = _result_from_capture()
    table = result.markdown()
    body = [ln for ln in table.splitlines() if ln.startswith("| tiny")]
    assert [ln.split("|")[4].strip() for ln in body] == ["pp16", "pp32", "tg8"]
    result.compare = compare_to(result, "q4_0")
    assert {r["tps_ratio"] for r in result.compare["rows"]} == {1.0}
    with pytest.raises(SlimEdgeError, match="--compare 'q8_0' matches none"):
        compare_to(result, "q8_0")
    emulated = _result_from_capture(emulated=True).markdown()
    assert emulated.startswith("**emulated, not a speed figure**")
    assert all(ln.endswith("emulated, not a speed figure |") for ln in emulated.splitlines() if ln.startswith("| tiny"))


def test_write_results_is_atomic_and_refuses_to_overwrite(tmp_path):
    result = _result_from_capture()
    out = tmp_path / "r"
    files = write_results(result, out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]
    with pytest.raises(SlimEdgeError, match="already exists.*--force"):
        write_results(result, out, plots=False)
    (out / "stale.txt").write_text("x")
    write_results(result, out, force=True, plots=False)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folders left behind
    assert json.loads(files["bench.json"].read_text())["schema"] == "slim-edge.bench/1"


def _png_checks(path: Path, min_colours: int = 50):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert (w, h) == (960, 600)  # 8x5 inches at 120 dpi
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours  # not blank: lines, bars, text, antialiasing


@pytest.mark.runtime
def test_host_end_to_end_through_the_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from slim_edge.cli import bench
    from slim_edge.evals.bench import llama_cpp_available
    from slim_edge.evals.tiny_gguf import tiny_models
    from slim_edge.runtime_patches.runtime import ensure_runtime

    ensure_runtime("host")
    models = tiny_models(tmp_path / "m", ("q4_0",))
    app = typer.Typer()
    app.command()(bench)
    out = tmp_path / "results"
    args = [
        str(models["q4_0"]),
        "--baselines",
        "q8_0,f16",
        "--fp-model",
        str(models["f16"]),
        "-p",
        "16,64",
        "-n",
        "8",
        "-t",
        "1,2",
        "-r",
        "2",
        "--compare",
        "f16",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    names = ["tiny-q4_0", "tiny-q8_0", "tiny-f16"]
    data = json.loads((out / "bench.json").read_text())
    assert [m["name"] for m in data["models"]] == names
    for m in data["models"]:
        assert m["file_size"] > 0 and m["peak_rss_kb"] > 0 and m["peak_rss_method"] == "VmHWM"
        assert [(e["n_prompt"], e["n_threads"]) for e in m["prefill"]] == [(16, 1), (64, 1), (16, 2), (64, 2)]
        assert all(e["tps_mean"] > 0 and e["ttft_ms_mean"] > 0 and len(e["samples_ns"]) == 2 for e in m["prefill"])
        assert all(e["tps_mean"] > 0 and e["n_gen"] == 8 for e in m["decode"])
        if llama_cpp_available():
            assert [c["n_threads"] for c in m["chat_ttft"]] == [1, 2]
            assert all(c["wall_ms_mean"] > 0 and c["n_prompt_tokens"] > 16 for c in m["chat_ttft"])
    assert data["label"] is None and data["device"]["device"] == "host"
    assert data["runtime"]["build_commit"] and data["device"]["cpu_features"]
    assert data["runtime"]["isa"] == "avx2" and "runtime: host (avx2 build) · build" in r.output  # the default build
    assert data["compare"]["baseline"] == "tiny-f16"
    table = (out / "bench.md").read_text()
    rows = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| tiny")]
    assert [n for n in dict.fromkeys(rows)] == names
    assert "Ratios against tiny-f16" in r.output
    _png_checks(out / "ttft.png")
    _png_checks(out / "decode.png")
    # a second run into the same folder is refused before measuring anything
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    # --json: bench.json's content on stdout, the table nowhere there
    small = [str(models["q4_0"]), "-p", "16", "-n", "4", "-t", "1", "-r", "1", "--no-chat-ttft"]
    r = CliRunner().invoke(app, [*small, "-o", str(tmp_path / "j"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads((tmp_path / "j" / "bench.json").read_text())
    assert json.loads(r.stdout)["models"][0]["name"] == "tiny-q4_0" and "| tiny" not in r.stdout


def test_wait_cool_polls_the_real_motorola_zones_until_below_the_limit():
    """A phone cooling by 1 °C per poll from the captured Motorola (SM4375) readings: hottest 42.6 °C."""
    text = (Path(__file__).resolve().parents[2] / "devices" / "captured" / "thermal_moto_sm4375.txt").read_text()
    zones = parse.parse_thermal("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))
    assert max(zones.values()) == pytest.approx(42.6)
    now, polls = [0.0], []

    def read():
        polls.append(now[0])
        return {k: v - len(polls) + 1 for k, v in zones.items()}

    def sleep(s):
        now[0] += s

    waited, hottest = wait_cool(read, 40.0, poll_s=5.0, sleep=sleep, clock=lambda: now[0])
    assert (waited, len(polls)) == (15.0, 4) and hottest == pytest.approx(39.6)
    now[0], polls[:] = 0.0, []
    waited, hottest = wait_cool(read, 20.0, timeout_s=30.0, poll_s=10.0, sleep=sleep, clock=lambda: now[0])
    assert waited == 30.0 and hottest == pytest.approx(42.6 - 3)  # gave up after the timeout
    waited, hottest = wait_cool(dict, 40.0, sleep=sleep)  # a device without zones: no wait
    assert hottest is None and waited < 1


def test_bench_baselines_are_the_types_export_writes(tmp_path):
    # issue 19: bench kept its own list, so `export --type q2_k` worked and `bench --baselines q2_k` was refused
    from slim_edge.converters.gguf_export import BASELINE_TYPES
    from slim_edge.evals.bench import build_baselines

    for kind in BASELINE_TYPES:  # past the type check: refused for the missing model, not for the kind
        with pytest.raises(SlimEdgeError, match="FP model .* does not exist"):
            build_baselines(tmp_path / "none.gguf", [kind])
    with pytest.raises(SlimEdgeError, match=r"Unknown baseline\(s\) q9_9; choose from .*q2_k, tq2_0, tq1_0"):
        build_baselines(tmp_path / "none.gguf", ["q9_9"])


def test_a_wrong_baseline_name_is_named_before_the_fp_model_is_asked_for(tmp_path):
    # `bench q.gguf --baselines q9` said "--baselines needs an unquantized GGUF" and never that q9 is no type
    import typer
    from typer.testing import CliRunner

    from slim_edge.cli import bench

    app = typer.Typer()
    app.command()(bench)
    (tmp_path / "q.gguf").write_bytes(b"GGUF")
    for value, seen in (("q9", "q9"), (",", "(none given)")):
        r = CliRunner().invoke(app, [str(tmp_path / "q.gguf"), "--baselines", value, "-o", str(tmp_path / "r")])
        assert isinstance(r.exception, SlimEdgeError), r.output
        assert str(r.exception).startswith(f"Unknown baseline(s) {seen}; choose from "), r.exception
    assert not (tmp_path / "r").exists()
