"""FLOPs per update and MFU (d2v2.engine.flops) and what a run records of them."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from d2v2.engine.flops import count_flops, count_kernels, count_step, peak_flops, utilisation

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_pretrain import data_root, run_config  # noqa: E402,F401  (the session fixture and helper)


def test_counted_flops_equal_the_matmul_formula():
    """Two linear layers, batch B: forward 2*B*(i*h + h*o); backward twice that, less the input gradient
    of the first layer (its input needs none): the counter sees exactly what the formula says."""
    B, i, h, o = 8, 32, 64, 16
    model = nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))
    x = torch.randn(B, i)
    forward = 2 * B * (i * h + h * o)
    backward = 2 * forward - 2 * B * i * h
    assert count_flops(lambda: model(x).sum().backward()) == forward + backward


def test_a_step_counts_its_kernels_but_not_its_views():
    """Kernels are dispatched operators that are not views, however large the tensors; the FLOPs are
    count_flops'."""
    x = torch.randn(8, 32)
    assert count_step(lambda: x.view(4, 64).t()[0]) == (0, 0)
    assert count_step(lambda: (x + 1).mul_(2).sum()) == (0, 3)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    step = lambda batch: model(torch.randn(batch, 32)).sum().backward()      # noqa: E731
    step(8)                                                         # the .grad tensors exist from now on
    flops, kernels = count_step(lambda: step(8))
    assert flops == count_flops(lambda: step(8)) and kernels > 10
    assert count_step(lambda: step(512))[1] == kernels
    assert count_kernels(lambda: step(8)) == kernels and count_kernels(lambda: x.view(4, 64).t()[0]) == 0


def test_utilisation_is_achieved_rate_over_peak():
    u = utilisation(10**12, updates=50, train_time_s=100.0, peak=1e12)
    assert u["achieved_flops_per_s"] == pytest.approx(5e11) and u["mfu"] == pytest.approx(0.5)
    assert utilisation(10**12, 50, 100.0, peak=None)["mfu"] is None
    assert utilisation(None, 50, 100.0, peak=1e12)["achieved_flops_per_s"] is None


def test_peak_defaults_to_none_on_a_cpu_and_takes_a_configured_value():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), configured=2e12) == 2e12


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_the_peak_follows_the_device_name(monkeypatch, name, peak):
    """Each variant's own dense bf16 peak (the NVL and PCIe cards run below the SXM ones); none for an unlisted GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak


def test_a_run_records_its_flops_mfu_and_data_wait(tmp_path, data_root):
    from d2v2.engine.pretrain import run

    out = tmp_path / "run"
    assert run(run_config(data_root, peak_flops=1e11), out) == 0
    s = json.loads((out / "summary.json").read_text())
    c = s["compute"]
    assert c["flops_per_update"] > 10**8 and c["clock"] == "train_time_s" and c["processes"] == 1
    assert c["achieved_flops_per_s"] == pytest.approx(c["flops_per_update"] * s["updates"] / s["train_time_s"])
    assert c["mfu"] == pytest.approx(c["achieved_flops_per_s"] / 1e11)
    assert 0 < s["data_wait"]["share_of_train_time"] < 1


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_steps_compute_the_same_step(tmp_path, data_root, scope):
    """``compile: blocks`` compiles every block, ``compile: model`` the whole forward (one graph for image
    data2vec 2.0, which nothing in it breaks or recompiles from update to update: the EMA's tau and the
    collapse guard are read outside it); both after the FLOPs count (a module first called under the counter
    would stay eager) and both train to the eager loss within float rounding."""
    import torch._dynamo.utils

    from d2v2.engine.pretrain import run

    losses = {}
    for compiled in ("off", scope):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / compiled
        cfg = run_config(data_root, compile=compiled, budget={"kind": "updates", "value": 4}, log_every=1)
        assert run(cfg, out) == 0
        losses[compiled] = [json.loads(line)["value"]["loss"] for line in (out / "events.jsonl").open()
                            if '"train_progress"' in line]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # blocks: one graph for the student's (training) blocks, one for the teacher's (eval, no grad)
        assert graphs == {"off": 0, "blocks": 2, "model": 1}[compiled]
        assert json.loads((out / "summary.json").read_text())["compute"]["compiled"] == compiled
    assert losses[scope] == pytest.approx(losses["off"], rel=1e-4)


def test_compile_true_means_the_blocks():
    from d2v2.engine.runconfig import PretrainRunConfig

    assert PretrainRunConfig.model_fields["compile"].default == "off"
    assert run_config("data", compile=True).compile == "blocks" and run_config("data", compile=False).compile == "off"
