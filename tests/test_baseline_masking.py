"""Statistics and structure of the baselines' masks (baselines/masking.py; METHOD.md#baseline-data2vec1, METHOD.md#baseline-mlm)."""
import functools
import math
import pickle

import numpy as np
import pytest
import torch

from baselines.masking import (MASK, NUM_SPECIAL, PAD, BertMasker, BlockMasker, SpanMasker, beit_block_mask,
                               bert_mask, span_mask)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ BEiT blocks

def test_beit_mask_ratio_and_bounds():
    num_masked = int(0.6 * 196)
    mask = beit_block_mask(512, (14, 14), num_masked, gen())
    assert mask.shape == (512, 196) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert int(counts.max()) <= num_masked                      # never more than asked
    assert counts.float().mean() > 0.97 * num_masked            # and almost always all of it
    assert abs(counts.float().mean().item() / 196 - 0.6) < 0.02


def test_beit_first_block_is_a_rectangle_of_about_min_block():
    """With a budget of one minimal block, each mask holds one filled rectangle of ~16 patches (BEiT's
    unit, aspect in [0.3, 3.3]) plus at most a few patches from a last, smaller block."""
    mask = beit_block_mask(300, (14, 14), 16, gen(1), min_block=16).view(-1, 1, 14, 14).float()
    assert (mask.sum((1, 2, 3)) <= 16).all()
    found = torch.zeros(300, dtype=torch.bool)
    for h in range(1, 14):
        for w in range(1, 14):
            if 12 <= h * w <= 16 and 0.25 <= h / w <= 4.0:
                window_sums = torch.nn.functional.conv2d(mask, torch.ones(1, 1, h, w))
                found |= (window_sums == h * w).flatten(1).any(1)
    assert found.all(), "some mask holds no filled rectangle of 12-16 patches"


