"""What the pretraining loop reports, and how it learns of a divergence without waiting for the device.

:class:`IntervalStats` sums one logging interval's loss, gradient norm and the method's diagnostics on
the device (plain numbers on the host) and remembers the first update whose loss or gradient norm was
not finite; reading it (:meth:`IntervalStats.means`, :meth:`IntervalStats.first_non_finite`) is the
interval's one host-device sync. :func:`progress_bar` is the optional terminal bar.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from d2v2.engine import distributed

__all__ = ["IntervalStats", "progress_bar"]

NEVER = 2**62           # "no non-finite update yet"


class IntervalStats:
    """Device-side sums of one logging interval, and the first non-finite update of the run so far."""

    def __init__(self, device: torch.device, updates: int, tokens: int, train_s: float):
        self.device = device
        self.log_sums: dict[str, torch.Tensor] = {}
        self.host_log_sums: dict[str, float] = {}
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), NEVER, dtype=torch.long, device=device)
        self.update_counter = torch.full((), updates, dtype=torch.long, device=device)
        self.last_logs: dict[str, Any] = {}      # the last forward's logs, named when a run diverges
        self.reset(updates, tokens, train_s)

    def reset(self, updates: int, tokens: int, train_s: float) -> None:
        """Start a new interval at this progress (its first update comes next)."""
        zero = torch.zeros((), device=self.device)
        self.loss_sum, self.gnorm_sum = zero.clone(), zero.clone()
        self.log_sums = {k: zero.clone() for k in self.log_sums}
        self.host_log_sums = {k: 0.0 for k in self.host_log_sums}
        self.start_updates, self.start_tokens, self.start_train_s = updates, tokens, train_s

    def add_forward(self, loss: torch.Tensor, logs: dict[str, Any], accum: int) -> None:
        """One of an update's ``accum`` forward passes: its loss and logs (tensors summed on the device)."""
        loss = loss.detach().float()
        self.loss_sum += loss / accum
        self.bad |= ~torch.isfinite(loss)
        for key, value in logs.items():
            if torch.is_tensor(value):
                if key not in self.log_sums:
                    self.log_sums[key] = torch.zeros((), device=self.device)
                self.log_sums[key] += value.detach().float() / accum
            else:
                self.host_log_sums[key] = self.host_log_sums.get(key, 0.0) + float(value) / accum
        self.last_logs = logs

    def add_update(self, gnorm: torch.Tensor, check_gnorm: bool) -> None:
        """The update's gradient norm (with fp16 an overflow is the loss scaler's business: ``check_gnorm``
        false); marks the update bad if anything in it was not finite."""
        if check_gnorm:
            self.bad |= ~torch.isfinite(gnorm)
        self.gnorm_sum += gnorm.detach().float()
        self.update_counter += 1
        self.first_bad = torch.where(self.bad, torch.minimum(self.first_bad, self.update_counter), self.first_bad)

    def first_non_finite(self, world: int) -> int | None:
        """The first update with a non-finite loss or gradient norm on any process (one sync), or None."""
        if world > 1:
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        first = int(self.first_bad)
        return first if first < NEVER else None

    def means(self, updates: int) -> tuple[float, float, dict[str, float]]:
        """Loss, gradient norm and diagnostics averaged over the interval's updates and the processes."""
        n = max(updates - self.start_updates, 1)
        sums = torch.stack([self.loss_sum, self.gnorm_sum, *self.log_sums.values()])
        distributed.all_reduce_mean(sums)
        values = (sums / n).tolist()
        return values[0], values[1], {**dict(zip(self.log_sums, values[2:])),
                                      **{k: v / n for k, v in self.host_log_sums.items()}}


def progress_bar(show: bool | str, main: bool, fraction: float):
    """A tqdm bar in per mille of the budget, or None (``show: auto``: on a terminal outside SLURM)."""
    if show == "auto":
        show = sys.stdout.isatty() and "SLURM_JOB_ID" not in os.environ
    if not (show and main):
        return None
    from tqdm import tqdm
    return tqdm(total=1000, initial=int(1000 * min(fraction, 1.0)), unit="‰", dynamic_ncols=True)
