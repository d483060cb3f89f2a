"""Mask generators (METHOD.md#masking) and the gather helpers of sparse encoding (METHOD.md#sparse-encoding).

Every generator returns a bool tensor (B, T), True = masked, with EXACTLY the same number of masked
positions in every row (METHOD.md#equal-mask-counts: sparse encoding gathers a fixed number of visible tokens per
row). All are vectorised over the batch and draw only from the given ``torch.Generator``, so masks
are reproducible whichever data-loader worker makes them.

- :func:`block_mask`: block masking on a 1-D sequence or 2-D grid. With ``inverse=True`` the blocks
  mark what is KEPT (data2vec 2.0 images: inverse block masking); with ``inverse=False`` they mark what
  is masked (speech, and the "block" ablation). ``block_width=1`` is random masking.
- :func:`random_mask`: MAE-style uniform random masking (text).
- :func:`span_mask`: wav2vec 2.0 span masking (data2vec 1.0 and wav2vec 2.0 speech, and the CTC fine-tune's
  time and channel masks).
"""
from __future__ import annotations

import itertools
import math

import torch

__all__ = ["block_mask", "random_mask", "span_mask", "num_kept", "keep_indices", "mask_indices", "gather_tokens",
           "scatter_tokens"]


def num_kept(length: int, mask_ratio: float) -> int:
    """Visible positions per row: ``int(T * (1 - R))`` (as in MAE / fairseq)."""
    return int(length * (1 - mask_ratio))


def _select_exact(marked: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (B, T) with exactly ``count`` True per row: a random subset of ``marked`` if it has too many,
    else all of ``marked`` plus random unmarked positions (METHOD.md#masking count adjustment)."""
    score = marked.float() + torch.rand(marked.shape, generator=generator)
    out = torch.zeros_like(marked)
    return out.scatter_(1, score.topk(count, dim=1).indices, True)


def block_mask(batch_size: int, shape: tuple[int, ...], mask_ratio: float, block_width: int,
               adjust: float = 0.0, inverse: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(Inverse) block masking over a 1-D sequence (``shape=(T,)``) or 2-D grid (``shape=(H, W)``).

    ``n = int(T * (p + A) / Bw**ndim)`` block centres are drawn uniformly with replacement
    (p = 1 - R when ``inverse`` else R); every centre marks a ``Bw``-wide square/segment around it
    (offset ``Bw // 2``, clipped at the borders). The marked set is then made exactly ``int(T * p)``
    positions by dropping random marked or adding random unmarked ones. ``inverse``: marked = kept.
    Returns bool (B, prod(shape)), True = masked.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if block_width < 1:
        raise ValueError(f"block_width must be >= 1, got {block_width}")
    generator = generator if generator is not None else torch.default_generator
    length = math.prod(shape)
    p = 1.0 - mask_ratio if inverse else mask_ratio
    target = int(length * p)              # fairseq: exactly int(T*(1-R)) kept / int(T*R) masked
    n_centres = int(length * (p + adjust) / block_width ** len(shape))

    marked = torch.zeros(batch_size, length, dtype=torch.bool)
    if n_centres > 0:
        centres = torch.randint(0, length, (batch_size, n_centres), generator=generator)
        coords = torch.unravel_index(centres, shape)                  # ndim x (B, n)
        rows = torch.arange(batch_size)[:, None].expand(-1, n_centres)
        offset = block_width // 2
        for delta in itertools.product(range(block_width), repeat=len(shape)):   # Bw**ndim offsets
            cells = [(c + d - offset).clamp(0, s - 1) for c, d, s in zip(coords, delta, shape)]
            flat = cells[0]
            for c, s in zip(cells[1:], shape[1:]):
                flat = flat * s + c
            marked[rows, flat] = True
    chosen = _select_exact(marked, target, generator)
    return ~chosen if inverse else chosen


def random_mask(batch_size: int, length: int, mask_ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random masking keeping ``int(T * (1 - R))`` positions per row (METHOD.md#masking text, MAE)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    generator = generator if generator is not None else torch.default_generator
    noise = torch.rand(batch_size, length, generator=generator)
    keep = noise.topk(num_kept(length, mask_ratio), dim=1).indices
    return torch.ones(batch_size, length, dtype=torch.bool).scatter_(1, keep, False)


def span_mask(batch_size: int, num_frames: int, generator: torch.Generator, *, mask_prob: float = 0.65,
              span: int = 10, min_spans: int = 1, same_count: bool = True) -> torch.Tensor:
    """wav2vec 2.0 span masks ``(batch_size, num_frames)`` (fairseq ``compute_mask_indices``, static lengths).

    Each row draws ``int(mask_prob * T / span + U(0,1))`` (at least ``min_spans``) distinct start frames
    and masks ``span`` frames from each; spans may overlap, so ~``1 - exp(-mask_prob)`` of the frames end
    up masked. With ``same_count`` (fairseq's ``require_same_masks``, on in data2vec 1.0) every row is
    then thinned at random to the smallest row's count.
    """
    T = num_frames
    num_spans = (mask_prob * T / span + torch.rand(batch_size, generator=generator)).long().clamp(min=min_spans)
    if int(num_spans.max()) >= T:
        raise ValueError(f"span masking: {num_frames} frames is too short for mask_prob={mask_prob}, span={span}")
    # Starts are drawn from [0, T - span); fairseq widens that range when it holds fewer than num_spans.
    start_range = torch.where(T - span <= num_spans, T - num_spans - 1, torch.full_like(num_spans, T - span))
    scores = torch.rand(batch_size, T, generator=generator)
    scores[torch.arange(T) >= start_range[:, None]] = 2.0            # outside the range: never chosen
    starts = scores.argsort(dim=1)[:, : int(num_spans.max())]        # distinct, uniform without replacement
    valid = torch.arange(starts.shape[1]) < num_spans[:, None]
    frames = starts[:, :, None] + torch.arange(span)                  # (B, spans, span)
    keep = valid[:, :, None] & (frames < T)
    mask = torch.zeros(batch_size, T + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(keep, frames, T).reshape(batch_size, -1), True)   # column T is a sink
    mask = mask[:, :T]
    if same_count:
        mask = _thin_to_min_count(mask, generator)
    return mask


def _thin_to_min_count(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unmask random positions so that every row keeps exactly the smallest row's masked count."""
    count = int(mask.sum(1).min())
    scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, -1.0)
    out = torch.zeros_like(mask)
    out.scatter_(1, scores.topk(count, dim=1).indices, True)
    return out


def keep_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted indices (B, T_vis) of the visible (False) positions; every row must have the same count."""
    visible = (~mask).sum(1)
    if visible.numel() and not bool((visible == visible[0]).all()):
        raise ValueError("sparse encoding needs the same number of masked positions in every row; got "
                         f"visible counts {sorted(set(visible.tolist()))}")
    if visible.numel() and int(visible[0]) == 0:
        raise ValueError("the mask leaves no visible token")
    return (~mask).nonzero()[:, 1].view(mask.shape[0], -1)


def mask_indices(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``keep`` (B, T_vis) and ``masked`` (B, T_mask): the sorted visible and masked positions of ``mask``.
    The maskers add them to the batch where the masks are drawn (the data-loader workers), so the training
    step gathers tokens with indices of known shape and never waits for the device to count them."""
    return {"keep": keep_indices(mask), "masked": keep_indices(~mask)}


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for (B, T, D) ``x`` and (B, K) ``index``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copy of (B, T, D) ``base`` with ``values`` (B, K, D) written at positions ``index`` (B, K)."""
    return base.scatter(1, index[..., None].expand(-1, -1, base.shape[-1]), values)
