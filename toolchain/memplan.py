"""The memory a QAT run needs per device, from the model's config.json alone: what `slim-edge quantize` holds at its
peak, component by component, so that a run that will not fit is refused before anything is allocated.

The peak of a step is in the loss's forward (train.train_step): every activation autograd saved is alive, the
student's and the teacher's logits and the loss's gradient buffer are alive, one chunk of the loss is being
computed, and the previous step's gradients are still held (zero_grad comes after the forward). Per token and
decoder layer autograd saves (counted on CPU with saved_tensors_hooks, tests/test_memplan.py):

    RMSNorm x2       input and normalised input, fp32 (the residual stream is fp32: the embedding is)  4 x 4h
    linear inputs    under bf16 autocast one bf16 cast per projection (q k v gate up; autocast caches
                     casts of leaf weights only); in fp32 the two norm outputs                          5 x 2h | 2 x 4h
    attention        q, k, v, output (o_proj's input is the same storage), log-sum-exp                  a(2h + 4kv) +
                                                                                                        4 heads
    MLP              gate, silu(gate), up, their product                                                4 x a f
    rsqrt            two per layer                                                                      8

with a the activation bytes (2 under autocast, 4 in fp32), h hidden, kv the key/value width, f the FFN width;
and once, the final norm's normalised input (4h). With --activation-checkpointing autograd keeps, per token, only each
decoder layer's input (the fp32 residual stream, 4h) and, in the backward, the table's activations of the one layer
being recomputed. Per weight of a quantized linear autograd keeps its int8 grid values and the weight F.linear
multiplies (bf16 under autocast, the fp32 fake-quantized weight otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .distill import CHUNK_ELEMENTS
from .errors import SlimEdgeError
from .formats import get_format
from .memory import available_ram, config_params

GIB = 2**30
# fp32 [chunk, vocab] buffers alive at once in one chunk of the loss (distill._chunk): compiled, the gradient the
# fused kernel returns and its `g / n`; eager, at `grad += ...` for cakld: s, ps, grad, t, pt, diff and three
# temporaries of that line (the `g / n` comes after they are freed)
CHUNK_BUFFERS = {True: 2, False: 9}
# FSDP2 holds a decoder layer's gathered weights while the next one is prefetched, the root's (embedding, norm)
# for the whole forward, and a layer's unsharded gradients before their reduce-scatter
FSDP_GATHERED_LAYERS = 3
# distill_loss_reference (autograd through log_softmax; the session-10 step, kept as the fused loss's reference) at
# its peak, the `s.exp() * (s - t)` of KL_st: fp32 [tokens, vocab] s, t, exp(t), exp(s), s - t and that product
REFERENCE_LOSS_BUFFERS = 6


@dataclass
class MemoryPlan:
    components: dict[str, int]
    device: str
    world: int = 1
    shard: str | None = None
    batch: int = 0
    seq_len: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())


def _shape(cfg: dict) -> dict:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = (cfg.get("num_key_value_heads") or heads) * hd
    f, layers, vocab = cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    layer = 2 * h * heads * hd + 2 * h * kv + 3 * h * f  # the quantized linears of one decoder layer
    return dict(
        h=h,
        heads=heads,
        kv=kv,
        f=f,
        layers=layers,
        vocab=vocab,
        layer=layer,
        params=config_params(cfg) + (2 * layers + 1) * h,
    )


def layer_activation_bytes(cfg: dict, autocast: bool) -> int:
    """Bytes autograd saves per token for one decoder layer (the module docstring's table)."""
    s = _shape(cfg)
    h, kv, f = s["h"], s["kv"], s["f"]
    a = 2 if autocast else 4
    inputs = 5 * 2 * h if autocast else 2 * 4 * h
    return 4 * 4 * h + inputs + a * (2 * h + 2 * kv) + 4 * s["heads"] + 4 * a * f + 8


def activation_bytes(cfg: dict, autocast: bool, checkpointing: bool = False) -> int:
    """Bytes autograd saves per token for the whole decoder; checkpointing: the layers' fp32 inputs and the one
    layer recomputed in the backward."""
    s = _shape(cfg)
    layer = layer_activation_bytes(cfg, autocast)
    if checkpointing:
        return s["layers"] * 4 * s["h"] + layer + 4 * s["h"]
    return s["layers"] * layer + 4 * s["h"]


def plan_memory(
    cfg: dict,
    config,
    batch: int | None = None,
    seq_len: int | None = None,
    *,
    device: str = "cuda",
    world: int = 1,
    shard: str | None = None,
    compiled: bool | None = None,
    teacher_copy: int | None = None,
    reference_loss: bool = False,
) -> MemoryPlan:
    """Per-device bytes of a QAT run of `config` (a QuantConfig) on a model of config.json `cfg`.

    device: "cuda" (bf16 autocast, a bf16 copy of the teacher) or "cpu" (fp32). shard: None (one process), "ddp"
    or "fsdp" over `world` ranks. compiled: --compile (default config.compile on cuda). teacher_copy: bytes per
    weight of the teacher copy QAT runs forward (default 2 on cuda, pipeline's bf16 copy; 0: the loaded one).
    reference_loss: distill.distill_loss_reference in place of the chunked distill_loss. The loss terms are
    counted for cakld (kl and none keep fewer buffers; none computes no teacher logits)."""
    batch = config.batch_size if batch is None else batch
    seq_len = config.seq_len if seq_len is None else seq_len
    cuda = device.startswith("cuda")
    compiled = (config.compile and cuda) if compiled is None else compiled
    n = world if shard == "fsdp" else 1
    teacher_sharded = n > 1 and getattr(config, "shard_teacher", False)
    # on cpu the QAT forward uses the loaded teacher, except when it is sharded: pipeline shards an fp32 copy
    teacher_copy = (2 if cuda else 4 * teacher_sharded) if teacher_copy is None else teacher_copy
    checkpointing = getattr(config, "activation_checkpointing", False)
    gathered = 2 if getattr(config, "fsdp_precision", "fp32") == "bf16" else 4
    s = _shape(cfg)
    emb = s["vocab"] * s["h"]
    quant = s["layers"] * s["layer"]
    block = get_format(config.formats[0]).block_size
    scales = quant // block
    saved_quant = s["layer"] if checkpointing else quant
    emb_fmt = get_format(config.embedding_type)
    emb_block = emb_fmt.block_size if emb_fmt.levels else None  # f16 holds no codes
    emb_scales = emb // emb_block if emb_block else 0
    norms = (2 * s["layers"] + 1) * s["h"]
    trained = quant + scales + norms
    tokens = batch * seq_len
    logit = 2 if cuda else 4
    c = {
        "teacher fp32 (evaluations)": 4 * s["params"],
        "teacher copy (QAT forward)": teacher_copy * s["params"] // (n if teacher_sharded else 1),
        "FSDP gathered teacher weights": (
            teacher_copy * (FSDP_GATHERED_LAYERS * s["layer"] + emb) if teacher_sharded else 0
        ),
        "student latent fp32": 4 * s["params"] // n,
        "block scales fp32": 4 * (scales + emb_scales) // n,
        "embedding codes (cached)": 5 * emb if emb_block else 0,
        "gradients fp32": 4 * trained // n,
        "AdamW moments": 8 * trained // n,
        "DDP gradient buckets": 4 * trained if shard == "ddp" else 0,
        "FSDP gathered weights": gathered * (FSDP_GATHERED_LAYERS * s["layer"] + emb) if shard == "fsdp" else 0,
        # checkpointed, a layer's grid values and multiplied weights are kept only while it is recomputed
        "saved per weight": (
            (1 + (2 if cuda else 4)) * saved_quant + 4 * saved_quant // block + (2 * emb if cuda and emb_block else 0)
        ),
        ("activations (checkpointed: layer inputs + one layer)" if checkpointing else "activations"): tokens
        * activation_bytes(cfg, autocast=cuda, checkpointing=checkpointing),
    }
    teacher_logits = config.distill != "none"
    if reference_loss:
        c["logits (student, teacher)"] = (1 + teacher_logits) * logit * tokens * s["vocab"]
        c["loss through autograd"] = REFERENCE_LOSS_BUFFERS * 4 * tokens * s["vocab"]
    else:  # the loss's gradient buffer (distill._FusedDistill) has the logits' dtype
        c["logits (student, teacher, grad)"] = (2 + teacher_logits) * logit * tokens * s["vocab"]
        chunk = min(tokens, max(1, CHUNK_ELEMENTS // s["vocab"]))
        c["loss chunk"] = CHUNK_BUFFERS[bool(compiled)] * 4 * chunk * s["vocab"]
    return MemoryPlan({k: v for k, v in c.items() if v}, device, world, shard, batch, seq_len)


def format_memory_plan(plan: MemoryPlan, available: int | None = None) -> str:
    where = "per GPU" if plan.device.startswith("cuda") else "in RAM"
    mode = "" if plan.shard is None else f", {plan.shard} over {plan.world} ranks"
    lines = [f"memory plan {where} ({plan.batch} x {plan.seq_len} tokens{mode}):"]
    lines += [f"  {k:<34} {v / GIB:8.2f} GiB" for k, v in plan.components.items()]
    lines.append(f"  {'total':<34} {plan.total / GIB:8.2f} GiB")
    if available is not None:
        lines.append(f"  {'available on ' + plan.device:<34} {available / GIB:8.2f} GiB")
    return "\n".join(lines)


def largest_batch(cfg: dict, config, available: int, **kw) -> int:
    """The largest batch whose plan fits `available` (0 when not even one sequence fits)."""
    lo, hi = 0, config.batch_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_memory(cfg, config, batch=mid, **kw).total <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_shard(cfg: dict, config, world: int, available: int, device: str) -> str:
    """--shard auto: fsdp when a DDP replica does not fit `available` but the fsdp-sharded state does; ddp else."""
    if plan_memory(cfg, config, device=device, world=world, shard="ddp").total <= available:
        return "ddp"
    if plan_memory(cfg, config, device=device, world=world, shard="fsdp").total <= available:
        return "fsdp"
    return "ddp"


def check_fits(
    cfg: dict,
    config,
    available: int,
    *,
    device: str,
    world: int = 1,
    shard: str | None = None,
    ranks: tuple[int, ...] = (2, 4, 8),
) -> MemoryPlan:
    """The plan; refused (SlimEdgeError) when its total exceeds `available`, naming what would fit."""
    plan = plan_memory(cfg, config, device=device, world=world, shard=shard)
    if plan.total <= available:
        return plan
    remedies = []
    b = largest_batch(cfg, config, available, device=device, world=world, shard=shard)
    if b:
        need = plan_memory(cfg, config, batch=b, device=device, world=world, shard=shard).total
        remedies.append(f"--batch-size {b} ({need / GIB:.2f} GiB)")
        g = config.global_batch(world)
        same = next((k for k in range(b, 0, -1) if g % (k * world) == 0), 1)
        need = plan_memory(cfg, config, batch=same, device=device, world=world, shard=shard).total
        remedies.append(
            f"--batch-size {same} --global-batch-size {g} (the same {g}-sequence step in "
            f"{g // (same * world)} accumulated passes, {need / GIB:.2f} GiB)"
        )
    if world > 1 and shard != "fsdp":
        need = plan_memory(cfg, config, device=device, world=world, shard="fsdp").total
        if need <= available:
            remedies.append(f"--shard fsdp ({need / GIB:.2f} GiB on each of the {world} ranks)")
    if world == 1 and device.startswith("cuda"):
        for r in ranks:
            need = plan_memory(cfg, config, device=device, world=r, shard="fsdp").total
            if need <= available:
                remedies.append(f"torchrun --nproc-per-node {r} ... --shard fsdp ({need / GIB:.2f} GiB per GPU)")
                break
    what = "GPU" if device.startswith("cuda") else "RAM"
    raise SlimEdgeError(
        f"the run needs about {plan.total / GIB:.2f} GiB {'per GPU' if what == 'GPU' else 'of RAM'} at --batch-size "
        f"{config.batch_size} x --seq-len {config.seq_len}, and {available / GIB:.2f} GiB of {what} is free on "
        f"{device}; "
        + (f"pass {' or '.join(remedies)}" if remedies else "use a larger device or a smaller --seq-len")
        + " (or --no-memory-check to try anyway)\n"
        + format_memory_plan(plan, available)
    )


LIMIT_ENV = "SLIM_EDGE_MEMORY_LIMIT_GIB"  # pretend the device has this much free (tests; a GPU shared with others)


def available_memory(device: str, environ=None) -> int | None:
    """Free bytes on `device`: the GPU's free memory (torch.cuda.mem_get_info), or MemAvailable for cpu;
    $SLIM_EDGE_MEMORY_LIMIT_GIB instead when set. None when it cannot be known."""
    limit = (os.environ if environ is None else environ).get(LIMIT_ENV)
    if limit:
        try:
            return int(float(limit) * GIB)
        except ValueError:
            raise SlimEdgeError(f"{LIMIT_ENV}={limit!r}: expected a number of GiB, e.g. 40") from None
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device == "cpu":
        return available_ram()
    return None
