"""Kernel benchmark: prefill (pp512) and decode (tg128) of every 1-4 bit type in real model shapes.

    python -m slim_edge.evals.lab.kernel_bench [--shape llama-3.2-1b|1.8b|smollm2-135m] [--bin-dir DIR] [-r 3] [-t 1,2]
    python -m slim_edge.evals.lab.kernel_bench --merge lane1.json lane2.json --out table   # runs split by --types
    GGML_CPU_TILED_MM=0 python -m slim_edge.evals.lab.kernel_bench --types STQ1_0 --label vec_dot  # a variant's rows

One F16 GGUF with random normal weights is written per shape (llama architecture, a filler vocabulary
of the real size), then llama-quantize makes each type with the embedding and the output head pinned to
Q6_K (Q8_0 where rows are not whole 256-blocks: smollm2-135m; pass --head-type q8_0 there), so only the
linear layers differ. llama-bench times them; memory read bandwidth is measured with
a numpy read loop, and the decode bound is bandwidth / bytes read per token (all weights but the
token embedding, which is gathered, not read). Markdown goes to stdout, JSON beside it with --out.
--label names the rows of a variant of the same type ("STQ1_0 vec_dot"), so that a run with, e.g.,
GGML_CPU_TILED_MM=0 (STQ1_0 and Q2_0C prefill on the vec_dot kernels, as before patch 0007) or
GGML_CPU_STQ1_0_LUT=0 (STQ1_0 decode on vec_dot instead of the activation tables of patch 0009) merges
beside the default one; the GGML_* variables of the environment are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slim_edge.errors import note
from slim_edge.evals.tiny_gguf import add_llama_tensors

SHAPES = {
    # hidden, layers, heads, kv heads, ffn, vocab
    "llama-3.2-1b": dict(hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192, vocab=128256),
    "1.8b": dict(hidden=2048, n_layers=32, n_heads=16, n_kv_heads=4, ffn=6144, vocab=120818),
    # rows of 576 = 9 blocks of 64: the shape the 64-block types (Q2_0C_64, STQ1_0_64) exist for
    "smollm2-135m": dict(hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn=1536, vocab=49152),
    # issue 20's 1B-class shape whose rows are multiples of 64 but not of 256 (1600 = 25 x 64, 5440 = 85 x 64), and
    # the nearest shape the 512/256-blocks (Q2_0C, STQ1_0, TQ2_0) fit (1536 = 3 x 512, 5632 = 11 x 512)
    "1b-64": dict(hidden=1600, n_layers=24, n_heads=25, n_kv_heads=5, ffn=5440, vocab=49152),
    "1b-512": dict(hidden=1536, n_layers=24, n_heads=24, n_kv_heads=6, ffn=5632, vocab=49152),
}
TYPES = ["STQ1_0", "Q2_0C", "TQ1_0", "TQ2_0", "Q2_0", "Q4_0", "Q4_K_M", "F16"]


def write_random_f16(path: Path, hidden, n_layers, n_heads, n_kv_heads, ffn, vocab, seed=0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    kv = hidden // n_heads * n_kv_heads

    def w(rows, cols):
        # random normal, never zero (a zero matrix would take fast paths real models never take)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm():
        return (1.0 + 0.01 * rng.standard_normal(hidden)).astype(np.float32)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_name(f"random {path.stem}")
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    wr.add_context_length(4096)
    wr.add_embedding_length(hidden)
    wr.add_block_count(n_layers)
    wr.add_feed_forward_length(ffn)
    wr.add_head_count(n_heads)
    wr.add_head_count_kv(n_kv_heads)
    wr.add_rope_dimension_count(hidden // n_heads)
    wr.add_rope_freq_base(500000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(vocab)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores([0.0] * vocab)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    add_llama_tensors(wr, w, norm, n_layers, hidden, kv, ffn, vocab)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def read_bandwidth_gbs(threads: int = 1, mib: int = 1024, reps: int = 5) -> float:
    """Best-of-reps read bandwidth: a sum over a buffer far larger than the caches, in `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    bufs = [np.ones(mib * 2**20 // 8 // threads, np.float64) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(ex.map(np.sum, bufs))  # numpy releases the GIL in the reduction
            best = max(best, mib * 2**20 / (time.perf_counter() - t0) / 1e9)
    return best


def decode_bytes(path: Path) -> int:
    """Bytes of weights read per decoded token: every tensor but the (gathered) token embedding."""
    from slim_edge.converters.gguf_read import read_tensor_table  # PyPI gguf's reader rejects 43/44

    return sum(t.span for t in read_tensor_table(path).tensors if t.name != "token_embd.weight")


def embedding_type(hidden: int) -> str:
    """Q6_K for the token embedding, as llama-quantize picks; Q8_0 where a row is not whole 256-blocks (576)."""
    return "q6_K" if hidden % 256 == 0 else "q8_0"


def quantize(bin_dir: Path | None, f16: Path, kind: str, out: Path, head: str = "q6_K", embd: str = "q6_K") -> Path:
    """`kind` of the F16 model with token_embd in `embd` and the output head in `head`; an existing file is reused."""
    from slim_edge.converters.gguf_export import llama_quantize

    if kind == "F16":
        return f16
    if not out.exists():
        note(f"llama-quantize {kind} (head {head}, embedding {embd}) -> {out.name}")
        llama_quantize(f16, out, kind, bin_dir=bin_dir, token_embedding_type=embd, output_tensor_type=head)
    return out


def llama_bench(bench: Path, model: Path, threads: int, reps: int) -> dict[str, float]:
    p = subprocess.run(
        [str(bench), "-m", str(model), "-p", "512", "-n", "128", "-t", str(threads), "-r", str(reps), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = {}
    for row in json.loads(p.stdout):
        key = "pp512" if row["n_prompt"] else "tg128"
        out[key], out[key + "_std"] = row["avg_ts"], row["stddev_ts"]
    return out


def machine() -> dict:
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags"))
        isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512vbmi") if f in flags]
    except (OSError, StopIteration):
        isa = []
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_at_start": os.getloadavg(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("GGML_")},
    }


def add_ratios(rows: dict, threads: list[int]) -> None:
    for row in rows.values():
        for t in threads:
            x = row[f"t{t}"]
            for base in ("Q4_0", "TQ2_0"):
                if base in rows:
                    b = rows[base][f"t{t}"]
                    x[f"pp_vs_{base}"] = x["pp512"] / b["pp512"]
                    x[f"tg_vs_{base}"] = x["tg128"] / b["tg128"]


def to_markdown(result: dict) -> str:
    md = []
    for shape, rows in result["shapes"].items():
        threads = sorted({int(k[1:]) for row in rows.values() for k in row if k[:1] == "t" and k[1:].isdigit()})
        add_ratios(rows, threads)
        md.append(f"### {shape} ({SHAPES[shape]})\n")
        md.append(
            "| type | MiB | threads | pp512 t/s | tg128 t/s | tg/Q4_0 | tg/TQ2_0 | pp/Q4_0 | decode bound t/s "
            "| % of bound |"
        )
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in [k for k in TYPES if k in rows] + [k for k in rows if k not in TYPES]:
            row = rows[kind]
            for t in threads:
                x = row[f"t{t}"]
                md.append(
                    f"| {kind} | {row['mib']:.0f} | {t} | {x['pp512']:.1f} ± {x['pp512_std']:.1f} | "
                    f"{x['tg128']:.1f} ± {x['tg128_std']:.1f} | {x.get('tg_vs_Q4_0', float('nan')):.2f} | "
                    f"{x.get('tg_vs_TQ2_0', float('nan')):.2f} | {x.get('pp_vs_Q4_0', float('nan')):.2f} | "
                    f"{x['decode_bound']:.1f} | {100 * x['tg128'] / x['decode_bound']:.0f} |"
                )
        md.append("")
    return "\n".join(md)


def merge(paths: list[Path]) -> dict:
    """One result from several runs that each measured some types (lanes pinned to their own cores)."""
    parts = [json.loads(p.read_text()) for p in paths]
    out = {**parts[0], "shapes": {}, "lanes": [{"file": str(p), "machine": r["machine"]} for p, r in zip(paths, parts)]}
    for r in parts:
        for shape, rows in r["shapes"].items():
            out["shapes"].setdefault(shape, {}).update(rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="default: llama-3.2-1b")
    ap.add_argument("--bin-dir", type=Path, help="llama-bench/llama-quantize; default: slim-edge's host runtime")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "slim-edge" / "kernel-bench")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--label", help="row names become 'TYPE LABEL' (a variant measured beside the default)")
    ap.add_argument(
        "--head-type",
        default="q6_K",
        help="type of the output head (default q6_K, llama-quantize's choice); at 1-2 bits the head is "
        "a third or more of decode time, so try q4_0 (labels rows 'TYPE head q4_0')",
    )
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--prepare", action="store_true", help="only write the models, measure nothing")
    ap.add_argument("--merge", type=Path, nargs="+", help="combine the JSON of runs over disjoint --types")
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    a = ap.parse_args(argv)

    if a.merge:
        result = merge(a.merge)
    else:
        result = measure(a)
        if result is None:
            return 0
    text = to_markdown(result)
    print(text)
    if a.out:
        # OUT may hold dots (llama-3.2-1b): append the suffixes rather than replace one
        Path(f"{a.out}.md").write_text(text + "\n")
        Path(f"{a.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def measure(a) -> dict | None:
    if a.bin_dir is None:
        from slim_edge.runtime_patches import runtime

        a.bin_dir = runtime.find_runtime("host", tools=("llama-bench", "llama-quantize")).bin_dir
    bench = a.bin_dir / "llama-bench"
    threads = [int(t) for t in a.threads.split(",")]
    types = a.types.split(",")
    bw = {} if a.prepare else {t: read_bandwidth_gbs(t) for t in threads}
    note(f"read bandwidth GB/s: {bw}")
    result = {"schema": "slim-edge.kernel-bench/1", "machine": machine(), "bandwidth_gbs": bw, "shapes": {}}
    for shape in a.shape or ["llama-3.2-1b"]:
        d = a.work / shape
        d.mkdir(parents=True, exist_ok=True)
        f16 = d / "f16.gguf"
        if not f16.exists():
            note(f"writing random F16 {shape} ...")
            write_random_f16(d / "f16.tmp.gguf", **SHAPES[shape]).rename(f16)
        rows = {}
        default_head = a.head_type.lower() == "q6_k"
        label = a.label or (None if default_head else f"head {a.head_type}")
        for kind in types:
            name = kind.lower() if default_head else f"{kind.lower()}-head-{a.head_type.lower()}"
            model = quantize(
                a.bin_dir, f16, kind, d / f"{name}.gguf", a.head_type, embedding_type(SHAPES[shape]["hidden"])
            )
            if a.prepare:
                continue
            row = rows[f"{kind} {label}" if label else kind] = {
                "mib": model.stat().st_size / 2**20,
                "decode_bytes": decode_bytes(model),
            }
            for t in threads:
                note(f"llama-bench {shape} {kind} t={t} ...")
                r = llama_bench(bench, model, t, a.reps)
                row[f"t{t}"] = {**r, "decode_bound": bw[t] * 1e9 / row["decode_bytes"]}
        result["shapes"][shape] = rows
    return None if a.prepare else result


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: sys.exit(main()))
