"""Which items each process reads in an epoch: torch's ``DistributedSampler`` rule, as a pure function.

Every loader (device-resident, torch workers, DALI) takes its order from :func:`shard_indices`, so an
epoch is a function of (seed, epoch, rank, world size): a resumed run reads what an uninterrupted one
would, and N processes together read every item once per epoch (plus the wrap-around padding).
"""

from __future__ import annotations

import numpy as np
import torch

_UINT64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A 63-bit generator seed mixing (seed, epoch, *more) with numpy's SeedSequence, so nearby tuples give
    unrelated streams (torch.manual_seed(seed + epoch) would make epoch 1 of seed 0 epoch 0 of seed 1)."""
    entropy = [value & _UINT64 for value in (seed, epoch, *more)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def shard_indices(
    num_items: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> torch.Tensor:
    """int64 (ceil(num_items / world_size),): the items rank `rank` reads in `epoch`, in reading order.

    The order is a permutation drawn from (seed, epoch) when `shuffle`, else 0..num_items-1; then as
    torch.utils.data.DistributedSampler: padded to a multiple of world_size by wrapping around, and
    rank r takes order[r::world_size].
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if shuffle:
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(num_items, generator=generator)
    else:
        order = torch.arange(num_items)
    total = -(-num_items // world_size) * world_size
    if total > num_items:
        order = order.repeat(-(-total // num_items))[:total]
    return order[rank::world_size]
