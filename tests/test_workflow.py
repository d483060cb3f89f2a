"""The Snakemake workflow: run matrix, DAG shapes, DAG-build-time validation, and real end-to-end runs.

Every workflow run uses a temporary working directory (``snakemake -d``) and the repository's prepared
data (``data/``, made by the workflow's own prepare_data rule when missing).
"""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from d2v2 import workflow as wfc
from d2v2.config import get_dotted, merge
from d2v2.engine.finetune import same_identity
from d2v2.launch import _slurm_options, build_parser
from d2v2.workflow import jobs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def snakemake(workdir, *args, config=(), timeout=600, profile=None):
    """Run Snakemake from the repository root on ``workdir``; ``config`` are extra --config entries."""
    cmd = [sys.executable, "-m", "snakemake", "-d", str(workdir)]
    if profile:
        cmd += ["--profile", profile]
    cmd += [*args, "--config", f"data={{root: {DATA}}}", *config]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table as {rule: count}."""
    table = output.split("Job stats:", 1)[1].split("Reasons:", 1)[0] if "Job stats:" in output else ""
    counts = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M))
    counts.pop("total", None)
    return counts


def resolved(**changes) -> dict:
    """The workflow config as the Snakefile resolves it (preset + schema defaults), without Snakemake."""
    config = wfc.with_preset({"preset": "tiny", **changes})
    wfc.check_schema(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    return config


def config_files(*names: str) -> dict:
    """``config/<name>`` files, each laid over the one before, as Snakemake lays several ``--configfile``."""
    extra: dict = {}
    for name in names:
        extra = merge(extra, yaml.safe_load((REPO / "config" / name).read_text()))
    return extra


# ------------------------------------------------------------------ run matrix (in-process)


def test_the_schema_takes_the_values_the_engine_owns_from_the_engine():
    """Budget kinds, clocks, modalities and launcher backends are written once, in the engine: the schema
    file has no enum for them and check_schema refuses a bad value with the engine's list."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert "enum" not in schema["definitions"]["budget"]["properties"]["kind"]
    assert "enum" not in schema["properties"]["report"]["properties"]["clock"]
    with pytest.raises(wfc.WorkflowConfigError, match="report.clock: 'wall' is not one of .*'train_cpu_s'"):
        resolved(report={"clock": "wall"})
    with pytest.raises(wfc.WorkflowConfigError, match="launcher.backend: 'k8s' is not one of .*'slurm'"):
        resolved(launcher={"backend": "k8s"})
    assert resolved()["report"]["bootstrap"] == 2000          # and the defaults are filled in
    assert "properties" not in schema["definitions"]["slurm_resources"]       # SlurmOptions' fields, once
    with pytest.raises(wfc.WorkflowConfigError, match="slurm.finetune.mem_gb: -1 is less than or equal to"):
        resolved(slurm={"finetune": {"mem_gb": -1}})


def test_variants_one_at_a_time_and_grid():
    fields = {"num_masks": [1, 2, 4], "decoder.depth": [1, 3]}
    names = [n for n, _ in wfc.variants(fields)]
    assert names == ["default", "decoder.depth=1", "decoder.depth=3", "num_masks=1", "num_masks=2", "num_masks=4"]
    grid = wfc.variants(fields, "grid")
    assert len(grid) == 1 + 6 and ("decoder.depth=3,num_masks=4", {"decoder.depth": 3, "num_masks": 4}) in grid


def test_run_config_holds_the_variant_and_only_this_run():
    config = resolved(ablations={"image": {"data2vec2": {"decoder.depth": [1]}}})
    runs = {r.key: r for r in wfc.expand_runs(config)}
    assert len(runs) == 8 + 1 and "image/data2vec2/decoder.depth=1/seed0" in runs
    variant = wfc.run_config(config, runs["image/data2vec2/decoder.depth=1/seed0"])
    default = wfc.run_config(config, runs["image/data2vec2/default/seed0"])
    assert variant["method"]["overrides"] == {"decoder": {"depth": 1}} and default["method"]["overrides"] == {}
    assert variant["budget"] == config["budget"]["image"] and variant["checkpoint"]["fractions"] == [0.25, 0.5, 1.0]
    assert "text" not in json.dumps(variant["method"])     # nothing of another run leaks into the params
    ft = wfc.finetune_request(config, runs["image/data2vec2/decoder.depth=1/seed0"], 0.5)
    assert ft["identity"] == {"variant": "decoder.depth=1", "params": {"decoder.depth": 1}, "seed": 0,
                              "budget_fraction": 0.5}


def test_a_pretrain_field_ablation_changes_the_run_config_not_the_method():
    """``pretrain.optim.lr`` varies the pretraining run config of one method's runs; its other settings (here
    the per-method anneal), the budget and the other methods' runs stay as they were."""
    config = resolved(modalities=["image"], methods={"image": ["data2vec2", "mae"]},
                      pretrain={"per_method": {"image": {"data2vec2": {
                          "method": {"overrides": {"ema_anneal_end_fraction": 0.8}}}}}},
                      ablations={"image": {"data2vec2": {"pretrain.optim.lr": [0.002]}}})
    runs = {r.key: r for r in wfc.expand_runs(config)}
    assert sorted(runs) == ["image/data2vec2/default/seed0", "image/data2vec2/pretrain.optim.lr=0.002/seed0",
                            "image/mae/default/seed0"]
    variant = wfc.run_config(config, runs["image/data2vec2/pretrain.optim.lr=0.002/seed0"])
    default = wfc.run_config(config, runs["image/data2vec2/default/seed0"])
    assert variant["optim"]["lr"] == 0.002 and default["optim"]["lr"] == 0.008
    assert variant["method"]["overrides"] == default["method"]["overrides"] == {"ema_anneal_end_fraction": 0.8}
    assert {k: v for k, v in variant.items() if k != "optim"} == {k: v for k, v in default.items() if k != "optim"}
    assert wfc.run_config(config, runs["image/mae/default/seed0"])["optim"]["lr"] == 1e-3     # MAE: its own
    assert wfc.validate_workflow(config)
    for owned in ("pretrain.budget.value", "pretrain.seed", "pretrain.method.name", "pretrain."):
        with pytest.raises(wfc.WorkflowConfigError, match=f"{owned}: not a field an ablation can vary"):
            wfc.variants({owned: [1]})


