"""A deterministic, resumable, DDP-sharded order of pretraining samples.

Epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)``; its ``k``-th global batch is
the slice ``perm[k*G : (k+1)*G]`` with ``G = world_size * batch_size``, of which rank ``r`` takes the
``r``-th part. The stream is infinite (epochs follow each other) and starts at any micro-batch count, so
a resumed run continues exactly where the checkpoint left off. Incomplete last batches are dropped
(every rank always has a full batch; equal mask counts need equal shapes).

With gradient accumulation ``a`` on ``w`` processes an update consumes ``a`` consecutive micro-batches
per rank; 1 process with ``a = 2`` then sees exactly the samples (and, with the data module's
``(seed, epoch, ids)`` mask seeds, the masks) of 2 processes with ``a = 1``.

:class:`WithEpoch` turns the sampler's ``(epoch, index)`` keys into items that carry ``"epoch"`` (the
collater seeds masks from it) and draws the item's augmentation from torch's RNG seeded by
``(seed, epoch, index)``, so augmentations too are independent of which worker loads the item.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from d2v2.data.common import stable_seed

__all__ = ["ResumableBatchSampler", "WithEpoch"]


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of this rank's micro-batches as lists of ``(epoch, index)`` keys."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise ValueError(f"dataset has {num_items} items, fewer than one global batch "
                             f"({world_size} x {batch_size})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.start = rank, start
        self.batches_per_epoch = num_items // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def position(self, micro_batches: int) -> tuple[int, int]:
        """``(epoch, batch index in the epoch)`` after ``micro_batches`` micro-batches."""
        return divmod(micro_batches, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.position(self.start)
        while True:
            perm = self.permutation(epoch)
            for k in range(batch, self.batches_per_epoch):
                lo = k * self.global_batch + self.rank * self.batch_size
                yield [(epoch, int(i)) for i in perm[lo:lo + self.batch_size]]
            epoch, batch = epoch + 1, 0


class WithEpoch(Dataset):
    """``dataset[(epoch, index)]`` -> ``{**dataset[index], "epoch": epoch}`` with a seeded augmentation."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = torch.default_generator                  # CPU transforms draw from it
        state = rng.get_state()
        rng.manual_seed(stable_seed(self.seed, epoch, [index]))
        try:
            item = self.dataset[index]
        finally:
            rng.set_state(state)
        return {**item, "epoch": epoch}
