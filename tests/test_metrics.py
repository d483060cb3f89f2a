"""Metrics on known data: hand-worked values and scipy references."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from d2v2.engine import metrics as M


def test_accuracy_f1_known_values():
    pred, label = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert M.accuracy(pred, label) == pytest.approx(4 / 6)
    # tp=2, fp=1, fn=1 -> 2*2 / (4+1+1)
    assert M.f1(pred, label) == pytest.approx(4 / 6)
    assert M.f1([0, 0], [1, 1]) == 0.0


def test_mcc_binary_known_value_and_degenerate():
    # sklearn's documented example: y_true [+1,+1,+1,-1], y_pred [+1,-1,+1,+1] -> -1/3
    assert M.mcc([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)
    assert M.mcc([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert M.mcc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0          # constant prediction


def test_mcc_binary_matches_phi_formula():
    rng = np.random.default_rng(0)
    label, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp = np.sum((pred == 1) & (label == 1)); tn = np.sum((pred == 0) & (label == 0))
    fp = np.sum((pred == 1) & (label == 0)); fn = np.sum((pred == 0) & (label == 1))
    phi = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.mcc(pred, label) == pytest.approx(phi)


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 100).astype(float)           # many ties
    y = x + rng.normal(size=100)
    assert M.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    assert M.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_ctc_greedy_collapses_repeats_and_blanks():
    frames = [0, 3, 3, 0, 3, 4, 4, 0, 0, 5, 7, 7]          # blank=0 separates the two 3s
    emissions = torch.nn.functional.one_hot(torch.tensor([frames, frames]), 8).float()
    out = M.ctc_greedy_decode(emissions, torch.tensor([12, 5]))
    assert out == [[3, 3, 4, 5, 7], [3, 3]]


def test_wer_cer_known_strings():
    refs = ["THE CAT SAT", "ON THE MAT"]
    hyps = ["THE CAT SAT", "ON A MAT HERE"]                 # 1 substitution + 1 insertion over 6 words
    assert M.wer(hyps, refs) == pytest.approx(2 / 6)
    assert M.cer(["KITTEN"], ["SITTING"]) == pytest.approx(3 / 7)
    assert M.cer(["A  B"], ["A B"]) == 0.0                  # whitespace normalised
    assert M.wer(["X"], ["A B C D"]) == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute(["acc"], [1], [1])
