"""Our data2vec 2.0 training step against the official fairseq code's, side by side in one process.

    python benchmarks/bench_vs_fairseq.py --fairseq /path/to/fairseq            # every modality, tiny and base, 1 and 2 threads
    python benchmarks/bench_vs_fairseq.py --fairseq /path/to/fairseq --device cuda --threads 0
    python benchmarks/bench_vs_fairseq.py --dry-run                             # a few steps (needs a checkout too)

Per (modality, preset, threads):

- **fairseq**: ``Data2VecMultiModel`` (examples/data2vec/models/data2vec2.py) built from our preset's
  configuration (scripts/crosscheck_fairseq.py imports it); one step is its forward, the losses summed and
  divided by ``sample_size`` (as fairseq's ``model`` criterion does), backward, gradient-norm clipping,
  ``torch.optim.AdamW`` with our parameter groups and hyperparameters, and ``set_num_updates`` (its EMA step).
- **ours**: the project's own ``Pretrainer.train_step`` (d2v2/engine/pretrain.py): the step the runner times,
  with its logging sums, finiteness checks, clipping, AdamW and EMA step.

Both start from the same weights (fairseq's initialisation through our converter) and see the same batches
and masks (random inputs of the preset's shape, masks drawn by our masker), with dropout, drop-path and
the decoder's mask noise off on both sides, so their losses must agree step by step (reported as the
largest relative difference). ``--dropout`` keeps the preset's dropouts and mask noise on both sides, as
pretraining runs them: each side then draws its own random masks, so only the times are compared. The
sides run in interleaved blocks of ``--steps`` steps, alternating which goes first, so load changes on a
shared machine hit both alike; each block's time is measured with
``time.perf_counter`` after a device synchronisation. Ratio = fairseq time / our time (> 1: ours is faster),
as the median over blocks and from the fastest block of each side. The load average before and after
each configuration is printed with it, and the allocator settings both sides ran under (glibc's defaults
in a plain ``python`` process; ``python -m d2v2 launch --threads N -- python benchmarks/bench_vs_fairseq.py
...`` runs it with the training jobs' settings, docs/BENCHMARKS.md#allocator).

Without a checkout (no ``--fairseq`` and no ``D2V2_FAIRSEQ`` in the environment) it prints why it skipped
and exits 0. fairseq's import-time dependencies: ``pip install omegaconf hydra-core bitarray sacrebleu
regex scikit-learn timm``. Results: docs/BENCHMARKS.md#ours-against-fairseq.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))                 # the cross-check's fairseq import

from crosscheck_common import Report                                               # noqa: E402
from crosscheck_fairseq import DETERMINISTIC, TEXT_DROPOUT, data2vec2_pair, importable_fairseq  # noqa: E402
from d2v2.config import merge                                                      # noqa: E402
from d2v2.engine.clock import synchronize                                          # noqa: E402
from d2v2.engine.optim import build_optimizer, param_groups, set_lr               # noqa: E402
from d2v2.engine.pretrain import Pretrainer                                        # noqa: E402
from d2v2.engine.runconfig import resolve_run_config                              # noqa: E402
from d2v2.launch.local import ALLOCATOR_ENV                                        # noqa: E402
from d2v2.workflow import Run, run_config, with_preset                     # noqa: E402

MODALITIES = ("image", "speech", "text")
# per-device batches: tiny = the workflow's tiny preset (d2v2/presets/tiny.yaml); base = a slice of the
# paper's per-GPU batch that a CPU steps through in seconds (--batch-size overrides both)
BATCH = {"tiny": {"image": 32, "speech": 8, "text": 16}, "base": {"image": 2, "speech": 2, "text": 2}}
LR = 1e-4                  # a constant learning rate on both sides (the schedule is not what is measured)


def allocator() -> str:
    """The malloc settings of this process, which both sides share (docs/BENCHMARKS.md#allocator)."""
    given = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    if not given:
        return "glibc defaults"
    return "the launcher's" if given == ALLOCATOR_ENV else ", ".join(f"{k}={v}" for k, v in given.items())


def our_trainer(modality: str, preset: str, batch_size: int, device: str, out: Path, dropout: bool) -> Pretrainer:
    """A Pretrainer with the workflow preset's optimiser, dropout off unless ``dropout``, and no dataset of its
    own (the benchmark feeds its batches to ``train_step``)."""
    workflow = with_preset({"preset": preset})
    request = run_config(workflow, Run(modality, "data2vec2", "default", 0))
    if not dropout:
        overrides = merge(DETERMINISTIC, TEXT_DROPOUT) if modality == "text" else DETERMINISTIC
        request["method"]["overrides"] = merge(request["method"]["overrides"], overrides)
    request["data"] = {"root": str(out)}              # unused: the data sections of base name real corpora
    cfg = resolve_run_config({**request, "batch_size": batch_size, "device": device, "precision": "fp32",
                              "threads": None, "progress": False, "budget": {"kind": "updates", "value": 10**9}})
    return Pretrainer(cfg, out, dataset=[])


def fairseq_optimizer(fs, trainer: Pretrainer) -> torch.optim.AdamW:
    """AdamW over fairseq's parameters with our groups' rule (no decay for biases, 1-D tensors, ALiBi scales)."""
    no_decay = {n for n, _ in fs.named_parameters() if n.endswith("alibi_scale")}
    return build_optimizer(param_groups(fs, trainer.cfg.optim.weight_decay, no_decay), trainer.cfg.optim)


def fairseq_step(fs, optimizer, batch: dict, clip: float | None, update: int) -> torch.Tensor:
    result = fs(batch["source"], precomputed_mask=batch["mask"])
    loss = sum(v.float().sum() for v in result["losses"].values()) / result["sample_size"]
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(fs.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fs.set_num_updates(update)
    return loss.detach()


def measure(modality: str, preset: str, threads: int, args, tmp: Path) -> dict:
    """One configuration: interleaved timed blocks of both sides, then the loss agreement."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    batch_size = args.batch_size or BATCH[preset][modality]
    report = Report(atol=0.0, reference="fairseq")     # only the config check reports into it
    pair = data2vec2_pair(modality, preset, batch_size, report, dropout=args.dropout)
    if report.failures:
        raise SystemExit(f"{modality}/{preset}: {report.failures}")
    trainer = our_trainer(modality, preset, batch_size, args.device, tmp / f"{modality}-{preset}-{threads}",
                          args.dropout)
    missing, unexpected = trainer.method.load_state_dict(pair.ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{modality}/{preset}: our model and fairseq's converted one differ "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    fs = pair.fs.to(device).train()
    fs_opt = fairseq_optimizer(fs, trainer)
    set_lr(trainer.optimizer, LR), set_lr(fs_opt, LR)
    clip = trainer.cfg.optim.clip_grad

    generator = torch.Generator().manual_seed(0)
    n = args.warmup + args.repeats * args.steps
    batches = [{k: v.to(device) for k, v in pair.batch(generator).items()} for _ in range(n)]
    ours_batches, fs_batches = iter(batches), iter(batches)
    losses = {"ours": [], "fairseq": []}

    def ours_block(steps: int) -> None:
        for _ in range(steps):
            before = trainer.stats.loss_sum.clone()
            trainer.train_step(ours_batches)
            losses["ours"].append(trainer.stats.loss_sum - before)

    def fs_block(steps: int) -> None:
        for _ in range(steps):
            losses["fairseq"].append(fairseq_step(fs, fs_opt, next(fs_batches), clip, len(losses["fairseq"]) + 1))

    def timed(block, steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        block(steps)
        synchronize(device)
        return (time.perf_counter() - start) / steps

    load_before = os.getloadavg()[0]
    ours_block(args.warmup), fs_block(args.warmup)
    times = {"ours": [], "fairseq": []}
    for r in range(args.repeats):
        order = (("ours", ours_block), ("fairseq", fs_block))
        for name, block in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(block, args.steps))
    ours_loss, fs_loss = torch.stack(losses["ours"]).double(), torch.stack(losses["fairseq"]).double()
    return {
        "modality": modality, "preset": preset, "threads": torch.get_num_threads(), "device": device.type,
        "batch_size": batch_size, "steps": args.steps, "repeats": args.repeats,
        "ours_s": statistics.median(times["ours"]), "fairseq_s": statistics.median(times["fairseq"]),
        "ratio_median": statistics.median(f / o for f, o in zip(times["fairseq"], times["ours"])),
        "ratio_min": min(times["fairseq"]) / min(times["ours"]),
        "dropout": args.dropout,         # with dropout the sides draw different masks: no loss agreement
        "loss_max_rel_diff": None if args.dropout else
        float(((ours_loss - fs_loss).abs() / fs_loss.abs().clamp_min(1e-12)).max()),
        "loss_steps": len(ours_loss), "load_before": load_before, "load_after": os.getloadavg()[0],
        "allocator": allocator(),
    }


def table(rows: list[dict]) -> str:
    lines = ["| modality | preset | threads | batch | ours s/step | fairseq s/step | ratio (median) | ratio (min) "
             "| loss rel. diff | load before/after |", "|" + "---|" * 10]
    for r in rows:
        agreement = "- (dropout on)" if r["loss_max_rel_diff"] is None else f"{r['loss_max_rel_diff']:.1e}"
        lines.append(f"| {r['modality']} | {r['preset']} | {r['threads']} | {r['batch_size']} | {r['ours_s']:.4f} "
                     f"| {r['fairseq_s']:.4f} | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x "
                     f"| {agreement} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fairseq", type=Path, default=os.environ.get("D2V2_FAIRSEQ"),
                   help="a fairseq checkout (default: $D2V2_FAIRSEQ)")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=list(BATCH))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="0: torch's default")
    p.add_argument("--batch-size", type=int, default=None, help="default: BATCH[preset][modality]")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dropout", action="store_true",
                   help="the preset's dropouts and mask noise on both sides, as pretraining runs them (timing only)")
    p.add_argument("--dry-run", action="store_true", help="tiny only, 1 thread, 1 warm-up step, 2 blocks of 1 step")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.fairseq is None:
        print("bench_vs_fairseq: skipped: no fairseq checkout (pass --fairseq PATH or set D2V2_FAIRSEQ; "
              "git clone https://github.com/facebookresearch/fairseq)")
        return 0
    if args.dry_run:
        args.presets, args.threads, args.warmup, args.steps, args.repeats = ["tiny"], [1], 1, 1, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        importable_fairseq(args.fairseq.resolve(), Path(tmp))
        for preset in args.presets:
            for modality in args.modalities:
                for threads in args.threads:
                    rows.append(measure(modality, preset, threads, args, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\nfairseq time / our time per training step, {args.device}, "
          f"{args.repeats} interleaved blocks of {args.steps} steps (wall clock, device synchronised; "
          f"allocator: {allocator()}):\n")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
