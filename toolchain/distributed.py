"""Data-parallel QAT under torchrun: one process per device, PyTorch's DistributedDataParallel averaging grads,
or FSDP2 (`fully_shard`) holding 1/N of the trained state on each rank (--shard fsdp).

    torchrun --nproc-per-node N --no-python slim-edge quantize ... --batch-size B [--shard fsdp]

Every rank draws the same global batch of N*B sequences from the one seeded stream and trains on rows
rank*B:(rank+1)*B, so N ranks at B see, step for step, what one process sees at N*B. Replicas stay identical,
so rank 0 alone writes the output folder; the others wait on a barrier. The training state is a
torch.distributed.checkpoint folder (train.dcp/, save_sharded) whatever the run: under FSDP each rank writes its own
shards, under DDP DCP writes each replicated tensor once, one process writes all of it; any number of ranks, sharded
or not, resumes it. For the output folder under FSDP every rank takes part in gathering the full weights (unsharded)
that rank 0 writes in one process's layout. A train.pt (the training state before DCP: rank 0's replica) is still
resumed, under FSDP too (load_optimizer). A single process (no WORLD_SIZE in the environment) never makes a process
group.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import SlimEdgeError
from .fsutil import fsync_dir, fsync_tree

# rank 0 alone samples teacher tokens (--calib teacher:N) while the others wait in a broadcast: that can take
# longer than torch's default 10-30 min collective timeout
TIMEOUT = datetime.timedelta(hours=3)
# --shard: auto is resolved before training by the memory plan (memplan.choose_shard: fsdp when a full replica does
# not fit the GPU but the sharded state does); left unresolved (train() called directly) it is ddp
SHARDS = ("auto", "ddp", "fsdp")
# --fsdp-precision: the dtype of the gathered parameters under fsdp (the sharded masters and the gradient
# reductions stay fp32)
FSDP_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env(environ=os.environ) -> World:
    """torchrun's WORLD_SIZE, RANK, LOCAL_RANK; World() when they are absent."""
    if "WORLD_SIZE" not in environ:
        return World()
    try:
        world = World(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError):
        raise SlimEdgeError(
            f"WORLD_SIZE={environ.get('WORLD_SIZE')!r} RANK={environ.get('RANK')!r} "
            f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}: expected integers as torchrun sets them; "
            f"launch with torchrun, or unset WORLD_SIZE for one process"
        ) from None
    if not 0 <= world.rank < world.size:
        raise SlimEdgeError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}; launch with torchrun")
    return world


def rank_device(world: World, device: str) -> str:
    """The device this rank trains on: cuda:LOCAL_RANK for cuda, cpu for cpu."""
    if world.size == 1:
        return device
    if device == "cpu":
        return device
    if device == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise SlimEdgeError(
                f"LOCAL_RANK {world.local_rank} but torch sees {torch.cuda.device_count()} CUDA "
                f"devices; pass --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    raise SlimEdgeError(
        f"--device {device} under torchrun (WORLD_SIZE {world.size}): each rank takes "
        f"cuda:LOCAL_RANK; pass --device cuda or --device cpu"
    )


def backend(device: str) -> str:
    """The collective backend for a device: nccl on CUDA, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def data_parallel(module: torch.nn.Module, device: str) -> torch.nn.parallel.DistributedDataParallel:
    """`module` in DistributedDataParallel on this rank's device, buffers not re-sent every forward: they (rotary
    tables, quads) are equal on every rank and never trained."""
    ddp = torch.nn.parallel.DistributedDataParallel
    index = None
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
    return ddp(
        module,
        device_ids=None if index is None else [index],
        **no_buffer_sync(inspect.signature(ddp.__init__).parameters),
    )


def no_buffer_sync(ddp_params) -> dict:
    """DDP's keyword that stops the per-forward buffer broadcast: torch 2.13 renamed `broadcast_buffers` (deprecated
    there) to `forward_sync_buffers`; torch 2.11, as on the lent H200, knows only the old name (a TypeError)."""
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_params else {"broadcast_buffers": False}


def sharding(world: World, shard: str) -> str | None:
    """How the ranks share the student: "ddp" or "fsdp" (QuantConfig checked the choice); None for one process."""
    if world.size == 1:
        return None
    return "ddp" if shard == "auto" else shard


def fully_sharded(module: torch.nn.Module, layers, precision: str = "fp32") -> torch.nn.Module:
    """`module` sharded in place with FSDP2: one all-gather group per decoder layer, then the root (embedding,
    final norm, head), so only one layer's full weights are live at a time.

    precision "fp32" (default): no MixedPrecisionPolicy, the parameters stay fp32 as under DDP, so fsdp trains the
    same numbers (the test holds it to the 1-process run); on a GPU the matmuls already run in bf16 through
    train_step's autocast. "bf16" (--fsdp-precision): the gathered copies the forward and backward see are bf16 (half
    the all-gather traffic and gathered memory), the gradients are reduce-scattered in fp32, and the sharded
    parameters the optimizer steps (latent weights, block scales, norms) stay fp32 master copies, so the scales'
    small relative steps are not lost to bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # here: a second of start-up otherwise

    if precision not in FSDP_PRECISIONS:
        raise SlimEdgeError(f"--fsdp-precision {precision!r}: choose one of {', '.join(FSDP_PRECISIONS)}")
    kw = {}
    if precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kw)
    return fully_shard(module, **kw)