def _components(m: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2-D boolean array."""
    seen, sizes = np.zeros_like(m), []
    for start in zip(*np.nonzero(m)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(size)
    return sizes


def test_beit_masks_are_blocks_not_scattered_patches():
    """Masked patches come in blocks: nearly all of them lie in components of >= 12 patches."""
    mask = beit_block_mask(64, (14, 14), int(0.6 * 196), gen(2)).view(-1, 14, 14).numpy()
    in_big = sum(s for m in mask for s in _components(m) if s >= 12)
    assert in_big / mask.sum() > 0.95


def test_beit_reproducible_and_validates():
    a = beit_block_mask(8, (14, 14), 100, gen(3))
    assert torch.equal(a, beit_block_mask(8, (14, 14), 100, gen(3)))
    assert not torch.equal(a, beit_block_mask(8, (14, 14), 100, gen(4)))
    with pytest.raises(ValueError, match="num_masked"):
        beit_block_mask(2, (14, 14), 196, gen())


def test_block_masker_uses_patch_grid():
    batch = {"source": torch.zeros(4, 1, 28, 28), "id": torch.arange(4)}
    out = BlockMasker(patch_size=2)(batch, gen())
    assert out["mask"].shape == (4, 196) and out["source"] is batch["source"]
    assert pickle.loads(pickle.dumps(BlockMasker(patch_size=2))) == BlockMasker(patch_size=2)


# ------------------------------------------------------------------------------------ wav2vec 2.0 spans

def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the maximal runs of True."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = torch.nonzero(padded.diff()).flatten().tolist()
    return [(s, e - s) for s, e in zip(edges[::2], edges[1::2])]


def test_span_mask_spans_and_ratio():
    T, span = 500, 10
    mask = span_mask(256, T, gen(), mask_prob=0.65, span=span, same_count=False)
    for row in mask[:32]:
        for start, length in _runs(row):
            assert length >= span or start + length == T, "a masked run shorter than one span"
    # Each frame starts a span with p = 0.065: the masked fraction is ~1 - (1 - p)^10 (~49%, METHOD.md#baseline-data2vec1).
    expected = 1 - (1 - 0.65 / span) ** span
    assert abs(mask.float().mean().item() - expected) < 0.03


def test_span_mask_number_of_spans():
    """int(0.65 * T / 10 + U) spans: with no overlap possible the count is 10 x that."""
    mask = span_mask(200, 1000, gen(5), mask_prob=0.05, span=10, same_count=False)   # 5 spans, rarely overlapping
    counts = mask.sum(1)
    assert counts.max() <= 60 and (counts == 50).float().mean() > 0.8


def test_span_mask_same_count_per_row():
    mask = span_mask(16, 300, gen(6))
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and 0.35 < counts[0] / 300 < 0.55


def test_span_mask_rejects_too_short_input():
    with pytest.raises(ValueError, match="too short"):
        span_mask(2, 3, gen(), mask_prob=0.65, span=10, min_spans=3)


def _frames(n: int, stride: int) -> int:
    return n // stride


def test_span_masker_frames_and_pickle():
    masker = SpanMasker(num_frames=functools.partial(_frames, stride=320))
    out = pickle.loads(pickle.dumps(masker))({"source": torch.zeros(3, 64000)}, gen())
    assert out["mask"].shape == (3, 200)


# ------------------------------------------------------------------------------------ BERT

def test_bert_mask_proportions():
    """15% selected; of those 80% <mask>, 10% random regular token, 10% unchanged (METHOD.md#baseline-mlm)."""
    vocab = 1000
    tokens = torch.randint(NUM_SPECIAL, vocab, (400, 128), generator=gen(7))
    tokens[:, 0] = 0
    tokens[:50, 100:] = PAD                                       # padded rows: pads are never selected
    out = bert_mask(tokens, gen(8), vocab)
    real = (tokens != PAD).sum(1)
    n = out.selected.sum(1)
    assert ((n - (0.15 * real).floor()).abs() <= 1).all()         # n = int(0.15 len + U(0,1)) per row
    assert not out.selected[tokens == PAD].any()
    sel = out.selected
    frac_mask = (out.source[sel] == MASK).float().mean().item()
    frac_keep = (out.source[sel] == tokens[sel]).float().mean().item()
    frac_rand = 1 - frac_mask - frac_keep
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_keep - 0.1) < 0.015 and abs(frac_rand - 0.1) < 0.015
    changed_to_random = sel & (out.source != MASK) & (out.source != tokens)
    assert (out.source[changed_to_random] >= NUM_SPECIAL).all() and (out.source < vocab).all()
    assert torch.equal(out.source[~sel], tokens[~sel])            # nothing else is touched
    assert torch.equal(out.masked, out.source == MASK)


def test_bert_mask_selection_is_uniform_over_positions():
    tokens = torch.randint(NUM_SPECIAL, 100, (4000, 20), generator=gen(9))
    freq = bert_mask(tokens, gen(10), 100).selected.float().mean(0)
    assert (freq - 0.15).abs().max() < 0.02                       # position 0 (<s>) included, as fairseq


def test_bert_masker_keys_and_loss_positions():
    tokens = torch.randint(NUM_SPECIAL, 50, (6, 64), generator=gen(11))
    batch = {"source": tokens, "id": torch.arange(6)}
    mlm = BertMasker(vocab_size=50)(batch, gen(12))
    d2v1 = BertMasker(vocab_size=50, loss_on="masked")(batch, gen(12))
    assert torch.equal(mlm["mlm_target"], tokens) and torch.equal(mlm["source"], d2v1["source"])
    assert torch.equal(d2v1["mask"], d2v1["source"] == MASK)
    assert (mlm["mask"] & ~d2v1["mask"]).any() and not (d2v1["mask"] & ~mlm["mask"]).any()
    assert batch["source"] is tokens and not torch.equal(mlm["source"], tokens)   # input not modified
    with pytest.raises(ValueError, match="loss_on"):
        BertMasker(vocab_size=50, loss_on="all")


def test_bert_mask_validates_input():
    with pytest.raises(ValueError, match="int64"):
        bert_mask(torch.zeros(2, 3), gen(), 100)
    with pytest.raises(ValueError, match="vocab_size"):
        bert_mask(torch.zeros(2, 3, dtype=torch.long), gen(), NUM_SPECIAL)


def test_bert_mask_reproducible():
    tokens = torch.randint(NUM_SPECIAL, 50, (4, 32), generator=gen(13))
    a, b = bert_mask(tokens, gen(1), 50), bert_mask(tokens, gen(1), 50)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert math.isclose(0.15 * 32, a.selected.sum(1).float().mean().item(), abs_tol=1.0)
