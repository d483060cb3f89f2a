"""benchmarks/bench_step.py: the step benchmark takes every preset, the image-only gpu preset included."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402

from d2v2.engine.provenance import device_name  # noqa: E402


def test_the_gpu_preset_is_benchmarked_on_its_one_modality(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_step.main(["--presets", "gpu", "--batch-size", "2", "--device", "cpu", "--steps", "1", "--warmup", "1",
                     "--methods", "mae", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["device"].startswith(f"{device_name('cpu')} (")          # the CPU model, not just "cpu"
    assert [(r["preset"], r["modality"], r["method"], r["compiled"]) for r in rows] == [("gpu", "image", "mae", "off")]
    assert rows[0]["flops_step"] > 0 and rows[0]["params_m"] > 20          # the ViT-S width
    assert rows[0]["kernels_step"] > 100
    assert rows[0]["us_per_kernel"] == rows[0]["step_s"] / rows[0]["kernels_step"] * 1e6


def test_the_teacher_copy_rows_differ_by_the_teachers_casts(tmp_path):
    """``--teacher-copy on off``: two eager rows of an EMA method in bf16, the second with the teacher casting
    its fp32 weights at every forward (a kernel per Linear and convolution weight and bias more); a compiled
    row runs once, since compiling turns the copy off, and so does a method without an EMA teacher (MAE)."""
    from d2v2.method import build_method

    out = tmp_path / "rows.json"
    bench_step.main(["--presets", "smoke", "--device", "cpu", "--dtype", "bf16", "--steps", "1", "--warmup", "1",
                     "--modalities", "image", "--methods", "data2vec2", "mae", "--teacher-copy", "on", "off",
                     "--json", str(out)])
    on, off, mae = json.loads(out.read_text())["rows"]
    assert (mae["method"], mae["teacher_copy"]) == ("mae", True)        # no teacher: no second row
    assert (on["teacher_copy"], off["teacher_copy"]) == (True, False)
    teacher = build_method("image", "data2vec2", "smoke").teacher.model
    weights = sum(len(list(m.parameters(recurse=False))) for m in teacher.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert off["kernels_step"] - on["kernels_step"] == weights - 1          # less the copy's one refresh


def test_several_batch_sizes_give_a_row_each(tmp_path, capsys):
    """``--batch-size 2 4``: a row per size, the same step at twice the samples, and each method's cost per
    sample compared with data2vec 2.0's at the same size."""
    out = tmp_path / "rows.json"
    bench_step.main(["--presets", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "1", "--modalities", "image",
                     "--methods", "data2vec2", "mae", "--batch-size", "2", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [("data2vec2", 2), ("data2vec2", 4), ("mae", 2), ("mae", 4)]
    assert rows[1]["flops_step"] == 2 * rows[0]["flops_step"]
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("smoke")]
    assert [line[4] for line in printed] == ["2", "4", "2", "4"] and printed[1][11] == "1.00x"   # vs itself
