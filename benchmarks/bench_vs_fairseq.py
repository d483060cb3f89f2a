"""Our data2vec 2.0 training step against the official fairseq code's, side by side in one process.

    python benchmarks/bench_vs_fairseq.py --fairseq /path/to/fairseq            # every modality, tiny and base, 1 and 2 threads
    python benchmarks/bench_vs_fairseq.py --fairseq /path/to/fairseq --device cuda --threads 0 --presets base --dtype bf16
    python benchmarks/bench_vs_fairseq.py --dry-run                             # a few steps (needs a checkout too)

Per (modality, preset, threads):

- **fairseq**: ``Data2VecMultiModel`` (examples/data2vec/models/data2vec2.py) built from our preset's
  configuration (scripts/crosscheck_fairseq.py imports it); one step is its forward, the losses summed and
  divided by ``sample_size`` (as fairseq's ``model`` criterion does), backward, gradient-norm clipping,
  ``torch.optim.AdamW`` with our parameter groups and hyperparameters, and ``set_num_updates`` (its EMA step).
- **ours**: the project's own ``Pretrainer.train_step`` (d2v2/engine/pretrain.py): the step the runner times,
  with its logging sums, finiteness checks, clipping, AdamW and EMA step.

``--dtype bf16`` / ``fp16`` runs each side in its own mixed precision: ours under autocast, as the runner trains
(the EMA teacher from its weights kept in that dtype); fairseq's as its trainer runs ``common.bf16`` / ``fp16``:
the model cast to the dtype, fairseq's ``FP16Optimizer`` holding fp32 master weights (a dynamic loss scale in
fp16) around the same AdamW, the sample's floats cast, the EMA teacher in fp32 run in the model's dtype. The
losses then agree to the dtype's rounding, not to float rounding.

Both start from the same weights (fairseq's initialisation through our converter) and see the same batches
and masks (random inputs of the preset's shape, masks drawn by our masker), with dropout, drop-path and
the decoder's mask noise off on both sides, so their losses must agree step by step (reported as the
largest relative difference). ``--dropout`` keeps the preset's dropouts and mask noise on both sides, as
pretraining runs them: each side then draws its own random masks, so only the times are compared. The
sides run in interleaved blocks of ``--steps`` steps, alternating which goes first, so load changes on a
shared machine hit both alike; each block's time is measured with
``time.perf_counter`` after a device synchronisation. Ratio = fairseq time / our time (> 1: ours is faster),
as the median over blocks and from the fastest block of each side. Each side's ATen kernels in one step
(views excluded; d2v2.engine.flops.count_kernels, counted after the warm-up) say how many launches a GPU step
issues, which bounds a step of small kernels (docs/BENCHMARKS.md#the-gpu-path). The load average before and after
each configuration is printed with it, and the allocator settings both sides ran under (glibc's defaults
in a plain ``python`` process; ``python -m d2v2 launch --backend local --threads N --
python benchmarks/bench_vs_fairseq.py ...`` runs it with the training jobs' settings, docs/BENCHMARKS.md#allocator).

Without a checkout (no ``--fairseq`` and no ``D2V2_FAIRSEQ`` in the environment) it prints why it skipped
and exits 0. fairseq's import-time dependencies: ``pip install omegaconf hydra-core bitarray timm``
(scripts/crosscheck_fairseq.py). Results: docs/BENCHMARKS.md#ours-against-fairseq.
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

from bench_step import AUDIO_SECONDS, DEFAULT_BATCH                                # noqa: E402
from crosscheck_common import Report                                               # noqa: E402
from crosscheck_fairseq import data2vec2_pair, deterministic, importable_fairseq      # noqa: E402
from d2v2.config import merge                                                      # noqa: E402
from d2v2.engine.clock import synchronize                                          # noqa: E402
from d2v2.engine.flops import count_kernels                                        # noqa: E402
from d2v2.engine.optim import build_optimizer, param_groups, set_lr               # noqa: E402
from d2v2.engine.provenance import device_name                                     # noqa: E402
from d2v2.engine.pretrain import Pretrainer                                        # noqa: E402
from d2v2.engine.runconfig import resolve_run_config                              # noqa: E402
from d2v2.launch.local import ALLOCATOR_ENV                                        # noqa: E402
from d2v2.workflow import Run, run_config, with_preset                     # noqa: E402

MODALITIES = ("image", "speech", "text")
# per-device batches: tiny = the workflow's tiny preset (d2v2/presets/tiny.yaml); base = on a CPU a slice of the
# paper's per-GPU batch that it steps through in seconds (1-s utterances), on a GPU the paper's per-GPU batches
# and utterance length (bench_step.py's); --batch-size and --audio-seconds override them
BATCH = {"tiny": {"image": 32, "speech": 8, "text": 16}, "base": {"image": 2, "speech": 2, "text": 2}}
GPU_BATCH = {"tiny": BATCH["tiny"], "base": DEFAULT_BATCH["base"]}
LR = 1e-4                  # a constant learning rate on both sides (the schedule is not what is measured)
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def allocator() -> str:
    """The malloc settings of this process, which both sides share (docs/BENCHMARKS.md#allocator)."""
    given = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    if not given:
        return "glibc defaults"
    return "the launcher's" if given == ALLOCATOR_ENV else ", ".join(f"{k}={v}" for k, v in given.items())


def our_trainer(modality: str, preset: str, batch_size: int, device: str, out: Path, dropout: bool,
                precision: str = "fp32", overrides: dict | None = None) -> Pretrainer:
    """A Pretrainer with the workflow preset's optimiser, dropout off unless ``dropout``, ``precision`` (bf16/fp16:
    autocast, as the runner trains), ``overrides`` over the method config, and no dataset of its own (the benchmark
    feeds its batches to ``train_step``)."""
    workflow = with_preset({"preset": preset})
    request = run_config(workflow, Run(modality, "data2vec2", "default", 0))
    request["method"]["overrides"] = merge(merge(request["method"]["overrides"], {} if dropout else
                                                 deterministic(modality)), overrides or {})
    request["data"] = {"root": str(out)}              # unused: the data sections of base name real corpora
    cfg = resolve_run_config({**request, "batch_size": batch_size, "device": device, "precision": precision,
                              "threads": None, "progress": False, "budget": {"kind": "updates", "value": 10**9}})
    return Pretrainer(cfg, out, dataset=[])


def narrowed(width: int | None) -> dict:
    """Method-config overrides that narrow the encoder (heads of 16 channels) and the decoder to ``width``."""
    if width is None:
        return {}
    return {"encoder": {"embed_dim": width, "num_heads": max(1, width // 16)}, "decoder": {"dim": width}}


def fairseq_param_groups(fs, trainer: Pretrainer) -> list[dict]:
    """fairseq's parameters in our groups (no decay for biases, 1-D tensors, ALiBi scales)."""
    no_decay = {n for n, _ in fs.named_parameters() if n.endswith("alibi_scale")}
    return param_groups(fs, trainer.cfg.optim.weight_decay, no_decay)


def fairseq_optimizer(fs, trainer: Pretrainer) -> torch.optim.AdamW:
    """Our AdamW over fairseq's parameters, in our groups."""
    return build_optimizer(fairseq_param_groups(fs, trainer), trainer.cfg.optim)


def fairseq_mixed_precision(fs, trainer: Pretrainer, dtype: str):
    """fairseq's trainer under ``common.fp16`` / ``common.bf16``: the model cast to the dtype, and fairseq's
    ``FP16Optimizer`` keeping fp32 master copies of the weights (one per parameter, as fairseq's image and text
    configs set with ``fp16_no_flatten_grads`` and its bf16 path always does; its speech config flattens them into
    one tensor in fp16, which this does not), with a dynamic loss scale in fp16
    (its defaults), stepping our AdamW over the master copies. The EMA teacher follows fairseq's ``ema_fp32``
    and ``ema_same_dtype``: fp32 weights, run in the model's dtype."""
    from fairseq.dataclass.configs import CommonConfig
    from fairseq.optim import FairseqOptimizer
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from omegaconf import OmegaConf

    fs.to(LOW[dtype])
    params = [p for p in fs.parameters() if p.requires_grad]
    cfg = OmegaConf.create({
        "common": OmegaConf.structured(CommonConfig(fp16=dtype == "fp16", bf16=dtype == "bf16",
                                                    fp16_no_flatten_grads=True)),
        "optimizer": {}, "optimization": {"update_freq": [1]},
        "distributed_training": {"distributed_world_size": 1}})
    masters = FP16Optimizer.build_fp32_params(cfg.optimizer, params, flatten=False)
    master_of = {id(p): m for p, m in zip(params, masters)}
    groups = [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in fairseq_param_groups(fs, trainer)]
    inner = FairseqOptimizer(cfg.optimizer)                   # fairseq's optimiser interface around our AdamW
    inner._optimizer = build_optimizer(groups, trainer.cfg.optim)
    return FP16Optimizer(cfg, params, inner, masters)


def fairseq_mixed_step(fs, optimizer, batch: dict, clip: float | None, update: int, dtype: str) -> torch.Tensor:
    """One update as fairseq's trainer takes it in fp16/bf16: the sample's floats in the model's dtype, the
    summed losses' backward (scaled in fp16), gradients divided by ``sample_size``, the norm clipped (computed
    even without clipping: the loss scaler reads it), the master weights stepped and copied back, the EMA step;
    an fp16 overflow skips the update, as its trainer does.
    Left out, in fairseq's favour: the trainer's check that the gradient norm is finite (a host sync)."""
    source = batch["source"].to(LOW[dtype]) if batch["source"].is_floating_point() else batch["source"]
    result = fs(source, precomputed_mask=batch["mask"])
    loss = sum(v.float().sum() for v in result["losses"].values())
    optimizer.backward(loss)
    optimizer.multiply_grads(1.0 / result["sample_size"])
    try:
        optimizer.clip_grad_norm(clip or 0.0)
        optimizer.step()
        fs.set_num_updates(update)
    except OverflowError:           # fp16: its trainer skips the update (the scaler has lowered the loss scale)
        pass
    optimizer.zero_grad()
    return loss.detach() / result["sample_size"]


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
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (GPU_BATCH if on_gpu else BATCH)[preset][modality]
    seconds = args.audio_seconds or (AUDIO_SECONDS[preset] if on_gpu and preset == "base" else 1.0)
    report = Report(atol=0.0, reference="fairseq")     # only the config check reports into it
    narrow = narrowed(args.width)
    pair = data2vec2_pair(modality, preset, batch_size, report, dropout=args.dropout, audio_seconds=seconds,
                          overrides=narrow)
    if report.failures:
        raise SystemExit(f"{modality}/{preset}: {report.failures}")
    trainer = our_trainer(modality, preset, batch_size, args.device, tmp / f"{modality}-{preset}-{threads}",
                          args.dropout, args.dtype, narrow)
    missing, unexpected = trainer.method.load_state_dict(pair.ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{modality}/{preset}: our model and fairseq's converted one differ "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    fs = pair.fs.to(device).train()
    clip = trainer.cfg.optim.clip_grad
    if args.dtype == "fp32":
        fs_opt = fairseq_optimizer(fs, trainer)
        set_lr(fs_opt, LR)
        step = lambda batch, update: fairseq_step(fs, fs_opt, batch, clip, update)           # noqa: E731
    else:
        fs_opt = fairseq_mixed_precision(fs, trainer, args.dtype)
        set_lr(fs_opt.optimizer, LR)                               # the AdamW over the master weights
        step = lambda batch, update: fairseq_mixed_step(fs, fs_opt, batch, clip, update, args.dtype)  # noqa: E731
    set_lr(trainer.optimizer, LR)

    generator = torch.Generator().manual_seed(0)
    n = args.warmup + 1 + args.repeats * args.steps
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
            losses["fairseq"].append(step(next(fs_batches), len(losses["fairseq"]) + 1))

    def timed(block, steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        block(steps)
        synchronize(device)
        return (time.perf_counter() - start) / steps

    load_before = os.getloadavg()[0]
    ours_block(args.warmup), fs_block(args.warmup)
    kernels = {"ours": count_kernels(lambda: ours_block(1)), "fairseq": count_kernels(lambda: fs_block(1))}
    times = {"ours": [], "fairseq": []}
    for r in range(args.repeats):
        order = (("ours", ours_block), ("fairseq", fs_block))
        for name, block in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(block, args.steps))
    ours_loss, fs_loss = torch.stack(losses["ours"]).double(), torch.stack(losses["fairseq"]).double()
    return {
        "modality": modality, "preset": preset, "threads": torch.get_num_threads(), "device": device.type,
        "dtype": args.dtype, "width": args.width,
        "params_m": sum(p.numel() for p in trainer.method.parameters() if p.requires_grad) / 1e6,
        "fairseq_weights": str(next(fs.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size, "audio_seconds": seconds if modality == "speech" else None,
        "steps": args.steps, "repeats": args.repeats,
        "ours_s": statistics.median(times["ours"]), "fairseq_s": statistics.median(times["fairseq"]),
        "ours_kernels": kernels["ours"], "fairseq_kernels": kernels["fairseq"],
        "ratio_median": statistics.median(f / o for f, o in zip(times["fairseq"], times["ours"])),
        "ratio_min": min(times["fairseq"]) / min(times["ours"]),
        "dropout": args.dropout,         # with dropout the sides draw different masks: no loss agreement
        "loss_max_rel_diff": None if args.dropout else
        float(((ours_loss - fs_loss).abs() / fs_loss.abs().clamp_min(1e-12)).max()),
        "loss_steps": len(ours_loss), "load_before": load_before, "load_after": os.getloadavg()[0],
        "allocator": allocator(), "device_name": device_name(device),
    }


def table(rows: list[dict]) -> str:
    lines = ["| modality | preset | threads | batch | ours s/step | fairseq s/step | ratio (median) | ratio (min) "
             "| kernels/step ours / fairseq | loss rel. diff | load before/after |", "|" + "---|" * 11]
    for r in rows:
        agreement = "- (dropout on)" if r["loss_max_rel_diff"] is None else f"{r['loss_max_rel_diff']:.1e}"
        lines.append(f"| {r['modality']} | {r['preset']} | {r['threads']} | {r['batch_size']} | {r['ours_s']:.4f} "
                     f"| {r['fairseq_s']:.4f} | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x "
                     f"| {r['ours_kernels']} / {r['fairseq_kernels']} | {agreement} "
                     f"| {r['load_before']:.2f} / {r['load_after']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fairseq", type=Path, default=os.environ.get("D2V2_FAIRSEQ"),
                   help="a fairseq checkout (default: $D2V2_FAIRSEQ)")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=list(BATCH))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="0: torch's default")
    p.add_argument("--batch-size", type=int, default=None, help="default: BATCH (GPU_BATCH on a GPU)[preset][modality]")
    p.add_argument("--audio-seconds", type=float, default=None,
                   help="length of each utterance (default: 1 s; at base on a GPU the paper's 15.6 s)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", *LOW], default="fp32",
                   help="bf16/fp16: ours under autocast (the runner's mixed precision), fairseq's model in the dtype "
                        "with fp32 master weights (its trainer's common.bf16/fp16)")
    p.add_argument("--width", type=int, default=None,
                   help="narrow the encoder and decoder to this many channels, the preset's structure otherwise "
                        "kept: a step bound by the framework's per-kernel overhead, as a GPU step at the paper's "
                        "per-GPU batches is (docs/BENCHMARKS.md#each-side-in-its-own-bf16)")
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
    print(f"\nfairseq time / our time per training step, {args.device}, {args.dtype}, "
          f"{'' if args.width is None else f'encoder and decoder narrowed to {args.width} channels, '}"
          f"{args.repeats} interleaved blocks of {args.steps} steps (wall clock, device synchronised; "
          f"allocator: {allocator()}; {device_name(args.device)}):\n")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
