"""Evaluation metrics of the fine-tuning tasks (METHOD.md#fine-tuning): classification, regression and speech recognition.

Classification and regression metrics are those of GLUE (accuracy, F1 of the positive class, Matthews
correlation, Pearson/Spearman correlation; METHOD.md#fine-tuning-text). Speech is scored by greedy CTC decoding followed by
word and character error rates (METHOD.md#fine-tuning-speech; the paper's 4-gram LM decoding is not reproduced here).

Every metric is a plain function on 1-D arrays (or lists of strings) returning a Python float; an
undefined value (a correlation of a constant prediction) is ``nan``, never a made-up number.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torchaudio.functional import edit_distance

__all__ = [
    "accuracy", "f1", "mcc", "pearson", "spearman", "ctc_greedy_decode", "wer", "cer",
    "METRICS", "LOWER_IS_BETTER", "compute",
]


def _labels(pred, label) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred).reshape(-1), np.asarray(label).reshape(-1)
    if pred.shape != label.shape:
        raise ValueError(f"predictions ({pred.shape[0]}) and labels ({label.shape[0]}) differ in length")
    if pred.size == 0:
        raise ValueError("cannot score an empty split")
    return pred, label


def accuracy(pred, label) -> float:
    """Fraction of exact matches."""
    pred, label = _labels(pred, label)
    return float((pred == label).mean())


def f1(pred, label, positive: int = 1) -> float:
    """F1 score of the positive class (GLUE's MRPC/QQP F1); 0 when there is no true positive."""
    pred, label = _labels(pred, label)
    tp = np.sum((pred == positive) & (label == positive))
    fp = np.sum((pred == positive) & (label != positive))
    fn = np.sum((pred != positive) & (label == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def mcc(pred, label) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; CoLA's metric).

    0 when either side predicts a single class (the denominator vanishes), as in scikit-learn.
    """
    pred, label = _labels(pred, label)
    classes = np.union1d(pred, label)
    conf = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(conf, (np.searchsorted(classes, label), np.searchsorted(classes, pred)), 1)
    t, p = conf.sum(1), conf.sum(0)      # true and predicted counts per class
    n, c = conf.sum(), np.trace(conf)
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((c * n - t @ p) / denom) if denom > 0 else 0.0


def pearson(pred, label) -> float:
    """Pearson correlation; ``nan`` if either side is constant."""
    x, y = (a.astype(np.float64) for a in _labels(pred, label))
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]            # start of each run of ties
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]               # mean of ranks start+1 .. end
    return ranks


def spearman(pred, label) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks)."""
    x, y = _labels(pred, label)
    return pearson(_ranks(x), _ranks(y))


def ctc_greedy_decode(emissions: torch.Tensor, lengths: torch.Tensor | None = None,
                      blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: arg-max per frame, collapse repeats, drop blanks.

    ``emissions`` is (B, T, V) scores; ``lengths`` (B,) valid frames per row (default: all).
    """
    best = emissions.argmax(-1).cpu()
    lengths = torch.full((best.shape[0],), best.shape[1]) if lengths is None else lengths.cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        row = row[:n]
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([t for t in row[keep].tolist() if t != blank])
    return out


def _error_rate(hyps: Sequence[Sequence], refs: Sequence[Sequence]) -> float:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("references are empty")
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / total


def wer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus word error rate: word-level edit distance summed over utterances / reference words."""
    return _error_rate([h.split() for h in hyps], [r.split() for r in refs])


def cer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus character error rate over the space-normalised transcripts (spaces count as characters)."""
    return _error_rate([" ".join(h.split()) for h in hyps], [" ".join(r.split()) for r in refs])


# name -> function(pred, label); the speech metrics take (hypotheses, references) transcripts.
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
    "wer": wer, "cer": cer,
}
LOWER_IS_BETTER = {"wer", "cer"}


def compute(names: Sequence[str], pred, label) -> dict[str, float]:
    """Every metric in ``names`` on one split."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    return {name: METRICS[name](pred, label) for name in names}