def test_validate_workflow_accepts_every_preset():
    for preset in ("smoke", "tiny"):
        assert wfc.validate_workflow(resolved(preset=preset))
    with pytest.raises(wfc.WorkflowConfigError, match="data.speech: .*manifest_dir: required"):
        wfc.validate_workflow(resolved(preset="base", slurm={"partition": "gpu"}))
    paper_data = {"image": {"imagenet_dir": "/in1k"}, "speech": {"manifest_dir": "/ls960"},
                  "text": {"gpt2_vocab": "/bpe/vocab.json", "gpt2_merges": "/bpe/merges.txt"}}
    with pytest.raises(wfc.WorkflowConfigError, match="missing data: data.image.imagenet_dir: not found: /in1k"):
        wfc.validate_workflow(resolved(preset="base", slurm={"partition": "gpu"}, data=paper_data))


def test_cpu_30min_config_is_the_tiny_dag_with_longer_budgets_in_its_own_folders():
    extra = config_files("cpu-30min.yaml")
    config, tiny = resolved(**extra), resolved()
    assert wfc.validate_workflow(config)
    runs = wfc.expand_runs(config)
    assert [r.key for r in runs] == [r.key for r in wfc.expand_runs(tiny)]
    assert all(wfc.run_config(config, r)["budget"] == {"kind": "train_seconds", "value": 1800} for r in runs)
    assert not set(config["paths"].values()) & set(tiny["paths"].values())     # the tiny results are kept


BASE_SPEECH = yaml.safe_load((REPO / "d2v2" / "presets" / "base.yaml").read_text())["method_settings"]["speech"]


@pytest.mark.parametrize("modality, seeds, budgets, anneal", [
    ("image", (0, 1), [60, 120, 240, 480], {"data2vec2": 0.8, "data2vec1": 0.8, "mae": None}),
    # the released configs' shares, the base preset's
    ("speech", (0, 1, 2, 3, 4), [60, 240, 960],
     {m: BASE_SPEECH[m]["ema_anneal_end_fraction"] for m in ("data2vec2", "data2vec1")})])
def test_cpu_sweep_configs_are_budget_sweeps_of_every_tiny_method_of_a_modality_with_fitted_anneals(
        modality, seeds, budgets, anneal):
    config, tiny = resolved(**config_files(f"cpu-{modality}-sweep.yaml")), resolved()
    assert wfc.validate_workflow(config)
    runs = wfc.expand_runs(config)
    assert set(anneal) == set(tiny["methods"][modality]) and {r.modality for r in runs} == {modality}
    assert sorted((r.method, r.seed, r.budget_scale * budgets[-1]) for r in runs) == sorted(
        (method, seed, budget) for method in anneal for seed in seeds for budget in budgets)
    for run in runs:
        cfg = wfc.run_config(config, run)
        assert cfg["budget"] == {"kind": "cpu_seconds", "value": budgets[-1] * run.budget_scale}
        # every teacher's anneal fits its budget
        assert cfg["method"]["overrides"].get("ema_anneal_end_fraction") == anneal[run.method]
        # the full runs' checkpoints at the sweep's budgets are fine-tuned too: the anytime points beside the sweep
        anytime = config["budget_sweep"][modality] if run.budget_scale == 1 else [1.0]
        assert wfc.finetune_fractions(config, run) == anytime
    assert not set(config["paths"].values()) & set(tiny["paths"].values())


def test_a_fine_tune_names_the_exact_fraction_its_file_name_rounds():
    """File names keep 3 decimals (the speech sweep's anytime checkpoint at 0.0625 is ``f0.062``); the fine-tune
    the workflow requests from the file name's fraction names that checkpoint for the engine's identity check."""
    config = resolved(**config_files("cpu-speech-sweep.yaml"))
    full = next(r for r in wfc.expand_runs(config) if r.budget_scale == 1)
    assert wfc.fraction_tag(0.0625) == "0.062"
    for fraction in (0.0625, 0.25, 1.0):
        requested = wfc.finetune_request(config, full, float(wfc.fraction_tag(fraction)))["identity"]["budget_fraction"]
        assert same_identity("budget_fraction", requested, fraction)
        assert not same_identity("budget_fraction", requested, fraction + 0.001)


