"""Splitting batch data work (cache filling) over the processes of a ``torchrun`` / ``accelerate launch`` run.

A launcher starts one process per device and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``). ``process_group_from_env`` joins those
processes in a ``torch.distributed`` group for the length of a block (or uses the group the caller already
has); ``shard`` gives each rank its part of a list; ``local_device`` is the accelerator a rank should use.
A plain ``python`` / ``reasonknee3d`` process is rank 0 of 1 and needs none of this.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a whole number (set by torchrun / "
                         f"accelerate launch)") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number >= 0")
    return value


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) when none is set."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or rank >= world:
        raise ValueError(f"environment RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def process_rank() -> tuple[int, int]:
    """(rank, world size) of the initialized ``torch.distributed`` group, else of the environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, _ = env_rank()
    return rank, world


def local_device() -> "torch.device":  # noqa: F821 - torch imported lazily
    """``cuda:LOCAL_RANK`` when CUDA is available (one device per process, as torchrun lays them out),
    else the CPU. Raises ValueError naming LOCAL_RANK when this machine has fewer devices."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    _, _, local = env_rank()
    count = torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"environment LOCAL_RANK={local}, but this machine has {count} CUDA device(s); start "
                         f"at most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group_from_env() -> Iterator[tuple[int, int]]:
    """Yield (rank, world size) with a ``torch.distributed`` group initialized when there are several processes.

    An already initialized group (a training run, a script that set one up) is used and left as it is.
    Otherwise, when the environment says ``WORLD_SIZE`` > 1, this joins one for the block: NCCL with the
    current device set to ``cuda:LOCAL_RANK`` when CUDA is available, gloo on CPUs; the group is destroyed
    when the block ends, so a later block (or a library that sets up its own group) starts clean. With one
    process nothing is initialized and (0, 1) is yielded.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    rank, world, _ = env_rank()
    if world == 1:
        yield 0, 1
        return
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} in the environment, but this torch build has no torch.distributed")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} in the environment but {' and '.join(missing)} unset: start the "
                         f"processes with torchrun or accelerate launch, which set them")
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def end_process_group() -> None:
    """After a run that completed on every rank: wait for all of them, then destroy the process group that the
    Trainer (accelerate) left initialized. A process that exits with the group alive while the others still work
    can abort in the group's teardown ("terminate called without an active exception", SIGABRT, seen once in a
    two-rank gloo run); PyTorch asks for ``destroy_process_group`` before exit. No group: nothing to do."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items of ``rank`` among ``world`` processes: item i goes to rank i % world.

    Every rank must pass the same sequence in the same order; the parts are then disjoint, cover every item,
    and differ in length by at most one.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} of world size {world}; expected 0 <= rank < world")
    return list(items[rank::world])
