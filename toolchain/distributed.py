"""Data-parallel QAT under torchrun: one process per device, PyTorch's DistributedDataParallel averaging grads,
or FSDP2 (`fully_shard`) holding 1/N of the trained state on each rank (--shard fsdp).

    torchrun --nproc-per-node N --no-python slim-edge quantize ... --batch-size B [--shard fsdp]

Every rank draws the same global batch of N*B sequences from the one seeded stream and trains on rows
rank*B:(rank+1)*B, so N ranks at B see, step for step, what one process sees at N*B. Replicas stay identical,
so rank 0 alone writes the output folder and the training checkpoint; the others wait on a barrier. Under
FSDP every rank takes part in gathering the full state dicts (full_state) that rank 0 then writes, in the same
train.pt and folder layouts as one process. A single process (no WORLD_SIZE in the environment) never makes a process group.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SlimEdgeError

# rank 0 alone samples teacher tokens (--calib teacher:N) while the others wait in a broadcast: that can take
# longer than torch's default 10-30 min collective timeout
TIMEOUT = datetime.timedelta(hours=3)
# --shard: auto is resolved before training by the memory plan (memplan.choose_shard: fsdp when a full replica does
# not fit the GPU but the sharded state does); left unresolved (train() called directly) it is ddp
SHARDS = ("auto", "ddp", "fsdp")


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
        raise SlimEdgeError(f"WORLD_SIZE={environ.get('WORLD_SIZE')!r} RANK={environ.get('RANK')!r} "
                            f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}: expected integers as torchrun sets them; "
                            f"launch with torchrun, or unset WORLD_SIZE for one process") from None
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
            raise SlimEdgeError(f"LOCAL_RANK {world.local_rank} but torch sees {torch.cuda.device_count()} CUDA "
                                f"devices; pass --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    raise SlimEdgeError(f"--device {device} under torchrun (WORLD_SIZE {world.size}): each rank takes "
                        f"cuda:LOCAL_RANK; pass --device cuda or --device cpu")


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
    return ddp(module, device_ids=None if index is None else [index],
               **no_buffer_sync(inspect.signature(ddp.__init__).parameters))


def no_buffer_sync(ddp_params) -> dict:
    """DDP's keyword that stops the per-forward buffer broadcast: torch 2.13 renamed `broadcast_buffers` (deprecated
    there) to `forward_sync_buffers`; torch 2.11, as on the lent H200, knows only the old name (a TypeError)."""
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_params else {"broadcast_buffers": False}


def sharding(world: World, shard: str) -> str | None:
    """How the ranks share the student: "ddp" or "fsdp" (QuantConfig checked the choice); None for one process."""
    if world.size == 1:
        return None
    return "ddp" if shard == "auto" else shard


def fully_sharded(module: torch.nn.Module, layers) -> torch.nn.Module:
    """`module` sharded in place with FSDP2: one all-gather group per decoder layer, then the root (embedding,
    final norm, head), so only one layer's full weights are live at a time.

    No MixedPrecisionPolicy: the parameters stay fp32 as under DDP, so fsdp trains the same numbers (the test holds
    it to the 1-process run) and the block scales' small relative steps are not lost to bf16; on a GPU the matmuls
    already run in bf16 through train_step's autocast."""
    from torch.distributed.fsdp import fully_shard  # here: importing it costs every command a second of start-up

    for layer in layers:
        fully_shard(layer)
    return fully_shard(module)


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
    return {"state": {index[n]: v for n, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]}


def by_name(optim_sd: dict, names: list[str]) -> dict:
    """by_index undone."""
    return {"state": {names[i]: v for i, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}


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
    sd.set_optimizer_state_dict(module, opt, by_name(optim_sd, param_names(module, opt)),
                                options=sd.StateDictOptions(full_state_dict=True))


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are on the meta device (no memory) and whose buffers are real: the
    non-persistent ones (rotary tables, quads) are in no state dict. It takes the gathered weights after FSDP
    training (unsharded)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
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


def _comm_device(device: str) -> str:
    return device if device.startswith("cuda") else "cpu"


def agree(world: World, stop: bool, late: bool, time_frac: float | None, device: str):
    """(any rank asked to stop, rank 0's clock says the time limit is reached, rank 0's time_frac): every rank
    leaves the loop at the same step and runs the schedules on the same clock."""
    if world.size == 1:
        return stop, late, time_frac
    main = float(world.main)
    t = torch.tensor([float(stop), main * late, main * (time_frac or 0.0), main * (time_frac is not None)],
                     dtype=torch.float64, device=_comm_device(device))
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
