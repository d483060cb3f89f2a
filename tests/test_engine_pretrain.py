"""The pretraining runner: budgets, schedule, outputs, failures (d2v2.engine.pretrain, optim, runconfig).

Runs use the real data2vec 2.0 "smoke" model on real Fashion-MNIST, in-process, for a few updates.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from d2v2.config import ConfigError, merge
from d2v2.data import DataConfig, prepare
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.engine.checkpoint import encoder_state_dict, load_checkpoint
from d2v2.engine.events import read_events
from d2v2.engine.optim import OptimConfig, build_optimizer, lr_at, param_groups
from d2v2.engine.pretrain import EXIT_DIVERGED, main, run
from d2v2.engine.runconfig import resolve_run_config

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def data_root() -> str:
    """The embedded Fashion-MNIST, prepared once (idempotent: skipped when already there)."""
    prepare(["image"], DataConfig(root=str(DATA_ROOT)))
    return str(DATA_ROOT)


def run_config(data_root: str, **changes):
    """A few updates of the smoke image data2vec 2.0 on 1 thread; ``changes`` are merged on top."""
    base = {
        "method": {"modality": "image", "name": "data2vec2", "preset": "smoke", "overrides": {"mask_noise_std": 0.0}},
        "data": {"root": data_root, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.2, "final_lr": 1e-5},
        "batch_size": 8,
        "budget": {"kind": "updates", "value": 6},
        "checkpoint": {"fractions": [0.5, 1.0]},
        "log_every": 2, "threads": 1, "progress": False, "device": "cpu",
    }
    return resolve_run_config(merge(base, changes))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------- optimiser and schedule
def test_param_groups_exclude_biases_1d_and_named_params_from_decay():
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.norm = nn.LayerNorm(4)
    model.alibi_scale = nn.Parameter(torch.ones(1, 2, 1, 1))     # 4-D, excluded by name (METHOD.md#pretraining-recipes)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, 4))          # 3-D: decayed, as in the paper
    groups = param_groups(model, 0.05, no_weight_decay={"alibi_scale"})
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decay == {"proj.weight", "cls_token"}
    assert sum(len(g["params"]) for g in groups) == 6


def test_the_fused_optimiser_is_adamw_on_a_cpu_too():
    """build_optimizer uses PyTorch's fused AdamW everywhere; on a CPU it takes the per-parameter loop's
    steps to float rounding (decoupled weight decay by group included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(param_groups(model, cfg.weight_decay), cfg)
    loop = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(32, 8)
    for _ in range(20):
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(model[0].weight, start)                  # it did train


def test_param_groups_layer_decay_scales():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups(model, 0.0, layer_decay=0.5, layer_id=lambda name: int(name.split(".")[0]), num_layers=2)
    scales = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scales["0.weight"] == 0.25 and scales["1.weight"] == 0.5 and scales["2.weight"] == 1.0
    with pytest.raises(ValueError, match="layer_id"):
        param_groups(model, 0.0, layer_decay=0.5)


def test_lr_schedules():
    assert lr_at(0.0, 1.0, 0.1) == 0.0                       # warm-up starts from 0
    assert lr_at(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, 0.1, final_lr=0.2) == pytest.approx(0.6)   # cosine midpoint
    assert lr_at(1.0, 1.0, 0.1, final_lr=0.2) == pytest.approx(0.2)
    assert lr_at(0.55, 1.0, 0.1, schedule="linear") == pytest.approx(0.5)
    assert lr_at(0.3, 1.0, 0.1, 0.05, "tristage", hold_fraction=0.4) == 1.0
    assert lr_at(1.0, 1.0, 0.1, 0.05, "tristage", hold_fraction=0.4) == pytest.approx(0.05)
    assert lr_at(0.75, 1.0, 0.1, 0.05, "tristage", hold_fraction=0.4) == pytest.approx(0.05 ** 0.5)
    assert lr_at(0.9, 1.0, 0.1, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0.5, 1.0, 0.1, schedule="step")
    with pytest.raises(ValueError):
        OptimConfig(warmup_fraction=0.8, hold_fraction=0.4)


# ---------------------------------------------------------------- config errors
def test_bad_configs_fail_before_compute_naming_the_key(tmp_path, capsys, data_root):
    cfg = tmp_path / "run.yaml"
    good = {"method": {"modality": "image", "name": "data2vec2", "preset": "smoke"}, "batch_size": 8,
            "budget": {"kind": "updates", "value": 2}}
    cases = [
        ({"batch_sise": 8}, "batch_sise: unknown key (did you mean 'batch_size'?)"),
        ({"budget": {"kind": "hours", "value": 1}}, "budget.kind"),
        ({"budget": {"kind": "updates", "value": 2.5}}, "whole number"),
        ({"checkpoint": {"fractions": [0.5, 1.5]}}, "checkpoint.fractions"),
        ({"method": {"overrides": {"decoder": {"depth": 0}}}}, "method.decoder.depth"),
        ({"method": {"name": "nope"}}, "'nope' is not available"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"precision": "fp8"}, "precision"),
    ]
    for change, message in cases:
        cfg.write_text(yaml.safe_dump(merge(good, change)))
        out = tmp_path / "never"
        assert main(["--config", str(cfg), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    cfg.write_text(yaml.safe_dump(good))
    assert main(["--config", str(cfg), "--out", str(tmp_path / "x"), "seed=oops"]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--out", str(tmp_path / "x"), f"data.root={tmp_path / 'nodata'}"]) == 2
    err = capsys.readouterr().err
    assert "data.root: not found" in err and "nodata" in err and "prepare-data" in err


# ---------------------------------------------------------------- budgets and outputs
def test_updates_budget_outputs_and_rerun(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": "updates", "value": 6}, checkpoint={"fractions": [0.3, 1.0]})
    assert run(cfg, out) == 0
    s = summary(out)
    assert s["status"] == "success" and s["updates"] == 6 and s["samples"] == 48
    assert s["train_time_s"] > 0 and s["e2e_time_s"] > s["train_time_s"]
    assert s["throughput"]["samples_per_s"] > 0 and s["peak_memory_bytes"] > 0
    for name in ("config.yaml", "events.jsonl", "segments.csv", "checkpoint_last.pt", "DONE"):
        assert (out / name).is_file(), name
    early = load_checkpoint(out / "checkpoints" / "checkpoint_f0.300.pt")
    assert early["progress"]["updates"] == 2 and early["budget_fraction"] == 0.3   # first update with >= 30%
    assert early["pretrain"]["updates"] == 2 and early["pretrain"]["train_time_s"] < s["train_time_s"]
    last = load_checkpoint(out / "checkpoint_last.pt")
    assert last["progress"]["updates"] == 6 and last["identity"]["method"] == "data2vec2"
    # the encoder is rebuilt from the checkpoint alone
    encoder = Encoder(EncoderConfig(**last["encoder_config"]))
    encoder.load_state_dict(encoder_state_dict(last))
    events = read_events(out / "events.jsonl")
    keys = [e["key"] for e in events]
    assert keys[:3] == ["run_start", "seed", "global_batch_size"] and keys[-1] == "run_stop"
    assert events[-1]["metadata"]["status"] == "success"
    progress = [e["value"] for e in events if e["key"] == "train_progress"]
    assert [p["updates"] for p in progress] == [2, 4, 6]
    assert all(math.isfinite(p["loss"]) and "target_var" in p["diagnostics"] for p in progress)
    assert all(p["diagnostics"]["model_norm"] > 0 and p["diagnostics"]["ema_norm"] > 0 for p in progress)
    # the saved config reproduces the run: the method config is complete in it
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["overrides"]["encoder"]["embed_dim"] == 32
    # a finished run re-invoked does nothing
    mtime = (out / "checkpoint_last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert run(cfg, out) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "checkpoint_last.pt").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("kind", ["updates", "epochs"])
def test_every_schedule_is_fitted_to_the_runs_own_budget(tmp_path, data_root, kind):
    """A budget sweep's premise (PROTOCOL.md#budgets): a run with half the budget reaches final_lr at its own
    end, and its EMA anneal (set as a budget fraction) ends at the same fraction of its own budget."""
    decays = {}
    for value in (8, 4):
        out = tmp_path / f"run{value}"
        budget = {"kind": "updates", "value": value} if kind == "updates" else \
            {"kind": "epochs", "value": value * 8 / 60_000}          # 8 samples a batch of 60,000
        cfg = run_config(data_root, budget=budget, log_every=1, checkpoint={"fractions": [1.0]},
                         method={"overrides": {"ema_decay": 0.9, "ema_end_decay": 0.99,
                                               "ema_anneal_end_fraction": 0.5}})
        assert run(cfg, out) == 0
        progress = [e["value"] for e in read_events(out / "events.jsonl") if e["key"] == "train_progress"]
        decays[value] = [p["diagnostics"]["ema_decay"] for p in progress]
        assert summary(out)["updates"] == value
        assert load_checkpoint(out / "checkpoint_last.pt")["schedule"]["lr"] == pytest.approx(1e-5)
    # 0.9 -> 0.99 over the first half of either budget (update n logs the tau of the EMA step after it, at
    # fraction n / budget)
    assert decays[8] == pytest.approx([0.9225, 0.945, 0.9675, 0.99, 0.99, 0.99, 0.99, 0.99])
    assert decays[4] == pytest.approx([0.945, 0.99, 0.99, 0.99])
    assert decays[4] == pytest.approx(decays[8][1::2])


def test_the_anneal_in_updates_stays_an_option():
    from d2v2.model.ema import teacher_decay
    from d2v2.method import method_config

    base = method_config("image", "data2vec2", "base")
    assert base.ema_anneal_end_fraction == pytest.approx(100_000 / 375_300)   # the released ratio
    assert teacher_decay(base, 5, fraction=base.ema_anneal_end_fraction) == base.ema_end_decay
    counted = method_config("image", "data2vec2", "base", {"ema_anneal_end_fraction": None})
    assert teacher_decay(counted, 50_000, fraction=1.0) == pytest.approx((0.9998 + 0.99999) / 2)
    assert method_config("image", "data2vec2", "tiny").ema_anneal_end_fraction is None   # tiny: 1,000 updates


def test_bf16_autocast_run(tmp_path, data_root):
    out = tmp_path / "run"
    assert run(run_config(data_root, precision="bf16", budget={"kind": "updates", "value": 2}), out) == 0
    assert math.isfinite(read_events(out / "events.jsonl", "train_progress")[-1]["value"]["loss"])


def test_fp16_runs_with_fairseqs_loss_scaling_and_resumes_its_scale(tmp_path, data_root):
    """fp16, base's precision, on a CPU: autocast with dynamic loss scaling from fairseq's 2^7
    (METHOD.md#mixed-precision); the scale is logged every interval, checkpointed and restored."""
    from d2v2.engine.pretrain import Pretrainer

    out = tmp_path / "run"
    cfg = run_config(data_root, precision="fp16", log_every=1)
    assert run(cfg, out) == 0
    assert "fp16 on a CPU runs several times slower" in read_events(out / "events.jsonl", "warning")[0]["value"]
    progress = [e["value"] for e in read_events(out / "events.jsonl", "train_progress")]
    scales = [p["diagnostics"]["loss_scale"] for p in progress]
    assert len(scales) == 6 and all(math.isfinite(p["loss"]) for p in progress)
    assert all(s <= 2 ** 7 and math.log2(s).is_integer() for s in scales)
    assert load_checkpoint(out / "checkpoint_last.pt")["scaler"]["scale"] == scales[-1]
    resumed = Pretrainer(cfg, out)
    resumed.restore()
    assert resumed.scaler.get_scale() == scales[-1] and resumed.updates == 6


def test_an_fp16_overflow_skips_the_step_and_a_vanishing_scale_stops_the_run(tmp_path, data_root):
    """An overflowing gradient leaves the weights as they were and halves the scale (the update is still
    counted, METHOD.md#mixed-precision); a scale below fairseq's minimum is a divergence that names it."""
    from d2v2.engine.pretrain import Diverged, Pretrainer

    trainer = Pretrainer(run_config(data_root, precision="fp16"), tmp_path / "run")
    assert trainer.scaler.get_growth_interval() == 2 ** 14          # fairseq's scale window, one process
    batches = iter(trainer._loader())
    trainer.train_step(batches)
    trainer.scaler.update(2.0 ** 100)                  # the scaled gradients overflow fp16
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step(batches)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert trainer.scaler.get_scale() == 2.0 ** 99 and trainer.updates == 2
    trainer.train_step(batches)                        # the next step at the halved scale overflows again
    assert trainer.scaler.get_scale() == 2.0 ** 98
    trainer.scaler.update(5e-5)
    with pytest.raises(Diverged, match="fp16 loss scale 5e-05 fell below 0.0001 after update 3"):
        trainer.check_loss_scale()
    assert Pretrainer(run_config(data_root, precision="fp16", loss_scaling={"init_scale": 4, "scale_window": 128}),
                      tmp_path / "other").scaler.state_dict() == {**trainer.scaler.state_dict(), "scale": 4.0,
                                                                   "growth_interval": 128, "_growth_tracker": 0}


def test_epochs_budget(tmp_path, data_root):
    out = tmp_path / "run"
    batches_per_epoch = 60_000 // 8
    cfg = run_config(data_root, budget={"kind": "epochs", "value": 0.001})   # 7.5 batches
    assert run(cfg, out) == 0
    s = summary(out)
    assert s["updates"] == math.ceil(0.001 * batches_per_epoch) == 8
    assert s["epochs"] == pytest.approx(8 / batches_per_epoch)


@pytest.mark.parametrize("kind, value, seconds, clock", [("train_seconds", 2.0, 2.0, "train_time_s"),
                                                        ("device_hours", 2.0 / 3600, 2.0, "train_time_s"),
                                                        ("cpu_seconds", 2.0, 2.0, "train_cpu_s")])
def test_time_budgets_stop_on_time_with_a_complete_schedule(tmp_path, data_root, kind, value, seconds, clock):
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": kind, "value": value}, log_every=1,
                     checkpoint={"fractions": [0.5, 1.0]})
    assert run(cfg, out) == 0
    s = summary(out)
    progress = [e["value"] for e in read_events(out / "events.jsonl", "train_progress")]
    step = max(b[clock] - a[clock] for a, b in zip(progress, progress[1:]))
    assert seconds <= s[clock] <= seconds + 2 * step                # stopped at the first update past the budget
    assert all(p["budget_fraction"] == pytest.approx(p[clock] / seconds, rel=0.05) for p in progress)
    assert progress[-2]["budget_fraction"] < 1.0 <= progress[-1]["budget_fraction"]
    lrs = [p["lr"] for p in progress]
    peak = cfg.optim.lr
    assert max(lrs) > 0.8 * peak                                   # the warm-up reached the peak
    assert lrs[-1] < 0.1 * peak                                     # and the decay finished by the end
    assert all(b <= a + 1e-12 for a, b in zip(lrs[lrs.index(max(lrs)):], lrs[lrs.index(max(lrs)) + 1:]))
    half = load_checkpoint(out / "checkpoints" / "checkpoint_f0.500.pt")
    assert half["fraction_consumed"] >= 0.5 and half["pretrain"][clock] >= 0.5 * seconds


def test_a_cpu_seconds_budget_resumes_with_its_clock(tmp_path, data_root, signal_after_update):
    """Interrupted at update 3 and resumed: the CPU clock continues from the checkpoint's (it never goes
    back), and the run stops when the two processes together have spent the budget."""
    signal_after_update(3)
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": "cpu_seconds", "value": 1.5}, log_every=1)
    assert run(cfg, out) == 128 + signal.SIGTERM
    at_stop = load_checkpoint(out / "checkpoint_last.pt")["clock"]["train_cpu_s"]
    assert 0 < at_stop < 1.5
    assert run(cfg, out) == 0
    progress = [e["value"] for e in read_events(out / "events.jsonl", "train_progress")]
    cpu = [p["train_cpu_s"] for p in progress]
    assert cpu == sorted(cpu) and cpu[0] < at_stop < cpu[-1]
    assert 1.5 <= summary(out)["train_cpu_s"] < 1.5 + 2 * max(b - a for a, b in zip(cpu, cpu[1:]))


# ---------------------------------------------------------------- failures
def test_nan_loss_stops_naming_update_and_last_good_checkpoint(tmp_path, data_root, monkeypatch, capsys):
    """Fault injection: the real model's loss becomes NaN from update 4 on."""
    from d2v2.data2vec2 import Data2Vec2

    forward = Data2Vec2.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        output = forward(self, batch)
        calls["n"] += 1
        if calls["n"] >= 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(Data2Vec2, "forward", poisoned)
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": "updates", "value": 10}, log_every=3,
                     checkpoint={"fractions": [0.2, 1.0]})
    assert run(cfg, out) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "non-finite loss or gradient norm at update 4" in err
    assert "checkpoint_f0.200.pt" in err and "target_var" in err
    stop = read_events(out / "events.jsonl", "run_stop")[-1]
    assert stop["metadata"]["status"] == "diverged" and summary(out)["status"] == "diverged"
    assert not (out / "DONE").exists()
    assert not (out / "checkpoint_last.pt").exists()       # nothing non-finite was saved
    assert "diverged" in (out / "segments.csv").read_text()


def test_collapse_guard_stops_the_run_as_diverged(tmp_path, data_root, capsys):
    """The real data2vec 2.0 guard (METHOD.md#collapse-guard) with an impossible threshold fires at the first
    logging interval past update 2."""
    out = tmp_path / "run"
    overrides = {"mask_noise_std": 0.0, "min_target_var": 100.0, "collapse_check_after": 2}
    cfg = run_config(data_root, method={"overrides": overrides}, checkpoint={"fractions": [0.2, 1.0]}, log_every=3)
    assert run(cfg, out) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "collapse guard: target std" in err and "(checked after update 3)" in err
    assert "checkpoint_f0.200.pt" in err
    assert summary(out)["status"] == "diverged" and not (out / "DONE").exists()


def test_resume_with_a_different_config_is_refused(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert run(run_config(data_root), out) == 0
    (out / "DONE").unlink()
    with pytest.raises(ConfigError, match="optim.lr: 0.001 -> 0.002"):
        run(run_config(data_root, optim={"lr": 2e-3}), out)
    assert run(run_config(data_root, log_every=3), out) == 0     # execution-only keys may change
    # a run directory from before a field was added (its config lacks the key) resumes under the empty default
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["input_costs"], saved["method"]["overrides"]["encoder"]["relative_position"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    (out / "DONE").unlink()
    assert run(run_config(data_root), out) == 0


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, data_root, monkeypatch):
    """SIGTERM mid-run: the update finishes, checkpoint_last is written, exit 128+15; a rerun resumes."""
    from d2v2.data2vec2 import Data2Vec2

    after_step = Data2Vec2.after_step

    def signalled(self, num_updates, fraction):
        after_step(self, num_updates, fraction)
        if num_updates == 3 and not os.environ.get("_D2V2_SIGNALLED"):
            os.environ["_D2V2_SIGNALLED"] = "1"
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Data2Vec2, "after_step", signalled)
    monkeypatch.delenv("_D2V2_SIGNALLED", raising=False)
    out = tmp_path / "run"
    cfg = run_config(data_root, budget={"kind": "updates", "value": 6})
    assert run(cfg, out) == 128 + signal.SIGTERM
    assert load_checkpoint(out / "checkpoint_last.pt")["progress"]["updates"] == 3
    assert read_events(out / "events.jsonl", "run_stop")[-1]["metadata"]["status"] == "interrupted"
    assert run(cfg, out) == 0
    rows = (out / "segments.csv").read_text().splitlines()
    assert len(rows) == 3 and "signal:SIGTERM" in rows[1] and "completed" in rows[2]
    assert summary(out)["updates"] == 6
