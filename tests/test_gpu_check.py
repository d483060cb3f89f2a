"""The device script (benchmarks/gpu_check.sh) runs right the first time: its CPU dry run goes through every
stage (CUDA tests, the step benchmark, ours against fairseq's step where a checkout is given, the gpu preset's
budget sweep end to end) and returns the files a
device run returns, and leaves nothing behind but those."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fairseq_given() -> bool:
    """Whether the script's fairseq stage runs: a checkout named, or one offline_bundle.sh packed."""
    return bool(os.environ.get("D2V2_FAIRSEQ")) or (REPO / ".gpu" / "fairseq.tar.gz").is_file()


def dry_run(out: Path, tmp: Path, timeout: int = 600, **env) -> str:
    """``gpu_check.sh OUT --dry-run`` under its own TMPDIR; its log, once it exited 0."""
    tmp.mkdir(exist_ok=True)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "TMPDIR": str(tmp), **env})
    log = (out / "log.txt").read_text()
    assert r.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_the_dry_run_goes_through_every_stage(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    log = dry_run(out, tmp, timeout=1500)
    for stage in ("cuda-tests", "bench", "compile", "sweep", "runner"):
        assert f"stage {stage}: exit 0" in log
    # ours against fairseq's step, each in its own bf16, from a checkout or the one offline_bundle.sh packed
    if fairseq_given():
        assert "stage fairseq: exit 0" in log and "fairseq time / our time per training step, cpu, bf16" in log
    else:
        assert "stage fairseq: skipped (no fairseq checkout" in log
    files = sorted(p.name for p in out.iterdir())
    assert not list(tmp.glob("tmp.*"))              # its work folder (mktemp's, 3 GB of checkpoints) is gone
    assert len(files) <= 8, files                     # the device tool returns at most 8 files
    assert {"log.txt", "bench.json", "report.md", "evals.csv", "runs.csv", "progress.csv",
            "curves_image_fmnist_sweep.png"} <= set(files)
    progress = (out / "progress.csv").read_text().splitlines()
    assert "diag.target_pos_share" in progress[0] and len(progress) > 4      # the collapse diagnostics of every run
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"data2vec2", "mae", "data2vec1", "mlm"}
    assert [r["compiled"] for r in rows if r["compiled"] != "off"] == ["model"]
    assert {r["batch"] for r in rows if (r["modality"], r["method"]) == ("image", "data2vec2")} >= {4, 8}   # the scan
    assert all(r["flops_step"] > 0 for r in rows)
    report = (out / "report.md").read_text()
    assert "image vs MAE: " in report and "budget sweep of 2 runs per method" in report
    assert "compute.flops_per_update" in report and "data_wait.share_of_train_time" in report


def test_the_deadline_skips_what_would_not_fit_and_names_it_for_a_second_call(tmp_path):
    log = dry_run(tmp_path / "out", tmp_path / "tmp", DEADLINE_S="1")
    stages = ["cuda-tests", "sweep", "compile", "fairseq", "bench", "runner"]
    if not fairseq_given():
        stages.remove("fairseq")
    for stage in stages:
        assert f"stage {stage}: skipped (deadline: " in log and f"stage {stage} (limit" not in log
    assert f'left for a second call: STAGES="{" ".join(stages)}"' in log      # in the order they run
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt"]


def test_a_stage_gets_at_most_what_is_left_of_the_deadline(tmp_path):
    log = dry_run(tmp_path / "out", tmp_path / "tmp", DEADLINE_S="100", STAGES="cuda-tests")
    limit = int(log.split("stage cuda-tests (limit ")[1].split("s)")[0])
    assert 40 < limit <= 100 - 15                     # the dry run's own limit is 300 s; 15 s kept for the end
    assert "stage cuda-tests: exit 0" in log and "left for a second call" not in log
