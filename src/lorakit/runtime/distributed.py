"""Data-parallel training on torch.distributed: process group, ranks, DDP / FSDP2 wrapping, gathering.

W processes (ranks) each take their share of every optimizer step, so

    global batch = micro_batch_size × grad_accum × W rows per optimizer step

and step s consumes the global micro-batches [s·K·W, (s+1)·K·W) of the data order (K = grad_accum);
rank r takes the contiguous block [r·K, (r+1)·K) of them. With S_r the summed cross-entropy of rank r's
supervised tokens and N = Σ_r N_r (token counts all-reduced *before* backward):

    L = Σ_r S_r / N        rank r backpropagates W · S_r / N      DDP / FSDP average: (1/W) Σ_r ∇(W·S_r/N) = ∇L

which is exactly the loss and gradient of one process running K·W micro-batches per step.

Launch with torchrun (`torchrun --nproc_per_node N -m lorakit train CONFIG`) or `lorakit train CONFIG
--nproc N`, which re-executes itself under torch.distributed.run. Backend: nccl on CUDA, gloo on CPU.
Rank 0 alone writes files (metrics, checkpoints, adapter); everything every rank needs from disk is read
by rank 0 and broadcast, so only rank 0's view of output_dir matters.

`train.parallel: fsdp` shards parameters with FSDP2 (`fully_shard`) per transformer block; NF4's packed
uint8 codes become frozen parameters so that they are sharded too (FSDP2 shards each parameter on its own,
so uint8 storage beside fp32/bf16 weights needs no common storage dtype).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lorakit.config import ConfigError
from lorakit.runtime.devices import pick_device

T = TypeVar("T")



# --------------------------------------------------------------------------- ranks


def active() -> bool:
    """True inside an initialized process group (torch builds without distributed support never are)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that logs, writes metrics and saves."""
    return rank() == 0


def launched() -> bool:
    """True inside a multi-process launch (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarted() -> bool:
    """True when torchrun (--max-restarts) restarted the worker group: the run must resume, not start over."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


# --------------------------------------------------------------------------- process group


def pick_rank_device(name: str) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK under a CUDA launch, else the configured one."""
    device = pick_device(name)
    if not launched() or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError([f"train.device {name!r} resolved to {device}, but multi-process training runs on CUDA "
                           f"(nccl) or CPU (gloo); set train.device: cuda or cpu"])
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[torch.device]:
    """Join the launch's process group (nccl on CUDA, gloo on CPU) for the duration; yields this rank's device.

    Outside a launch this is a no-op yielding the configured device; a group the caller already
    initialized is used and left alone."""
    device = pick_rank_device(device_name)
    owned = launched() and not active()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        if owned and active():
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(*values: float) -> list[float]:
    """Σ over ranks of each value, in float64 (token counts stay exact up to 2^53)."""
    if not active():
        return list(values)
    device = _comm_device()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable Python objects and tensors; in memory only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def my_share(items: Sequence[T], per_rank: int) -> list[T]:
    """This rank's contiguous block of one optimizer step's W · per_rank global micro-batches."""
    start = rank() * per_rank
    return list(items[start:start + per_rank])


# --------------------------------------------------------------------------- wrapping


def wrap_model(model: nn.Module, parallel: Literal["ddp", "fsdp"], device: torch.device) -> nn.Module:
    """DDP around `model`, or FSDP2 applied to it in place; the model itself in a single process."""
    if not active() or world_size() == 1:
        return model
    if parallel == "fsdp":
        return shard_model(model, device)
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (NF4 codes, rotary tables) are identical on every rank by construction: no per-step broadcast.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: shard each transformer block (transformers' `_no_split_modules`), then the rest at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    nf4 = shardable_nf4_storage(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if is_main():
        print(f"FSDP2: {len(blocks)} blocks + the root sharded over {world_size()} ranks "
              f"({nf4} NF4 storage tensors among them)", file=sys.stderr)
    return model


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back after a forward without backward (eval): the root module keeps
    its gathered weights after forward, expecting the backward that would reshard them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shardable_nf4_storage(model: nn.Module) -> int:
    """Re-register each NF4Linear's uint8 codes as frozen parameters (FSDP shards parameters, not buffers).

    A module names such buffers in its `fsdp_shardable_buffers` class attribute (NF4Linear: the codes),
    so this foundation needs no import of the layer. The fp32 scales (absmax, absmax2, offset: 1/64 the
    size of the codes with double quantization) stay replicated buffers. Returns how many tensors moved."""
    moved = 0
    for module in model.modules():
        for name in getattr(module, "fsdp_shardable_buffers", ()):
            tensor = dict(module.named_buffers(recurse=False)).get(name)
            if tensor is None:
                continue
            delattr(module, name)
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            moved += 1
    return moved


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 works in place, so its model is already the module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on all but the last micro-batch of a step (gradients accumulate locally).

    FSDP2 reduce-scatters every micro-batch: accumulating unsharded gradients would cost the memory
    that sharding saves."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# --------------------------------------------------------------------------- full tensors


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference`: this rank's shard when reference is a DTensor (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return full.to(reference.device, reference.dtype)
    full = full.to(reference.device, reference.dtype)
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param[:] = full, where param may be a shard of a DTensor and full is the whole tensor."""
    param.copy_(like(param, full))


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, trainable_only: bool = True) -> Iterator[nn.Module]:
    """Sharded (trainable) parameters temporarily replaced by their full tensors, e.g. to save an adapter.

    A collective on entry under FSDP2; the sharded parameters are put back on exit."""
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor) and (param.requires_grad or not trainable_only):
                full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                module.register_parameter(name, full)
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module.register_parameter(name, param)


def sharded(model: nn.Module) -> bool:
    """True when FSDP2 has sharded the model's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, on CPU on rank 0 ({} elsewhere): what save_pretrained needs after FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not active():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------- launching


def lost_rank_message(error: BaseException, last_checkpoint: Path | None) -> str:
    """What a surviving rank says when a collective fails because another rank died."""
    return (f"rank {rank()} lost contact with the other ranks ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"another process died or was killed. {resume_hint(last_checkpoint)}")


def resume_hint(last_checkpoint: Path | None) -> str:
    if last_checkpoint is None:
        return "No checkpoint was saved yet (train.save_every); rerun from the start."
    return f"The last checkpoint is {last_checkpoint}; rerun the same command with --resume to continue from it."


def relaunch(nproc: int, child_argv: list[str], last_checkpoint: Callable[[], Path | None]) -> int:
    """`lorakit train --nproc N`: run `python -m lorakit <child_argv>` on N local ranks via torch.distributed.run.

    Returns the exit status; when a rank fails, prints which one and how, and how to resume."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "lorakit", *child_argv])
    try:
        run(args)
    except ChildFailedError as e:
        print(f"error: {failure_summary(e)} {resume_hint(last_checkpoint())}", file=sys.stderr)
        return 1
    return 0


def failure_summary(error: Any) -> str:
    """'rank 1 (pid 123) was killed by SIGKILL' from a torchrun ChildFailedError.

    torchrun stops the surviving ranks with SIGTERM, so those are named only when nothing else failed."""
    failures = sorted(error.failures.items())
    primary = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures
    parts = []
    for global_rank, failure in primary:
        how = f"was killed by {_signal_name(-failure.exitcode)}" if failure.exitcode < 0 else f"exited with status {failure.exitcode}"
        parts.append(f"rank {global_rank} (pid {failure.pid}) {how}")
    return "the distributed run failed: " + "; ".join(parts) + "; torchrun stopped the other ranks."


def is_lost_rank(error: BaseException) -> bool:
    """True for the error a collective raises on the survivors when another rank died (gloo raises a bare
    RuntimeError, NCCL a DistBackendError)."""
    if not active() or world_size() == 1:
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
