"""What the cross-checks against official code share (crosscheck_fairseq.py, crosscheck_mae.py): the
overrides that switch our random parts off, the numpy shim old official code needs, and the comparison
table (every compared tensor or number, the worst difference per row, the failures)."""
from __future__ import annotations

import numpy as np
import torch

# our encoder's random parts, off on both sides (they cannot be compared draw by draw)
NO_DROPOUT = {"encoder": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                          "post_mlp_dropout": 0.0, "prenet_dropout": 0.0, "drop_path": 0.0,
                          "layerdrop": 0.0, "prenet_layerdrop": 0.0}}


def restore_numpy_float() -> None:
    """``numpy.float``, removed in numpy 1.24, which the official code still calls: the builtin float,
    which it always was."""
    if not hasattr(np, "float"):
        np.float = float


class Report:
    """Rows of (what, max |ours - reference|, max |reference|); ``summary`` folds many tensors into one row
    (the worst difference, and the largest value, over the group). A difference beyond ``atol`` relative to
    max(1, the largest |reference value|) is a failure that names the tensor."""

    def __init__(self, atol: float, reference: str):
        self.atol, self.reference, self.failures, self.rows = atol, reference, [], {}

    def _row(self, row: str, diff: float, scale: float) -> None:
        old_diff, old_scale = self.rows.get(row, (0.0, 0.0))
        self.rows[row] = (max(diff, old_diff), max(scale, old_scale))

    def compare(self, what: str, ours: torch.Tensor, theirs: torch.Tensor, summary: str | None = None) -> None:
        row, ref = summary or what, self.reference
        if ours.shape != theirs.shape:
            self.failures.append(f"{what}: shape {tuple(ours.shape)} vs {ref} {tuple(theirs.shape)}")
            self.rows[row] = (float("nan"), float("nan"))
            return
        diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
        scale = theirs.double().abs().max().item() if theirs.numel() else 0.0
        self._row(row, diff, scale)
        if not diff <= self.atol * max(1.0, scale):
            self.failures.append(f"{what}: max |ours - {ref}| = {diff:.3g} (max |{ref}| = {scale:.3g})")

    def exact(self, what: str, ours: float, theirs: float) -> None:
        """A number both sides compute by the same formula in double precision: equal, or a failure."""
        self.rows[what] = (abs(ours - theirs), abs(theirs))
        if ours != theirs:
            self.failures.append(f"{what}: ours {ours!r}, {self.reference} {theirs!r}")

    def within(self, what: str, ours: float, theirs: float, tolerance: float, summary: str) -> None:
        """A statistic that may differ by ``tolerance``."""
        diff = abs(ours - theirs)
        self._row(summary, diff, abs(theirs))
        if not diff <= tolerance:
            self.failures.append(f"{what}: ours {ours:.4g}, {self.reference} {theirs:.4g} "
                                 f"(tolerance {tolerance:.2g})")

    def print(self) -> int:
        """Print the table and the failures; the exit status (0: everything agreed)."""
        ref = self.reference
        width = max(map(len, self.rows))
        print(f"{'what'.ljust(width)}  max |ours - {ref}|  max |{ref}|")
        for what, (diff, scale) in self.rows.items():
            print(f"{what.ljust(width)}  {diff:{len(ref) + 11}.3g}  {scale:{len(ref) + 6}.3g}")
        if self.failures:
            print("\nMISMATCH:\n  " + "\n  ".join(self.failures))
            return 1
        print(f"\nall equal within atol {self.atol:g} (relative to max(1, max |{ref}|))")
        return 0