def test_cpu_image_sweep_own_lr_overlay_is_the_sweep_at_tinys_own_lrs_in_its_own_folders():
    sweep, tiny = resolved(**config_files("cpu-image-sweep.yaml")), resolved()
    config = resolved(**config_files("cpu-image-sweep.yaml", "cpu-image-sweep-own-lr.yaml"))
    assert wfc.validate_workflow(config)
    runs = wfc.expand_runs(config)
    assert [r.key for r in runs] == [r.key for r in wfc.expand_runs(sweep)]
    own = {r.method: wfc.run_config(tiny, r)["optim"] for r in wfc.expand_runs(tiny) if r.modality == "image"}
    moved = set()
    for run in runs:
        cfg, pinned = wfc.run_config(config, run), wfc.run_config(sweep, run)
        assert cfg["optim"] == own[run.method]                               # tiny's LR, nothing else moved
        assert {k: v for k, v in cfg.items() if k != "optim"} == {k: v for k, v in pinned.items() if k != "optim"}
        if pinned["optim"] != own[run.method]:
            moved.add(run.method)
    assert moved == {"data2vec2", "data2vec1"}
    paths = set(config["paths"].values())
    assert not paths & set(sweep["paths"].values()) and not paths & set(tiny["paths"].values())


def test_cpu_image_long_config_runs_data2vec2_and_mae_for_1920_cpu_seconds_with_checkpoints_at_the_sweeps_budgets():
    extra = config_files("cpu-image-long.yaml")
    config, tiny = resolved(**extra), resolved()
    assert wfc.validate_workflow(config)
    runs = wfc.expand_runs(config)
    assert sorted((r.method, r.seed) for r in runs) == [("data2vec2", 0), ("data2vec2", 1), ("mae", 0), ("mae", 1)]
    for run in runs:
        cfg = wfc.run_config(config, run)
        assert cfg["budget"] == {"kind": "cpu_seconds", "value": 1920}
        assert cfg["method"]["overrides"].get("ema_anneal_end_fraction") == (None if run.method == "mae" else 0.8)
    assert [1920 * f for f in config["checkpoint_fractions"]] == [240, 480, 960, 1920]   # the sweep's 240 and 480 s
    assert not set(config["paths"].values()) & set(tiny["paths"].values())


def test_the_long_lr_overlay_adds_only_data2vec2_runs_at_4e3_beside_the_long_runs():
    long = resolved(**config_files("cpu-image-long.yaml"))
    config = resolved(**config_files("cpu-image-long.yaml", "cpu-image-long-lr.yaml"))
    assert wfc.validate_workflow(config)
    before = {r.key: wfc.run_config(long, r) for r in wfc.expand_runs(long)}
    after = {r.key: wfc.run_config(config, r) for r in wfc.expand_runs(config)}
    assert {k: after[k] for k in before} == before              # the long config's runs stay up to date
    added = sorted(set(after) - set(before))
    assert added == [f"image/data2vec2/pretrain.optim.lr=0.004/seed{s}" for s in (0, 1)]
    for key in added:
        default = after[key.replace("pretrain.optim.lr=0.004", "default")]
        assert after[key]["optim"] == {**default["optim"], "lr": 0.004} and after[key]["budget"] == default["budget"]
        assert after[key]["method"] == default["method"]          # the anneal over 80% of the run kept
    assert config["paths"] == long["paths"]


DATA2VEC_IMAGE_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
TEXT_LRS, SPEECH_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3), (3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3)


@pytest.mark.parametrize("modality, lrs", [
    ("image", {"data2vec2": DATA2VEC_IMAGE_LRS, "mae": (5e-4, 1e-3, 2e-3, 4e-3), "data2vec1": DATA2VEC_IMAGE_LRS}),
    ("text", {"data2vec2": TEXT_LRS, "data2vec1": TEXT_LRS, "mlm": TEXT_LRS}),
    ("speech", {"data2vec2": SPEECH_LRS, "data2vec1": SPEECH_LRS})])
def test_cpu_lr_configs_run_every_method_of_a_modality_at_a_range_of_lrs_at_tinys_budget(modality, lrs):
    config, tiny = resolved(**config_files(f"cpu-{modality}-lr.yaml")), resolved()
    assert wfc.validate_workflow(config)
    found = {}
    for run in wfc.expand_runs(config):
        cfg = wfc.run_config(config, run)
        assert cfg["budget"] == tiny["budget"][modality] and wfc.finetune_fractions(config, run) == [1.0]
        found.setdefault(run.method, set()).add((cfg["optim"]["lr"], run.seed))
    assert set(lrs) == set(tiny["methods"][modality])
    assert found == {method: {(lr, seed) for lr in values for seed in (0, 1, 2)} for method, values in lrs.items()}
    assert not set(config["paths"].values()) & set(tiny["paths"].values())


def test_tiny_gives_each_image_method_its_own_lr_and_the_measured_configs_keep_the_shared_one():
    """tiny: data2vec 2.0 and 1.0 at 8e-3, MAE at 1e-3 (TINY_SCALE.md, "Each image method at its own LR"); the
    configs whose results the docs give were measured at the shared 1e-3 and pin it, so they reproduce them."""
    tiny = resolved()
    lrs = {r.method: wfc.run_config(tiny, r)["optim"]["lr"] for r in wfc.expand_runs(tiny) if r.modality == "image"}
    assert lrs == {"data2vec2": 8e-3, "data2vec1": 8e-3, "mae": 1e-3}
    for files in (["cpu-30min.yaml"], ["cpu-image-sweep.yaml"], ["cpu-image-long.yaml"], ["cpu-image-masks.yaml"],
                  ["cpu-image-masks.yaml", "cpu-image-masks-updates.yaml"], ["cpu-image-decoder.yaml"],
                  ["cpu-image-lr.yaml"]):
        config = resolved(**config_files(*files))
        runs = [r for r in wfc.expand_runs(config) if r.modality == "image" and r.variant == "default"]
        assert runs and {wfc.run_config(config, r)["optim"]["lr"] for r in runs} == {1e-3}, files


