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

:class:`LengthBucketedBatchSampler` serves fine-tuning: batches of utterances (or sentences) of similar
length, so that little compute goes to padding (fairseq's ``batch_by_size`` over length-ordered indices,
counted in samples).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from d2v2.data.common import stable_seed

__all__ = ["ResumableBatchSampler", "WithEpoch", "LengthBucketedBatchSampler"]


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
    """``dataset[(epoch, index)]`` -> ``{**dataset[index], "epoch": epoch}`` with a seeded augmentation.

    A dataset with ``draws_repeat_every = k`` makes the same draws every ``k`` epochs (seeded from
    ``epoch mod k``: BERT's static masking with ``k`` duplicates of the corpus)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = torch.default_generator                  # CPU transforms draw from it
        state = rng.get_state()
        period = getattr(self.dataset, "draws_repeat_every", None)
        rng.manual_seed(stable_seed(self.seed, epoch % period if period else epoch, [index]))
        try:
            item = self.dataset[index]
        finally:
            rng.set_state(state)
        return {**item, "epoch": epoch}


class LengthBucketedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` items of similar length, in a shuffled order; one epoch per iteration.

    fairseq's wav2vec 2.0 / data2vec fine-tuning orders the utterances by length (random tie-breaking),
    groups neighbours into batches and shuffles the order of the batches every epoch. Here batches are
    counted in items, not in ``max_tokens``, so every update sees ``batch_size`` utterances as without
    bucketing. Epoch ``e`` (:meth:`set_epoch`) draws everything from ``(seed, e)``:

    1. a random permutation of the items, of which the last ``len(sizes) % batch_size`` are left out
       (``drop_last``: a different random few every epoch; every other item is visited exactly once);
    2. the rest is cut into chunks of ``chunk_batches * batch_size`` items, each sorted by length (stable,
       so equal lengths keep their random order) and cut into batches; with at most that many items (the
       tiny recipe: 300 utterances) this is one global sort, as fairseq does;
    3. the batches of all chunks are shuffled.
    """

    def __init__(self, sizes, batch_size: int, seed: int, chunk_batches: int = 64):
        self.sizes = np.asarray(sizes)
        if self.sizes.ndim != 1 or len(self.sizes) < batch_size:
            raise ValueError(f"need one size per item and at least batch_size={batch_size} items "
                             f"(got sizes of shape {self.sizes.shape})")
        self.batch_size, self.seed, self.chunk = batch_size, seed, chunk_batches * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.sizes))[:len(self) * self.batch_size]
        batches = []
        for lo in range(0, len(perm), self.chunk):
            chunk = perm[lo:lo + self.chunk]
            chunk = chunk[np.argsort(self.sizes[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for k in rng.permutation(len(batches)):
            yield batches[k].tolist()
