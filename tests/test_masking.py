"""Mask generators: exact counts per row, block structure, reproducibility, gather helpers."""

import pytest
import torch

from d2v2.model.masking import block_mask, gather_tokens, keep_indices, num_kept, random_mask, scatter_tokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def neighbour_agreement(mask: torch.Tensor, side: int) -> float:
    """Fraction of 4-neighbour pairs with the same state: high for block masks, ~p^2+(1-p)^2 for random."""
    g = mask.view(-1, side, side).float()
    same_h = (g[:, :, 1:] == g[:, :, :-1]).float().mean()
    same_v = (g[:, 1:, :] == g[:, :-1, :]).float().mean()
    return float((same_h + same_v) / 2)


def test_inverse_block_mask_keeps_exactly_39_of_196():
    mask = block_mask(64, (14, 14), 0.8, 3, 0.07, inverse=True, generator=gen())
    assert mask.shape == (64, 196) and mask.dtype == torch.bool
    assert ((~mask).sum(1) == 39).all()                 # METHOD.md#equal-mask-counts
    rows = {tuple(r.tolist()) for r in mask}
    assert len(rows) == 64                              # independent masks


def test_inverse_block_mask_keeps_bw_squares_around_every_centre():
    # few centres (adjust < 0): the marked squares never exceed the target, so none is thinned
    side, bw, n = 14, 3, int(196 * (0.5 - 0.4) / 9)
    mask = block_mask(16, (side, side), 0.5, bw, adjust=-0.4, inverse=True, generator=gen(3))
    centres = torch.randint(0, 196, (16, n), generator=gen(3))   # the generator's first draw
    kept = (~mask).view(16, side, side)
    for b in range(16):
        for c in centres[b].tolist():
            r, col = divmod(c, side)
            square = kept[b, max(r - 1, 0):r + 2, max(col - 1, 0):col + 2]
            assert square.all(), (b, r, col)
    assert ((~mask).sum(1) == 98).all()


def test_block_masks_are_spatially_clustered_unlike_random():
    block = block_mask(256, (14, 14), 0.8, 3, 0.07, inverse=True, generator=gen())
    rand = random_mask(256, 196, 0.8, generator=gen())
    assert neighbour_agreement(block, 14) > neighbour_agreement(rand, 14) + 0.1


def test_1d_block_mask_exact_count_and_long_runs():
    mask = block_mask(128, (150,), 0.5, 5, 0.05, inverse=False, generator=gen())
    assert (mask.sum(1) == 75).all()
    odd = block_mask(4, (99,), 0.5, 5, 0.05, inverse=False, generator=gen())
    assert (odd.sum(1) == 49).all()                       # fairseq: exactly int(T * R) masked
    rand = random_mask(128, 150, 0.5, generator=gen())

    def mean_run(m):
        starts = (m[:, 1:] & ~m[:, :-1]).sum() + m[:, 0].sum()
        return m.sum().item() / starts.item()

    assert mean_run(mask) > 4.0 > 2.5 > mean_run(rand)


def test_random_mask_exact_count_and_uniform_positions():
    mask = random_mask(4000, 128, 0.42, generator=gen())
    assert ((~mask).sum(1) == num_kept(128, 0.42)).all() and num_kept(128, 0.42) == 74
    freq = mask.float().mean(0)
    assert (freq - mask.float().mean()).abs().max() < 0.05


def test_masks_are_reproducible_from_the_generator():
    a = block_mask(8, (14, 14), 0.8, 3, 0.07, True, gen(7))
    b = block_mask(8, (14, 14), 0.8, 3, 0.07, True, gen(7))
    c = block_mask(8, (14, 14), 0.8, 3, 0.07, True, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_mask(4, 50, 0.5, gen(1)), random_mask(4, 50, 0.5, gen(1)))


def test_bad_ratios_and_unequal_rows_are_clear_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 10, 1.0, gen())
    with pytest.raises(ValueError, match="no visible token"):
        keep_indices(random_mask(2, 10, 0.95, gen()))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="same number of masked positions"):
        keep_indices(mask)


def test_gather_scatter_roundtrip():
    x = torch.randn(3, 10, 4)
    mask = random_mask(3, 10, 0.6, gen())
    idx = keep_indices(mask)
    assert idx.shape == (3, 4) and (idx.diff(dim=1) > 0).all()
    vis = gather_tokens(x, idx)
    torch.testing.assert_close(vis, x[~mask].view(3, 4, 4))
    back = scatter_tokens(torch.zeros_like(x), idx, vis)
    torch.testing.assert_close(back[~mask], x[~mask])
    assert (back[mask] == 0).all()
