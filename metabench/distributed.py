"""Several processes (``torchrun --nproc_per_node=N -m metabench run ...``) on PyTorch's own machinery.

- Meta-training: each rank takes ``train.tasks_per_update`` tasks of every meta-batch (N times that in all,
  ``training.meta_batch``), every rank reads only its share of one seeded episode
  stream, and gradients are averaged across ranks right after each backward pass, before the
  learner clips them or steps any of its optimisers. That is what DistributedDataParallel does for
  one model and one optimiser; learners here own several optimisers and several backward passes per
  update (SMAT), so the averaging hangs on the parameters instead of on a wrapped module. Averaging
  is linear, so several backward passes still sum to the mean over all the batch's tasks.
- Evaluation: episode i goes to rank i mod N; rank 0 gathers the rows, puts them in the single-process
  order and writes them, so the per-episode table does not depend on the number of ranks.
- Only rank 0 writes the run folder, validates, and records training probes.

Backends: NCCL with one GPU per rank when CUDA is available, else gloo (CPU).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "attach_grad_averaging",
    "average_metrics",
    "broadcast_module",
    "gather_to_rank0",
    "grad_sync",
    "init_from_env",
    "is_main",
    "rank",
    "shard",
    "share_from_rank0",
    "shutdown",
    "world_size",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SYNC = {"active": False}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> str:
    """Join the process group that torchrun describes in the environment (a no-op without it).

    Returns the device to use: ``cuda:<local rank>`` under NCCL, else ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=dt.timedelta(minutes=30))
    log.info("Rank %d of %d (%s backend).", rank(), world_size(), dist.get_backend())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def share_from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (e.g. the run id, which holds a timestamp)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(items: Sequence[T]) -> list[list[T]]:
    """Every rank's ``items``, on rank 0 (other ranks get an empty list)."""
    if world_size() == 1:
        return [list(items)]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(list(items), out, dst=0)
    return out or []


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting points)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def attach_grad_averaging(module: nn.Module) -> None:
    """Average each trainable parameter's gradient across ranks after every backward pass, while
    ``grad_sync()`` is active (meta-training steps; not probes or test-time fine-tuning)."""
    if world_size() == 1:
        return
    n = world_size()

    def average(param: torch.Tensor) -> None:
        if _SYNC["active"] and param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(n)

    for param in module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(average)


@contextlib.contextmanager
def grad_sync() -> Iterator[None]:
    """Gradients are averaged across ranks inside this block only."""
    previous = _SYNC["active"]
    _SYNC["active"] = world_size() > 1
    try:
        yield
    finally:
        _SYNC["active"] = previous


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar metric over the ranks (for the training log)."""
    if world_size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, values.tolist())}


def average_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (a copy; the tensor itself with one process)."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def shard(n: int) -> range:
    """This rank's evaluation episodes among ``n``: i mod world == rank."""
    return range(rank(), n, world_size())


def shutdown() -> None:
    """Leave the process group (after every rank got here)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
