"""The `slim-edge` command: thin shells over library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import SlimEdgeError, run_main
from .runtime_patches import runtime
from .schemes import SCHEMES

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn an LLM into a 2-bit or 1.25-bit model that runs fast on a phone.\n\n"
    "quantize (QAT) -> export --gguf -> runtime build -> eval / bench",
)

ModelArg = Annotated[str, typer.Argument(help="HF model folder, or the embedded default 'smollm2-135m'")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing output")]
JsonOut = Annotated[bool, typer.Option("--json", help="print machine-readable JSON to stdout")]


@app.callback()
def _root():
    """slim-edge: extreme quantization for edge devices."""


@app.command()
def quantize(
    model: Annotated[
        str,
        typer.Argument(
            help="HF model folder, the embedded default 'smollm2-135m', or a slim-edge checkpoint to continue training"
        ),
    ] = "smollm2-135m",
    scheme: Annotated[
        str | None,
        typer.Option(
            help="; ".join(f"{s.name}: {s.doc}" for s in SCHEMES.values())
            + " (default: sherry, or the checkpoint's own)"
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="full-precision model to distil from when MODEL is a checkpoint (default: the one it was made from)"
        ),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint folder to write")] = Path("runs/out"),
    steps: Annotated[int, typer.Option(help="QAT steps (0 = PTQ only: data-free scale init)")] = 0,
    calib: Annotated[
        str,
        typer.Option(
            help="training text, comma-separated sources: a UTF-8 file, wiki | lee | pydoc "
            "| pydocs (1.4 M tokens of Python's HTML docs), or teacher[:N] (N tokens "
            "the FP model samples itself, e.g. wiki,teacher:2M; data-free when alone; "
            "options :temp=T :top_p=P :prompt=K open each sample with K tokens of the "
            "text and sample sharper, e.g. "
            "wiki,teacher:4M:temp=0.7:top_p=0.9:prompt=16; :batch=N samples N "
            "sequences at once instead of sizing the batch to 70 % of the free GPU "
            "memory, for runs that share a GPU. Samples are kept in the cache "
            "(samples/, or $SLIM_EDGE_SAMPLES) and reused by a run that asks for the "
            "same draw; :cache=0 "
            "samples anew. Samples sharing a 13-token span with lee or wiki's "
            "held-out text are dropped)"
        ),
    ] = "wiki",
    target: Annotated[str | None, typer.Option(help="override the primary format (e.g. tq1_0)")] = None,
    lr: Annotated[float, typer.Option(help="learning rate of the latent weights")] = 5e-5,
    scale_lr: Annotated[
        float,
        typer.Option(
            help="learning rate of the block scales; with --scale-update relative "
            "a step moves a scale by about this fraction of its size (3e-2 was "
            "best on SmolLM2: PPL 98.6 vs 493.7 at 1e-3 for seq2)"
        ),
    ] = 3e-2,
    scale_update: Annotated[
        str,
        typer.Option(
            help="relative (Adam on log d: the same relative step for small and large scales) | absolute (Adam on d)"
        ),
    ] = "relative",
    ste_clipped: Annotated[
        bool,
        typer.Option(
            "--ste-clipped",
            help="keep the straight-through gradient for "
            "weights beyond the outermost level (LSQ and ParetoQ zero it; "
            "default off)",
        ),
    ] = False,
    lsq_grad: Annotated[
        bool,
        typer.Option(
            "--lsq-grad",
            help="scale the block-scale gradient by LSQ's 1/sqrt(block * top level) (Adam mostly cancels it)",
        ),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            help="on a GPU, run fake quantization and the loss through "
            "torch.compile (~20 s of compiling): Sherry steps 1.4x faster, seq2 "
            "5 % slower; compiled rounding differs from the exported values on "
            "~5e-5 of seq2's weights (evals/reports/qat_throughput.md)"
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            help="sequences per step (per rank under torchrun); on a GPU go as large "
            "as memory allows: on an H200, SmolLM2-135M at 64 x 512 steps in the "
            "time of 32 x 512 (2.25x the tokens/s, 41 GiB; 128: 2.7x, "
            "78 GiB)"
        ),
    ] = 4,
    global_batch_size: Annotated[
        int,
        typer.Option(
            help="sequences per optimizer step over all ranks, a multiple of "
            "--batch-size x ranks: each rank sums the gradients of "
            "global / (batch x ranks) passes (gradient accumulation), "
            "so a small GPU takes the step a large one would; 0 "
            "(default): --batch-size x ranks"
        ),
    ] = 0,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    distill: Annotated[str, typer.Option(help="cakld | kl | none (CE only)")] = "cakld",
    ce_weight: Annotated[
        float,
        typer.Option(
            help="weight of the cross-entropy on the training text in the loss "
            "(ce_weight x CE + KD); 0 (default) = pure distillation: the student "
            "fits the FP model, not the text (a small text seen many times is "
            "learnt by heart). SmolLM2 seq2, H200, equal time: CE + KD (1) PPL "
            "89.1, KLD 1.35; pure KD (0) 66.9, 0.99"
        ),
    ] = 0.0,
    block_steps: Annotated[
        int,
        typer.Option(
            help="block-wise reconstruction steps per decoder layer before end-to-end "
            "QAT (EfficientQAT's Block-AP; 0 = off; on SmolLM2-135M it did not "
            "help, see evals/reports/qat_smollm2.md)"
        ),
    ] = 0,
    block_samples: Annotated[int, typer.Option(help="sequences the block-wise phase learns from")] = 128,
    ptq: Annotated[
        str,
        typer.Option(
            help="the PTQ start: rtn (per-block MSE-searched scale, round to nearest; "
            "data-free) | gptq (GPTQ: rounds column by column and moves each error "
            "onto the columns not yet rounded, weighted by the inputs of "
            "--ptq-samples training sequences; SmolLM2-135M seq2 at 0 steps: "
            "PPL 2.1e7 -> 710, see evals/reports/ptq_smollm2.md)"
        ),
    ] = "rtn",
    ptq_samples: Annotated[
        int,
        typer.Option(
            help="calibration sequences (of --seq-len tokens) for --ptq gptq; its time grows with them (fewer on CPU)"
        ),
    ] = 128,
    keep: Annotated[
        str, typer.Option(help="comma-separated module-name fragments kept in high precision")
    ] = "embed_tokens,lm_head",
    bits: Annotated[
        float | None,
        typer.Option(
            help="bits per weight over the quantized linears, from the scheme's own up to 4.5: the linears whose "
            "PTQ raises the KL to the FP model most per extra bit (measured on the training text) go to q4_0, "
            "the rest stay in the scheme's type (default: none; a checkpoint's own)",
            show_default=False,
        ),
    ] = None,
    embedding_type: Annotated[
        str | None,
        typer.Option(
            help="q8_0 | q4_0 | f16: the token embedding and tied head train on the type export writes "
            "(f16 keeps them float; default q8_0, or a checkpoint's own)",
            show_default=False,
        ),
    ] = None,
    act_quant: Annotated[
        bool,
        typer.Option(
            "--act-quant",
            help="train with the runtime's 8-bit activation "
            "rounding (Q8_0 / Q8_K blocks per weight type, straight-through); "
            "the checkpoint keeps it, so PyTorch computes what llama.cpp "
            "computes",
        ),
    ] = False,
    runtime_attention: Annotated[
        bool,
        typer.Option(
            "--runtime-attention",
            help="train attending as the runtime does: K, V, Q and the attention "
            "probabilities in half precision (llama.cpp's F16 KV cache) and ggml's rope "
            "angles; the checkpoint keeps it. With --act-quant the PyTorch model then "
            "rounds everything the runtime rounds: Sherry's top-1 agreement with "
            "llama.cpp went 93.0 -> 96.0 % (eager attention: more GPU memory)",
        ),
    ] = False,
    arenas_lambda: Annotated[
        float | None,
        typer.Option(
            help="Sherry's Arenas peak weight; 0 = off. Default: 1.0 from a full-precision model, 0 when MODEL is a "
            "checkpoint (its codes are trained; a new residual branch would have to be trained away again)",
            show_default=False,
        ),
    ] = None,
    tequila_lambda: Annotated[float, typer.Option(help="Tequila's dead-weight bias factor")] = 1e-3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    shard: Annotated[
        str,
        typer.Option(
            help="under torchrun: ddp (a full replica of the student per rank, "
            "DistributedDataParallel) | fsdp (FSDP2 fully_shard per decoder layer: "
            "each rank holds 1/N of the weights, grads and optimizer state) | auto "
            "(ddp when a full replica fits the GPU by the memory plan, else fsdp when "
            "the sharded state does). One process trains as without it. "
            "Every run saves its training state as a torch.distributed.checkpoint "
            "folder, OUT.partial/train.dcp/, that any number of ranks resumes, "
            "sharded or not"
        ),
    ] = "auto",
    fsdp_precision: Annotated[
        str,
        typer.Option(
            help="under --shard fsdp: fp32 | bf16 (the gathered weights the "
            "forward sees are bf16; the sharded master weights, block scales "
            "and gradient reductions stay fp32)"
        ),
    ] = "fp32",
    activation_checkpointing: Annotated[
        bool,
        typer.Option(
            "--activation-checkpointing",
            help="recompute each decoder layer in the backward: autograd keeps only the "
            "layers' inputs (see the --dry-run memory plan)",
        ),
    ] = False,
    shard_teacher: Annotated[
        bool,
        typer.Option(
            "--shard-teacher", help="under --shard fsdp: shard the teacher's QAT copy as the student (1/N per rank)"
        ),
    ] = False,
    memory_check: Annotated[
        bool,
        typer.Option(
            help="refuse a run whose memory plan (printed before training) does not fit the device's free memory"
        ),
    ] = True,
    checkpoint_every: Annotated[int, typer.Option(help="save the training state every N steps")] = 50,
    time_limit: Annotated[
        float,
        typer.Option(
            help="minutes for the whole run; QAT stops there and saves the "
            "model trained so far. The lr and Arenas schedules run on time, so "
            "they end at the limit even when --steps are not reached; 0 = none"
        ),
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue an interrupted run of the same -o (its "
            "OUT.partial/train.dcp/, which any number of ranks "
            "resumes, or an older version's train.pt)",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the per-tensor plan and stop")] = False,
    seed: int = 0,
    force: Force = False,
    as_json: JsonOut = False,
):
    """Quantize MODEL with QAT and distillation from its full-precision self.

    Examples:

      slim-edge quantize smollm2-135m --scheme sherry --steps 200 -o runs/sherry

      slim-edge quantize ./my-llama --scheme seq2 --steps 2000 --calib corpus.txt -o runs/seq2

      slim-edge quantize smollm2-135m --scheme seq2 --ptq gptq --steps 3000 --batch-size 64 --seq-len 512 \\
        --time-limit 15 --device cuda -o runs/seq2
      (session 16's H200 recipe: held-out PPL 66.9, KLD 0.99; the lr schedule ends at the time limit)

      slim-edge quantize smollm2-135m --scheme seq2 --steps 2000 --calib wiki,teacher:4M --device cuda -o runs/seq2

      slim-edge quantize runs/seq2 --steps 500 --act-quant -o runs/seq2-more   (continue a checkpoint)

      slim-edge quantize runs/sherry --steps 500 --act-quant --runtime-attention -o runs/sherry-rt

      slim-edge quantize smollm2-135m --scheme seq2 --bits 2.5 --steps 30 -o runs/seq2-2.5

      slim-edge quantize smollm2-135m --scheme ternary --target tq1_0 --dry-run

      torchrun --nproc-per-node 4 --no-python slim-edge quantize smollm2-135m --scheme seq2 --steps 1000 \\
        --device cuda -o runs/seq2   (data-parallel; --batch-size per GPU)

      slim-edge quantize smollm2-135m --scheme seq2 --batch-size 16 --global-batch-size 64 --device cuda \
        -o runs/seq2   (the 64-sequence step of a larger GPU in 4 accumulated passes of 16)

      torchrun --nproc-per-node 8 --no-python slim-edge quantize ./my-llama --shard fsdp --steps 1000 \\
        --device cuda -o runs/seq2   (sharded)
    """
    from .checkpoint import is_checkpoint, read_meta
    from .distributed import world_from_env
    from .pipeline import run_quantize
    from .quantize import QuantConfig

    if time_limit < 0 or checkpoint_every < 1:
        raise SlimEdgeError(
            f"--time-limit {time_limit} / --checkpoint-every {checkpoint_every}: need minutes >= 0 "
            f"(0 = no limit) and a save at least every step"
        )
    if scheme is None:
        scheme = read_meta(Path(model))["config"]["scheme"] if is_checkpoint(model) else "sherry"
    if arenas_lambda is None:
        arenas_lambda = 0.0 if is_checkpoint(model) else 1.0
    if is_checkpoint(model):
        base = QuantConfig.from_json(read_meta(Path(model))["config"])
        bits = base.bits if bits is None else bits
        embedding_type = embedding_type or base.embedding_type
    config = QuantConfig(
        scheme=scheme,
        target=target,
        keep=tuple(k for k in keep.split(",") if k),
        steps=steps,
        lr=lr,
        scale_lr=scale_lr,
        scale_update=scale_update,
        ste_clipped=ste_clipped,
        lsq_grad=lsq_grad,
        compile=compile,
        batch_size=batch_size,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        distill=distill,
        ce_weight=ce_weight,
        block_steps=block_steps,
        block_samples=block_samples,
        ptq=ptq,
        ptq_samples=ptq_samples,
        arenas_lambda=arenas_lambda,
        tequila_lambda=tequila_lambda,
        act_quant=act_quant,
        runtime_attention=runtime_attention,
        shard=shard,
        fsdp_precision=fsdp_precision,
        activation_checkpointing=activation_checkpointing,
        shard_teacher=shard_teacher,
        calib=calib,
        seed=seed,
        bits=bits,
        embedding_type=embedding_type or "q8_0",
    )
    report = run_quantize(
        model,
        config,
        output,
        force=force,
        resume=resume,
        device=device,
        checkpoint_every=checkpoint_every,
        dry_run=dry_run,
        time_limit=time_limit * 60,
        teacher_model=teacher,
        memory_check=memory_check,
    )
    if as_json and world_from_env().main:  # under torchrun the results are rank 0's
        print(json.dumps(report, indent=1))


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="a checkpoint folder from `slim-edge quantize`, or (with --type) "
            "an HF folder / 'smollm2-135m' for a baseline"
        ),
    ],
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf", help="GGUF file to write (default: named by the GGUF convention, in the current folder)"
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            help="write an ONNX Runtime folder instead: model.onnx "
            "(the trained codes as MatMulNBits; from an HF model: a "
            "float32 baseline), tokenizer, "
            "genai_config.json",
        ),
    ] = None,
    type_: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="baseline from the FP model: f16 | q8_0 (the "
            "converter) or q4_0 | q4_k_m | q4_k_s | q2_k | tq2_0 | tq1_0 (llama-quantize, "
            "llama.cpp's PTQ)",
        ),
    ] = None,
    token_embedding_type: Annotated[
        str | None,
        typer.Option(
            help="f16 | q8_0 | q4_0 (default: the type the checkpoint's embedding trained on, written as its codes; "
            "q8_0 for a float one)",
            show_default=False,
        ),
    ] = None,
    onnx_bits: Annotated[
        int,
        typer.Option(
            help="with --onnx: the fewest bits per code of the quantized linears. 2: "
            "the smallest file; 4: the same values in onnxruntime's fast 4-bit "
            "kernel (linears ~2x larger, decode several times faster on CPU: "
            "evals/reports/onnx_bench_host.md)"
        ),
    ] = 2,
    onnx_attention: Annotated[
        str | None,
        typer.Option(
            help="with --onnx: gqa (default: onnxruntime's fused GroupQueryAttention and RMSNorm ops, faster decode) | "
            "plain (every step in standard ONNX ops, for runtimes without onnxruntime's contrib ops)",
            show_default=False,
        ),
    ] = None,
    output_tensor_type: Annotated[str, typer.Option(help="untied output head: f16 | q8_0 | q4_0")] = "q8_0",
    tensor_type: Annotated[
        list[str] | None, typer.Option(help="REGEX=TYPE for unquantized tensors (repeatable)")
    ] = None,
    force: Force = False,
    as_json: JsonOut = False,
):
    """Write the trained codes exactly as GGUF tensors (or an F16/Q8_0/Q4 baseline with --type).

    Examples:

      slim-edge export runs/sherry --gguf sherry.gguf

      slim-edge export smollm2-135m --type q4_k_m --gguf smollm2-q4_k_m.gguf

      slim-edge export runs/seq2 --onnx seq2-onnx

      slim-edge export runs/seq2 --onnx seq2-onnx4 --onnx-bits 4    (faster decode, larger file)

      slim-edge export runs/seq2 --onnx seq2-plain --onnx-attention plain
    """
    if onnx is not None:
        from .converters.onnx_export import export_onnx

        if gguf is not None or type_ is not None:
            raise SlimEdgeError("--onnx writes an ONNX folder from a checkpoint; leave out --gguf and --type")
        summary = export_onnx(
            source, onnx, force=force, bits=onnx_bits, **({"attention": onnx_attention} if onnx_attention else {})
        )
        rounded = [k for k, v in summary["trained_for"].items() if v]
        if rounded:
            print(
                f"slim-edge: note: the checkpoint was trained through llama.cpp's roundings ({', '.join(rounded)}); "
                f"onnxruntime computes in float32, so its logits are the plain forward of the same weights",
                file=sys.stderr,
            )
        print(
            json.dumps(summary, indent=1)
            if as_json
            else f"wrote {onnx} ({summary['bytes'] / 2**20:.1f} MiB, {summary['linear_bits_per_weight']:.3f} bits per "
            f"weight in the linears)"
        )
        return
    if onnx_bits != 2:
        raise SlimEdgeError(f"--onnx-bits {onnx_bits} applies to --onnx exports only; add --onnx DIR or leave it out")
    if onnx_attention is not None:
        raise SlimEdgeError(
            f"--onnx-attention {onnx_attention} applies to --onnx exports only; add --onnx DIR or leave it out"
        )
    from .converters.gguf_export import export_baseline, export_checkpoint
    from .converters.model_card import card_path, write_card

    if type_ is not None:
        out = gguf or Path(f"{Path(source).name}-{type_.upper()}.gguf")
        card = card_path(out, force)  # refused now, not after the export
        summary = export_baseline(source, out, type_, force=force)
    else:
        from .checkpoint import read_meta

        meta = read_meta(Path(source))
        out = gguf or Path(f"{Path(source).name}-{meta['config']['scheme']}.gguf")
        card = card_path(out, force)
        summary = export_checkpoint(
            Path(source),
            out,
            token_embedding_type=token_embedding_type,
            output_tensor_type=output_tensor_type,
            overrides=tensor_type,
            force=force,
        )
        for name, k in summary["kept"].items():
            if not k["exact"]:
                better = f"; {k['exact_in']} holds it exactly" if k.get("exact_in") else ""
                print(
                    f"slim-edge: note: {name} in {k['type']} differs from the checkpoint (max |error| "
                    f"{k['max_abs_err']:.2g}, relative RMS {k['rel_rms_err']:.2g}){better}",
                    file=sys.stderr,
                )
    summary["model_card"] = str(write_card(out, summary, source, card=card))
    print(
        json.dumps(summary, indent=1)
        if as_json
        else f"wrote {out} ({summary['bytes'] / 2**20:.1f} MiB); model card {summary['model_card']}"
    )


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="a GGUF file, or an ONNX model (model.onnx or its folder)")],
    runtime: Annotated[str, typer.Option(help="stock | patched: which runtime to check the types against")] = "stock",
    as_json: JsonOut = False,
):
    """Per-tensor types, bits per weight, size, metadata, and which runtime the file needs; for an ONNX model
    (model.onnx or its export folder) its operators, per-weight bits and size.

    Examples:  slim-edge inspect sherry.gguf --runtime stock

               slim-edge inspect seq2-onnx/model.onnx
    """
    from .converters.inspect import format_report, inspect_gguf
    from .fsutil import path_kind

    path_kind(file, "")  # a path too long to look up is one line, before the ONNX test looks inside it
    if file.suffix == ".onnx" or (file / "model.onnx").is_file():
        from .converters.onnx_export import format_onnx_report, inspect_onnx

        report = inspect_onnx(file)
        print(json.dumps(report, indent=1) if as_json else format_onnx_report(report))
        return

    report = inspect_gguf(file, runtime)
    print(json.dumps(report, indent=1) if as_json else format_report(report))


@app.command()
def demo(
    steps: Annotated[
        int,
        typer.Option(
            help="QAT steps per scheme, 2 x 256 tokens each, after the PTQ start "
            "(the defaults take ~17 min on 2 idle cores; the whole demo ~22)"
        ),
    ] = 24,
    ptq: Annotated[
        str,
        typer.Option(
            help="PTQ start: gptq (64 x 256 calibration tokens, 2.5-4 min per scheme on 2 "
            "cores; seq2 demo PPL 231 vs 10,186 from rtn) | "
            "rtn (round to nearest)"
        ),
    ] = "gptq",
    output: Annotated[Path, typer.Option("-o", help="results folder")] = Path("results/demo"),
    eval_chunks: Annotated[int, typer.Option(help="512-token chunks of lee:eval scored per model")] = 8,
    bench_reps: Annotated[int, typer.Option(help="llama-bench repetitions per measurement")] = 3,
    force: Force = False,
):
    """The main job on the embedded SmolLM2-135M: quantize (seq2, sherry) -> export -> runtime build ->
    eval -> bench against Q4_0, Q4_K_M and F16 -> one summary table and plots."""
    from .demo import run_demo

    if min(steps, eval_chunks, bench_reps) < 1:
        raise SlimEdgeError(
            f"--steps {steps}, --eval-chunks {eval_chunks}, --bench-reps {bench_reps}: each must be at least 1"
        )
    run_demo(steps=steps, out=output, force=force, eval_chunks=eval_chunks, bench_reps=bench_reps, ptq=ptq)


# --- slim-edge runtime: the patched llama.cpp (slim_edge.runtime_patches) ----------------------------

runtime_app = typer.Typer(
    no_args_is_help=True,
    help="Build and locate the patched llama.cpp runtime (pinned: llama-cpp-python "
    f"{runtime.PIN.version} = llama.cpp {runtime.PIN.commit}).",
)
app.add_typer(runtime_app, name="runtime")

TargetOpt = Annotated[str, typer.Option("--target", "-t", help=f"one of {', '.join(runtime.TARGETS)}")]
IsaOpt = Annotated[
    str,
    typer.Option(
        "--isa",
        help="host x86 ISA: avx2 (AVX2+FMA+F16C), avx512 (+VNNI, BF16, VBMI) or native (-march=native, not portable)",
    ),
]
NativeOpt = Annotated[bool, typer.Option("--native", help="same as --isa native")]
ArmOpt = Annotated[str, typer.Option("--arm-arch", help="aarch64 -march for linux-arm64/android-arm64")]
_TOOLS = ", ".join(runtime.DEFAULT_TOOLS)
ToolOpt = Annotated[
    list[str] | None, typer.Option("--tool", help=f"build these instead of the default set ({_TOOLS}); repeatable")
]


def _isa(isa: str, native: bool) -> str:
    return "native" if native else isa


def _report(rt: runtime.Runtime, as_json: bool) -> None:
    print(
        f"llama.cpp {runtime.PIN.commit} runtime for {rt.target}: tools in {rt.bin_dir}"
        + (f", libraries in {rt.lib_dir}" if rt.config.flavor == "host" else ""),
        file=sys.stderr,
    )
    if as_json:
        print(json.dumps(rt.to_json(), indent=2))


@runtime_app.command("build")
def runtime_build(
    target: TargetOpt = "host",
    isa: IsaOpt = "avx2",
    native: NativeOpt = False,
    arm_arch: ArmOpt = runtime.DEFAULT_ARM_ARCH,
    tool: ToolOpt = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="compile jobs")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False,
    keep_build: Annotated[
        bool, typer.Option("--keep-build", help="keep the tree and build dir (.work-<target> in the cache)")
    ] = False,
    as_json: JsonOut = False,
):
    """Build the patched llama.cpp tools (cached by pin + patch series + target + flags).

    host: AVX2 tools plus the shared libllama the Python bindings load; linux-arm64: static aarch64
    tools that run under qemu-aarch64 and from /data/local/tmp on a phone.

    Examples:
      slim-edge runtime build
      slim-edge runtime build --target linux-arm64
      slim-edge runtime build --isa avx512 --json
    """
    rt = runtime.build(
        target,
        isa=_isa(isa, native),
        arm_arch=arm_arch,
        tools=tuple(tool) if tool else None,
        jobs=jobs,
        force=force,
        keep_build=keep_build,
    )
    _report(rt, as_json)


@runtime_app.command("where")
def runtime_where(
    target: TargetOpt = "host",
    isa: IsaOpt = "avx2",
    native: NativeOpt = False,
    arm_arch: ArmOpt = runtime.DEFAULT_ARM_ARCH,
    tool: ToolOpt = None,
    as_json: JsonOut = False,
):
    """Print where the built tools are, without building.

    Example:  slim-edge runtime where --target linux-arm64 --json
    """
    rt = runtime.find_runtime(target, isa=_isa(isa, native), arm_arch=arm_arch, tools=tuple(tool) if tool else None)
    _report(rt, as_json)


@runtime_app.command("python-env")
def runtime_python_env(isa: IsaOpt = "avx2", native: NativeOpt = False):
    """Print the export line that makes `import llama_cpp` load the patched host library.

    Example:  eval "$(slim-edge runtime python-env)"
    """
    rt = runtime.find_runtime("host", isa=_isa(isa, native))
    for k, v in rt.env().items():
        print(f"export {k}={v}")


@runtime_app.command("source")
def runtime_source(
    dest: Annotated[Path, typer.Argument(help="new directory for the tree")],
    pristine: Annotated[bool, typer.Option("--pristine", help="leave the patches out")] = False,
):
    """Write the pinned llama.cpp tree (patched unless --pristine), e.g. to write a new patch.

    Example:  slim-edge runtime source /tmp/llama.cpp --pristine
    """
    patches = runtime.patch_series()
    runtime.prepare_source(dest, patches, pristine=pristine)
    added = "" if pristine else f" + {len(patches)} patch(es)"
    print(f"llama.cpp {runtime.PIN.commit}{added} in {dest}", file=sys.stderr)


@runtime_app.command("patches")
def runtime_patches_cmd(as_json: JsonOut = False):
    """List the patch series the runtime is built with: file name and sha256 of each patch.

    An empty or incomplete series (a broken install) is an error, as it is for `runtime build`.

    Examples:
      slim-edge runtime patches
      slim-edge runtime patches --json
    """
    series = runtime.describe_series()
    if as_json:
        print(json.dumps(series, indent=2))
        return
    for p in series:
        print(f"{p['sha256']}  {p['name']}")
    print(f"{len(series)} patches on llama.cpp {runtime.PIN.commit} in {runtime.PATCH_DIR}", file=sys.stderr)


# --- slim-edge gguf: low-level GGUF fixes (slim_edge.converters.gguf_retag) -------------------------

gguf_app = typer.Typer(help="Low-level GGUF fixes.", no_args_is_help=True)
app.add_typer(gguf_app, name="gguf")


@gguf_app.callback()
def _gguf_group():
    """Low-level GGUF fixes (a group even with one command, so `slim-edge gguf retag` keeps its name)."""


@gguf_app.command("retag")
def retag_cmd(
    file: Annotated[Path, typer.Argument(help="GGUF file to fix")],
    from_id: Annotated[int, typer.Option("--from", help="type id the old file stores")] = 42,
    to_id: Annotated[int, typer.Option("--to", help="type id to write")] = 43,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="output file (default: FILE with -retag before .gguf)")
    ] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="replace FILE (atomically)")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would change")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")] = False,
):
    """Retag STQ1_0 tensors stored under type 42 (older AngelSlim exports) as 43.

    Only tensors typed --from whose data is laid out as --to (STQ1_0: 42 bytes per 256 weights, vs
    Q2_0: 18 bytes per 64) change; genuine Q2_0 tensors and all other bytes stay as they are.

    Examples:
      slim-edge gguf retag model.gguf --dry-run
      slim-edge gguf retag model.gguf -o model-stq1_0.gguf
      slim-edge gguf retag model.gguf --in-place
    """
    from .converters.gguf_retag import retag
    from .converters.inspect import printable

    plan, written = retag(file, out, from_id=from_id, to_id=to_id, force=force, in_place=in_place, dry_run=dry_run)
    log = [f"  {printable(t.name):40s} {list(t.shape)}  {from_id} -> {to_id}" for t in plan.retag]
    if plan.keep:
        log.append(f"  kept {len(plan.keep)} tensor(s) typed {from_id} whose bytes match type {from_id}")
    if dry_run:
        log.append(f"dry run: would retag {len(plan.retag)} tensor(s) {from_id} -> {to_id}; nothing written")
    elif written is None:
        log.append(f"nothing to retag in {file}: no tensor typed {from_id} has the {to_id} layout; nothing written")
    else:
        log.append(f"retagged {len(plan.retag)} tensor(s) {from_id} -> {to_id}: {written}")
    print("\n".join(log), file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({**plan.to_json(), "output": str(written) if written else None, "dry_run": dry_run}, indent=2))


# --- slim-edge bench (slim_edge.evals.bench) -------------------------------------------------------


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SlimEdgeError(f"{what} must be comma-separated integers, e.g. 1,2; got {text!r}.")


@app.command()
def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="GGUF files to benchmark (slim-edge files and baselines), "
            "and on the host ONNX exports (run by onnxruntime)."
        ),
    ],
    device: Annotated[str, typer.Option("--device", "-d", help="host | android | ssh | qemu-arm64")] = "host",
    serial: Annotated[str | None, typer.Option(help="android: adb serial when several phones are attached.")] = None,
    host: Annotated[str | None, typer.Option(help="ssh: user@address of the board.")] = None,
    port: Annotated[int, typer.Option(help="ssh: port.")] = 22,
    identity: Annotated[Path | None, typer.Option(help="ssh: private key file.")] = None,
    prompt_lengths: Annotated[
        str, typer.Option("--prompt-lengths", "-p", help="Prompt lengths for prefill and TTFT.")
    ] = "128,256,512,1024",
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", help="Tokens generated in the decode test.")] = 128,
    threads: Annotated[str, typer.Option("--threads", "-t", help="Thread counts.")] = "1,2",
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Repetitions of each test.")] = 5,
    delay: Annotated[int, typer.Option(help="Cool-down seconds between tests and runs.")] = 0,
    cool_to: Annotated[
        float | None,
        typer.Option(
            help="Before each run wait (up to 5 min) until the hottest thermal zone reads below this many °C, e.g. 40."
        ),
    ] = None,
    baselines: Annotated[str | None, typer.Option(help="Build and add baselines, e.g. q4_0,q4_k_m,f16.")] = None,
    fp_model: Annotated[Path | None, typer.Option(help="F16/F32 GGUF the baselines are quantized from.")] = None,
    compare: Annotated[str | None, typer.Option(help="Print ratios against this model, e.g. q4_0.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Results folder (default results/bench-<timestamp>).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing results folder.")] = False,
    cleanup: Annotated[bool, typer.Option(help="Remove the device's working folder afterwards.")] = False,
    pin: Annotated[bool, typer.Option(help="Pin threads to the fastest cores (android/ssh).")] = True,
    chat_ttft: Annotated[bool, typer.Option(help="host: also time a chat prompt through llama_cpp.")] = True,
    isa: Annotated[
        str,
        typer.Option(
            "--isa",
            help="host: the runtime build to run, by its x86 ISA (avx2, "
            "avx512, native: `slim-edge runtime build --isa`).",
        ),
    ] = "avx2",
    as_json: Annotated[
        bool, typer.Option("--json", help="print the results as JSON on stdout (bench.json's) instead of the table")
    ] = False,
):
    """Measure time to first token and decode speed of GGUF models on a device.

    Examples:

        slim-edge bench model-stq1_0.gguf --baselines q4_0,f16 --fp-model model-f16.gguf --compare q4_0

        slim-edge bench model-q2_0.gguf model-q4_0.gguf --device android --serial R58M12345 -t 2,4 --cool-to 40

        slim-edge bench model-q2_0.gguf --device ssh --host pi@192.168.1.20 --identity ~/.ssh/id_ed25519

        slim-edge bench tiny.gguf --device qemu-arm64 -p 16 -n 8 -r 1   # emulated, not a speed figure

        slim-edge bench seq2.gguf seq2-onnx -t 2   # llama.cpp and onnxruntime side by side on the host

        slim-edge bench seq2.gguf q4_0.gguf --isa avx512 --compare q4_0   # the AVX-512 (VNNI) build

    Writes bench.md (table), bench.json (every sample, device info, runtime commit, CPU features)
    and ttft.png / decode.png into the results folder; prints the table to stdout (--json: bench.json's
    content).
    """
    from .evals.bench import BenchConfig, bench_models

    cfg = BenchConfig(
        prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"),
        n_gen=n_gen,
        threads=_ints(threads, "--threads"),
        repetitions=repetitions,
        delay=delay,
        cool_to=cool_to,
        pin_big_cores=pin,
        chat_ttft=chat_ttft,
    )
    given = {
        "--host": host is not None,
        "--port": port != 22,
        "--identity": identity is not None,
        "--serial": serial is not None,
    }
    given["--isa"] = isa != "avx2"
    takes = {"ssh": {"--host", "--port", "--identity"}, "android": {"--serial"}, "host": {"--isa"}}.get(device, set())
    ignored = [k for k, v in given.items() if v and k not in takes]
    if ignored and device in {"host", "android", "ssh", "qemu-arm64"}:
        them = "them" if len(ignored) > 1 else "it"
        raise SlimEdgeError(
            f"{', '.join(ignored)} given with --device {device}, which does not use {them}; "
            f"leave {them} out or pick the device it is for"
        )
    kinds = None if not baselines else [k.strip().lower() for k in baselines.split(",") if k.strip()]
    result, files = bench_models(
        models,
        cfg,
        device,
        device_options=dict(
            serial=serial,
            host=host,
            port=port,
            identity=str(identity.expanduser()) if identity else None,
            isa=isa if device == "host" else None,
        ),
        baselines=kinds,
        fp_model=fp_model,
        compare=compare,
        output=output,
        force=force,
        cleanup=cleanup,
    )
    print(json.dumps(result.to_json(), indent=1) if as_json else result.markdown())
    print(f"results: {', '.join(str(p) for p in files.values())}", file=sys.stderr)


# --- slim-edge eval (slim_edge.evals.eval_cmd) -----------------------------------------------------

ModelsArg = Annotated[
    list[str],
    typer.Argument(help="GGUF files (run by the runtime), slim-edge checkpoint folders, HF folders or 'smollm2-135m'"),
]


@app.command(name="eval")
def eval_command(
    models: ModelsArg,
    reference: Annotated[
        str | None,
        typer.Option("--reference", "-r", help="full-precision model to compare against (KLD, ΔPPL, same top-1)"),
    ] = None,
    corpus: Annotated[str, typer.Option(help="lee | wiki | pydoc | pydocs, or a UTF-8 text file")] = "lee",
    split: Annotated[str, typer.Option(help="eval (held out) | train, for the built-in corpora")] = "eval",
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="tokens per chunk; the second half is scored")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="evaluate at most this many chunks")] = None,
    gen_tokens: Annotated[int, typer.Option(help="greedy tokens per prompt for the loop check (0 = skip)")] = 64,
    threads: Annotated[int, typer.Option("--threads", "-t", help="CPU threads for torch and the runtime")] = 2,
    train_text: Annotated[
        str | None,
        typer.Option(help="the text the models were trained on (corpus name or file): refuse overlapping eval text"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the results as JSON to stdout (the table goes to stderr)")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the results as JSON to this file")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing -o file")] = False,
):
    """Perplexity, KL divergence against a reference, and a generation loop check.

    Numbers follow llama-perplexity: chunks of --ctx tokens, the second half of each scored, KLD =
    KL(reference ‖ model) per token. GGUF files run through the pinned llama.cpp runtime, folders
    through PyTorch, all on the same token ids.

    Examples:

      slim-edge eval runs/sherry/model.gguf --reference smollm2-135m

      slim-edge eval runs/seq2 runs/seq2/model.gguf -r smollm2-135m --corpus wiki --chunks 40

      slim-edge eval smollm2-135m --corpus notes.txt --ctx 256 --gen-tokens 0 -o results.json

      slim-edge eval runs/seq2/model.gguf -r smollm2-135m --chunks 8 --json | jq '.models[1].mean_kld'
    """
    from .evals import eval_cmd

    for m in models:
        if m.endswith(".json") and not Path(m).is_dir():
            raise SlimEdgeError(
                f"MODEL {m} is a .json file, not a model: --json is a flag (JSON on stdout); "
                f"write the results to a file with -o {m}"
            )
    if output is not None:
        eval_cmd.check_results_file(output, [*models, *([reference] if reference else [])], force, "-o")
    result = eval_cmd.evaluate(
        models,
        reference=reference,
        corpus=corpus,
        split=split,
        ctx=ctx,
        max_chunks=chunks,
        gen_tokens=gen_tokens,
        threads=threads,
        train_text=train_text,
    )
    print(eval_cmd.format_table(result), file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(result, indent=1))
    if output is not None:
        eval_cmd.write_results(result, output)
        print(f"slim-edge: wrote {output}", file=sys.stderr)


def main():
    run_main(app)


if __name__ == "__main__":
    main()
