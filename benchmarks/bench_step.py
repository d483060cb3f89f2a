"""Training-step throughput and peak memory of every registered pretraining method.

For each (modality, method) in ``d2v2.method.available_methods()`` and each preset, build the method,
feed it synthetic inputs of the preset's shape (masks drawn by its own masker, outside the timed
region, as the data-loader workers do), and time ``forward + backward + AdamW step + after_step``
with ``time.perf_counter`` (wall clock; the device is synchronised before every timestamp).

Reported per row: seconds per step (median over the timed steps); FLOPs per step (counted on one step
with ``FlopCounterMode``, d2v2.engine.flops), achieved TFLOP/s and MFU against the device's dense bf16 peak
(GPU only); "cpu s", the process CPU time of
the step (``time.process_time``: about what the step takes on idle cores when others share the
machine); samples/s; encoder tokens per step and per second (``method.encoder_tokens``: student +
teacher tokens); the per-sample training cost relative to data2vec 2.0 of the same modality and preset
(from CPU time on a CPU, wall time on a GPU); and peak memory: ``torch.cuda.max_memory_allocated`` on a
GPU, on a CPU the peak resident set size of a fresh process that runs only that row (so it includes the
Python/torch runtime, ~0.6 GB); "kernels", the ATen kernels of one eager step (views excluded: about one
launch each on a GPU), and the step time per kernel: tens of microseconds per kernel on a GPU mean the host,
issuing them, is what bounds the step (docs/BENCHMARKS.md#the-gpu-path).

    python benchmarks/bench_step.py --presets tiny
    python benchmarks/bench_step.py --presets base --batch-size 2 --steps 3 --methods data2vec2
    python benchmarks/bench_step.py --presets base --dtype bf16 --compile off model --json rows.json   # on a GPU
    python benchmarks/bench_step.py --presets base --dtype bf16 --compile model --compile-mode reduce-overhead
    python benchmarks/bench_step.py --presets base --dtype bf16 --modalities image --methods data2vec2 --batch-size 16 32 64

``--compile`` rows (d2v2.engine.compile: ``blocks`` or the whole ``model``) run in a fresh process each; the
first steps pay the compilation (``--warmup``). A row that fails prints why and the others go on.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from typing import get_args

import torch

# samples of audio per utterance when benchmarking (the tiny data are 2-4 s; the paper crops to 20 s)
AUDIO_SECONDS = {"smoke": 2.0, "tiny": 3.0, "base": 15.6}     # base: 62.5 s per GPU as 4 utterances
DEFAULT_BATCH = {"smoke": {"image": 16, "speech": 4, "text": 8},
                 "tiny": {"image": 64, "speech": 16, "text": 32},          # 2x d2v2/presets/tiny.yaml's
                 "base": {"image": 16, "speech": 4, "text": 4},            # per-GPU batches (METHOD.md#pretraining-recipes)
                 "gpu": {"image": 256}}                                    # presets/gpu.yaml: images only


def synthetic_batch(encoder_cfg, modality: str, batch_size: int, audio_seconds: float) -> dict:
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        c = encoder_cfg.image
        source = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size, generator=g)
    elif modality == "speech":
        source = torch.randn(batch_size, int(audio_seconds * 16000), generator=g)
    else:
        c = encoder_cfg.text
        source = torch.randint(5, c.vocab_size, (batch_size, c.max_positions), generator=g)
        source[:, 0] = 0                                                    # <s>
    return {"source": source, "id": torch.arange(batch_size)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def bench_one(modality: str, method_name: str, preset: str, batch_size: int, steps: int, warmup: int,
              device: str, dtype: str, threads: int, audio_seconds: float | None, compile: str = "off",
              compile_mode: str = "default", teacher_copy: bool = True) -> dict | None:
    """Benchmark one (modality, method, preset); runs in its own process on CPU. ``teacher_copy=False``: an EMA
    teacher runs from its fp32 weights under autocast (the casts at every forward; d2v2.model.ema); None for a
    method without one (the row would repeat the ``teacher_copy=True`` one)."""
    from d2v2.engine.compile import compile_model, mark_step, replays_cuda_graphs
    from d2v2.engine.flops import count_step, peak_flops
    from d2v2.engine.precision import autocast, loss_scaler
    from d2v2.method import build_method
    from d2v2.model.ema import disable_autocast_copies

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = build_method(modality, method_name, preset).to(device)
    method.train()
    if not teacher_copy and not disable_autocast_copies(method):
        return None
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dev = torch.device(device)
    scaler = loss_scaler(dev, dtype)
    raw = method.stand_in_inputs(synthetic_batch(method.encoder().cfg, modality, batch_size, audio_seconds),
                                 torch.Generator().manual_seed(0))
    masker = method.masker()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, tokens = [], [], 0

    cuda_graphs = replays_cuda_graphs(compile, compile_mode, dev)

    def step_fn(step: int, batch: dict) -> None:
        if cuda_graphs:
            mark_step()
        with autocast(dev, dtype):
            out = method(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        method.after_step(step + 1, fraction=(step + 1) / (warmup + steps))

    # FLOPs and kernels of one step, counted before compiling (a block first called under the counter stays
    # eager), after an uncounted one (the optimiser's state is created at its first step)
    first = _to(masker(dict(raw), torch.Generator().manual_seed(0)), device)
    step_fn(-2, first)
    flops, kernels = count_step(lambda: step_fn(-1, first))
    compile_model(method, compile, compile_mode)
    for step in range(warmup + steps):
        batch = _to(masker(dict(raw), torch.Generator().manual_seed(step)), device)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step_fn(step, batch)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens = method.encoder_tokens(batch)
    step_s = statistics.median(times)
    if device.startswith("cuda"):
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB -> GiB (Linux)
    peak = peak_flops(dev)
    return {"modality": modality, "method": method_name, "preset": preset, "batch": batch_size, "dtype": dtype,
            "compiled": compile, "compile_mode": compile_mode, "teacher_copy": teacher_copy, "step_s": step_s,
            "cpu_s": statistics.median(cpu_times),
            "samples_s": batch_size / step_s, "tokens_step": tokens, "tokens_s": tokens / step_s, "peak_gb": peak_gb,
            "params_m": sum(p.numel() for p in params) / 1e6, "flops_step": flops,
            "tflops_s": flops / step_s / 1e12, "mfu": flops / step_s / peak if peak else None,
            "kernels_step": kernels, "us_per_kernel": step_s / kernels * 1e6}


def _run_isolated(kwargs: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(bench_one, kwds=kwargs)


def main(argv=None) -> None:
    from d2v2.engine.compile import CompileMode, CompileScope

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: all registered)")
    parser.add_argument("--modalities", nargs="+", default=["image", "speech", "text"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="default: the preset's batch size; several: a row per size (whether a larger per-device "
                             "batch turns a step bound by issuing kernels into one bound by arithmetic)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="bf16/fp16: torch.autocast mixed precision (fp16 with a GradScaler)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--audio-seconds", type=float, default=None,
                        help=f"utterance length for audio (default per preset: {AUDIO_SECONDS})")
    parser.add_argument("--compile", nargs="+", choices=get_args(CompileScope), default=["off"],
                        help="a row per scope: eager (off), the Transformer blocks or the whole model compiled")
    parser.add_argument("--compile-mode", choices=get_args(CompileMode), default="default",
                        help="torch.compile's mode for the compiled rows (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--teacher-copy", nargs="+", choices=["on", "off"], default=["on"],
                        help="eager rows: an EMA teacher under autocast runs from its weights kept in the autocast "
                             "dtype (on) or casts its fp32 weights at every forward (off); a row per value")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    from d2v2.engine import provenance
    from d2v2.method import available_methods

    rows = []
    device_name = provenance.device_name(args.device) + ("" if args.device.startswith("cuda") else
                                                         f" ({args.threads} threads)")
    print(f"device: {device_name}; dtype: {args.dtype}; clock: time.perf_counter (wall), device synchronised; "
          f"median of {args.steps} steps after {args.warmup} warm-up; cost ratio from "
          f"{'CPU time' if args.device == 'cpu' else 'wall time'}; FLOPs counted by FlopCounterMode on one step "
          f"(matmuls, convolutions, attention) with its ATen kernels (views excluded); MFU against the dense bf16 "
          f"peak (GPU only)")
    header = (f"{'preset':6} {'modality':8} {'method':10} {'compiled':24} {'batch':>5} {'params(M)':>9} {'s/step':>8} "
              f"{'cpu s':>7} {'samples/s':>9} {'tokens/step':>11} {'tokens/s':>10} {'cost/sample vs d2v2':>19} "
              f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'kernels':>7} {'us/kernel':>9}")
    # per-sample cost ratio: CPU time on a CPU (robust to other processes sharing the cores), else wall
    cost = "cpu_s" if args.device == "cpu" else "step_s"
    print(header)
    failed = 0
    for preset in args.presets:
        # data2vec 2.0 first in each modality: the others' cost is relative to it
        ordered = sorted(available_methods(), key=lambda mm: (mm[0], mm[1] != "data2vec2", mm[1]))
        for modality, method in ordered:
            if modality not in args.modalities or (args.methods and method not in args.methods):
                continue
            if modality not in DEFAULT_BATCH[preset]:                # a modality the preset does not define
                continue
            # compiled models run the teacher's fp32 weights whatever --teacher-copy says (d2v2.engine.compile)
            variants = [(batch, c, copy == "on") for batch in (args.batch_size or [DEFAULT_BATCH[preset][modality]])
                        for c in args.compile for copy in (args.teacher_copy if c == "off" else ["on"])]
            for batch, compiled, teacher_copy in variants:
                mode = "default" if compiled == "off" else args.compile_mode
                label = compiled if mode == "default" else f"{compiled} {mode}"
                label += "" if teacher_copy else ", teacher casts"
                kwargs = dict(modality=modality, method_name=method, preset=preset, batch_size=batch,
                              steps=args.steps, warmup=args.warmup, device=args.device, dtype=args.dtype,
                              threads=args.threads, audio_seconds=args.audio_seconds or AUDIO_SECONDS.get(preset),
                              compile=compiled, compile_mode=mode, teacher_copy=teacher_copy)
                # a fresh process per row on a CPU (peak RSS) and with compile (no graph cache shared)
                try:
                    row = _run_isolated(kwargs) if args.device == "cpu" or compiled != "off" else bench_one(**kwargs)
                except Exception as err:                 # noqa: BLE001 - one failed row must not lose the others
                    failed += 1
                    print(f"{preset:6} {modality:8} {method:10} {label:24} failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}", flush=True)
                    continue
                if row is None:                          # --teacher-copy off for a method without an EMA teacher
                    continue
                rows.append(row)
                key = (preset, modality, "data2vec2", batch, compiled, mode, teacher_copy)
                ref = next((r for r in rows if (r["preset"], r["modality"], r["method"], r["batch"], r["compiled"],
                                                r["compile_mode"], r["teacher_copy"]) == key), None)
                ratio = f"{(row[cost] / row['batch']) / (ref[cost] / ref['batch']):.2f}x" if ref else "-"
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
                print(f"{preset:6} {modality:8} {method:10} {label:24} {batch:>5} "
                      f"{row['params_m']:>9.2f} {row['step_s']:>8.3f} {row['cpu_s']:>7.3f} "
                      f"{row['samples_s']:>9.1f} {row['tokens_step']:>11} {row['tokens_s']:>10.0f} {ratio:>19} "
                      f"{row['flops_step'] / 1e9:>10.1f} {row['tflops_s']:>8.2f} {mfu:>6} {row['peak_gb']:>8.2f} "
                      f"{row['kernels_step']:>7} {row['us_per_kernel']:>9.1f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "dtype": args.dtype, "rows": rows}, f, indent=1)
    if failed:
        raise SystemExit(f"{failed} row(s) failed")


if __name__ == "__main__":
    main()