CPU_SECONDS_240 = {"kind": "cpu_seconds", "value": 240}


@pytest.mark.parametrize("files, budget, field, values, default", [
    (["cpu-image-masks.yaml"], CPU_SECONDS_240, "num_masks", [1, 2, 8, 16], 4),
    (["cpu-image-masks.yaml", "cpu-image-masks-updates.yaml"], {"kind": "updates", "value": 1250},
     "num_masks", [1, 2, 8, 16], 4),
    (["cpu-image-decoder.yaml"], CPU_SECONDS_240, "decoder.depth", [1, 2, 5], 3)])
def test_cpu_image_ablation_configs_vary_one_field_at_one_budget_with_fitted_anneals(files, budget, field, values,
                                                                                      default):
    config, tiny = resolved(**config_files(*files)), resolved()
    assert wfc.validate_workflow(config)
    runs = wfc.expand_runs(config)
    assert {(r.modality, r.method) for r in runs} == {("image", "data2vec2")} and len(runs) == (len(values) + 1) * 2
    set_to = {}
    for run in runs:
        cfg = wfc.run_config(config, run)
        assert cfg["budget"] == budget
        assert cfg["method"]["overrides"]["ema_anneal_end_fraction"] == 0.8     # the same point of every run
        set_to[run.variant] = get_dotted(cfg["method"]["overrides"], field)          # what the run is told
    assert set_to == {"default": None, **{f"{field}={v}": v for v in values}}
    preset = yaml.safe_load((REPO / "d2v2" / "presets" / "tiny.yaml").read_text())
    assert get_dotted(preset["method_settings"]["image"]["data2vec2"], field) == default     # what "default" runs with
    assert not set(config["paths"].values()) & set(tiny["paths"].values())


def test_cli_strings_are_read_back_as_yaml_scalars():
    assert wfc.coerce_scalars({"a": "2", "b": ["0.5", "1e-3", "true", "null", "debug"]}) == \
        {"a": 2, "b": [0.5, 1e-3, True, None, "debug"]}


def test_launch_command_carries_the_slurm_settings():
    config = resolved(launcher={"backend": "slurm"},
                      slurm={"partition": "gpu", "account": "acc", "setup": ["module load x"],
                             "pretrain": {"gpus_per_node": 8, "time_min": 100, "sbatch": {"exclusive": True}}})
    cmd = wfc.launch_command(config, "pretrain", "n", "RUN/slurm/%j", "RUN/slurm_job.json")
    for piece in ("--backend slurm", "--checkpointable", "--job-file RUN/slurm_job.json"):
        assert piece in cmd
    words = shlex.split(cmd.replace("{{", "{").replace("}}", "}"))    # as Snakemake formats the template
    args = build_parser().parse_args(words[words.index("launch") + 1:])
    options = _slurm_options(args)          # what the launcher submits: shared settings + the kind's resources
    assert (options.partition, options.account, options.gpus_per_node, options.time_min) == ("gpu", "acc", 8, 100)
    assert options.setup == ["module load x"] and options.sbatch == {"exclusive": True}
    assert options.cpus_per_task == 1
    with pytest.raises(wfc.WorkflowConfigError, match="slurm.pretrain.gpus: unknown key"):   # at DAG-build time
        wfc.validate_workflow(resolved(launcher={"backend": "slurm"}, slurm={"partition": "p", "pretrain": {"gpus": 8}}))
    local = wfc.launch_command(resolved(), "finetune", "n", "x")
    assert "--backend local --threads 1" in local and "--partition" not in local


def test_prepare_run_keeps_a_run_with_the_same_config_and_moves_another_aside(tmp_path):
    from d2v2.engine.runconfig import resolve_run_config

    config = resolved(preset="smoke")
    run = next(r for r in wfc.expand_runs(config) if r.key == "image/data2vec2/default/seed0")
    request = wfc.run_config(config, run)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolve_run_config(request).model_dump(mode="json")))
    (run_dir / "checkpoint_last.pt").write_text("resume me")
    assert jobs.main([str(run_dir), json.dumps(request)]) == 0     # same config: resume
    assert (run_dir / "checkpoint_last.pt").exists() and json.loads((run_dir / "run.yaml").read_text()) == request
    changed = {**request, "budget": {"kind": "updates", "value": 7}}
    assert jobs.main([str(run_dir), json.dumps(changed)]) == 0     # other config: fresh start
    (moved,) = tmp_path.glob("run.replaced-*")
    assert (moved / "checkpoint_last.pt").exists() and not (run_dir / "checkpoint_last.pt").exists()
    assert json.loads((run_dir / "run.yaml").read_text())["budget"]["value"] == 7


