"""slim-edge: extreme (2-bit, 1.25-bit) quantization of LLMs for edge devices.

The Python API beside the CLI (each name is imported on first use, so `import slim_edge` stays light):

    import slim_edge

    config = slim_edge.QuantConfig(scheme="seq2", steps=200, ptq="gptq")
    report = slim_edge.quantize_("smollm2-135m", config, "runs/seq2")   # = slim-edge quantize
    model, tokenizer = slim_edge.load_quantized("runs/seq2")             # exact weights, plain nn.Linear
    summary = slim_edge.export_gguf("runs/seq2", "seq2.gguf")            # = slim-edge export --gguf
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["QuantConfig", "quantize_", "load_quantized", "export_gguf", "__version__"]


def quantize_(
    model: str, config=None, output=None, *, force: bool = False, device: str | None = None, **options
) -> dict:
    """QAT of `model` (an HF folder, a hub-style name such as 'smollm2-135m', or a checkpoint to continue) with
    `config` (a QuantConfig; default QuantConfig()) into the checkpoint folder `output`; returns the run's report.
    `options` are run_quantize's (resume, checkpoint_every, progress, dry_run, time_limit in seconds,
    teacher_model)."""
    from pathlib import Path

    from .errors import SlimEdgeError
    from .pipeline import run_quantize
    from .quantize import QuantConfig

    if output is None:
        raise SlimEdgeError(
            "quantize_: give the checkpoint folder to write, e.g. "
            "slim_edge.quantize_('smollm2-135m', config, 'runs/seq2')"
        )
    return run_quantize(model, config or QuantConfig(), Path(output), force=force, device=device, **options)


def export_gguf(checkpoint, out, **options) -> dict:
    """Write a slim-edge checkpoint as GGUF, the trained codes bit for bit; returns the export summary.
    `options` are export_checkpoint's (token_embedding_type, output_tensor_type, overrides, force)."""
    from pathlib import Path

    from .converters.gguf_export import export_checkpoint

    return export_checkpoint(Path(checkpoint), Path(out), **options)


def __getattr__(name: str):
    if name == "QuantConfig":
        from .quantize import QuantConfig

        return QuantConfig
    if name == "load_quantized":
        from .checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module 'slim_edge' has no attribute {name!r}")
