"""benchmarks/bench_step.py: the step benchmark takes every preset, the image-only gpu preset included."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


def test_the_gpu_preset_is_benchmarked_on_its_one_modality(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench_step.main(["--presets", "gpu", "--batch-size", "2", "--device", "cpu", "--steps", "1", "--warmup", "1",
                     "--methods", "mae", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["modality"], r["method"], r["compiled"]) for r in rows] == [("gpu", "image", "mae", "off")]
    assert rows[0]["flops_step"] > 0 and rows[0]["params_m"] > 20          # the ViT-S width
    assert rows[0]["kernels_step"] > 100
    assert rows[0]["us_per_kernel"] == rows[0]["step_s"] / rows[0]["kernels_step"] * 1e6
