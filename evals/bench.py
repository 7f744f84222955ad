"""`slim-edge bench`: time to first token and decode speed on a device, against 4-bit and FP16.

For each GGUF file, llama-bench measures prefill at several prompt lengths (pp128...pp1024) and
decode (tg128), at each thread count, with repetitions; every sample is kept. Time to first token
at prompt length p is the time llama-bench took to process p prompt tokens (p / prefill rate). On
the host it is also measured end to end through the llama_cpp Python bindings on a real chat
prompt (create_chat_completion with max_tokens=1, plus llama_perf_context's t_p_eval_ms).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from slim_edge.converters.gguf_read import read_tensor_table
from slim_edge.converters.onnx_export import MARKER
from slim_edge.devices import get_device
from slim_edge.devices.base import Device, DeviceInfo, check_fits, safe_name
from slim_edge.devices.parse import cpu_mask, fastest_cores, parse_llama_bench
from slim_edge.devices.qemu_arm64 import EMULATED_LABEL
from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import atomic_dir, check_output_dir

SCHEMA = "slim-edge.bench/1"
# llama-quantize type names for --baselines values.
FP_FILE_TYPES = {0: "F32", 1: "F16", 32: "BF16"}  # general.file_type values of unquantized files

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that answers briefly."},
    {
        "role": "user",
        "content": "I am flying to Lisbon next week for three days. What should I pack for "
        "the trip, and which neighbourhoods are worth walking around in the evening?",
    },
]


@dataclass
class BenchConfig:
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    n_gen: int = 128
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repetitions: int = 5
    delay: int = 0
    cool_to: float | None = None  # before each run, wait until the hottest zone reads below this (°C)
    pin_big_cores: bool = True
    chat_ttft: bool = True
    timeout: float | None = None

    def __post_init__(self):
        if not self.prompt_lengths or any(p <= 0 for p in self.prompt_lengths):
            raise SlimEdgeError(
                f"Prompt lengths must be positive integers; got {self.prompt_lengths}. Example: -p 128,256,512,1024."
            )
        if not self.threads or any(t <= 0 for t in self.threads):
            raise SlimEdgeError(f"Thread counts must be positive integers; got {self.threads}. Example: -t 1,2.")
        if self.repetitions < 1:
            raise SlimEdgeError(f"--repetitions must be at least 1; got {self.repetitions}.")
        if self.n_gen < 1:
            raise SlimEdgeError(f"--n-gen must be at least 1; got {self.n_gen}.")
        if self.delay < 0:
            raise SlimEdgeError(f"--delay must be 0 or more seconds; got {self.delay}.")
        if self.cool_to is not None and not 20 <= self.cool_to <= 90:
            raise SlimEdgeError(f"--cool-to takes a temperature in °C between 20 and 90; got {self.cool_to}.")


def wait_cool(
    read_zones, limit_c: float, timeout_s: float = 300.0, poll_s: float = 5.0, sleep=time.sleep, clock=time.monotonic
) -> tuple[float, float | None]:
    """Poll `read_zones()` ({zone: °C}) until the hottest zone is below `limit_c` or `timeout_s` passes.
    Returns (seconds waited, last hottest reading); a device without zones returns at once."""
    t0 = clock()
    while True:
        zones = read_zones()
        hottest = max(zones.values()) if zones else None
        if hottest is None or hottest < limit_c or clock() - t0 >= timeout_s:
            return clock() - t0, hottest
        sleep(poll_s)


@dataclass
class ModelResult:
    name: str
    path: str
    file_size: int
    model_type: str = ""
    peak_rss_kb: int | None = None
    peak_rss_method: str | None = None
    prefill: list[dict] = field(default_factory=list)  # per (n_prompt, n_threads)
    decode: list[dict] = field(default_factory=list)  # per (n_gen, n_threads)
    chat_ttft: list[dict] = field(default_factory=list)  # host only, per n_threads
    thermal_after_c: list[dict] = field(default_factory=list)  # zone readings after each run
    rows: list[dict] = field(default_factory=list)  # raw llama-bench rows, with samples_ns


@dataclass
class BenchResult:
    device: DeviceInfo
    config: BenchConfig
    models: list[ModelResult]
    runtime: dict
    cpu_masks: dict[int, str] = field(default_factory=dict)  # per thread count, pinned strictly
    created: str = ""
    compare: dict | None = None

    @property
    def emulated(self) -> bool:
        return self.device.emulated

    def to_json(self) -> dict:
        d = {
            "schema": SCHEMA,
            "created": self.created,
            "label": EMULATED_LABEL if self.emulated else None,
            "device": self.device.to_json(),
            "runtime": self.runtime,
            "cpu_masks": {str(t): m for t, m in self.cpu_masks.items()},
            "config": asdict(self.config),
            "models": [asdict(m) | {"label": EMULATED_LABEL if self.emulated else None} for m in self.models],
            "compare": self.compare,
            "host": {"python": platform.python_version(), "platform": platform.platform()},
        }
        return d

    def markdown(self) -> str:
        return markdown_table(self)


# -- pure helpers ------------------------------------------------------------------------------
def llama_bench_argv(bench: str, model: str, cfg: BenchConfig, threads: int, mask: str | None) -> list[str]:
    argv = [
        bench,
        "-m",
        model,
        "-p",
        ",".join(map(str, cfg.prompt_lengths)),
        "-n",
        str(cfg.n_gen),
        "-t",
        str(threads),
        "-r",
        str(cfg.repetitions),
        "-o",
        "jsonl",
    ]
    if cfg.delay:
        argv += ["--delay", str(cfg.delay)]
    if mask:
        # -C alone gives every thread the whole mask to migrate within; --cpu-strict 1 pins each thread
        # to its own core of the mask, lowest first (ggml_thread_cpumask_next in the pinned ggml-cpu.c)
        argv += ["-C", mask, "--cpu-strict", "1"]
    return argv


def pin_masks(max_freqs: dict[int, int], threads: list[int]) -> dict[int, str]:
    """{thread count: mask of that many fastest cores}, for big.LITTLE devices only: where every core
    has the same max frequency, or the run takes every core, there is nothing to prefer."""
    if len(set(max_freqs.values())) < 2:
        return {}
    return {t: cpu_mask(fastest_cores(max_freqs, t)) for t in threads if t < len(max_freqs)}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """llama-bench rows -> (prefill entries with TTFT, decode entries), all samples kept."""
    prefill, decode = [], []
    for r in rows:
        samples_ns = [float(x) for x in r.get("samples_ns", [])]
        samples_ts = [float(x) for x in r.get("samples_ts", [])]
        base = {
            "n_threads": int(r.get("n_threads", 0)),
            "tps_mean": float(r["avg_ts"]),
            "tps_std": float(r.get("stddev_ts", 0.0)),
            "samples_ns": samples_ns,
            "samples_ts": samples_ts,
        }
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            ttft_ms = [ns / 1e6 for ns in samples_ns] or [r["n_prompt"] / float(r["avg_ts"]) * 1e3]
            mean, std = _mean_std(ttft_ms)
            prefill.append(
                {
                    "n_prompt": int(r["n_prompt"]),
                    **base,
                    "ttft_ms_mean": mean,
                    "ttft_ms_std": std,
                    "ttft_ms_samples": ttft_ms,
                }
            )
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            decode.append({"n_gen": int(r["n_gen"]), **base})
    prefill.sort(key=lambda e: (e["n_threads"], e["n_prompt"]))
    decode.sort(key=lambda e: e["n_threads"])
    return prefill, decode


def compare_to(result: BenchResult, baseline: str) -> dict:
    """Ratios of every model against the model named (or formatted) `baseline`: t/s ratio > 1 and
    TTFT ratio < 1 mean faster than the baseline."""
    key = baseline.lower()
    matches = [m for m in result.models if m.name.lower() == key] or [
        m for m in result.models if key in m.name.lower().replace("-", "_").replace(".", "_")
    ]
    if len(matches) != 1:
        names = ", ".join(m.name for m in result.models)
        what = "matches none" if not matches else f"matches {len(matches)} ({', '.join(m.name for m in matches)})"
        raise SlimEdgeError(
            f"--compare {baseline!r} {what} of the benchmarked models ({names}). "
            "Pass the exact model name (the file name without .gguf)."
        )
    base = matches[0]
    bp = {(e["n_prompt"], e["n_threads"]): e for e in base.prefill}
    bd = {(e["n_gen"], e["n_threads"]): e for e in base.decode}
    rows = []
    for m in result.models:
        for e in m.prefill:
            b = bp.get((e["n_prompt"], e["n_threads"]))
            if b:
                rows.append(
                    {
                        "model": m.name,
                        "test": f"pp{e['n_prompt']}",
                        "n_threads": e["n_threads"],
                        "tps_ratio": e["tps_mean"] / b["tps_mean"],
                        "ttft_ratio": e["ttft_ms_mean"] / b["ttft_ms_mean"],
                    }
                )
        for e in m.decode:
            b = bd.get((e["n_gen"], e["n_threads"]))
            if b:
                rows.append(
                    {
                        "model": m.name,
                        "test": f"tg{e['n_gen']}",
                        "n_threads": e["n_threads"],
                        "tps_ratio": e["tps_mean"] / b["tps_mean"],
                        "ttft_ratio": None,
                    }
                )
    return {"baseline": base.name, "rows": rows}


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def markdown_table(result: BenchResult) -> str:
    """A llama-bench-style table (one row per test), the compare ratios, and provenance lines."""
    lines = []
    if result.emulated:
        lines += [f"**{EMULATED_LABEL}** — {result.device.arch}", ""]
    note = " note |" if result.emulated else ""
    lines += [
        "| model | size | threads | test | t/s | TTFT ms | peak mem |" + note,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" --- |" if note else ""),
    ]
    tail = f" {EMULATED_LABEL} |" if result.emulated else ""
    for m in result.models:
        mem = "n/a" if m.peak_rss_kb is None else f"{m.peak_rss_kb / 1024:.1f} MiB"
        for e in m.prefill:
            lines.append(
                f"| {m.name} | {_mib(m.file_size)} | {e['n_threads']} | pp{e['n_prompt']} | "
                f"{e['tps_mean']:.2f} ± {e['tps_std']:.2f} | {e['ttft_ms_mean']:.1f} ± {e['ttft_ms_std']:.1f} "
                f"| {mem} |" + tail
            )
        for e in m.decode:
            lines.append(
                f"| {m.name} | {_mib(m.file_size)} | {e['n_threads']} | tg{e['n_gen']} | "
                f"{e['tps_mean']:.2f} ± {e['tps_std']:.2f} | | {mem} |" + tail
            )
    chats = [(m, c) for m in result.models for c in m.chat_ttft]
    if chats:
        lines += [
            "",
            "Time to first token on a real chat prompt (llama_cpp create_chat_completion, max_tokens=1):",
            "",
            "| model | threads | prompt tokens | TTFT ms (wall) | t_p_eval ms |" + note,
            "| --- | ---: | ---: | ---: | ---: |" + (" --- |" if note else ""),
        ]
        for m, c in chats:
            lines.append(
                f"| {m.name} | {c['n_threads']} | {c['n_prompt_tokens']} | {c['wall_ms_mean']:.1f} ± "
                f"{c['wall_ms_std']:.1f} | {c['t_p_eval_ms_mean']:.1f} ± {c['t_p_eval_ms_std']:.1f} |" + tail
            )
    if result.compare:
        lines += [
            "",
            f"Ratios against {result.compare['baseline']} (t/s: >1 is faster; TTFT: <1 is faster):",
            "",
            "| model | test | threads | t/s ratio | TTFT ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in result.compare["rows"]:
            tt = "" if r["ttft_ratio"] is None else f"{r['ttft_ratio']:.2f}x"
            lines.append(f"| {r['model']} | {r['test']} | {r['n_threads']} | {r['tps_ratio']:.2f}x | {tt} |")
    d = result.device
    methods = sorted({m.peak_rss_method for m in result.models if m.peak_rss_method})
    lines += [
        "",
        f"device: {d.device} · {d.soc} · {d.model or d.arch}"
        + (f" · Android {d.android_version}" if d.android_version else "")
        + f" · features: {' '.join(d.cpu_features_of_interest) or 'n/a'}"
        + (
            " · pinned (cpu-strict) " + ", ".join(f"t{t} {m}" for t, m in result.cpu_masks.items())
            if result.cpu_masks
            else ""
        )
        + (f" · hottest zone at start {max(d.thermal_c.values()):.1f} °C" if d.thermal_c else ""),
        f"runtime: {result.runtime.get('target')}"
        + (f" ({result.runtime['isa']} build)" if result.runtime.get("isa") else "")
        + f" · build {result.runtime.get('build_commit')} ({result.runtime.get('build_number')})"
        + (f" · {result.runtime['onnxruntime']} (CPU EP)" if result.runtime.get("onnxruntime") else "")
        + f" · peak memory by {', '.join(methods) or 'n/a'}",
    ]
    return "\n".join(lines) + "\n"


# -- baselines ---------------------------------------------------------------------------------
def gguf_file_type(path: Path) -> int | None:
    """general.file_type of a GGUF, or None when it cannot be read (e.g. custom tensor types)."""
    try:
        import gguf

        f = gguf.GGUFReader(str(path)).fields.get("general.file_type")
        return int(f.parts[f.data[0]][0]) if f is not None else None
    except Exception:
        return None


def find_fp_model(models: list[Path]) -> Path | None:
    for m in models:
        if gguf_file_type(m) in FP_FILE_TYPES:
            return m
    return None


def check_baselines(kinds: list[str]) -> None:
    from slim_edge.converters.gguf_export import BASELINE_TYPES

    unknown = [k for k in kinds if k not in BASELINE_TYPES]
    if unknown or not kinds:
        raise SlimEdgeError(
            f"Unknown baseline(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BASELINE_TYPES)}."
        )


def build_baselines(fp_model: Path, kinds: list[str], out_dir: Path | None = None) -> list[Path]:
    """Quantize `fp_model` to each baseline kind with the runtime's llama-quantize, reusing files that
    already exist. An F16 source is its own f16 baseline."""
    from slim_edge.converters.gguf_export import llama_quantize

    check_baselines(kinds)
    if not fp_model.is_file():
        raise SlimEdgeError(f"FP model {fp_model} does not exist. Pass an F16/F32/BF16 GGUF with --fp-model.")
    out_dir = out_dir or fp_model.parent
    stem = fp_model.name[:-5] if fp_model.name.endswith(".gguf") else fp_model.name
    for suffix in ("-f16", "-f32", "-bf16", ".f16", ".f32", ".bf16", "-F16", "-F32", "-BF16"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    out = []
    for kind in kinds:
        if kind == "f16" and gguf_file_type(fp_model) == 1:
            out.append(fp_model)
            continue
        dst = out_dir / f"{stem}-{kind}.gguf"
        if not dst.is_file():
            llama_quantize(fp_model, dst, kind)
        out.append(dst)
    return out


# -- host chat TTFT through the Python bindings ------------------------------------------------
_CHAT_TTFT_SCRIPT = r"""
import json, statistics, sys, time
import llama_cpp
args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=args["model"], n_ctx=args["n_ctx"], n_threads=args["threads"],
                      n_threads_batch=args["threads"], n_batch=512, verbose=False)
