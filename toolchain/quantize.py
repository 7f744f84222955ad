"""`quantize_(model, QuantConfig(...))`: plan every linear layer, then swap in QuantLinear in place.

The plan is decided before training: each weight trains on the exact grid it will be exported in.
A row length that no format of the scheme divides keeps the tensor in f16, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from torch import nn

from .distributed import FSDP_PRECISIONS, SHARDS
from .errors import SlimEdgeError
from .formats import embedding_types, get_format
from .qlinear import QuantLinear, activation_type, quantize_embedding_
from .schemes import get_scheme

CONFIG_VERSION = 1
PROMOTED = "q4_0"  # where --bits puts the most sensitive linears
MAX_BITS = get_format(PROMOTED).bits_per_weight


@dataclass
class QuantConfig:
    scheme: str = "sherry"
    target: str | None = None  # override the scheme's primary format (e.g. tq1_0 for ternary)
    keep: tuple[str, ...] = ("embed_tokens", "lm_head")  # module-name fragments left in high precision
    # bits per weight over the quantized linears: the most sensitive ones go to q4_0 within it (budget.py)
    bits: float | None = None
    # the token embedding (and a tied head) trains on the type export writes: q8_0 | q4_0, or f16 = float
    embedding_type: str = "q8_0"
    tequila_lambda: float = 1e-3
    # training
    steps: int = 0
    lr: float = 5e-5
    scale_lr: float = 3e-2  # relative: best of 1e-3..1e-1 for seq2 and sherry on SmolLM2 (qat_smollm2.md)
    # "relative": Adam on log(d), so one step moves a scale by at most ~scale_lr of its size whatever its
    # magnitude (scales span 1e-3..0.3); "absolute": Adam on d itself (sessions before 10)
    scale_update: str = "relative"
    ste_clipped: bool = False  # keep the straight-through weight gradient outside the clip range
    lsq_grad: bool = False  # multiply the scale gradient by LSQ's 1/sqrt(block * top level)
    batch_size: int = 4
    # sequences per optimizer step over all ranks; 0: --batch-size x ranks. A multiple of that: each rank runs
    # global / (batch_size x ranks) forward-backward passes of batch_size and sums their gradients (accumulation)
    global_batch_size: int = 0
    seq_len: int = 256
    warmup: int = 0  # steps of linear lr warm-up (default: 5% of steps)
    distill: str = "cakld"  # cakld | kl | none
    # loss = ce_weight * CE + KD. 0 (pure distillation) by default: on the H200 at equal time it took seq2 from
    # PPL 89.1 / KLD 1.35 to 66.9 / 0.99 (evals/reports/qat_smollm2.md, session 16)
    ce_weight: float = 0.0
    block_steps: int = 0  # block-wise reconstruction steps per decoder layer before end-to-end QAT
    block_samples: int = 128  # sequences (of seq_len) the block-wise phase learns from
    ptq: str = "rtn"  # PTQ start: "rtn" (per-block MSE scale, round to nearest) | "gptq" (toolchain/ptq.py)
    ptq_samples: int = 128  # calibration sequences (of seq_len) for --ptq gptq
    arenas_lambda: float = 1.0
    arenas_warmup: float = 0.1  # fraction of steps spent ramping λ up
    # round each quantized linear's input as the runtime does (Q8_0 / Q8_K per weight type), in training
    # (straight-through) and in the reloaded model, so the PyTorch model computes what llama.cpp computes
    act_quant: bool = False
    # attend as the runtime does: K, V, Q and the attention probabilities rounded to half (llama.cpp's F16 KV
    # cache) and ggml's rope angles, in training and in the reloaded model
    runtime_attention: bool = False
    # on a GPU: fake quantization and the loss through torch.compile. Off by default: Sherry steps 1.4x faster,
    # seq2 5 % slower, and compiled rounding differs from the eager (= exported) values on ~5e-5 of seq2's weights
    compile: bool = False
    # under torchrun: auto (ddp or fsdp by the memory plan, memplan.choose_shard) | ddp (a full replica per rank) | fsdp
    # (FSDP2: 1/N of the weights, grads and AdamW state per rank); ignored by one process
    shard: str = "auto"
    # under fsdp: the dtype of the gathered weights the forward sees (fp32 | bf16; the sharded masters and the
    # gradient reductions stay fp32)
    fsdp_precision: str = "fp32"
    # recompute each decoder layer's forward in the backward (torch.utils.checkpoint): autograd keeps only the
    # layers' inputs, for one more forward's compute
    activation_checkpointing: bool = False
    # under fsdp: shard the teacher's QAT copy as the student (1/N of its weights per rank)
    shard_teacher: bool = False
    calib: str = "wiki"
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        scheme = get_scheme(self.scheme)
        if self.target is not None:
            fmt = get_format(self.target)
            allowed = scheme.targets()
            if fmt.name not in allowed:
                raise SlimEdgeError(
                    f"--target {fmt.name} cannot hold scheme {scheme.name}'s values; "
                    f"choose one of: {', '.join(allowed)}"
                )
        for name, low in (("batch_size", 1), ("seq_len", 2), ("steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SlimEdgeError(f"--{name.replace('_', '-')} {value!r}: it must be an integer of at least {low}")
        if not isinstance(self.global_batch_size, int) or self.global_batch_size < 0:
            raise SlimEdgeError(
                f"--global-batch-size {self.global_batch_size!r}: it must be a whole number of "
                f"sequences (0: --batch-size x ranks, no accumulation)"
            )
        if self.global_batch_size and self.global_batch_size % self.batch_size:
            raise SlimEdgeError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --batch-size "
                f"{self.batch_size}: pass a multiple of it, e.g. "
                f"{max(1, round(self.global_batch_size / self.batch_size)) * self.batch_size}"
            )
        for name, strict in (("lr", True), ("scale_lr", False), ("arenas_lambda", False), ("tequila_lambda", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (strict and value == 0):
                raise SlimEdgeError(
                    f"--{name.replace('_', '-')} {value!r}: it must be a finite number {'> 0' if strict else '>= 0'}"
                )
        if not 0 <= self.arenas_warmup <= 1 or not isinstance(self.warmup, int) or self.warmup < 0:
            raise SlimEdgeError(
                f"arenas_warmup {self.arenas_warmup!r} / warmup {self.warmup!r}: need a fraction "
                f"in [0, 1] and a whole number of steps >= 0"
            )
        if self.block_steps < 0 or self.block_samples < 1:
            raise SlimEdgeError(
                f"--block-steps {self.block_steps} / --block-samples {self.block_samples}: "
                f"need block steps >= 0 and at least one sample"
            )
        if self.ptq not in ("rtn", "gptq"):
            raise SlimEdgeError(f"--ptq {self.ptq!r}: choose rtn (round to nearest) or gptq (error-compensating)")
        if self.ptq_samples < 1:
            raise SlimEdgeError(f"--ptq-samples {self.ptq_samples}: need at least one calibration sequence")
        if self.scale_update not in ("relative", "absolute"):
            raise SlimEdgeError(f"--scale-update {self.scale_update!r}: choose relative or absolute")
        if self.distill not in ("cakld", "kl", "none"):
            raise SlimEdgeError(f"--distill {self.distill!r}: choose cakld, kl or none")
        if self.ce_weight < 0 or (self.distill == "none" and self.ce_weight == 0):
            raise SlimEdgeError(
                f"--ce-weight {self.ce_weight} with --distill {self.distill}: the weight of the "
                f"cross-entropy must be >= 0, and > 0 without distillation (the loss would be empty)"
            )
        if self.shard not in SHARDS:
            raise SlimEdgeError(
                f"--shard {self.shard!r}: choose one of {', '.join(SHARDS)} (auto = ddp or fsdp by what fits)"
            )
        if self.fsdp_precision not in FSDP_PRECISIONS:
            raise SlimEdgeError(f"--fsdp-precision {self.fsdp_precision!r}: choose one of {', '.join(FSDP_PRECISIONS)}")
        if self.embedding_type not in embedding_types():
            raise SlimEdgeError(
                f"--embedding-type {self.embedding_type!r}: choose one of {', '.join(embedding_types())}"
            )
        if self.bits is not None and not 0 < self.bits <= MAX_BITS:
            raise SlimEdgeError(
                f"--bits {self.bits}: the budget must lie between the scheme's own bits per weight "
                f"and {MAX_BITS} (everything in {PROMOTED})"
            )
        self.keep = tuple(self.keep)

    def accumulation(self, ranks: int = 1) -> int:
        """Forward-backward passes of batch_size per rank and optimizer step, for the global batch over `ranks`."""
        per_pass = self.batch_size * ranks
        if not self.global_batch_size:
            return 1
        if self.global_batch_size % per_pass:
            lo = max(1, self.global_batch_size // per_pass) * per_pass
            raise SlimEdgeError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --batch-size "
                f"{self.batch_size} x {ranks} rank{'s' if ranks > 1 else ''} = {per_pass}: pass "
                f"{lo} or {lo + per_pass}"
            )
        return self.global_batch_size // per_pass

    def global_batch(self, ranks: int = 1) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.batch_size * ranks * self.accumulation(ranks)

    def batch_text(self, ranks: int = 1) -> str:
        """How the global batch is made, e.g. "2 ranks x 4 x 8 accumulated passes"."""
        parts = ([f"{ranks} ranks"] if ranks > 1 else []) + [str(self.batch_size)]
        k = self.accumulation(ranks)
        if k > 1:
            parts.append(f"{k} accumulated passes")
        return " x ".join(parts) if len(parts) > 1 else f"--batch-size {self.batch_size}"

    @property
    def formats(self) -> tuple[str, ...]:
        scheme = get_scheme(self.scheme)
        if self.target is None:
            return scheme.formats
        return (self.target,) + tuple(f for f in scheme.formats if f != self.target)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> QuantConfig:
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise SlimEdgeError(
                f"quantization config version {version!r} is not supported "
                f"(this slim-edge reads version {CONFIG_VERSION}); re-run slim-edge quantize"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        data = {"embedding_type": "f16", **data}  # checkpoints before embedding_type kept it in float
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class PlanEntry:
    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # (out_features, in_features)
    format: str
    mode: str  # grid | ternary | sherry | keep
    reason: str = ""

    @property
    def bits_per_weight(self) -> float:
        return get_format(self.format).bits_per_weight

    @property
    def type_id(self) -> int:
        return get_format(self.format).type_id

    def to_json(self):
        return {
            **dataclasses.asdict(self),
            "shape": list(self.shape),
            "type_id": self.type_id,
            "bpw": round(self.bits_per_weight, 4),
        }


def make_plan(
    model: nn.Module, config: QuantConfig, overrides: dict[str, tuple[str, str]] | None = None
) -> list[PlanEntry]:
    """One entry per linear layer; `overrides` maps a module name to (format, reason), e.g. the tensors that
    the bit budget promotes to q4_0 (budget.py). A format outside the scheme's trains on its full grid."""
    scheme = get_scheme(config.scheme)
    plan = []
    overrides = overrides or {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, QuantLinear)) or any(k in name for k in config.keep):
            continue
        shape = (mod.out_features, mod.in_features)
        if name in overrides:
            fname, reason = overrides[name]
            get_format(fname).check_row(mod.in_features, name)
            mode = "keep" if fname == "f16" else scheme.values if fname in config.formats else "grid"
            plan.append(PlanEntry(name, shape, fname, mode, reason))
            continue
        for i, fname in enumerate(config.formats):
            if mod.in_features % get_format(fname).block_size == 0:
                reason = (
                    ""
                    if i == 0
                    else (
                        f"row length {mod.in_features} is not a multiple of "
                        f"{config.formats[0]}'s block {get_format(config.formats[0]).block_size}"
                    )
                )
                plan.append(PlanEntry(name, shape, fname, scheme.values, reason))
                break
        else:
            plan.append(
                PlanEntry(name, shape, "f16", "keep", f"no {scheme.name} format divides row length {mod.in_features}")
            )
    if not plan:
        raise SlimEdgeError("the model has no linear layers to quantize (after --keep); nothing to do")
    unknown = sorted(set(overrides) - {e.name for e in plan})
    if unknown:
        raise SlimEdgeError(
            f"the plan's overrides name {unknown[:3]}, which are no quantized linear of this "
            f"model; plan with the model they were made for"
        )
    return plan


