"""DistributedDataParallel support: detect a torchrun launch, shard the batch order, reduce metrics.

`torchrun --nproc_per_node=N -m edgeexit train ...` sets WORLD_SIZE/RANK/LOCAL_RANK; `setup` then joins the
process group (gloo on CPU, nccl on CUDA). Every rank computes the same seeded per-epoch order and takes its
own strided shard of it (DistributedSampler style); only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from edgeexit.errors import UserError

__all__ = [
    "DistInfo",
    "MainRankOnly",
    "env_world",
    "setup",
    "teardown",
    "barrier",
    "all_reduce_sum",
    "shard",
    "wrap",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) training job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this call initialised the process group, so it also destroys it

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs epochs and writes files."""
        return self.rank == 0


class MainRankOnly(logging.Filter):
    """Drops log records on every rank but 0 of an initialised process group (one log, not N copies)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(
            f"environment variable {name} must be an integer (set by torchrun), got {raw!r}"
        ) from None


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) when not launched by it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, local, world


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); a no-op otherwise."""
    rank, local, world = env_world()
    if world == 1:
        return DistInfo()
    if dist.is_initialized():  # e.g. the caller runs several trainings in one group
        return DistInfo(dist.get_rank(), local, dist.get_world_size(), owns_group=False)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    log.info("DDP: rank %d of %d (backend %s)", rank, world, backend)
    return DistInfo(rank, local, world, owns_group=True)


def teardown(info: DistInfo, ok: bool = True) -> None:
    """Leave the process group if `setup` created it (after a barrier, unless this rank is failing)."""
    if info.owns_group and dist.is_initialized():
        if ok:  # a failing rank must not wait for peers that may never arrive
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over ranks in place (gloo needs CPU tensors, nccl CUDA ones: `t` must be on the right device)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(order: torch.Tensor, info: DistInfo, pad: bool = True) -> torch.Tensor:
    """This rank's strided share of `order` (same on every rank); padded by wrapping so shares are equal.

    Equal shares keep every rank at the same number of optimizer steps, which DDP's gradient all-reduce needs;
    evaluation passes `pad=False` so no sample is counted twice.
    """
    if not info.enabled:
        return order
    n = order.numel()
    if pad and n % info.world_size:
        extra = info.world_size - n % info.world_size
        order = torch.cat([order, order[:extra]]) if extra <= n else order.repeat(extra // n + 2)[: n + extra]
    return order[info.rank :: info.world_size]


def wrap(net: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """`net` wrapped in DistributedDataParallel when several processes train; `net` itself otherwise."""
    if not info.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)
