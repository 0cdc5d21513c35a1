"""Multi-process data parallelism through PyTorch's own launcher.

``torchrun --nproc_per_node N -m flowdistill ...`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) makes every
:func:`~flowdistill.engine.fit` call data-parallel: each process trains on its share of every
global batch, gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`,
epoch metrics are summed across processes, and only rank 0 writes checkpoints, metrics and
logs. Without those variables nothing here does anything and training is single-process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "gather_objects",
    "is_main",
    "rank",
    "setup",
    "world_size",
]


def world_size() -> int:
    """Number of processes (1 when not launched by ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and logs."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched with ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on
    CUDA, each process on GPU ``LOCAL_RANK``); return the device this process trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    """Wait for every process (no-op when single-process)."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over processes (returned unchanged when single-process)."""
    if world_size() > 1 and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order (``[obj]`` when single-process); every process
    must call it."""
    if world_size() > 1 and dist.is_initialized():
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, ...) to every process, so that all
    processes evaluate and save the same model."""
    if world_size() > 1 and dist.is_initialized():
        for buf in module.buffers():
            if buf is not None:
                dist.broadcast(buf.data, src=0)