def quantize_(model: nn.Module, config: QuantConfig, plan: list[PlanEntry] | None = None) -> list[PlanEntry]:
    """Replace each planned nn.Linear by a QuantLinear initialised from its weights (PTQ), and the token
    embedding (with a tied head) by a QuantEmbedding on config.embedding_type unless that is f16."""
    plan = plan or make_plan(model, config)
    scheme = get_scheme(config.scheme)
    for entry in plan:
        if entry.mode == "keep":
            continue
        parent_name, _, child = entry.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        q = QuantLinear(
            linear,
            entry.format,
            entry.mode,
            tequila_lambda=config.tequila_lambda if scheme.tequila and entry.mode == scheme.values else 0.0,
            act=activation_type(entry.type_id) if config.act_quant else None,
            ste_clipped=config.ste_clipped,
            lsq_grad=config.lsq_grad,
        )
        setattr(parent, child, q.to(linear.weight.device))
    if config.embedding_type != "f16":
        quantize_embedding_(model, config.embedding_type)
    if config.runtime_attention:
        from .runtime_patches.runtime_sim import use_runtime_attention

        use_runtime_attention(model)
    return plan


def plan_summary(plan: list[PlanEntry], model: nn.Module | None = None) -> dict:
    n = sum(e.shape[0] * e.shape[1] for e in plan)
    bits = sum(e.shape[0] * e.shape[1] * e.bits_per_weight for e in plan)
    by_format: dict[str, int] = {}
    for e in plan:
        by_format[e.format] = by_format.get(e.format, 0) + 1
    return {"tensors": len(plan), "weights": n, "bits_per_weight": round(bits / max(n, 1), 4), "by_format": by_format}


def format_plan(plan: list[PlanEntry]) -> str:
    """A compact table: identical rows (same shape, format, reason) across layers are folded."""
    import re

    groups: dict[tuple, list[str]] = {}
    for e in plan:
        key = (re.sub(r"\.\d+\.", ".N.", e.name), e.shape, e.format, e.mode, e.reason)
        groups.setdefault(key, []).append(e.name)
    lines = [f"{'tensor':42} {'shape':>12} {'format':>7} {'bpw':>6} {'n':>4}  note"]
    for (name, shape, fmt, mode, reason), names in groups.items():
        lines.append(
            f"{name:42} {shape[0]:>5}x{shape[1]:<6} {fmt:>7} {get_format(fmt).bits_per_weight:6.3f} "
            f"{len(names):>4}  {reason}"
        )
    s = plan_summary(plan)
    lines.append(
        f"{s['tensors']} tensors, {s['weights'] / 1e6:.1f} M weights, "
        f"{s['bits_per_weight']:.3f} bits per weight in the quantized linears"
    )
    return "\n".join(lines)


def dump_plan(plan: list[PlanEntry]) -> str:
    return json.dumps([e.to_json() for e in plan], indent=1)