prompt_tokens = None
wall, peval, npeval = [], [], []
for i in range(args["reps"] + 1):  # the first call warms up and is dropped
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    out = llm.create_chat_completion(messages=args["messages"], max_tokens=1, temperature=0.0)
    dt = (time.perf_counter() - t0) * 1e3
    perf = llama_cpp.llama_perf_context(llm.ctx)
    prompt_tokens = out["usage"]["prompt_tokens"]
    if i:
        wall.append(dt); peval.append(perf.t_p_eval_ms); npeval.append(perf.n_p_eval)
print(json.dumps({"n_prompt_tokens": prompt_tokens, "wall_ms": wall, "t_p_eval_ms": peval, "n_p_eval": npeval}))
"""


def measure_chat_ttft(model: Path, threads: int, reps: int, lib_dir: Path | None = None, n_ctx: int = 2048) -> dict:
    """TTFT of one chat turn through llama_cpp (in a child process, so LLAMA_CPP_LIB_PATH can
    point at the runtime's libllama.so)."""
    env = dict(os.environ)
    if lib_dir is not None and (lib_dir / "libllama.so").exists():
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
        env["LD_LIBRARY_PATH"] = str(lib_dir) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    args = {"model": str(model), "threads": threads, "reps": reps, "n_ctx": n_ctx, "messages": CHAT_MESSAGES}
    p = subprocess.run(
        [sys.executable, "-c", _CHAT_TTFT_SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        raise SlimEdgeError(f"Chat TTFT through llama_cpp failed for {model.name}: {p.stderr.strip()[-600:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    wm, ws = _mean_std(r["wall_ms"])
    pm, ps = _mean_std(r["t_p_eval_ms"])
    return {
        "n_threads": threads,
        "n_prompt_tokens": r["n_prompt_tokens"],
        "wall_ms_mean": wm,
        "wall_ms_std": ws,
        "t_p_eval_ms_mean": pm,
        "t_p_eval_ms_std": ps,
        "wall_ms_samples": r["wall_ms"],
        "t_p_eval_ms_samples": r["t_p_eval_ms"],
        "n_p_eval": r["n_p_eval"],
        "source": "llama_cpp create_chat_completion(max_tokens=1) + llama_perf_context",
    }


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# -- ONNX exports: onnxruntime on the host, timed as llama-bench times a GGUF ---------------------
# pp<N>: N random prompt tokens into an empty cache; tg<N>: N tokens decoded one at a time from an empty
# cache, after one warm-up run; returned as llama-bench's JSON rows, so that the tables, TTFT and plots
# treat both runtimes alike.
def is_onnx_model(path: Path) -> bool:
    path = Path(path)
    return (path.suffix == ".onnx" and path.is_file()) or (path.is_dir() and (path / MARKER).is_file())


def onnx_file_size(path: Path) -> int:
    path = Path(path)
    model = path / "model.onnx" if path.is_dir() else path
    return sum(f.stat().st_size for f in (model, model.with_name(model.name + ".data")) if f.is_file())


def _prefill_ns(lm, n: int, rng) -> int:
    ids = rng.integers(0, lm.n_vocab, n)
    t0 = time.perf_counter_ns()
    lm.step(ids, lm.empty_cache(), 0)
    return time.perf_counter_ns() - t0


def _decode_ns(lm, n: int, rng) -> int:
    cache, tok = lm.empty_cache(), int(rng.integers(0, lm.n_vocab))
    t0 = time.perf_counter_ns()
    for pos in range(n):
        logits, cache = lm.step([tok], cache, pos)
        tok = int(np.argmax(logits[-1]))
    return time.perf_counter_ns() - t0


def _row(kind: str, n: int, threads: int, samples_ns: list[int], ort_version: str) -> dict:
    ts = [n / (s / 1e9) for s in samples_ns]
    return {
        "n_prompt": n if kind == "pp" else 0,
        "n_gen": n if kind == "tg" else 0,
        "n_threads": threads,
        "avg_ts": float(np.mean(ts)),
        "stddev_ts": float(np.std(ts, ddof=1)) if len(ts) > 1 else 0.0,
        "samples_ns": samples_ns,
        "samples_ts": ts,
        "model_type": "onnx",
        "build_commit": f"onnxruntime {ort_version}",
        "backends": "onnxruntime CPUExecutionProvider",
    }


def onnx_bench_rows(
    path: Path, prompt_lengths: list[int], n_gen: int, threads: int, repetitions: int, seed: int = 0
) -> list[dict]:
    """llama-bench-style rows (pp per prompt length, then tg) for the ONNX model at `path`."""
    import onnxruntime

    from slim_edge.evals.backends import OnnxLM

    if repetitions < 1:
        raise SlimEdgeError(f"--repetitions {repetitions}: need at least 1")
    lm = OnnxLM(path, n_threads=threads)
    rng = np.random.default_rng(seed)
    rows = []
    for p in prompt_lengths:
        _prefill_ns(lm, p, rng)  # warm-up: onnxruntime allocates and packs on the first run of a shape
        rows.append(
            _row("pp", p, threads, [_prefill_ns(lm, p, rng) for _ in range(repetitions)], onnxruntime.__version__)
        )
    _decode_ns(lm, min(n_gen, 4), rng)
    rows.append(
        _row("tg", n_gen, threads, [_decode_ns(lm, n_gen, rng) for _ in range(repetitions)], onnxruntime.__version__)
    )
    return rows


# -- the benchmark -----------------------------------------------------------------------------
def run_bench(
    models: list[Path | str],
    device: Device | str = "host",
    config: BenchConfig | None = None,
    *,
    compare: str | None = None,
    progress: bool = True,
    log=None,
) -> BenchResult:
    """Benchmark each GGUF in `models` on `device` and return every measurement.

    >>> result = run_bench(["tiny-q4_0.gguf", "tiny-f16.gguf"], "host", BenchConfig(threads=[1]))
    >>> print(result.markdown())
    """
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = config or BenchConfig()
    paths = [Path(m) for m in models]
    onnx_paths = [p for p in paths if is_onnx_model(p)]
    missing = [str(p) for p in paths if not p.is_file() and p not in onnx_paths]
    if missing:
        raise SlimEdgeError(
            f"Model file(s) not found: {', '.join(missing)}. Pass paths to GGUF files or ONNX "
            f"exports (model.onnx or its folder)."
        )
    names = [
        p.name[:-5] if p.name.endswith(".gguf") else p.parent.name if p.name == "model.onnx" else p.name for p in paths
    ]
    if len(set(names)) != len(names):
        raise SlimEdgeError(f"Two models share a name ({', '.join(names)}); rename one so results stay apart.")
    onnx_names = {p: n for p, n in zip(paths, names) if p in onnx_paths}
    names = [n for p, n in zip(paths, names) if p not in onnx_paths]
    paths = [p for p in paths if p not in onnx_paths]
    for p in paths:  # a damaged or non-GGUF file is refused here, before anything is copied to the device
        read_tensor_table(p)
    dev = get_device(device) if isinstance(device, str) else device
    if onnx_paths and dev.name != "host":
        raise SlimEdgeError(
            f"ONNX models are benchmarked on the host only (onnxruntime here); drop "
            f"{', '.join(map(str, onnx_paths))} or use --device host"
        )

    dev.check_connection()
    info = dev.info()
    # Storage only matters where files are copied; RAM always.
    check_fits(info if dev.copies_files else replace(info, storage_available_kb=None), paths)
    dev.ensure_workdir()
    if dev.copies_files:
        dev.shell_ok(f"mkdir -p {dev.remote_path('results')}")
    tools, env = dev.stage_runtime(("llama-bench",)) if paths else ({}, {})
    log(f"[bench] {info.device}: {info.soc} {info.model} ({info.arch}); staging {len(paths)} model(s)")
    staged = dev.stage(paths, subdir="models")
    masks = pin_masks(info.max_freqs_khz, cfg.threads) if cfg.pin_big_cores else {}
    if masks:
        log(
            "[bench] pinning each thread to one of the fastest cores (highest cpuinfo_max_freq): "
            + ", ".join(f"{t} thread(s) -> mask {m}" for t, m in masks.items())
        )

    results, runtime = [], {"target": dev.runtime_target}
    if getattr(dev, "isa", None):  # the host build that runs (`--isa`): its kernels set the speeds
        runtime["isa"] = dev.isa
    jobs = [(p, n, t) for p, n in zip(paths, names) for t in cfg.threads]
    bar = tqdm(total=len(jobs), desc="bench", unit="run", file=sys.stderr, disable=not progress)
    by_name: dict[str, ModelResult] = {}
    for i, (path, name, threads) in enumerate(jobs):
        bar.set_postfix_str(f"{name} t={threads}")
        if i and cfg.delay:  # cool-down between runs (llama-bench --delay covers tests within one)
            time.sleep(cfg.delay)
        if cfg.cool_to is not None and info.thermal_c:
            waited, hottest = wait_cool(dev.thermal, cfg.cool_to)
            if waited >= 1:
                log(f"[bench] cooled for {waited:.0f} s; hottest zone now {hottest:.1f} °C")
        argv = llama_bench_argv(tools["llama-bench"], staged[path], cfg, threads, masks.get(threads))
        if dev.copies_files:  # llama-bench writes its JSONL on the device; pull it back
            remote_out = f"results/{safe_name(f'{name}-t{threads}.jsonl')}"
            res = dev.run_measured(
                argv, env=env, timeout=cfg.timeout, use_gnu_time=info.has_gnu_time, stdout_file=remote_out
            )
            with tempfile.TemporaryDirectory() as tmp:
                pulled = dev.pull(remote_out, Path(tmp) / "out.jsonl") if res.returncode == 0 else None
                text = pulled.read_text() if pulled else ""
        else:
            res = dev.run_measured(argv, env=env, timeout=cfg.timeout, use_gnu_time=info.has_gnu_time)
            text = res.stdout
        rows = parse_llama_bench(text)
        if res.returncode != 0 or not rows:
            raise SlimEdgeError(
                f"llama-bench failed on {info.device} for {path.name} (exit {res.returncode}): "
                f"{(res.stderr.strip() or res.stdout.strip())[-1200:]}"
            )
        mr = by_name.get(name)
        if mr is None:
            mr = by_name[name] = ModelResult(
                name=name, path=str(path), file_size=path.stat().st_size, model_type=str(rows[0].get("model_type", ""))
            )
            results.append(mr)
        mr.rows += rows
        if res.peak_rss_kb is not None and (mr.peak_rss_kb is None or res.peak_rss_kb > mr.peak_rss_kb):
            mr.peak_rss_kb, mr.peak_rss_method = res.peak_rss_kb, res.peak_rss_method
        if info.thermal_c:
            mr.thermal_after_c.append({"n_threads": threads, "zones": dev.thermal()})
        runtime.update(
            build_commit=rows[0].get("build_commit"),
            build_number=rows[0].get("build_number"),
            backends=rows[0].get("backends"),
            cpu_info=rows[0].get("cpu_info"),
        )
        bar.update(1)
    bar.close()
    for path, name in onnx_names.items():  # onnxruntime on the host, measured as llama-bench measures
        mr = ModelResult(name=name, path=str(path), file_size=onnx_file_size(path), model_type="onnx")
        for t in tqdm(cfg.threads, desc=f"onnxruntime {name}", file=sys.stderr, disable=not progress):
            mr.rows += onnx_bench_rows(path, cfg.prompt_lengths, cfg.n_gen, t, cfg.repetitions)
        runtime["onnxruntime"] = mr.rows[0]["build_commit"]
        results.append(mr)

    for mr in results:
        mr.prefill, mr.decode = summarize_rows(mr.rows)

    if dev.name == "host" and cfg.chat_ttft and paths:
        if llama_cpp_available():
            _, lib_dir = dev.runtime_dirs()
            for mr in tqdm(results, desc="chat TTFT", file=sys.stderr, disable=not progress):
                for t in cfg.threads if mr.model_type != "onnx" else ():
                    mr.chat_ttft.append(measure_chat_ttft(Path(mr.path), t, cfg.repetitions, lib_dir))
        else:
            log("[bench] llama_cpp is not installed: skipping the chat-prompt TTFT (pip install 'slim-edge[runtime]')")

    result = BenchResult(
        device=info,
        config=cfg,
        models=results,
        runtime=runtime,
        cpu_masks=masks,
        created=datetime.now().isoformat(timespec="seconds"),
    )
    if compare:
        result.compare = compare_to(result, compare)
    return result


# -- output ------------------------------------------------------------------------------------
def default_output_dir() -> Path:
    return Path("results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _is_bench_results(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / "bench.json").read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_results_dir(out_dir: Path, force: bool) -> None:
    """-o may be new, empty, or (with --force) an earlier bench's results folder; nothing else."""
    check_output_dir(out_dir, force, _is_bench_results)


def write_results(result: BenchResult, out_dir: Path, *, force: bool = False, plots: bool = True) -> dict[str, Path]:
    """Write bench.md, bench.json and the PNG plots into `out_dir` atomically: everything goes to a
    temporary sibling folder that is renamed into place at the end. An existing folder is refused
    unless force=True and it holds an earlier bench's results."""
    out_dir = Path(out_dir)
    check_results_dir(out_dir, force)
    names = ["bench.md", "bench.json"]
    with atomic_dir(out_dir) as tmp:
        (tmp / "bench.md").write_text(result.markdown())
        (tmp / "bench.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        if plots:
            from slim_edge.evals.plots import plot_decode, plot_ttft

            plot_ttft(result, tmp / "ttft.png")
            plot_decode(result, tmp / "decode.png")
            names += ["ttft.png", "decode.png"]
    return {n: out_dir / n for n in names}


# -- the command's flow (`slim-edge bench` in cli.py parses the options) ------------------------
def bench_models(
    models: list[Path],
    config: BenchConfig,
    device: str = "host",
    *,
    device_options: dict | None = None,
    baselines: list[str] | None = None,
    fp_model: Path | None = None,
    compare: str | None = None,
    output: Path | None = None,
    force: bool = False,
    cleanup: bool = False,
) -> tuple[BenchResult, dict[str, Path]]:
    """Add the `baselines` (built from `fp_model`, else from the unquantized file among `models`), run
    `run_bench` on `device` (get_device(device, **device_options)) and write the results folder `output`
    (default results/bench-<timestamp>). Returns the result and the files written.

    `output` is checked before anything is measured, and a wrong baseline name before an FP model is
    looked for: both are cheap to get wrong and minutes to find out."""
    out_dir = output or default_output_dir()
    check_results_dir(out_dir, force)
    models = list(models)
    if baselines is not None:
        check_baselines(baselines)
        src = fp_model or find_fp_model(models)
        if src is None:
            raise SlimEdgeError(
                "--baselines needs an unquantized (F16/F32/BF16) GGUF to quantize from: pass "
                "--fp-model PATH or include one among the models."
            )
        for b in build_baselines(src, baselines):
            if b.resolve() not in {m.resolve() for m in models}:
                models.append(b)
    dev = get_device(device, **(device_options or {}))
    try:
        result = run_bench(models, dev, config, compare=compare)
    finally:
        if cleanup:
            dev.cleanup()
    return result, write_results(result, out_dir, force=force)
