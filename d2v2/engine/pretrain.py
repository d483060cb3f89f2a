"""Pretrain one method under a budget: ``python -m d2v2 pretrain --config run.yaml --out RUN [key=value ...]``.

The loop is the paper's (METHOD.md#the-training-step, METHOD.md#pretraining-recipes): AdamW, warm-up + cosine LR, gradient clipping, mixed
precision, an EMA step after every update (``method.after_step``, at the budget fraction consumed). Around it, what a benchmark needs:

- **Budgets** (d2v2.engine.runconfig): updates, epochs, train seconds or device-hours; the LR follows the
  fraction of the budget consumed and the run stops at the first update that consumes it.
- **Checkpoints** at the configured budget fractions and ``checkpoint_last.pt`` every few minutes, written
  atomically (d2v2.engine.checkpoint). Each holds the whole state: model (student, decoder, EMA teacher),
  optimiser, loss scaler, schedule position, every process' RNG states, data position, clocks, segment
  table, config, method identity and the encoder config (fine-tuning rebuilds the encoder from it alone).
- **Resume**: re-running the same command continues from ``checkpoint_last.pt`` (or its ``.prev`` copy
  when the last one is corrupt); on CPU with an updates budget the final weights are bit-identical to an
  uninterrupted run. A finished run (``DONE``) is not run again.
- **Clocks** (d2v2.engine.clock): train-only and end-to-end, cumulative across restarts.
- **Signals**: SIGTERM / SIGUSR2 / SIGINT (Ctrl-C) finish the current update, write ``checkpoint_last.pt``
  and exit with ``128 + signal`` (so a launcher can requeue); the next start resumes.
- **Errors** (a full disk, bad data, a bug) stop the run at once with a message naming the cause and the
  last good checkpoint; the data workers are stopped with it, so a process never outlives its error.
- **Failures**: a non-finite loss or gradient norm stops the run naming the update, the diagnostics and
  the last good checkpoint (exit 3, ``run_stop`` status ``diverged``); nothing non-finite is saved.
- **DDP** (d2v2.engine.distributed): one process per device, gloo on CPU, NCCL on GPU.

The step does no host-device synchronisation: losses and diagnostics are summed on the device and read
(with a device sync before the timestamp) once per logging interval.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from d2v2 import data
from d2v2.config import ConfigError
from d2v2.atomic import atomic_write, atomic_write_json
from d2v2.engine import distributed
from d2v2.engine.checkpoint import load_latest, pretraining_checkpoint, remove_stale_temporaries, save_checkpoint
from d2v2.engine.clock import RunClock, SegmentTable, input_costs, process_start_time
from d2v2.engine.compile import compile_model, mark_step, replays_cuda_graphs
from d2v2.engine.errors import EXIT_USER_ERROR, USER_ERRORS
from d2v2.engine.events import EventLog
from d2v2.engine.flops import count_flops
from d2v2.engine.optim import build_optimizer, param_groups, set_lr
from d2v2.engine.precision import autocast, loss_scaler
from d2v2.engine.progress import IntervalStats, progress_bar
from d2v2.engine.provenance import job_id, provenance
from d2v2.engine.runconfig import PretrainRunConfig, config_differences, load_run_config
from d2v2.engine.summary import run_summary
from d2v2.engine.sampler import ResumableBatchSampler, WithEpoch
from d2v2.method import CollapseError, PretrainMethod, build_method, method_dataset

__all__ = ["main", "run", "Pretrainer", "Diverged", "EXIT_DIVERGED"]

EXIT_DIVERGED = 3
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm, a failed collapse guard or a vanished fp16 loss scale; the message
    names the update and the last good checkpoint."""


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _rng_state() -> dict[str, Any]:
    """This process' RNG states as checkpoint-safe values (tensors, lists, numbers)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ignore_signals_in_worker(init_fn):
    """Data workers leave SIGTERM/SIGUSR2/SIGINT to the main process (which checkpoints, then stops them:
    :func:`_stop_workers`)."""

    def worker_init(worker_id: int) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if init_fn is not None:
            init_fn(worker_id)

    return worker_init


def _stop_workers(batches) -> None:
    """Stop the data loader's workers now. Left to garbage collection, an exception's traceback keeps the
    iterator alive until interpreter exit, where multiprocessing stops daemonic workers with SIGTERM, which
    they ignore, and then waits for them forever."""
    shutdown = getattr(batches, "_shutdown_workers", None)     # torch's _MultiProcessingDataLoaderIter
    if shutdown is not None:
        shutdown()


class Pretrainer:
    """One pretraining run in ``out`` (see module docstring); :meth:`fit` returns the exit status. The
    training items come from ``cfg.data`` unless ``dataset`` is given."""

    def __init__(self, cfg: PretrainRunConfig, out: str | Path, start_wall: float | None = None,
                 dataset: Dataset | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.device = _resolve_device(cfg.device)
        self.segments = SegmentTable.resume(self.out / "segments.csv")
        self.clock = RunClock(self.device, e2e_before_s=self.segments.e2e_before_s, start_wall=start_wall)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.world = distributed.init_distributed(self.device.type)
        self.rank, self.main = distributed.rank(), distributed.is_main()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        # control messages (stop / save decisions) go through a CPU group, so agreeing costs no device sync
        self.control = dist.new_group(backend="gloo") if self.world > 1 else None
        m = cfg.method
        # a missing data path fails before any compute, and before the run directory exists
        self.dataset = method_dataset(m.modality, m.name, m.preset, m.overrides, cfg.data) if dataset is None \
            else dataset
        self.inputs = input_costs(cfg.input_costs)     # what made the inputs cost (HuBERT: labels, iteration 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        _seed_all(cfg.seed)                      # identical initial weights on every process
        self.method: PretrainMethod = build_method(m.modality, m.name, m.preset, m.overrides).to(self.device)
        _seed_all(cfg.seed + self.rank)          # then per-process randomness (dropout, noise)
        self._compile_pending = cfg.compile != "off"       # done by the first train_step (see there)
        self._cuda_graphs = replays_cuda_graphs(cfg.compile, cfg.compile_mode, self.device)
        self.model = self.method
        if self.world > 1:
            enc = self.method.encoder().cfg
            find_unused = cfg.ddp_find_unused_parameters
            if find_unused is None:     # layer-drop leaves some blocks without gradient in a step
                find_unused = getattr(enc, "layerdrop", 0) > 0 or getattr(enc, "prenet_layerdrop", 0) > 0
            self.model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused)
        self.optimizer = build_optimizer(
            param_groups(self.method, cfg.optim.weight_decay, no_weight_decay=self.method.no_weight_decay()),
            cfg.optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = loss_scaler(self.device, cfg.precision, cfg.loss_scaling, self.world, cfg.grad_accum)

        self.updates = self.tokens = self._local_tokens = 0
        self.flops_per_update: int | None = None      # counted on the run's first update (d2v2.engine.flops)
        self.data_wait_s = 0.0                        # host seconds waiting for the data loader, cumulative
        self.fraction = 0.0
        self.fractions_done: list[float] = []
        self.lr = cfg.optim.lr_at(0.0)
        self.last_good: str | None = None
        self.resumed_from: Path | None = None
        self._signal: int | None = None
        # set again when the loop starts (after a resume): its events, data order, statistics, bar
        self.events: EventLog | None = None
        self.provenance: dict[str, Any] = {}
        self.sampler: ResumableBatchSampler | None = None
        self.stats = IntervalStats(self.device, self.updates, self.tokens, 0.0)
        self.bar = None
        self._last_saved_e2e = 0.0

    # ------------------------------------------------------------------ budget and progress
    @property
    def identity(self) -> dict[str, Any]:
        m = self.cfg.method
        return {"modality": m.modality, "method": m.name, "preset": m.preset, "seed": self.cfg.seed}

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    @property
    def samples(self) -> int:
        return self.updates * self.global_batch

    @property
    def epochs(self) -> float:
        return self.updates * self.cfg.grad_accum / self.sampler.batches_per_epoch

    def budget_fraction(self, sync: bool = True) -> float:
        """Fraction of the budget consumed after ``self.updates`` updates and the clocks' time so far."""
        kind, value = self.cfg.budget.kind, self.cfg.budget.value
        if kind == "updates":
            return self.updates / value
        if kind == "epochs":
            return self.epochs / value
        if kind == "cpu_seconds":
            return self.clock.train_cpu_s(sync) / value
        train_time_s = self.clock.train_time_s(sync)
        if kind == "train_seconds":
            return train_time_s / value
        return train_time_s * self.world / 3600.0 / value

    def _count_tokens(self) -> None:
        """Add the tokens all processes encoded since the last count (a collective: call on all ranks)."""
        if self.world > 1:
            t = torch.tensor([self._local_tokens], dtype=torch.float64)
            dist.all_reduce(t, group=self.control)
            self._local_tokens = int(t.item())
        self.tokens += self._local_tokens
        self._local_tokens = 0

    def pretrain_record(self, train: float | None = None, e2e: float | None = None) -> dict[str, Any]:
        """The clocks and progress behind the current weights (the metrics file's ``pretrain`` entry)."""
        train = self.clock.train_time_s() if train is None else train
        e2e = self.clock.e2e_time_s() if e2e is None else e2e
        record = {"train_time_s": train, "e2e_time_s": e2e, "train_cpu_s": self.clock.train_cpu_s(sync=False),
                  "device_hours": train * self.world / 3600.0, "device_count": self.world,
                  "updates": self.updates, "samples": self.samples, "epochs": self.epochs, "tokens": self.tokens}
        return {**record, "inputs": self.inputs} if self.inputs else record

    # ------------------------------------------------------------------ checkpoints
    def _encoder_prefix(self) -> str:
        encoder = self.method.encoder()
        return next(name + "." for name, module in self.method.named_modules() if module is encoder)

    def state(self, budget_fraction: float | None) -> dict[str, Any]:
        """Everything needed to resume, or to fine-tune from the encoder (see module docstring)."""
        self._count_tokens()
        rng = _rng_state()
        rng_all = [rng]
        if self.world > 1:
            rng_all = [None] * self.world
            dist.all_gather_object(rng_all, rng, group=self.control)
        epoch, batch = self.sampler.position(self.updates * self.cfg.grad_accum)
        train, e2e = self.clock.train_time_s(), self.clock.e2e_time_s()
        return pretraining_checkpoint(
            identity=self.identity,
            method_config=self.method.cfg.model_dump(mode="json"), encoder=self.method.encoder(),
            encoder_prefix=self._encoder_prefix(), model=self.method.state_dict(),
            pretrain=self.pretrain_record(train, e2e), budget_fraction=budget_fraction,
            fraction_consumed=self.fraction, provenance=self.provenance, run_config=self.cfg.model_dump(mode="json"),
            # what restore() reads back
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            schedule={"fraction": self.fraction, "lr": self.cfg.optim.lr_at(self.fraction)},
            rng=rng_all,
            data_position={"epoch": epoch, "batch": batch, "micro_batches": self.updates * self.cfg.grad_accum},
            progress={"updates": self.updates, "tokens": self.tokens, "fractions_done": self.fractions_done,
                      "flops_per_update": self.flops_per_update, "data_wait_s": self.data_wait_s},
            clock={"train_time_s": train, "e2e_time_s": e2e, "train_cpu_s": self.clock.train_cpu_s(sync=False)},
            budget=self.cfg.budget.model_dump(),
            segments=self.segments.rows,
            world_size=self.world,
            config=self.cfg.model_dump(mode="json"),
        )

    def save(self, path: Path, budget_fraction: float | None = None, keep_previous: bool = False) -> None:
        """Write a checkpoint (all processes join; rank 0 writes), outside the train clock."""
        self.check_finite()
        with self.clock.paused():
            state = self.state(budget_fraction)
            if self.main:
                save_checkpoint(state, path, keep_previous=keep_previous)
                self.events.log("checkpoint", {"path": str(path.relative_to(self.out)), "updates": self.updates,
                                               "budget_fraction": budget_fraction, "fraction_consumed": self.fraction,
                                               "train_time_s": state["clock"]["train_time_s"]})
                self.segments.update(self.clock, train_time_s=state["clock"]["train_time_s"])
        self.last_good = str(path)
        self._last_saved_e2e = self.clock.e2e_time_s(sync=False)

    def save_last(self) -> None:
        self.save(self.out / "checkpoint_last.pt", keep_previous=self.cfg.checkpoint.keep_previous)

    def restore(self) -> None:
        """Continue from ``checkpoint_last.pt`` (or its previous copy when it is unreadable)."""
        self._check_config(self.out / "config.yaml")
        path = self.out / "checkpoint_last.pt"
        if not path.exists() and not path.with_name("checkpoint_last.prev.pt").exists():
            return
        ckpt, used, problems = load_latest(path)     # on the CPU: RNG states must stay there
        for problem in problems:
            self._warn(f"rejected {problem}; resuming from {used}")
        if used != path and path.exists():
            # out of the way, so that the next save does not rotate it over the good previous copy
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            self._warn(f"moved the unreadable {path.name} to {aside}")
        self._check_config(used, ckpt["config"])
        if ckpt["world_size"] != self.world:
            raise ConfigError(f"{self.out} was started with {ckpt['world_size']} processes, now {self.world}: "
                              "the data order and results would change")
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"][self.rank])
        self.updates, self.tokens = ckpt["progress"]["updates"], ckpt["progress"]["tokens"]
        self.fractions_done = list(ckpt["progress"]["fractions_done"])
        self.flops_per_update = ckpt["progress"].get("flops_per_update")     # older checkpoints: counted anew
        self.data_wait_s = ckpt["progress"].get("data_wait_s", 0.0)
        self.fraction = ckpt["fraction_consumed"]
        # segments.csv is newer than any checkpoint; the checkpoint's copy is the fallback if it was lost
        self.segments = SegmentTable.resume(self.out / "segments.csv", fallback=ckpt["segments"],
                                            checkpoint_e2e_s=ckpt["clock"]["e2e_time_s"])
        self.clock = RunClock(self.device, ckpt["clock"]["train_time_s"], self.segments.e2e_before_s,
                              start_wall=self.clock.start_wall, train_cpu_s=ckpt["clock"].get("train_cpu_s", 0.0))
        self.resumed_from, self.last_good = used, str(used)

    def _check_config(self, where: Path, saved: dict | None = None) -> None:
        """A run directory belongs to one config: refuse to continue it with another."""
        if saved is None:
            if not where.is_file():
                return
            saved = yaml.safe_load(where.read_text())
        differences = config_differences(saved, self.cfg.model_dump(mode="json"))
        if differences:
            raise ConfigError(f"{where} holds a different config; use a new --out folder or the same config: "
                              + "; ".join(differences))

    # ------------------------------------------------------------------ reporting
    def _warn(self, message: str) -> None:
        if self.main:
            print(f"warning: {message}", file=sys.stderr, flush=True)
            if self.events is not None:
                with contextlib.suppress(OSError):      # a full disk must not hide the error being reported
                    self.events.log("warning", message)

    def check_finite(self) -> None:
        """Raise :class:`Diverged` if any update so far had a non-finite loss or gradient norm (one sync);
        every process learns of a divergence on any of them, so all stop together."""
        first_bad = self.stats.first_non_finite(self.world)
        if first_bad is not None:
            diagnostics = {k: float(v) for k, v in self.stats.last_logs.items()}
            raise self._diverged(f"non-finite loss or gradient norm at update {first_bad}; diagnostics of the last "
                                 f"update: {diagnostics}")

    def check_loss_scale(self) -> float | None:
        """fp16: the loss scale (one read), or :class:`Diverged` once overflows have halved it below
        ``loss_scaling.min_scale``; ``None`` without loss scaling. Every process holds the same scale (the same
        reduced gradients)."""
        if not self.scaler.is_enabled():
            return None
        scale, floor = self.scaler.get_scale(), self.cfg.loss_scaling.min_scale
        if scale < floor:
            raise self._diverged(f"fp16 loss scale {scale:.3g} fell below {floor:g} after update {self.updates}: "
                                 f"gradients overflow at every scale, the loss is probably exploding (lower the LR "
                                 f"or use bf16)")
        return scale

    def check_health(self) -> None:
        """The method's check of the last update's diagnostics (the collapse guard of data2vec 2.0 and of data2vec
        1.0 for speech, METHOD.md#collapse-guard) as a divergence; every process stops if it fails on any of them."""
        try:
            self.method.check_health(self.stats.last_logs)
            failure = None
        except CollapseError as err:
            failure = str(err)
        if distributed.agree_max([float(failure is not None)], self.control)[0]:
            raise self._diverged(f"{failure or 'the collapse guard failed on another process'} (checked after "
                                 f"update {self.updates})")

    def _diverged(self, message: str) -> Diverged:
        """``message`` with the checkpoint the run can go back to."""
        return Diverged(f"{message}; last good checkpoint: {self.last_good or 'none (no checkpoint was written)'}")

    def log_interval(self) -> None:
        """Read the device-side sums of the interval (one sync), log one ``train_progress`` event."""
        self.check_finite()
        loss_scale = self.check_loss_scale()
        self.check_health()
        self._count_tokens()
        train, e2e = self.clock.train_time_s(), self.clock.e2e_time_s()
        n = self.updates - self.stats.start_updates
        snapshot = self.method.log_snapshot()          # read now, once per interval (not averaged)
        loss, gnorm, diagnostics = self.stats.means(self.updates)
        seconds = max(train - self.stats.start_train_s, 1e-9)
        tokens = self.tokens - self.stats.start_tokens
        record = {
            "updates": self.updates, "train_samples": self.samples, "epoch": self.epochs,
            "budget_fraction": self.fraction, "train_time_s": train, "e2e_time_s": e2e,
            "train_cpu_s": self.clock.train_cpu_s(sync=False),
            "loss": loss, "lr": self.lr, "grad_norm": gnorm,
            "diagnostics": {**diagnostics, **{k: float(v) for k, v in snapshot.items()}},
            "throughput": {"samples_per_s": n * self.global_batch / seconds,
                           "tokens_per_s": tokens / seconds, "updates_per_s": n / seconds},
        }
        if loss_scale is not None:                     # a column of the progress table, as diag.loss_scale
            record["diagnostics"]["loss_scale"] = loss_scale
        if self.main:
            self.events.log("train_progress", record)
            self.segments.update(self.clock)
            line = (f"update {self.updates} ({100 * self.fraction:.1f}%) loss {loss:.4f} "
                    f"lr {record['lr']:.3g} gnorm {gnorm:.3g} "
                    f"{record['throughput']['samples_per_s']:.1f} samples/s train {train:.1f}s")
            if self.bar is not None:
                self.bar.set_postfix_str(line, refresh=False)
            else:
                print(line, flush=True)
        self.stats.reset(self.updates, self.tokens, self.clock.train_time_s(sync=False))

    def write_summary(self, status: str, train: float, e2e: float) -> dict[str, Any]:
        summary = run_summary(status=status, identity=self.identity, record=self.pretrain_record(train, e2e),
                              cfg=self.cfg, fraction_consumed=self.fraction, flops_per_update=self.flops_per_update,
                              data_wait_s=self.data_wait_s, device=self.device, world=self.world, run_dir=self.out,
                              segments=self.segments, provenance=self.provenance)
        if self.main:
            atomic_write_json(self.out / "summary.json", summary)
        return summary

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum: int, _frame) -> None:
        self._signal = signum

    def _agree(self, fraction: float, save_due: bool) -> tuple[float, bool, bool]:
        """All processes adopt the largest fraction / any stop or save request (one CPU all-reduce)."""
        flags = distributed.agree_max([fraction, float(self._signal is not None), float(save_due)], self.control)
        if flags[1] and self._signal is None:       # another process was signalled: stop as if this one was
            self._signal = signal.SIGTERM
        return flags[0], bool(flags[1]), bool(flags[2])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batches) -> None:
        """One update: ``grad_accum`` forward/backward passes, clip, optimiser step, EMA step."""
        if self.flops_per_update is None:
            self.flops_per_update = count_flops(lambda: self._update(batches))
        else:
            self._update(batches)
        if self._compile_pending:    # after the count: a module first compiled under the counter stays eager
            compile_model(self.model, self.cfg.compile, self.cfg.compile_mode)
            self._compile_pending = False

    def _update(self, batches) -> None:
        accum = self.cfg.grad_accum
        for i in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            self.data_wait_s += time.perf_counter() - waited
            batch = self._to_device(batch)
            sync = (self.model.no_sync() if self.world > 1 and i < accum - 1 else contextlib.nullcontext())
            if self._cuda_graphs:
                mark_step()
            with sync, autocast(self.device, self.cfg.precision):
                output = self.model(batch)
            self.scaler.scale(output.loss / accum).backward()
            self.stats.add_forward(output.loss, output.logs, accum)
            self._local_tokens += self.method.encoder_tokens(batch)
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.optim.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.clip_grad, gnorm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.method.after_step(self.updates, self._teacher_fraction())
        self.stats.add_update(gnorm, check_gnorm=not self.scaler.is_enabled())

    def _teacher_fraction(self) -> float:
        """The budget fraction the EMA schedule reads after an update: exact for counted budgets; on a clock,
        the fraction all processes agreed on after the previous update (a clock read here can differ between
        processes, and their teachers must stay identical)."""
        return self.fraction if self.cfg.budget.timed else min(self.budget_fraction(sync=False), 1.0)

    def _loader(self) -> DataLoader:
        m = self.cfg.method
        self.sampler = ResumableBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.rank,
                                             self.world, start=self.updates * self.cfg.grad_accum)
        collater = data.pretrain_collater(m.modality, self.cfg.data, self.method.masker(), self.cfg.seed)
        kwargs = data.loader_kwargs(self.cfg.data, self.device, collater)
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = _ignore_signals_in_worker(kwargs.get("worker_init_fn"))
        # its own generator: creating the loader must not draw from the training RNG (bit-exact resume)
        return DataLoader(WithEpoch(self.dataset, self.cfg.seed), batch_sampler=self.sampler,
                          generator=torch.Generator().manual_seed(self.cfg.seed), **kwargs)

    def _start_events(self) -> None:
        self.events = EventLog(self.out / "events.jsonl", enabled=self.main)
        self.provenance = provenance(self.cfg.method.preset, self.device, self.world)
        cfg = self.cfg
        self.events.log("run_start", None, segment=len(self.segments.rows), job_id=job_id(),
                        resumed_from=str(self.resumed_from) if self.resumed_from else None,
                        updates=self.updates, provenance=self.provenance)
        self.events.log("seed", cfg.seed)
        self.events.log("global_batch_size", self.global_batch, per_device=cfg.batch_size,
                        grad_accum=cfg.grad_accum, processes=self.world, reference=cfg.reference_batch_size)
        self.events.log("train_samples", len(self.dataset))
        self.events.log("budget", cfg.budget.model_dump(), checkpoint_fractions=cfg.checkpoint.fractions)
        if cfg.precision == "fp16" and self.device.type == "cpu":
            self._warn("precision fp16 on a CPU runs several times slower than fp32 "
                       "(docs/BENCHMARKS.md#fp16-on-a-cpu); it is there for tests: use fp32 or bf16")
        if cfg.reference_batch_size and cfg.reference_batch_size != self.global_batch:
            self._warn(f"effective batch {self.global_batch} (= {cfg.batch_size} x {cfg.grad_accum} accumulation x "
                       f"{self.world} processes) differs from the paper's {cfg.reference_batch_size} "
                       f"({self.global_batch / cfg.reference_batch_size:.3g}x): results may differ (METHOD.md#small-batch-gap)")

    def fit(self) -> int:
        """Train until the budget is consumed or a signal arrives; return the process exit status."""
        if self.main and not (self.out / "config.yaml").exists():
            with atomic_write(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(self.cfg.model_dump(mode="json"), f, sort_keys=False)
        if self.main:
            self._remove_stale_temporaries()
        self.restore()
        loader = self._loader()
        self._start_events()
        if self.main:
            self.segments.begin(job_id(), self.provenance["host"], self.clock)
        in_main_thread = threading.current_thread() is threading.main_thread()   # where Python delivers signals
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS} if in_main_thread else {}
        self.stats = IntervalStats(self.device, self.updates, self.tokens, self.clock.train_time_s(sync=False))
        self._last_saved_e2e = self.clock.e2e_time_s(sync=False)
        self.bar = progress_bar(self.cfg.progress, self.main, self.fraction)
        self.method.train()
        status, exit_code, batches = "success", 0, None
        try:
            self.clock.start_train()
            batches = iter(loader)
            while self.fraction < 1.0:
                self.lr = self.cfg.optim.lr_at(self.fraction)
                set_lr(self.optimizer, self.lr)
                self.train_step(batches)
                save_due = self.clock.e2e_time_s(sync=False) - self._last_saved_e2e >= self.cfg.checkpoint.last_every_s
                self.fraction, stop, save_due = self._agree(
                    self.budget_fraction(sync=self.cfg.budget.timed and self._near_end()), save_due)
                if self.bar is not None:
                    self.bar.update(int(1000 * min(self.fraction, 1.0)) - self.bar.n)
                if self.updates % self.cfg.log_every == 0 or self.fraction >= 1.0 or stop:
                    self.log_interval()
                for f in self.cfg.checkpoint.fractions:
                    if f not in self.fractions_done and self.fraction >= f:
                        self.fractions_done.append(f)
                        self.save(self.out / "checkpoints" / f"checkpoint_f{f:.3f}.pt", budget_fraction=f)
                if stop:
                    status, exit_code = "interrupted", 128 + int(self._signal)
                    break
                if save_due and self.fraction < 1.0:          # at the end, the final save below is this one
                    self.save_last()
            self.clock.stop_train()
            self.save_last()
        except Diverged as err:
            status, exit_code = "diverged", EXIT_DIVERGED
            self._warn(str(err))
            if self.main:
                print(f"error: run diverged: {err}", file=sys.stderr, flush=True)
        except BaseException as err:
            status, exit_code = "aborted", EXIT_USER_ERROR if isinstance(err, USER_ERRORS) else 1
            self._warn(f"aborted at update {self.updates}: {type(err).__name__}: {err}; "
                       f"last good checkpoint: {self.last_good}")
            raise
        finally:
            _stop_workers(batches)
            if self.clock.running:
                self.clock.stop_train()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self.bar.close()
            self._finish(status, exit_code)
        return exit_code

    def _near_end(self) -> bool:
        """Time budgets: sync the device only when the host clock says the budget is nearly spent."""
        return self.budget_fraction(sync=False) >= 0.99

    def _remove_stale_temporaries(self) -> None:
        for leftover in remove_stale_temporaries(self.out) + remove_stale_temporaries(self.out / "checkpoints"):
            self._warn(f"removed {leftover}, left by an interrupted checkpoint write")

    def _finish(self, status: str, exit_code: int) -> None:
        """Close the segment, write the summary and ``run_stop`` (and ``DONE`` on success). When the run
        stops on an error this may fail too (a full disk): it then says so and leaves the error to report."""
        reason = {"success": "completed", "interrupted": f"signal:{signal.Signals(self._signal).name}"
                  if self._signal else "interrupted"}.get(status, status)
        try:
            if self.main:
                train, e2e = self.clock.train_time_s(), self.clock.e2e_time_s()
                self.segments.update(self.clock, reason=reason, train_time_s=train, e2e_time_s=e2e)
                summary = self.write_summary(status, train, e2e)
                self.events.log("run_stop", {"updates": self.updates, "train_time_s": summary["train_time_s"],
                                             "e2e_time_s": summary["e2e_time_s"]}, status=status,
                                exit_code=exit_code)
                if status == "success":
                    self._remove_stale_temporaries()
                    (self.out / "DONE").write_text(f"updates {self.updates}\n")
        except OSError as err:
            if status == "success":
                raise
            print(f"warning: could not record the end of the run in {self.out}: {err}", file=sys.stderr, flush=True)
        finally:
            self.events.close()


def run(cfg: PretrainRunConfig, out: str | Path, start_wall: float | None = None) -> int:
    """Pretrain ``cfg`` into ``out`` (resuming if it has a checkpoint); return the exit status.

    ``start_wall`` (``time.time()`` value) is where this segment's end-to-end clock starts; default now.
    """
    if (Path(out) / "DONE").exists():
        print(f"{out}: already finished (DONE exists); nothing to do")
        return 0
    trainer = Pretrainer(cfg, out, start_wall)
    try:
        return trainer.fit()
    finally:
        distributed.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config YAML (d2v2.engine.runconfig.PretrainRunConfig)")
    parser.add_argument("--out", required=True, help="run directory (created; resumed if it has a checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. budget.value=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        return run(cfg, args.out, start_wall=process_start_time())
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