def sharded_teacher(teacher: torch.nn.Module, layers) -> torch.nn.Module:
    """The teacher sharded as the student (fully_shard per decoder layer, then the root): each rank holds 1/N of
    its weights, gathered layer by layer for the forward. It runs forward only, under no_grad: no gradients, and
    FSDP2 frees each layer's gathered weights after its forward (reshard_after_forward)."""
    from torch.distributed.fsdp import fully_shard

    for p in teacher.parameters():
        p.requires_grad_(False)
    for layer in layers:
        fully_shard(layer)
    return fully_shard(teacher)


def _state_dict_api():
    """torch.distributed.checkpoint's state-dict functions, imported when FSDP needs them (at module level they
    would add a second to the start-up of every command that imports QuantConfig)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full_on_cpu(sd):
    return sd.StateDictOptions(full_state_dict=True, cpu_offload=True)


def param_names(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The module's names of the optimizer's parameters, in the order opt.state_dict() numbers them."""
    name = {id(p): n for n, p in module.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def by_index(optim_sd: dict, names: list[str]) -> dict:
    """A state dict keyed by parameter names (torch.distributed.checkpoint's) keyed by index, as
    opt.state_dict() of one process keys it."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: v for n, v in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]],
    }


def by_name(optim_sd: dict, names: list[str]) -> dict:
    """by_index undone."""
    return {
        "state": {names[i]: v for i, v in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]],
    }


def full_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An FSDP module's full model and optimizer state dicts on rank 0's CPU, laid out as one process's
    module.state_dict() and opt.state_dict(); ({}, {}) on the other ranks. Every rank must call it."""
    sd = _state_dict_api()
    model_sd = sd.get_model_state_dict(module, options=_full_on_cpu(sd))
    optim_sd = sd.get_optimizer_state_dict(module, opt, options=_full_on_cpu(sd))
    return model_sd, by_index(optim_sd, param_names(module, opt)) if optim_sd else {}


def load_optimizer(module: torch.nn.Module, opt: torch.optim.Optimizer, optim_sd: dict) -> None:
    """One process's opt.state_dict() (every rank holds it) into the sharded optimizer of an FSDP module."""
    sd = _state_dict_api()
    sd.set_optimizer_state_dict(
        module, opt, by_name(optim_sd, param_names(module, opt)), options=sd.StateDictOptions(full_state_dict=True)
    )


# OUT.partial/train.dcp/, the training state of a run (any world size, any --shard) in torch.distributed.checkpoint's
# layout:
#   .metadata            rank 0's index of every tensor's global shape and which shard file holds which rows
#   __<rank>_0.distcp    the model and optimizer state this rank wrote: its own shards under fsdp, its share of the
#                        replicated tensors under ddp (each written by one rank), all of it for one process
#   slim_edge.json       {"state": TrainState, "rng": the data stream's bit generator state, "global_batch"}
# written into train.dcp.tmp/ by all ranks, then renamed into place by rank 0 once all have written; the previous
# one is kept as train.dcp.old/ until the rename and read when a crash fell between the two renames
DCP_META = "slim_edge.json"


def sharded_checkpoint(ckpt_path: Path) -> Path | None:
    """The whole DCP folder beside ckpt_path (train.pt -> train.dcp, else the train.dcp.old a crash left), or None."""
    folder = Path(ckpt_path).with_suffix(".dcp")
    for f in (folder, folder.with_name(folder.name + ".old")):
        if (f / ".metadata").is_file() and (f / DCP_META).is_file():
            return f
    return None


def _rank_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """This rank's model and optimizer state dicts, keyed by parameter names: DTensor shards under FSDP, plain
    tensors for a plain module (one process). The optimizer's state is created (a zero step) when it has none."""
    sd = _state_dict_api()
    return {"model": sd.get_model_state_dict(module), "optim": sd.get_optimizer_state_dict(module, opt)}


@contextlib.contextmanager
def one_process_dcp():
    """DCP without a process group (one process) warns at every save and load that it assumes one process: it is
    what slim-edge means, so the warning would only repeat itself in every run's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def save_sharded(world: World, module: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict, folder: Path) -> None:
    """The training state as a DCP folder (the layout above): every rank writes its own shards (fsdp) or its share
    of the replicated tensors (ddp), nothing is gathered onto one rank. Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if world.main:
        if tmp.exists():  # an earlier save that died half-way
            shutil.rmtree(tmp)
        if sharded_checkpoint(folder.with_suffix(".pt")) == folder and old.exists():
            # a crash after the renames below left both; with train.dcp/ whole the old one is never read, and kept it
            # would be a third training state on disk beside the two pipeline.disk_need counts
            shutil.rmtree(old)
    barrier(world)
    with one_process_dcp():  # collective: rank 0 writes .metadata last
        dcp.save(_rank_state(module, opt), checkpoint_id=str(tmp))
    if world.main:
        (tmp / DCP_META).write_text(json.dumps(extra))
        fsync_tree(tmp)  # every rank's shards are on disk before the name says the save is whole
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        if old.exists():
            shutil.rmtree(old)
    barrier(world)  # no rank starts the next save into train.dcp.tmp before the rename


def load_sharded(module: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> dict:
    """A DCP folder into `module` and `opt` as they are sharded now (FSDP over any number of ranks, or one process):
    DCP reads the rows each rank holds from whichever shard files have them. Returns slim_edge.json. A damaged folder,
    or one of another model, is a SlimEdgeError on every rank (DCP hands each rank every rank's failure)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    sd = _state_dict_api()
    state = _rank_state(module, opt)
    try:
        with one_process_dcp():
            dcp.load(state, checkpoint_id=str(folder))
        extra = json.loads((Path(folder) / DCP_META).read_text())
    except (CheckpointException, OSError, ValueError) as e:
        raise SlimEdgeError(
            f"{folder}: cannot resume from it ({_reason(e)}): it is damaged, or was saved by another "
            f"model or settings; resume with the settings it was made with, or run with --force "
            f"instead of --resume to start over"
        ) from None
    sd.set_model_state_dict(module, state["model"])
    sd.set_optimizer_state_dict(module, opt, state["optim"])
    return extra


def _reason(e: BaseException) -> str:
    """The first failure inside a CheckpointException (which carries every rank's traceback), in one line."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are on the meta device (no memory) and whose buffers are real: the
    non-persistent ones (rotary tables, quads) are in no state dict. It takes the gathered weights after FSDP
    training (unsharded)."""
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def unsharded(module: torch.nn.Module, skeleton: torch.nn.Module | None, device: str) -> torch.nn.Module | None:
    """The FSDP module's trained weights in `skeleton` (meta_copy's, taken before sharding) on rank 0's `device`;
    None on the other ranks. Every rank must call it."""
    sd = _state_dict_api()
    weights = sd.get_model_state_dict(module, options=_full_on_cpu(sd))
    if skeleton is None:
        return None
    skeleton.load_state_dict(weights, assign=True)
    return skeleton.to(device)


@contextlib.contextmanager
def joined(world: World, device: str):
    """The process group for the duration of a run (gloo on CPU, nccl on CUDA); nothing for one process."""
    if world.size == 1:
        yield
        return
    dist.init_process_group(backend(device), timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet(world: World):
    """stdout and stderr of ranks > 0 go nowhere: the logs, bars and summaries are rank 0's."""
    if world.main:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the others."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _comm_device(device: str) -> str:
    return device if device.startswith("cuda") else "cpu"


def agree(world: World, stop: bool, late: bool, time_frac: float | None, device: str):
    """(any rank asked to stop, rank 0's clock says the time limit is reached, rank 0's time_frac): every rank
    leaves the loop at the same step and runs the schedules on the same clock."""
    if world.size == 1:
        return stop, late, time_frac
    main = float(world.main)
    t = torch.tensor(
        [float(stop), main * late, main * (time_frac or 0.0), main * (time_frac is not None)],
        dtype=torch.float64,
        device=_comm_device(device),
    )
    dist.all_reduce(t)
    stop, late, frac, has_frac = t.tolist()
    return stop > 0, late > 0, frac if has_frac > 0 else None


def global_mean(world: World, values: list[torch.Tensor], device: str) -> list[float]:
    """The mean over ranks of scalar tensors: each rank's loss is a mean over its equal share of the global
    batch, so this is the mean over the global batch."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().to(_comm_device(device)) for v in values])
    if world.size > 1:
        dist.all_reduce(t)
        t /= world.size
    return t.tolist()