# ------------------------------------------------------------------ DAG shapes (snakemake -n)
def test_tiny_dag_shape(tmp_path):
    r = snakemake(tmp_path, "-n")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts.pop("prepare_data", 0) <= 3
    # 8 runs (image 3 methods, speech 2, text 3); image and text fine-tune 3 checkpoint fractions, speech
    # only the final one (finetune_fractions); random-init references per modality
    assert counts == {"pretrain": 8, "finetune": 3 * 3 + 2 * 1 + 3 * 3, "finetune_random_init": 3,
                      "resolved_config": 1, "collect": 1, "report": 1, "all": 1}
    assert "metrics/speech/data2vec2/default/seed0/f1.000.json" in r.stdout
    assert "metrics/speech/data2vec2/default/seed0/f0.500.json" not in r.stdout
    # longest chain first: every pretraining run before any fine-tune, speech's long CTC fine-tunes first
    priority = {}
    for block in r.stdout.split("rule ")[1:]:
        modality = re.search(r"modality=(\w+)", block)
        if modality:
            level = re.search(r"^\s+priority: (\d+)", block, re.M)
            key = (block.split(":", 1)[0], modality.group(1))
            priority.setdefault(key, set()).add(int(level.group(1)) if level else 0)
    assert all(len(levels) == 1 for levels in priority.values()), priority
    level = {key: levels.pop() for key, levels in priority.items()}
    assert min(level[("pretrain", m)] for m in ("image", "speech", "text")) > max(
        level[(rule, m)] for rule in ("finetune", "finetune_random_init") for m in ("image", "speech", "text"))
    assert level[("finetune", "speech")] > level[("finetune", "image")] > level[("finetune", "text")]
    assert level[("finetune_random_init", "speech")] == level[("finetune", "speech")]
    assert level[("pretrain", "speech")] > level[("pretrain", "image")] > level[("pretrain", "text")]
    assert min(level[("prepare_data", m)] for m in ("image", "speech", "text")) > 2 * level[("pretrain", "speech")]


def test_ablation_dag_shape_and_readable_paths(tmp_path):
    ablations = "ablations={image: {data2vec2: {num_masks: [1, 2, 4], decoder.depth: [1, 3]}}}"
    r = snakemake(tmp_path, "-n", config=[ablations])
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["pretrain"] == 8 + 5 and counts["finetune"] == 3 * (6 + 5) + 2
    for variant in ("num_masks=1", "num_masks=4", "decoder.depth=3"):
        assert f"runs/image/data2vec2/{variant}/seed0/DONE" in r.stdout
    grid = snakemake(tmp_path, "-n", config=[ablations, "ablation_mode=grid", "seeds=[0,1]"])
    assert job_counts(grid.stdout)["pretrain"] == 2 * (8 + 6)
    assert "runs/image/data2vec2/decoder.depth=3,num_masks=4/seed1/DONE" in grid.stdout


def test_a_budget_sweep_is_one_run_per_budget_with_its_own_schedule():
    """Each fraction below 1 is a separate run: the budget scaled, only its final checkpoint kept and fine-tuned;
    the full run stays as it is (the sweep's point at 1 and the anytime points)."""
    config = resolved(budget_sweep={"image": [0.25, 0.5, 1.0]})
    runs = wfc.validate_workflow(config)
    image = [r for r in runs if r.modality == "image" and r.method == "mae"]
    assert [(r.budget_scale, r.key) for r in image] == [
        (1.0, "image/mae/default/seed0"), (0.25, "image/mae/default/seed0-budget0.250"),
        (0.5, "image/mae/default/seed0-budget0.500")]
    full, quarter = (wfc.run_config(config, r) for r in image[:2])
    assert full["budget"] == {"kind": "cpu_seconds", "value": 60}
    assert quarter["budget"] == {"kind": "cpu_seconds", "value": 15.0}
    assert full["checkpoint"]["fractions"] == [0.25, 0.5, 1.0] and quarter["checkpoint"]["fractions"] == [1.0]
    assert wfc.finetune_fractions(config, image[1]) == [1.0]
    assert wfc.finetune_request(config, image[1], 1.0)["identity"]["budget_scale"] == 0.25
    assert len(runs) == 8 + 3 * 2                      # three image methods, two extra budgets each
    updates = resolved(preset="smoke", budget_sweep={"image": [0.5]})
    half = next(r for r in wfc.validate_workflow(updates) if r.budget_scale == 0.5)
    assert wfc.run_config(updates, half)["budget"] == {"kind": "updates", "value": 3}


def test_job_priorities_put_the_longest_chain_first():
    """HuBERT's label chains, then pretraining, then fine-tuning; within each, the modalities by the length of
    their fine-tunes (update counts; an epochs budget after them)."""
    config = resolved()
    assert [wfc.job_priority(config, m, "finetune") for m in ("text", "image", "speech")] == [1, 2, 3]
    assert wfc.job_priority(config, "speech", "pretrain") == 13 and wfc.job_priority(config, "speech", "label_chain") == 23
    epochs = resolved(finetune={"speech": {"budget": {"kind": "epochs", "value": 50}}})
    assert wfc.job_priority(epochs, "speech", "finetune") == 1 and wfc.job_priority(epochs, "text", "finetune") == 2
    with pytest.raises(ValueError, match="stage 'collect'"):
        wfc.job_priority(config, "image", "collect")


