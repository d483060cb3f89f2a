"""The collector builds the tidy tables from the fixture and rejects inconsistent inputs by file name."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from d2v2.analysis.collect import CollectError, collect_evals, collect_progress, collect_runs, main

FIXTURE = Path(__file__).parent / "fixtures" / "analysis"
METRICS = FIXTURE / "metrics"


@pytest.fixture
def metrics_dir(tmp_path):
    out = tmp_path / "metrics"
    shutil.copytree(METRICS, out)
    return out


def _edit(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_collect_cli_writes_parquet_and_csv(tmp_path):
    out = tmp_path / "tables"
    assert main(["--metrics", str(METRICS), "--runs", str(FIXTURE / "runs"), "--out", str(out)]) == 0
    evals = pd.read_parquet(out / "evals.parquet")
    assert len(evals) == 32 and len(pd.read_csv(out / "evals.csv")) == 32
    assert (evals["init"] == "random").sum() == 2
    row = evals[(evals.method == "mae") & (evals.seed == 1) & (evals.budget_fraction == 1.0)].iloc[0]
    assert row["value"] == pytest.approx(0.73) and row["metric.valid_accuracy"] == pytest.approx(0.74)
    assert row["train_time_s"] == pytest.approx(60.0) and row["preset"] == "tiny"
    assert row["git_commit"].startswith("0123") and row["slurm_job_ids"] == "101"
    assert set(evals.loc[evals["param.num_masks"].notna(), "variant"]) == {"num_masks=1", "num_masks=4"}
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs.loc[0, "throughput.samples_per_s"] == pytest.approx(53.3)
    assert runs.loc[0, "last_loss"] == pytest.approx(0.9) and runs.loc[0, "events"] == 4
    progress = pd.read_parquet(out / "progress.parquet")      # one row per logging interval
    assert list(progress["updates"]) == [50, 100] and list(progress["loss"]) == [1.5, 0.9]
    assert list(progress["diag.target_pos_share"]) == [0.4, 0.3] and list(progress["e2e_time_s"]) == [34.0, 66.0]
    assert set(progress[["modality", "method", "variant", "seed"]].itertuples(index=False)) == {
        ("image", "data2vec2", "image-data2vec2-default-s0", 0)}
    assert len(pd.read_csv(out / "progress.csv")) == 2
    assert list(progress["device_hours"]) == list(progress["train_time_s"] * progress["device_count"] / 3600)
    # the fixture's log ends in a line torn by a kill: skipped, and said so
    assert json.loads((out / "collect_warnings.json").read_text()) == [
        f"{FIXTURE / 'runs' / 'image-data2vec2-default-s0' / 'events.jsonl'}:5: skipped a torn last line "
        "(a process killed mid-write)"]


def test_rejects_metrics_without_provenance(metrics_dir):
    bad = metrics_dir / "image-mae-default-s0-f1.000.json"
    _edit(bad, lambda d: d.pop("provenance"))
    with pytest.raises(CollectError, match=r"image-mae-default-s0-f1\.000\.json: no provenance"):
        collect_evals([metrics_dir])


def test_rejects_duplicated_run(metrics_dir):
    src = metrics_dir / "image-mae-default-s0-f1.000.json"
    shutil.copy(src, metrics_dir / "copy.json")
    with pytest.raises(CollectError, match=r"duplicated run.*(copy\.json|s0-f1\.000\.json).* and "):
        collect_evals([metrics_dir])


def test_rejects_missing_key_naming_file_and_key(metrics_dir):
    bad = metrics_dir / "speech-data2vec1-default-s0-f0.333.json"
    _edit(bad, lambda d: d["pretrain"].pop("train_time_s"))
    with pytest.raises(CollectError, match=r"f0\.333\.json: pretrain\.train_time_s: Field required"):
        collect_evals([metrics_dir])
    _edit(bad, lambda d: (d["pretrain"].update(train_time_s=1.0), d.update(primary_metric="bleu")))
    with pytest.raises(CollectError, match="primary_metric 'bleu'"):
        collect_evals([bad])
    bad.write_text("{not json")
    with pytest.raises(CollectError, match="not valid JSON"):
        collect_evals([bad])


def test_rejects_mixed_presets_and_devices_warns_on_device_count(metrics_dir):
    bad = metrics_dir / "image-mae-default-s2-f0.333.json"
    _edit(bad, lambda d: d["provenance"].update(preset="base"))
    with pytest.raises(CollectError, match=r"s2-f0\.333\.json: mixed presets within the 'image'"):
        collect_evals([metrics_dir])
    _edit(bad, lambda d: d["provenance"].update(preset="tiny", device_name="NVIDIA H100"))
    with pytest.raises(CollectError, match="mixed devices"):
        collect_evals([metrics_dir])
    _edit(bad, lambda d: d["provenance"].update(device_name="Fixture CPU", device_count=2))
    _, notes = collect_evals([metrics_dir])
    assert any("different device counts" in n for n in notes)
    assert not any("allocator" in n for n in notes)
    _edit(bad, lambda d: d["provenance"].update(allocator={"MALLOC_TRIM_THRESHOLD_": None}))
    evals, notes = collect_evals([metrics_dir])
    assert any("image: runs pretrained under different allocator settings" in n for n in notes)
    assert '{"MALLOC_TRIM_THRESHOLD_": null}' in set(evals["allocator"])


def test_rejects_disagreeing_metric_direction(metrics_dir):
    _edit(metrics_dir / "speech-data2vec1-default-s0-f0.667.json", lambda d: d.update(higher_is_better=True))
    with pytest.raises(CollectError, match="higher_is_better differs"):
        collect_evals([metrics_dir])


def test_missing_paths_and_bad_run_dirs(tmp_path, capsys):
    assert main(["--metrics", str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(CollectError, match="summary.json: missing 'provenance'"):
        collect_runs([run])


def test_identity_includes_mode_and_devices_come_from_pretraining(metrics_dir):
    src = metrics_dir / "image-mae-default-s0-f1.000.json"
    probe = metrics_dir / "probe.json"
    shutil.copy(src, probe)
    _edit(probe, lambda d: d["identity"].update(mode="linear_probe"))
    evals, _ = collect_evals([metrics_dir])                       # not a duplicate: another evaluation
    assert set(evals["mode"]) == {"finetune", "linear_probe"}
    # fine-tuned elsewhere, pretrained on the same device: comparable
    _edit(probe, lambda d: (d["provenance"].update(device_name="Other CPU"),
                            d.update(pretrain_provenance={**d["provenance"], "device_name": "Fixture CPU"})))
    evals, _ = collect_evals([metrics_dir])
    row = evals[evals["mode"] == "linear_probe"].iloc[0]
    assert (row["device_name"], row["ft_device_name"]) == ("Fixture CPU", "Other CPU")
    _edit(probe, lambda d: d["pretrain_provenance"].update(device_name="Other CPU"))
    with pytest.raises(CollectError, match=r"probe\.json: mixed devices"):
        collect_evals([metrics_dir])


def test_input_costs_are_added_to_every_clock_and_kept_apart(metrics_dir):
    """PROTOCOL.md#input-costs: a run trained on inputs that cost compute (HuBERT's labels and first
    iteration) is compared on its total time; inputs_<clock> gives that part."""
    path = metrics_dir / "image-mae-default-s0-f1.000.json"
    own = json.loads(path.read_text())["pretrain"]
    inputs = {"train_time_s": 10.0, "e2e_time_s": 12.0, "train_cpu_s": 9.0, "device_hours": 0.5, "sources": ["a"]}
    _edit(path, lambda d: d["pretrain"].update(inputs=inputs, train_cpu_s=1.0))
    evals, _ = collect_evals([metrics_dir])
    row = evals[evals["source"] == str(path)].iloc[0]
    for clock in ("train_time_s", "e2e_time_s", "device_hours"):
        assert row[clock] == pytest.approx(own[clock] + inputs[clock]) and row[f"inputs_{clock}"] == inputs[clock]
    assert row["train_cpu_s"] == pytest.approx(10.0)
    others = evals[evals["source"] != str(path)]
    assert (others["inputs_train_time_s"] == 0).all()
    _edit(path, lambda d: d["pretrain"]["inputs"].pop("train_cpu_s"))
    with pytest.raises(CollectError, match="train_cpu_s"):
        collect_evals([metrics_dir])


def test_progress_takes_the_variant_from_the_workflow_layout(tmp_path):
    run = tmp_path / "runs" / "image" / "data2vec2" / "num_masks=4" / "seed0"
    shutil.copytree(FIXTURE / "runs" / "image-data2vec2-default-s0", run)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"key": "train_progress", "value": {"updates": 1')          # cut by a kill: tolerated
    progress = collect_progress([tmp_path / "runs"])
    assert list(progress["variant"]) == ["num_masks=4"] * 2 and list(progress["updates"]) == [50, 100]


def test_torn_event_lines_are_recovered_or_skipped_and_reported(tmp_path):
    """A kill mid-write tears a line; an older writer appended the resumed run's first event onto it."""
    run = tmp_path / "runs" / "run"
    shutil.copytree(FIXTURE / "runs" / "image-data2vec2-default-s0", run)
    lines = (run / "events.jsonl").read_text().splitlines()[:-1]        # the fixture's own last line is torn
    glued = lines[-1][: len(lines[-1]) // 2] + lines[-1]
    (run / "events.jsonl").write_text("\n".join(lines[:-1] + [glued, lines[-1][:20]]) + "\n")
    out = tmp_path / "tables"
    assert main(["--metrics", str(METRICS), "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    notes = json.loads((out / "collect_warnings.json").read_text())
    assert any("dropped a torn event" in n and f"events.jsonl:{len(lines)}" in n for n in notes)
    assert any("skipped a torn last line" in n for n in notes)
    assert pd.read_csv(out / "runs.csv")["events"].tolist() == [len(lines)]
    # anything else that is not JSON is corruption, named by file and line
    (run / "events.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(CollectError, match=r"events\.jsonl:2: not valid JSON"):
        collect_runs([run])


def test_default_variant_gets_the_ablated_fields_recorded_by_its_pretraining(metrics_dir):
    """An ablation's figure needs the default variant on the axis: its param.<name> comes from the method
    config the metrics file recorded (fine-tuning copies it from the checkpoint); where none was recorded it
    stays unset, and methods without variants get no column values."""
    config = {"num_masks": 16, "decoder": {"depth": 5}}
    for path in metrics_dir.glob("image-data2vec2-default-*.json"):
        _edit(path, lambda d: d["pretrain"].update(method_config=config))
    for path in metrics_dir.glob("image-data2vec2-num_masks=1-*.json"):     # a second ablated field, dotted
        _edit(path, lambda d: d["identity"]["params"].update({"decoder.depth": 2}))
    evals, _ = collect_evals([metrics_dir])
    d2v2 = evals[(evals.method == "data2vec2") & (evals.modality == "image")]
    by_variant = d2v2.groupby("variant")[["param.num_masks", "param.decoder.depth"]].agg(lambda s: set(s.dropna()))
    assert by_variant.loc["default"].tolist() == [{16}, {5}]
    assert by_variant.loc["num_masks=1"].tolist() == [{1}, {2}]             # its own values win
    assert by_variant.loc["num_masks=4"].tolist() == [{4}, set()]           # nothing recorded: unset
    assert evals.loc[evals.method == "mae", "param.num_masks"].isna().all()
    assert "method_config" not in evals.columns


def test_a_pretrain_field_ablation_fills_the_default_from_the_recorded_run_config(metrics_dir):
    """``pretrain.optim.lr`` is read from the run config the fine-tune copied from the checkpoint, not from the
    method config; a metrics file that recorded none leaves it unset."""
    for path in metrics_dir.glob("image-data2vec2-default-*.json"):
        _edit(path, lambda d: d["pretrain"].update(method_config={"optim": {"lr": 9.0}},
                                                   run_config={"optim": {"lr": 0.001}}))
    for path in metrics_dir.glob("image-data2vec2-num_masks=1-*.json"):
        _edit(path, lambda d: d["identity"]["params"].update({"pretrain.optim.lr": 0.004}))
    evals, _ = collect_evals([metrics_dir])
    d2v2 = evals[(evals.method == "data2vec2") & (evals.modality == "image")]
    lr = d2v2.groupby("variant")["param.pretrain.optim.lr"].agg(lambda s: set(s.dropna()))
    assert lr.to_dict() == {"default": {0.001}, "num_masks=1": {0.004}, "num_masks=4": set()}
    assert "run_config" not in evals.columns
