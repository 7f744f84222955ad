"""Quality table: llama-quantize PTQ baselines next to slim-edge schemes at PTQ and after QAT, every row a
GGUF file run by the patched runtime and compared with the F16 file on the same held-out tokens.

    python -m slim_edge.evals.lab.quality_table -o evals/reports/quality_smollm2 \\
        [--qat-steps 44] [--reuse results/demo] [--extra 'LABEL=FILE.gguf=COMMAND' ...]

Rows it makes itself (cached in --runs, so a re-run only evaluates):
- F16, Q8_0 (the pinned converter), Q4_K_M, Q4_0, Q2_K, TQ2_0 (the runtime's llama-quantize from F16);
- seq2, sherry, tequila, ternary at PTQ (0 QAT steps) and after --qat-steps steps of the 2-core budget
  (the demo's recipe: batch 2 x 256 tokens of wiki:train, lr 1e-4); `--reuse DIR` takes DIR/ckpt-<scheme>
  when its recipe is the same (the demo's folder);
- `--extra` rows: files made elsewhere (a GPU run), with the command that made them.
Evaluation: lee:eval (never trained on), context 512, `--chunks` chunks, `slim_edge.evals.eval_cmd.evaluate`.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from slim_edge.errors import SlimEdgeError, note

MODEL = "smollm2-135m"
BASELINES = ("f16", "q8_0", "q4_k_m", "q4_0", "q2_k", "tq2_0")
SCHEMES = ("seq2", "sherry", "tequila", "ternary")
QAT_RECIPE = dict(batch_size=2, seq_len=256, lr=1e-4, calib="wiki")


@dataclass
class Row:
    label: str
    gguf: Path
    command: str
    kind: str  # baseline | ptq | qat-cpu | extra
    steps: int = 0
    seconds: float | None = None


def _log(msg: str) -> None:
    note(msg, prefix="== quality: ")


def _quantize_cmd(scheme: str, steps: int, out: Path) -> str:
    r = QAT_RECIPE
    train = (
        f" --batch-size {r['batch_size']} --seq-len {r['seq_len']} --lr {r['lr']:g} --calib {r['calib']}"
        if steps
        else ""
    )
    return f"slim-edge quantize {MODEL} --scheme {scheme} --steps {steps}{train} -o {out}"


def _same_recipe(ckpt: Path, scheme: str, steps: int) -> bool:
    try:
        cfg = json.loads((ckpt / "quant_config.json").read_text())
    except (OSError, ValueError):
        return False
    cfg = cfg.get("config", cfg)
    want = dict(QAT_RECIPE, scheme=scheme, steps=steps)
    return all(cfg.get(k) == v for k, v in want.items())


def scheme_row(scheme: str, steps: int, runs: Path, reuse: Path | None) -> Row:
    from slim_edge.converters.gguf_export import export_checkpoint
    from slim_edge.pipeline import run_quantize
    from slim_edge.quantize import QuantConfig

    tag = "ptq" if steps == 0 else f"qat{steps}"
    ckpt = runs / f"{scheme}-{tag}"
    if reuse is not None and steps and _same_recipe(reuse / f"ckpt-{scheme}", scheme, steps):
        ckpt = reuse / f"ckpt-{scheme}"
    gguf = runs / f"SmolLM2-135M-Instruct-{scheme}-{tag}.gguf"
    seconds = None
    if not (ckpt / "quant_config.json").exists():
        _log(f"quantize {scheme}, {steps} steps -> {ckpt}")
        t = time.perf_counter()
        cfg = QuantConfig(scheme=scheme, steps=steps, **(QAT_RECIPE if steps else {}))
        run_quantize(MODEL, cfg, ckpt, force=True)
        seconds = time.perf_counter() - t
    if not gguf.exists():
        export_checkpoint(ckpt, gguf, force=True)
    cmd = _quantize_cmd(scheme, steps, ckpt) + f" && slim-edge export {ckpt} --gguf {gguf.name}"
    return Row(f"slim-edge {scheme}", gguf, cmd, "ptq" if steps == 0 else "qat-cpu", steps, seconds)


def baseline_row(type_: str, runs: Path) -> Row:
    from slim_edge.converters.gguf_export import export_baseline

    gguf = runs / f"SmolLM2-135M-Instruct-{type_.upper()}.gguf"
    if not gguf.exists():
        _log(f"baseline {type_}")
        export_baseline(MODEL, gguf, type_, force=True)
    how = "converter" if type_ in ("f16", "q8_0") else "llama-quantize from F16"
    return Row(
        f"{type_.upper()} ({how})", gguf, f"slim-edge export {MODEL} --gguf {gguf.name} --type {type_}", "baseline"
    )


def parse_extra(spec: str) -> Row:
    parts = spec.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise SlimEdgeError(f"--extra {spec!r}: write LABEL=FILE.gguf=COMMAND (the command that made the file)")
    label, path, cmd = parts
    if not Path(path).is_file():
        raise SlimEdgeError(f"--extra {spec!r}: {path} is not a file")
    return Row(label, Path(path), cmd, "extra")


def to_markdown(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    ev = result["eval"]
    lines = [
        "# Quality of SmolLM2-135M-Instruct by format (slim-edge quality table)",
        "",
        f"Every row is a GGUF run by the patched runtime (llama-cpp-python {result['bindings']}), "
        f"{ev['chunks']} chunks of {ev['ctx']} tokens of `{ev['corpus']}:{ev['split']}` "
        f"({ev['scored_tokens']} scored tokens; training never sees it), against the F16 file. "
        f"Machine: {result['machine']}; {result['date']}.",
        "",
        "| model | how | QAT steps | bits/weight (linears) | MiB | PPL | ΔPPL vs F16 | mean KLD | "
        "same top-1 % | greedy loop rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        e = r["eval"]
        lines.append(
            f"| {r['label']} | {r['kind']} | {r['steps'] or '-'} | {r['bpw']:.3f} | {r['mib']:.1f} | "
            f"{f(e.get('ppl'), '.2f')} | {f(e.get('delta_ppl'), '+.2f')} | {f(e.get('mean_kld'), '.4f')} | "
            f"{f(e.get('same_top_pct'), '.1f')} | {f(e.get('repeat_rate'), '.2f')} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['label']} ({r['kind']}): `{r['command']}`" for r in result["rows"]]
    lines += ["", f"Made by `{result['argv']}` in {result['total_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(
    output: Path = typer.Option(..., "-o", help="report path without suffix (.md and .json are written)"),
    qat_steps: int = typer.Option(44, help="QAT steps of the 2-core rows (0 = none)"),
    schemes: str = typer.Option(",".join(SCHEMES), help="slim-edge schemes, comma-separated"),
    reuse: Path = typer.Option(None, help="a demo folder whose ckpt-<scheme> to reuse when the recipe matches"),
    extra: list[str] = typer.Option([], help="LABEL=FILE.gguf=COMMAND, a row made elsewhere"),
    chunks: int = typer.Option(16, help="evaluation chunks of 512 tokens"),
    runs: Path = typer.Option(Path("runs/quality"), help="where GGUFs and checkpoints are cached"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing report"),
):
    from importlib.metadata import version

    from slim_edge.converters.inspect import linear_bpw
    from slim_edge.evals.eval_cmd import evaluate

    md, js = output.with_suffix(".md"), output.with_suffix(".json")
    if (md.exists() or js.exists()) and not force:
        raise SlimEdgeError(f"{md} exists; pass --force to replace it")
    t0 = time.perf_counter()
    runs.mkdir(parents=True, exist_ok=True)
    extras = [parse_extra(s) for s in extra]
    rows = [baseline_row(t, runs) for t in BASELINES]
    names = [s for s in schemes.split(",") if s]
    rows += [scheme_row(s, 0, runs, reuse) for s in names]
    if qat_steps:
        rows += [scheme_row(s, qat_steps, runs, reuse) for s in names]
    rows += extras
    _log(f"evaluating {len(rows) - 1} files against F16")
    ev = evaluate(
        [str(r.gguf) for r in rows[1:]],
        reference=str(rows[0].gguf),
        corpus="lee",
        split="eval",
        ctx=512,
        max_chunks=chunks,
        gen_tokens=64,
        train_text="wiki",
    )
    by_model = {m["model"]: m for m in ev["models"]}
    out_rows = []
    for r in rows:
        e = {k: v for k, v in by_model[str(r.gguf)].items() if k != "generation"}
        out_rows.append(
            {
                **asdict(r),
                "gguf": str(r.gguf),
                "bpw": linear_bpw(r.gguf),
                "mib": r.gguf.stat().st_size / 2**20,
                "eval": e,
            }
        )
    result = {
        "rows": out_rows,
        "eval": {k: v for k, v in ev.items() if k != "models"},
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, 2 threads",
        "bindings": version("llama_cpp_python"),
        "date": time.strftime("%Y-%m-%d"),
        "argv": "python -m slim_edge.evals.lab.quality_table " + " ".join(sys.argv[1:]),
        "total_s": time.perf_counter() - t0,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((js, json.dumps(result, indent=1, default=str)), (md, to_markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(md.read_text())


if __name__ == "__main__":
    from slim_edge.errors import run_main

    run_main(lambda: typer.run(main))
