"""The side-by-side benchmark against fairseq (benchmarks/bench_vs_fairseq.py): it skips with a clear
message without a checkout, names a path that is not one, and (with ``D2V2_FAIRSEQ`` set to a checkout and
fairseq's import-time dependencies installed) runs its CPU dry run with the two sides' losses agreeing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2v2.engine.provenance import device_name

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_fairseq.py"


def bench(*args, env=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "D2V2_FAIRSEQ"} if env is None else env
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_without_a_checkout_it_skips_saying_why():
    r = bench()
    assert r.returncode == 0, r.stderr
    assert "skipped: no fairseq checkout" in r.stdout and "--fairseq" in r.stdout


def test_a_path_that_is_not_a_checkout_is_named(tmp_path):
    r = bench("--fairseq", str(tmp_path), "--dry-run")
    assert r.returncode != 0
    assert f"{tmp_path} is not a fairseq checkout" in r.stderr


@pytest.mark.skipif(not os.environ.get("D2V2_FAIRSEQ"), reason="D2V2_FAIRSEQ (a fairseq checkout) not set")
def test_the_dry_run_measures_every_modality_with_equal_losses(tmp_path):
    """Through the launcher, as its docstring says: the rows record the training jobs' allocator settings."""
    r = subprocess.run([sys.executable, "-m", "d2v2", "launch", "--backend", "local", "--threads", "1", "--",
                        sys.executable, str(BENCH), "--dry-run", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["modality"] for row in rows] == ["image", "speech", "text"]
    for row in rows:
        assert row["ours_s"] > 0 and row["fairseq_s"] > 0 and row["loss_steps"] == 4     # + the counted step
        assert 100 < row["ours_kernels"] < row["fairseq_kernels"], row
        assert row["loss_max_rel_diff"] < 1e-5, row
        assert row["allocator"] == "the launcher's", row
        assert row["device_name"] == device_name("cpu"), row          # ratios differ between CPU models
    assert "| image | tiny | 1 |" in r.stdout and f"allocator: the launcher's; {device_name('cpu')})" in r.stdout


@pytest.mark.skipif(not os.environ.get("D2V2_FAIRSEQ"), reason="D2V2_FAIRSEQ (a fairseq checkout) not set")
def test_with_dropout_both_sides_train_with_the_recipes_dropout_and_only_times_are_compared(tmp_path):
    r = bench("--dry-run", "--dropout", "--modalities", "text", "--json", str(tmp_path / "rows.json"),
              env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["dropout"] is True and row["loss_max_rel_diff"] is None and row["ours_s"] > 0
    assert row["allocator"] == "glibc defaults"      # a plain process
    assert "- (dropout on)" in r.stdout


@pytest.mark.skipif(not os.environ.get("D2V2_FAIRSEQ"), reason="D2V2_FAIRSEQ (a fairseq checkout) not set")
def test_in_bf16_each_side_trains_in_its_own_mixed_precision(tmp_path):
    """Ours under autocast, fairseq's weights cast to bf16 with fp32 masters: the losses agree to bf16's
    rounding, no closer (so neither side ran in fp32)."""
    r = bench("--dry-run", "--dtype", "bf16", "--json", str(tmp_path / "rows.json"), env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["modality"] for row in rows] == ["image", "speech", "text"]
    for row in rows:
        assert row["dtype"] == "bf16" and row["fairseq_weights"] == "bfloat16", row
        assert 1e-6 < row["loss_max_rel_diff"] < 3e-2, row
        assert row["ours_s"] > 0 and row["fairseq_s"] > 0
    assert "fairseq time / our time per training step, cpu, bf16" in r.stdout


@pytest.mark.skipif(not os.environ.get("D2V2_FAIRSEQ"), reason="D2V2_FAIRSEQ (a fairseq checkout) not set")
def test_without_scikit_learn_fairseq_still_imports_and_its_names_fail_only_if_called(tmp_path):
    """As on an offline GPU machine: scikit-learn, which only fairseq's other criterions and tasks use, fails to
    import (a package on the path that raises ImportError shadows the installed one)."""
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "__init__.py").write_text("raise ImportError('scikit-learn hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = bench("--dry-run", "--modalities", "image", "--json", str(tmp_path / "rows.json"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["loss_max_rel_diff"] < 1e-5
    code = ("import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import tempfile; "
            "from crosscheck_fairseq import importable_fairseq; "
            "importable_fairseq(Path(sys.argv[1]), Path(tempfile.mkdtemp())); "
            "from sklearn.metrics import f1_score; f1_score([1], [1])")
    r = subprocess.run([sys.executable, "-c", code, os.environ["D2V2_FAIRSEQ"]], capture_output=True, text=True,
                       env=env, cwd=BENCH.parents[1], timeout=300)
    assert r.returncode != 0 and "sklearn.metrics.f1_score: sklearn is not installed" in r.stderr, r.stderr[-1000:]


@pytest.mark.skipif(not os.environ.get("D2V2_FAIRSEQ"), reason="D2V2_FAIRSEQ (a fairseq checkout) not set")
def test_width_narrows_both_sides_alike(tmp_path):
    """``--width``: the preset's structure with narrower encoder and decoder, on both sides (their losses agree)."""
    rows = {}
    for width in (None, 16):
        out = tmp_path / f"{width}.json"
        r = bench("--dry-run", "--modalities", "image", "--json", str(out),
                  *([] if width is None else ["--width", str(width)]), env=dict(os.environ))
        assert r.returncode == 0, r.stderr[-2000:]
        (rows[width],) = json.loads(out.read_text())
    assert rows[16]["width"] == 16 and rows[16]["params_m"] < rows[None]["params_m"] / 2
    assert rows[16]["loss_max_rel_diff"] < 1e-5 and "narrowed to 16 channels" in r.stdout
