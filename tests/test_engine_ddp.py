"""Real DDP (gloo, 2 CPU processes through torchrun) gives the result of 1 process with the same
effective batch.

The reference is 1 process x batch b x 2 accumulation steps: it sees exactly the samples of 2 processes
x batch b, in the same micro-batches, hence the same masks (the collater seeds masks from the batch's
sample ids), so the two runs must agree to float rounding. (1 process x batch 2b draws its masks per
2b-sample batch, so its masks, and therefore its weights, differ by design.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from d2v2.engine.checkpoint import load_checkpoint
from d2v2.engine.events import read_events
from d2v2.engine.pretrain import run
from test_engine_pretrain import data_root, run_config  # noqa: F401  (fixture re-used)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow    # a subprocess start-up + two runs: ~15 s idle, >30 s on a loaded 2-core machine
@pytest.mark.parametrize("precision", ["fp32", "fp16"])     # fp16: base's, with its loss scaling
def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path, data_root, precision):
    changes = dict(batch_size=4, budget={"kind": "updates", "value": 5}, checkpoint={"fractions": [1.0]},
                   precision=precision)
    ddp_cfg = run_config(data_root, **changes)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(ddp_cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "d2v2", "pretrain", "--config", str(config), "--out", str(ddp)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = tmp_path / "single"
    assert run(run_config(data_root, **changes, grad_accum=2), single) == 0

    # fp16: the same products, but the gradients of half a loss (accumulation) round differently from those of
    # a whole one averaged by DDP; Adam turns that into up to about one LR step (1e-3) per update where a
    # gradient is nearly zero (the attention's key bias)
    rtol, atol, weights_atol = (1e-5, 1e-6, 1e-6) if precision == "fp32" else (1e-3, 1e-4, 5e-3)
    a, b = load_checkpoint(ddp / "checkpoint_last.pt"), load_checkpoint(single / "checkpoint_last.pt")
    for key in a["model"]:     # student, decoder and EMA teacher
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=rtol, atol=weights_atol, msg=key)
    assert a["world_size"] == 2 and len(a["rng"]) == 2        # every process' RNG state is kept
    assert a["scaler"] == b["scaler"]      # fp16: the same scale and scale window (2^14 / (processes x steps))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ddp, single))
    assert sa["batch"]["effective"] == sb["batch"]["effective"] == 8
    assert sa["samples"] == sb["samples"] == 40 and sa["tokens"] == sb["tokens"]
    assert sa["device_count"] == 2 and sa["device_hours"] == sa["train_time_s"] * 2 / 3600
    assert len(read_events(ddp / "events.jsonl", "run_start")) == 1          # only rank 0 writes
    losses = [e["value"]["loss"] for e in read_events(ddp / "events.jsonl", "train_progress")]
    ref = [e["value"]["loss"] for e in read_events(single / "events.jsonl", "train_progress")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=rtol, atol=atol)