def test_a_hubert_run_brings_its_label_chain():
    """MFCC labels -> iteration 1 (its own config: the first label set, 0.625 x the budget, its final
    checkpoint kept) -> labels of its block `layer` -> the compared run, which reads them."""
    config = resolved(preset="smoke", budget_sweep={"speech": [0.5, 1.0]})
    runs = [r for r in wfc.validate_workflow(config) if r.method == "hubert"]
    assert [r.key for r in runs] == ["speech/hubert/default/seed0", "speech/hubert/default/seed0-budget0.500"]
    chain = "runs/hubert_chain/default/seed0-budget0.500"
    assert wfc.hubert_chain(config, runs[1]) == chain
    compared, first = wfc.run_config(config, runs[1]), wfc.hubert_iteration1_config(config, runs[1])
    assert compared["data"]["speech"]["pretrain_labels"] == f"{chain}/labels2/pretrain.km"
    assert compared["method"]["overrides"] == {"num_classes": 8, "label_rate": 50.0}
    assert compared["budget"] == {"kind": "updates", "value": 2}
    assert compared["input_costs"] == [f"{chain}/labels1/labels.json", f"{chain}/iteration1/summary.json",
                                       f"{chain}/labels2/labels.json"] and "input_costs" not in first
    assert first["data"]["speech"]["pretrain_labels"] == f"{chain}/labels1/pretrain.km"
    assert first["method"]["overrides"] == {"num_classes": 8, "label_rate": 100.0}
    assert first["budget"] == {"kind": "updates", "value": 1} and first["checkpoint"]["fractions"] == [1.0]
    args = wfc.hubert_labels_args(config, runs[1], 2)
    assert args[args.index("--checkpoint") + 1] == f"{chain}/iteration1/checkpoints/checkpoint_f1.000.pt"
    assert args[args.index("--layer") + 1] == "1" and "--checkpoint" not in wfc.hubert_labels_args(config, runs[1], 1)
    with pytest.raises(wfc.WorkflowConfigError, match="hubert.layer: 3 but the smoke encoder has 2 blocks"):
        wfc.validate_workflow(resolved(preset="smoke", hubert={"layer": 3}))


def test_smoke_runs_every_registered_method():
    """CI's end-to-end run covers every method of every modality."""
    from d2v2.method import available_methods

    runs = wfc.validate_workflow(resolved(preset="smoke"))
    assert {(r.modality, r.method) for r in runs} == set(available_methods())


def test_a_wavlm_run_trains_on_the_default_hubert_runs_labels():
    """WavLM reads the second labels of the default HuBERT run of its seed and budget, whether HuBERT is
    compared too (one chain for both, whatever HuBERT's ablations) or not (the chain is made for WavLM)."""
    both = resolved(preset="smoke", methods={"speech": ["hubert", "wavlm"]},
                    ablations={"speech": {"hubert": {"unmasked_weight": [0.5]}}})
    runs = wfc.validate_workflow(both)
    wavlm = next(r for r in runs if r.method == "wavlm")
    chains = wfc.label_chains(both, runs)
    assert sorted(chains) == ["runs/hubert_chain/default/seed0", "runs/hubert_chain/unmasked_weight=0.5/seed0"]
    assert wfc.hubert_chain(both, wavlm) == "runs/hubert_chain/default/seed0"
    cfg = wfc.run_config(both, wavlm)
    assert cfg["data"]["speech"]["pretrain_labels"] == "runs/hubert_chain/default/seed0/labels2/pretrain.km"
    assert cfg["method"]["overrides"] == {"num_classes": 8, "label_rate": 50.0} and len(cfg["input_costs"]) == 3
    alone = resolved(preset="smoke", methods={"speech": ["wavlm"]}, budget_sweep={"speech": [0.5, 1.0]})
    runs = wfc.validate_workflow(alone)
    owners = wfc.label_chains(alone, runs)
    assert {o.key for o in owners.values()} == {"speech/hubert/default/seed0", "speech/hubert/default/seed0-budget0.500"}
    first = wfc.hubert_iteration1_config(alone, owners["runs/hubert_chain/default/seed0"])
    assert first["method"]["name"] == "hubert" and first["method"]["overrides"]["label_rate"] == 100.0
    # data at another sample rate: the runs align labels to frames at the data's rate, not the default 16 kHz
    slow = resolved(preset="smoke", methods={"speech": ["wavlm"]}, data={"speech": {"sample_rate": 8000}})
    overrides = wfc.run_config(slow, next(r for r in wfc.validate_workflow(slow) if r.method == "wavlm"))["method"]["overrides"]
    assert overrides["sample_rate"] == 8000 and overrides["label_rate"] == 25.0


def test_budget_sweep_dag_shape(tmp_path):
    r = snakemake(tmp_path, "-n", config=["budget_sweep={image: [0.25, 0.5, 1.0]}"])
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["pretrain"] == 8 + 6 and counts["finetune"] == 3 * 3 + 2 + 3 * 3 + 6
    assert "runs/image/data2vec2/default/seed0-budget0.250/DONE" in r.stdout
    assert "metrics/image/mae/default/seed0-budget0.500/f1.000.json" in r.stdout


def test_slurm_profile_dag(tmp_path):
    r = snakemake(tmp_path, "-n", "-p", "results/figures/", profile="slurm", config=["preset=smoke"])
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["pretrain"] == 12                       # smoke: 3 image, 5 speech, 4 text methods
    assert counts["hubert_iteration1"] == 1 and counts["hubert_labels_mfcc"] == counts["hubert_labels_layer"] == 1
    labels = [c for c in _shell_commands(r.stdout) if "hubert-labels" in c]    # HuBERT's label jobs are SLURM jobs
    assert len(labels) == 2 and all(c[c.index("--backend") + 1] == "slurm" for c in labels)
    chain = "runs/hubert_chain/default/seed0"
    assert {c[c.index("--folder") + 1] for c in labels} == {f"{chain}/labels1/slurm/%j", f"{chain}/labels2/slurm/%j"}


# ------------------------------------------------------------------ nothing reaches a shell unquoted
HOSTILE = "logs $(touch PWNED) `touch PWNED`"


