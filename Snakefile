"""data2vec 2.0 benchmark workflow: prepare data -> pretrain every (modality, method, variant, seed) under
one matched budget per modality -> fine-tune every kept checkpoint -> tables -> figures + report.

    snakemake                                   # embedded tiny preset, locally (workflow/profiles/default)
    snakemake --config preset=smoke             # the CI-sized run
    snakemake --profile slurm results/figures/  # every training job as a SLURM job (slurm/config.v8+.yaml)
    snakemake --report report.html              # browsable report of the figures and tables

The config (config/config.yaml over config/presets/<preset>.yaml) is validated against
workflow/schemas/config.schema.yaml, then every run's pretraining and fine-tuning config is validated
by the engine's own models (d2v2/workflow_config.py) before anything is scheduled.
"""
import json
import os
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from d2v2 import workflow_config as wfc

min_version("8.0")


configfile: "config/config.yaml"


try:
    _resolved = wfc.with_preset(config, Path(workflow.basedir) / "config" / "presets")
    config.clear()
    config.update(_resolved)
    validate(config, "workflow/schemas/config.schema.yaml")
    RUNS = {run.key: run for run in wfc.validate_workflow(config)}
except wfc.WorkflowConfigError as err:
    raise WorkflowError(f"invalid workflow config: {err}") from None

PATHS = config["paths"]
FRACTIONS = [wfc.fraction_tag(f) for f in config["checkpoint_fractions"]]


include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/results.smk"


rule all:
    default_target: True
    input:
        f"{PATHS['results']}/report.html",
        f"{PATHS['results']}/figures",
