"""torch.distributed helpers: set-up under torchrun, rank, world size, gradient averaging.

Data parallel training runs one process per device (``torchrun --nproc_per_node N``):
NCCL on GPUs, gloo on CPUs. Every process reads its share of each global batch through
a ``DistributedSampler``; after the backward pass the head's gradients (a few million
values) are summed over the processes with one all-reduce per tensor, and every
process divides by the global number of samples, so a run on N processes takes the
same steps as one process with the same global batch — also when some process lost
videos of its share to the broken-input policy.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("mpfast.engine")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_environment(device: str | None = None) -> torch.device:
    """Joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Returns the device of this process: ``cuda:LOCAL_RANK`` with NCCL when CUDA is
    available (and ``device`` is not "cpu"), else CPU with gloo. Without torchrun
    variables, returns ``device`` (default: cuda when available) without a process group.
    """
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        if wanted.startswith("cuda") and is_distributed():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device(wanted)
    use_cuda = wanted.startswith("cuda") and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    logger.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), "nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over the processes (in place; identity without a process group)."""
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` of process ``source`` on every process (pickled between our own processes)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sums the gradients of ``parameters`` over the processes (missing ones count as zero)."""
    if not is_distributed():
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates every process's ``[n_r, ...]`` rows (n_r may differ) in rank order."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c.item())] for g, c in zip(gathered, counts)])