def test_hostile_paths_are_harmless_in_a_real_job(tmp_path):
    """A path with a command substitution and a space is a path: the job writes there, nothing runs."""
    r = snakemake(tmp_path, "--cores", "1", "results/data/prepared_image.txt",
                  config=["preset=smoke", f"paths={{logs: '{HOSTILE}'}}"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / HOSTILE / "prepare_data" / "image.log").is_file()
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


def _shell_commands(output: str) -> list[list[str]]:
    """The one-line shell commands of ``snakemake -p`` as shell words (the multi-line config dump is left out)."""
    commands = []
    for line in output.splitlines():
        if "Shell command:" in line:
            with contextlib.suppress(ValueError):
                commands.append(shlex.split(line.split("Shell command:", 1)[1]))
    return commands


def test_every_path_and_variant_is_one_shell_word_with_the_slurm_launcher(tmp_path):
    """A variant that is a mapping, a logs path with a space and ``$(...)``: each is exactly one word of
    the pretraining command (run dir, job name, SLURM folder and job file)."""
    r = snakemake(tmp_path, "-n", "-p", "results/figures/", profile="slurm",
                  config=["preset=smoke", "modalities=[image]", f"paths={{logs: '{HOSTILE}'}}",
                          "ablations={image: {data2vec2: {decoder: [{depth: 2}]}}}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_dir = 'runs/image/data2vec2/decoder={"depth":2}/seed0'
    pretrain = [c for c in _shell_commands(r.stdout) if "prepare-run" in c and run_dir in c]
    assert len(pretrain) == 1, r.stdout[-3000:]
    words = pretrain[0]
    assert words[words.index("--name") + 1] == f"pretrain:{run_dir}"
    assert words[words.index("--folder") + 1] == f"{run_dir}/slurm/%j"
    assert words[words.index("--out") + 1] == run_dir
    finetune = [c for c in _shell_commands(r.stdout) if "finetune" in c and run_dir + "/checkpoints/checkpoint_f1.000.pt" in c]
    assert len(finetune) == 1
    assert finetune[0][finetune[0].index("--folder") + 1] == f"{HOSTILE}/slurm/%j"


# ------------------------------------------------------------------ bad input fails at DAG-build time
BAD_CONFIGS = [
    (["colour=blue"], "colour: unknown key"),
    (["seeds=zero"], "seeds: 'zero' is not of type 'array'"),
    (["checkpoint_fractions=[0.5, 1.5]"], "checkpoint_fractions[1]: 1.5 is greater than the maximum of 1"),
    (["checkpoint_fractions=[0, 1]"], "checkpoint_fractions[0]: 0 is less than or equal to the minimum of 0"),
    (["budget={image: {kind: hours, value: 60}}"], "budget.image.kind: 'hours' is not one of"),
    (["budget={text: {kind: updates, value: -5}}"], "budget.text.value: -5 is less than or equal to the minimum"),
    (["preset=huge"], "preset: 'huge' unknown"),
    (["methods={speech: [mae]}"], "methods.speech: method: 'mae' is not available for modality 'speech'"),
    (["ablations={image: {data2vec2: {decoder.depth: [0, 2]}}}"],
     "ablations.image.data2vec2 variant decoder.depth=0: method.decoder.depth"),
    (["ablations={image: {data2vec2: {num_maskz: [2]}}}"], "num_maskz: unknown key"),
    (["ablations={image: {data2vec2: {pretrain.optim.lrr: [0.1]}}}"],
     "ablations.image.data2vec2 variant pretrain.optim.lrr=0.1: optim.lrr: unknown key"),
    (["ablations={image: {data2vec2: {pretrain.budget.value: [9]}}}"],
     "pretrain.budget.value: not a field an ablation can vary"),
    (["ablations={image: {data2vec2: {num_masks: 4}}}"], "num_masks: expected a non-empty list"),
    (["ablations={text: {mae: {num_masks: [2]}}}"], "ablations.text.mae: 'mae' is not in methods.text"),
    (["preset=smoke", "hubert={clusters: [1, 5]}"], "hubert.clusters[0]: 1 is less than the minimum of 2"),
    (["pretrain={image: {batch_sise: 8}}"], "batch_sise: unknown key (did you mean 'batch_size'?)"),
    (["finetune={text: {layer_decay: 2}}"], "finetune.text: layer_decay"),
    (["data={image: {dataset: imagenet, imagenet_dir: /nonexistent/imagenet}}"],
     "missing data: data.image.imagenet_dir: not found: /nonexistent/imagenet"),
    (["launcher={backend: slurm}"], "slurm.partition: required when launcher.backend is slurm"),
    (["slurm={pretrain: {gpus: 8}}"], "slurm.pretrain.gpus: unknown key"),
    (["finetune_fractions={speech: [0.75]}"], "finetune_fractions.speech: [0.75] not in checkpoint_fractions"),
    (["budget_sweep={image: []}"], "budget_sweep.image: expected a non-empty list"),
    (["budget_sweep={image: [0.5, 0.25]}"], "budget_sweep.image: [0.5, 0.25] is not sorted"),
    (["budget_sweep={text: [0.25, 0.25]}"], "budget_sweep.text: repeated values"),
    (["budget_sweep={speech: [-0.5, 1]}"], "budget_sweep.speech: [-0.5] not in (0, 1]"),
    (["checkpoint_fractions=[0.1251, 0.1254, 1.0]"],
     "checkpoint_fractions: [0.1251, 0.1254, 1.0] has fractions equal to 3 decimals"),
]


@pytest.mark.slow
def test_bad_configs_fail_before_any_job_naming_the_key(tmp_path):
    """Each bad config stops `snakemake -n` with a message that names the key (one subprocess each)."""
    failures = []
    for entries, expected in BAD_CONFIGS:
        r = snakemake(tmp_path, "-n", config=entries, timeout=120)
        if r.returncode == 0 or expected not in r.stdout + r.stderr or "Job stats" in r.stdout:
            failures.append(f"{entries}: expected {expected!r}, got rc={r.returncode}:\n{(r.stdout + r.stderr)[-800:]}")
    assert not failures, "\n\n".join(failures)


def test_only_the_data_of_the_modalities_run_is_checked(tmp_path):
    """``base`` with images only: its unset speech and text paths are not the workflow's business."""
    imagenet = tmp_path / "imagenet"
    (imagenet / "train").mkdir(parents=True)
    (imagenet / "val").mkdir()
    r = snakemake(tmp_path, "-n", config=["preset=base", "modalities=[image]", "slurm={partition: p}",
                                          f"data={{root: {DATA}, image: {{imagenet_dir: {imagenet}}}}}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert job_counts(r.stdout)["pretrain"] == 3 * 3        # three methods, each a budget sweep of three runs
    # with every modality, every run still carries the whole data config (run directories unchanged)
    tiny = resolved()
    assert all(wfc.run_config(tiny, run)["data"] == tiny["data"] for run in wfc.expand_runs(tiny))


def test_slurm_profile_without_partition_fails_naming_the_key(tmp_path):
    r = snakemake(tmp_path, "-n", profile="slurm", config=["slurm={partition: null}"])
    assert r.returncode != 0 and "slurm.partition: required" in r.stdout + r.stderr


# ------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_smoke_end_to_end_locally_then_incremental_reruns(tmp_path):
    """The smoke preset from data to report with the default (local) profile; then: a finished workflow
    has nothing to do, a deleted metrics file re-runs only its fine-tune, a new ablation value adds only
    its own jobs."""
    smoke = ["preset=smoke"]
    r = snakemake(tmp_path, config=smoke, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = tmp_path / "results"
    assert (results / "report.html").stat().st_size > 0 and list((results / "figures").glob("curves_*.png"))
    metrics = sorted((results / "metrics").rglob("*.json"))
    assert len(metrics) == 12 * 2                      # 12 runs x 2 checkpoint fractions
    chain = tmp_path / "runs" / "hubert_chain" / "default" / "seed0"       # HuBERT's labels and iteration 1
    assert (chain / "iteration1" / "DONE").exists()
    for labels, rate in (("labels1", 100.0), ("labels2", 50.0)):
        assert json.loads((chain / labels / "labels.json").read_text())["label_rate"] == rate
    hubert = json.loads((tmp_path / "runs/speech/hubert/default/seed0/summary.json").read_text())
    assert hubert["inputs"]["train_time_s"] > 0 and len(hubert["inputs"]["sources"]) == 3
    wavlm = json.loads((tmp_path / "runs/speech/wavlm/default/seed0/summary.json").read_text())
    assert wavlm["inputs"] == hubert["inputs"]                # WavLM trains on the same chain's labels
    report_md = (results / "report.md").read_text()
    assert "Input costs" in report_md and "time includes its inputs" in report_md
    first = json.loads(metrics[0].read_text())
    assert first["identity"]["variant"] == "default" and first["provenance"]
    assert yaml.safe_load((results / "config.yaml").read_text())["preset"] == "smoke"
    for run in (tmp_path / "runs").glob("*/*/*/seed0"):
        assert (run / "DONE").exists() and (run / "checkpoints" / "checkpoint_f0.500.pt").exists()
    warned = [log for log in (tmp_path / "logs").rglob("*.log") if "RuntimeWarning" in log.read_text()]
    assert not warned, f"runtime warnings in the jobs' logs: {warned}"

    report = snakemake(tmp_path, "--report", str(tmp_path / "snakemake_report.html"), config=smoke)
    assert report.returncode == 0 and (tmp_path / "snakemake_report.html").stat().st_size > 0

    again = snakemake(tmp_path, config=smoke)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    victim = results / "metrics" / "image" / "mae" / "default" / "seed0" / "f0.500.json"
    victim.unlink()
    dry = snakemake(tmp_path, "-n", config=smoke)
    assert job_counts(dry.stdout) == {"finetune": 1, "collect": 1, "report": 1, "all": 1}
    assert str(victim.relative_to(tmp_path)) in dry.stdout
    redo = snakemake(tmp_path, config=smoke, timeout=600)
    assert redo.returncode == 0 and victim.exists()

    ablation = snakemake(tmp_path, "-n", config=smoke + ["ablations={image: {data2vec2: {num_masks: [1]}}}"])
    assert job_counts(ablation.stdout) == {"pretrain": 1, "finetune": 2, "resolved_config": 1, "collect": 1,
                                           "report": 1, "all": 1}
    assert "runs/image/data2vec2/num_masks=1/seed0/DONE" in ablation.stdout

    clusters = snakemake(tmp_path, "-n", config=smoke + ["hubert={clusters: [8, 6], layer: 1, percent: 0.1}"])
    counts = job_counts(clusters.stdout)               # the labels cached before the changed count are kept
    assert counts["hubert_labels_layer"] == 1 and counts["pretrain"] == 2 and counts["finetune"] == 4
    assert "hubert_labels_mfcc" not in counts and "hubert_iteration1" not in counts

    sweep = snakemake(tmp_path, "-n", config=smoke + ["budget_sweep={image: [0.5, 1.0]}"])
    assert job_counts(sweep.stdout) == {"pretrain": 3, "finetune": 3, "resolved_config": 1, "collect": 1,
                                        "report": 1, "all": 1}
    assert "runs/image/mae/default/seed0-budget0.500/DONE" in sweep.stdout
