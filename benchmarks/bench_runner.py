"""Overhead of the pretraining runner over the bare model step (same method, batches, device).

- **bare**: ``forward -> backward -> clip -> AdamW step -> EMA step`` on the very batches the runner
  will see (same sampler order, collated with masks before the clock starts): the model's own speed.
  Speech batches are cropped to their shortest utterance, so their cost varies: both sides must see the
  same batches for samples/s to compare.
- **runner**: ``d2v2.engine.pretrain.run`` with an updates budget: data loading (workers, masks in the
  workers), the LR schedule, logging, budget checks; its train-only clock from ``events.jsonl`` over
  the updates after the warm-up (checkpoint writing is outside that clock).

The run config is the workflow's for ``--preset`` (``d2v2/presets/<preset>.yaml``: batch size, optimiser,
data), with an updates budget. Both synchronise the device before each timestamp
(``time.perf_counter``). Example:

    python benchmarks/bench_runner.py --modality speech --threads 1 --num-workers 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from d2v2 import data
from d2v2.engine.clock import synchronize
from d2v2.engine.events import read_events
from d2v2.engine.optim import build_optimizer, param_groups
from d2v2.engine.precision import autocast, loss_scaler
from d2v2.engine.pretrain import run
from d2v2.engine.runconfig import resolve_run_config
from d2v2.engine.sampler import ResumableBatchSampler, WithEpoch
from d2v2.method import build_method, method_dataset
from d2v2.workflow import Run, run_config, with_preset


def bare_step_throughput(cfg, warmup: int, updates: int) -> float:
    """Samples/s of the bare training step on pre-collated batches."""
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    m = cfg.method
    method = build_method(m.modality, m.name, m.preset, m.overrides).to(device).train()
    optimizer = build_optimizer(param_groups(method, cfg.optim.weight_decay, method.no_weight_decay()),
                                cfg.optim)                                  # as the runner builds it
    dataset = WithEpoch(method_dataset(m.modality, m.name, m.preset, m.overrides, cfg.data), cfg.seed)
    collate = data.pretrain_collater(m.modality, cfg.data, method.masker(), cfg.seed)
    sampler = iter(ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed))
    stream = iter([{k: v.to(device) if torch.is_tensor(v) else v
                    for k, v in collate([dataset[key] for key in next(sampler)]).items()}
                   for _ in range(warmup + updates)])
    scaler = loss_scaler(device, cfg.precision, cfg.loss_scaling)

    def step(i: int) -> None:
        with autocast(device, cfg.precision):
            loss = method(next(stream)).loss
        scaler.scale(loss).backward()
        if cfg.optim.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(i + 1, fraction=(i + 1) / (warmup + updates))

    for i in range(warmup):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + updates):
        step(i)
    synchronize(device)
    return updates * cfg.batch_size / (time.perf_counter() - start)


def runner_throughput(cfg, warmup: int, out: Path) -> float:
    """Samples/s of the runner between the end of the warm-up and the end (train-only clock)."""
    assert run(cfg, out) == 0
    progress = [e["value"] for e in read_events(out / "events.jsonl", "train_progress")]
    first = next(p for p in progress if p["updates"] >= warmup)
    last = progress[-1]
    return (last["train_samples"] - first["train_samples"]) / (last["train_time_s"] - first["train_time_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="image")
    p.add_argument("--method", default="data2vec2")
    p.add_argument("--preset", default="tiny", help="workflow preset: d2v2/presets/<preset>.yaml")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--updates", type=int, default=40, help="timed updates (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="data workers (default: data.loader_kwargs)")
    p.add_argument("--data-root", default="data")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workflow = with_preset({"preset": args.preset})
    request = run_config(workflow, Run(args.modality, args.method, "default", 0))
    request["data"] = {**request["data"], "root": args.data_root, "num_workers": args.num_workers}
    if args.batch_size:
        request["batch_size"] = args.batch_size
    cfg = resolve_run_config({
        **request, "budget": {"kind": "updates", "value": args.warmup + args.updates},
        "checkpoint": {"fractions": [1.0], "last_every_s": 1e9}, "log_every": args.warmup,
        "precision": args.precision, "device": args.device, "threads": args.threads, "progress": False})
    bare, runner = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):          # interleaved, so load changes hit both alike
            bare.append(bare_step_throughput(cfg, args.warmup, args.updates))
            runner.append(runner_throughput(cfg, args.warmup, Path(tmp) / f"run{r}"))
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    print(f"{args.modality}/{args.method}/{args.preset} batch {cfg.batch_size} {args.precision} on {device} "
          f"({torch.get_num_threads()} threads), {args.updates} timed updates, {args.repeats} interleaved repeats")
    print(f"  bare step : runs {', '.join(f'{x:.1f}' for x in bare)} samples/s")
    print(f"  runner    : runs {', '.join(f'{x:.1f}' for x in runner)} samples/s")
    # best-of-N estimates the unloaded speed on a shared machine (as timeit does); the median is the typical one
    for name, agg in (("best", max), ("median", statistics.median)):
        ratio = agg(runner) / agg(bare)
        print(f"  {name:<6}: bare {agg(bare):.1f}, runner {agg(runner):.1f} samples/s, "
              f"runner / bare = {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%)")


if __name__ == "__main__":
    main()
