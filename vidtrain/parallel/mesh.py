"""Process topology: world = data-parallel x sequence-parallel ranks, from the launcher's env.

A `Mesh` is what every other part of vidtrain.parallel is given (parallelize, the layouts, the
balance log): ranks, sizes, the dp / sp process groups and the device. `Mesh.single(device)` is
one process (no groups); `build_mesh` the launcher's world.

Rank r sits at (dp_rank, sp_rank) = divmod(r, sp_size): the ranks of one sequence-parallel
group are consecutive, so on a multi-GPU node an SP group shares the fast local links.
Every collective group gets `parallel.timeout_s`, so a dead rank fails a run instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Mesh:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    device: torch.device
    owns_process_group: bool

    @classmethod
    def single(cls, device: torch.device | None = None) -> Mesh:
        """One process, no communication (device: CUDA when available)."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, 0, 0, 1, 0, 1, None, None, device, False)

    @property
    def distributed(self) -> bool:
        """Built from a launcher's world (process groups exist, even for a world of one)."""
        return self.dp_group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun, deepspeed or the Slurm script."""
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"a distributed strategy needs the launcher's environment ({', '.join(missing)} not set): "
            "start it with vidtrain-launch (deepspeed, torchrun or slurm), or use parallel.strategy=none"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def sp_dims(world_size: int, sp_size: int) -> int:
    """Data-parallel size; a world that does not split into SP groups is a clear error."""
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.sp_size={sp_size}: "
            f"launch a multiple of {sp_size} ranks or change parallel.sp_size"
        )
    return world_size // sp_size


def build_mesh(sp_size: int, timeout_s: float) -> Mesh:
    """Initialise the default process group (unless one exists) and the dp / sp subgroups."""
    rank, world, local_rank = launch_env()
    dp_size = sp_dims(world, sp_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    elif dist.get_world_size() != world:
        raise ValueError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    dp_rank, sp_rank = divmod(rank, sp_size)
    sp_group = dp_group = None
    # every rank must create every group, in the same order
    for d in range(dp_size):
        g = dist.new_group([d * sp_size + s for s in range(sp_size)], timeout=timeout)
        if d == dp_rank:
            sp_group = g
    for s in range(sp_size):
        g = dist.new_group([d * sp_size + s for d in range(dp_size)], timeout=timeout)
        if s == sp_rank:
            dp_group = g
    return Mesh(rank, world, local_rank, dp_rank, dp_size, sp_rank, sp_size, sp_group, dp_group, device, owns)
