"""Masking schemes of the baselines (METHOD.md#baseline-data2vec1, METHOD.md#baseline-mlm); MAE's random
masking lives in :mod:`d2v2.model.masking`.

* :func:`beit_block_mask` - BEiT blockwise masking for data2vec 1.0 vision (METHOD.md#baseline-data2vec1): rectangles of at
  least ``min_block`` patches with aspect ratio in [0.3, 1/0.3], placed until ~60% of the grid is masked.
* :func:`span_mask` - wav2vec 2.0 span masking for data2vec 1.0 speech (METHOD.md#baseline-data2vec1): every frame starts a
  span of 10 with probability ``mask_prob / span`` (0.065), ~49% of the frames masked.
* :func:`bert_mask` - BERT/RoBERTa token corruption for MLM and data2vec 1.0 text (METHOD.md#baseline-mlm): 15% of the
  tokens selected, of which 80% become ``<mask>``, 10% a random regular token and 10% stay unchanged.

Each returns boolean masks (True = masked) and takes a ``torch.Generator`` so the data workers can
reproduce a batch's masks from its seed. The ``*Masker`` classes wrap them as the picklable
``masker(batch, generator) -> batch`` callables of docs/ARCHITECTURE.md, and the ``*MaskConfig``
classes are their validated settings inside a method config (``kind`` names the scheme).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import numpy as np
import pydantic
import torch

from d2v2.config import Config
from d2v2.model.encoder import EncoderConfig
from d2v2.model.masking import span_mask
from d2v2.model.modalities.speech import frame_count
from d2v2.model.modalities.text import MASK, PAD, SPECIALS

__all__ = [
    "beit_block_mask", "span_mask", "bert_mask", "BertMasking",
    "BlockMasker", "SpanMasker", "BertMasker", "WithMaskedPositions", "masked_positions",
    "BlockMaskConfig", "SpanMaskConfig", "BertMaskConfig",
    "PAD", "MASK", "NUM_SPECIAL",
]

# Text vocabulary (d2v2.model.modalities.text.SPECIALS): the special tokens first, regular tokens after.
NUM_SPECIAL = len(SPECIALS)


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded by one draw of ``generator`` (same seed -> same masks)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _one_beit_mask(rng: np.random.Generator, height: int, width: int, num_masked: int, min_block: int,
                   max_block: int, log_aspect: tuple[float, float]) -> np.ndarray:
    """BEiT's sequential placement for one image: add rectangles until ``num_masked`` patches are masked.

    A rectangle of area ~U(min_block, budget) and aspect exp(U(log_aspect)) is placed at a uniform
    position; it is accepted if it masks between 1 and ``budget`` new patches. After 10 rejected
    placements in a row BEiT gives up, so a mask can fall slightly short of ``num_masked``.
    """
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(*sorted((min_block, budget)))    # near the end the budget is < min_block
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= height or w >= width:
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask.reshape(-1)


def beit_block_mask(batch_size: int, grid: tuple[int, int], num_masked: int, generator: torch.Generator, *,
                    min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3,
                    max_aspect: float | None = None) -> torch.Tensor:
    """BEiT blockwise masks ``(batch_size, H*W)`` over an ``H x W`` patch grid (METHOD.md#baseline-data2vec1, data2vec 1.0 vision).

    ``max_block`` defaults to ``num_masked`` and ``max_aspect`` to ``1 / min_aspect`` as in BEiT. The
    number of masked patches differs slightly between rows (at most ``num_masked``); data2vec 1.0 encodes
    all patches, so rows need not match.
    """
    height, width = grid
    if not 0 < num_masked < height * width:
        raise ValueError(f"num_masked={num_masked} must be in (0, {height * width}) for a {height}x{width} grid")
    if min_block < 1 or min_aspect <= 0:
        raise ValueError(f"min_block={min_block} must be >= 1 and min_aspect={min_aspect} > 0")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    rng = _numpy_rng(generator)
    rows = [_one_beit_mask(rng, height, width, num_masked, min_block, max_block or num_masked, log_aspect)
            for _ in range(batch_size)]
    return torch.from_numpy(np.stack(rows))


class BertMasking(NamedTuple):
    """The result of :func:`bert_mask`."""

    source: torch.Tensor       # (B, L) corrupted tokens: <mask> / random token / unchanged at selected positions
    selected: torch.Tensor     # (B, L) bool: the ~15% chosen positions (the MLM loss positions)
    masked: torch.Tensor       # (B, L) bool: the selected positions that became <mask> (data2vec 1.0 text)


def bert_mask(tokens: torch.Tensor, generator: torch.Generator, vocab_size: int, *, prob: float = 0.15,
              mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
              candidates: torch.Tensor | None = None) -> BertMasking:
    """RoBERTa's dynamic masking (fairseq ``MaskTokensDataset``, METHOD.md#baseline-mlm) of a ``(B, L)`` token batch.

    Per sequence ``n = int(prob * len + U(0,1))`` of its ``len`` candidate positions are chosen uniformly
    without replacement (default candidates: the non-pad tokens, ``<s>`` included, as in fairseq; BERT
    passes its tokens without ``<s>`` and ``</s>``); each chosen token independently becomes ``<mask>``
    with probability ``mask_token_prob``, a uniformly random regular token (id >= 5) with probability
    ``random_token_prob``, and stays unchanged otherwise.
    """
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"bert_mask expects (B, L) int64 token ids, got {tuple(tokens.shape)} {tokens.dtype}")
    if vocab_size <= NUM_SPECIAL:
        raise ValueError(f"vocab_size={vocab_size} leaves no regular token (ids >= {NUM_SPECIAL})")
    B, L = tokens.shape
    real = tokens != PAD if candidates is None else candidates
    n = (prob * real.sum(1) + torch.rand(B, generator=generator)).long()
    scores = torch.rand(B, L, generator=generator).masked_fill(~real, 2.0)
    rank = scores.argsort(1).argsort(1)                               # a uniform random order of real tokens
    selected = rank < n[:, None]
    u = torch.rand(B, L, generator=generator)
    masked = selected & (u < mask_token_prob)
    randomised = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    random_tokens = torch.randint(NUM_SPECIAL, vocab_size, (B, L), generator=generator)
    source = torch.where(masked, torch.full_like(tokens, MASK), torch.where(randomised, random_tokens, tokens))
    return BertMasking(source, selected, masked)


# ---------------------------------------------------------------- maskers (run in data-loader workers)

@dataclass(frozen=True)
class BlockMasker:
    """Image masker for data2vec 1.0: BEiT block masks over the patch grid of ``source (B, C, H, W)``."""

    patch_size: int
    mask_ratio: float = 0.6
    min_block: int = 16
    min_aspect: float = 0.3

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        B, _, H, W = batch["source"].shape
        grid = (H // self.patch_size, W // self.patch_size)
        num_masked = int(self.mask_ratio * grid[0] * grid[1])
        mask = beit_block_mask(B, grid, num_masked, generator, min_block=self.min_block, min_aspect=self.min_aspect)
        return {**batch, "mask": mask}


@dataclass(frozen=True)
class SpanMasker:
    """Speech masker for data2vec 1.0: wav2vec 2.0 spans over the frames of ``source (B, N)``.

    ``num_frames`` maps a waveform length to the encoder's frame count (a module-level function, or a
    ``functools.partial`` of one, so the masker stays picklable).
    """

    num_frames: Callable[[int], int]
    mask_prob: float = 0.65
    span: int = 10
    same_count: bool = True

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        B, N = batch["source"].shape
        mask = span_mask(B, self.num_frames(N), generator, mask_prob=self.mask_prob, span=self.span,
                         same_count=self.same_count)
        return {**batch, "mask": mask}


@dataclass(frozen=True)
class BertMasker:
    """Text masker: BERT-corrupts ``source`` and adds ``mlm_target`` (the original tokens) and ``mask``.

    ``loss_on="selected"`` marks all chosen positions (RoBERTa MLM, METHOD.md#baseline-mlm); ``loss_on="masked"`` only
    those that became ``<mask>`` (data2vec 1.0 text regresses there alone, METHOD.md#text-loss-of-data2vec1).
    """

    vocab_size: int
    loss_on: str = "selected"
    prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self):
        if self.loss_on not in ("selected", "masked"):
            raise ValueError(f"BertMasker.loss_on must be 'selected' or 'masked', got {self.loss_on!r}")

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        tokens = batch["source"]
        out = bert_mask(tokens, generator, self.vocab_size, prob=self.prob, mask_token_prob=self.mask_token_prob,
                        random_token_prob=self.random_token_prob)
        mask = out.selected if self.loss_on == "selected" else out.masked
        return {**batch, "source": out.source, "mlm_target": tokens, "mask": mask}


@dataclass(frozen=True)
class WithMaskedPositions:
    """Picklable masker wrapper: adds ``masked_pos`` (N, 2), the (row, column) of every masked position in
    row-major order, made where the masks are drawn (the loader workers), so the step indexes with a shape
    known on the host instead of a boolean mask (which makes a GPU step wait for the count)."""

    masker: Callable[[dict, torch.Generator], dict]

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.masker(batch, generator)
        return {**batch, "masked_pos": batch["mask"].nonzero()}


def masked_positions(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)`` of the masked positions on ``device``: the masker's ``masked_pos``
    (:class:`WithMaskedPositions`), or found from ``mask`` when a caller gave only the mask."""
    pos = batch["masked_pos"] if "masked_pos" in batch else batch["mask"].nonzero()
    return pos.to(device, non_blocking=True).unbind(1)


# ---------------------------------------------------------------- settings inside method configs

class BlockMaskConfig(Config):
    """BEiT block masking (data2vec 1.0 vision): ~60% of the patches in blocks of >= 16 (METHOD.md#baseline-data2vec1)."""

    kind: Literal["block"] = "block"
    mask_ratio: float = pydantic.Field(0.6, gt=0, lt=1)
    min_block: int = pydantic.Field(16, ge=1)
    min_aspect: float = pydantic.Field(0.3, gt=0, le=1)

    def masker(self, enc: EncoderConfig) -> BlockMasker:
        return BlockMasker(enc.image.patch_size, self.mask_ratio, self.min_block, self.min_aspect)


class SpanMaskConfig(Config):
    """wav2vec 2.0 span masking (data2vec 1.0 speech): p=0.65, spans of 10 frames (METHOD.md#baseline-data2vec1)."""

    kind: Literal["span"] = "span"
    mask_prob: float = pydantic.Field(0.65, gt=0, lt=1)
    span: int = pydantic.Field(10, ge=1)
    same_count: bool = True

    def masker(self, enc: EncoderConfig) -> SpanMasker:
        frames = functools.partial(frame_count, conv_layers=[tuple(c) for c in enc.speech.conv_layers])
        return SpanMasker(frames, self.mask_prob, self.span, self.same_count)


class BertMaskConfig(Config):
    """BERT masking: 15% of the tokens, 80% <mask> / 10% random / 10% unchanged (METHOD.md#baseline-mlm)."""

    kind: Literal["bert"] = "bert"
    prob: float = pydantic.Field(0.15, gt=0, lt=1)
    mask_token_prob: float = pydantic.Field(0.8, ge=0, le=1)
    random_token_prob: float = pydantic.Field(0.1, ge=0, le=1)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "BertMaskConfig":
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must be <= 1")
        return self

    def masker(self, enc: EncoderConfig, loss_on: str) -> BertMasker:
        return BertMasker(enc.text.vocab_size, loss_on, self.prob, self.mask_token_prob, self.random_token_prob)
