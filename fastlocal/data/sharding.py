"""Which items of an epoch each process reads under data parallelism (one rule for every loader).

An epoch's order is a permutation drawn from (seed, epoch) (or 0..N-1 without shuffling); like
``torch.utils.data.DistributedSampler`` it is padded to a multiple of the world size by wrapping around
to its start, and rank r takes positions r, r + world_size, ... So every rank gets the same number of
items (the same number of steps: no rank waits in a collective for a step another never runs), and
with one process the order is the whole epoch, unpadded.
"""

from __future__ import annotations

import torch


def shard_positions(num_items: int, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """int64: the positions of an epoch's order this rank reads (padded by wrapping, then strided)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, world_size "
                         f"{world_size}")
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    padded = -(-num_items // world_size) * world_size
    return torch.arange(rank, padded, world_size) % num_items


def shard_indices(num_items: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> torch.Tensor:
    """This rank's item indices for `epoch`: a permutation from (seed, epoch) when `shuffle`, else
    0..N-1; padded to a multiple of `world_size` by wrapping; rank takes order[rank::world_size]."""
    from fastlocal.data.loader import epoch_seed

    positions = shard_positions(num_items, rank=rank, world_size=world_size)
    if not shuffle:
        return positions
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator)[positions]
