"""The `slim-edge` command: thin shells over library functions."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import SlimEdgeError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Turn an LLM into a 2-bit or 1.25-bit model that runs fast on a phone.\n\n"
                       "quantize (QAT) -> export --gguf -> runtime build -> eval / bench")

ModelArg = Annotated[str, typer.Argument(help="HF model folder, or the embedded default 'smollm2-135m'")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing output")]
JsonOut = Annotated[bool, typer.Option("--json", help="print machine-readable JSON to stdout")]


@app.callback()
def _root():
    """slim-edge: extreme quantization for edge devices."""


@app.command()
def quantize(
    model: ModelArg = "smollm2-135m",
    scheme: Annotated[str, typer.Option(help="seq2 | sherry | tequila | ternary | q2")] = "sherry",
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint folder to write")] = Path("runs/out"),
    steps: Annotated[int, typer.Option(help="QAT steps (0 = PTQ only: data-free scale init)")] = 0,
    calib: Annotated[str, typer.Option(help="training text: a UTF-8 file or wiki | lee | pydoc")] = "wiki",
    target: Annotated[Optional[str], typer.Option(help="override the primary format (e.g. tq1_0)")] = None,
    lr: Annotated[float, typer.Option(help="learning rate of the latent weights")] = 5e-5,
    scale_lr: Annotated[float, typer.Option(help="learning rate of the block scales")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    distill: Annotated[str, typer.Option(help="cakld | kl | none (CE only)")] = "cakld",
    keep: Annotated[str, typer.Option(help="comma-separated module-name fragments kept in high precision")]
    = "embed_tokens,lm_head",
    arenas_lambda: Annotated[float, typer.Option(help="Sherry's Arenas peak weight (0 = off)")] = 1.0,
    tequila_lambda: Annotated[float, typer.Option(help="Tequila's dead-weight bias factor")] = 1e-3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="save the training state every N steps")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run of the same -o")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the per-tensor plan and stop")] = False,
    seed: int = 0,
    force: Force = False,
    as_json: JsonOut = False,
):
    """Quantize MODEL with QAT and distillation from its full-precision self.

    Examples:

      slim-edge quantize smollm2-135m --scheme sherry --steps 200 -o runs/sherry

      slim-edge quantize ./my-llama --scheme seq2 --steps 2000 --calib corpus.txt -o runs/seq2

      slim-edge quantize smollm2-135m --scheme ternary --target tq1_0 --dry-run
    """
    from .pipeline import run_quantize
    from .quantize import QuantConfig

    config = QuantConfig(scheme=scheme, target=target, keep=tuple(k for k in keep.split(",") if k),
                         steps=steps, lr=lr, scale_lr=scale_lr, batch_size=batch_size, seq_len=seq_len,
                         distill=distill, arenas_lambda=arenas_lambda, tequila_lambda=tequila_lambda,
                         calib=calib, seed=seed)
    report = run_quantize(model, config, output, force=force, resume=resume, device=device,
                          checkpoint_every=checkpoint_every, dry_run=dry_run)
    if as_json:
        print(json.dumps(report, indent=1))


def main():
    try:
        app()
    except SlimEdgeError as e:
        print(f"slim-edge: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("slim-edge: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
