"""Where code runs: the device a `device` setting picks, the CPU threads a process may use, and whether other ranks
share the work.

One copy for every stage: training (`train.device`, `train.cpu_threads`), embedding (`embed.device`) and evaluation
(`evaluate.device`) resolve their settings here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(choice: str, *, key: str = "device") -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; an explicit `cuda` without a GPU is an error naming `key`."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} = cuda but no CUDA device is visible")
    return choice


def local_device(choice: str, *, key: str = "device") -> torch.device:
    """`resolve_device` as a `torch.device`, on this process's GPU (`LOCAL_RANK`) under a launcher."""
    device = resolve_device(choice, key=key)
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(configured: int, num_workers: int) -> int:
    """Intra-op threads of a CPU process: as configured, else the cores per local rank minus its data workers.

    Oversubscribed cores hurt small models badly (PyTorch's thread pool waits on busy cores: a ViT-tiny step ran 20x
    slower with 2 threads than with 1 on a loaded 2-core machine), so the default never oversubscribes.
    """
    if configured:
        return configured
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_ranks - num_workers)


def several_ranks() -> bool:
    """Whether a process group with other ranks is running: collectives are skipped otherwise, including in the group
    of one that DeepSpeed starts on a single device."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def join_process_group(backend: str | None = None) -> tuple[int, int]:
    """(rank, world size) under a launcher (torchrun sets WORLD_SIZE), with the process group started; (0, 1) alone.

    Args:
        backend: `gloo`, `nccl`, or None: NCCL with a GPU, gloo without (collectives of CPU data need gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), world


def barrier(world: int, *, last: bool = False) -> None:
    """Waits for every rank (nothing alone); `last` then leaves the process group."""
    if world > 1:
        dist.barrier()
        if last:
            dist.destroy_process_group()
