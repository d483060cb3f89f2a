"""DAG-build-time validation of the workflow config: every run's pretraining and fine-tuning config is
validated by the engine's own models, and the external data it points at must exist, before Snakemake
schedules anything; a problem raises :class:`WorkflowConfigError` naming the key."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, get_args

import yaml

from d2v2.config import MODALITIES, RENAMED_MODALITIES, ConfigError, renamed_modality
from d2v2.workflow.runs import (HUBERT, Run, WorkflowConfigError, active_data, budget_sweep, expand_runs,
                                finetune_request, fraction_tag, hubert_iteration1_config, label_chains,
                                random_init_request, run_config, schema_error)

__all__ = ["check_schema", "validate_workflow"]


def _model_enums() -> dict[tuple[str, ...], list[str]]:
    """The values the engine owns, by their place in the workflow schema (written there only once)."""
    from d2v2.engine.clock import CLOCKS
    from d2v2.engine.runconfig import Budget
    from d2v2.launch import BACKENDS

    return {("definitions", "modality"): list(MODALITIES),
            ("definitions", "budget", "properties", "kind"): list(get_args(Budget.model_fields["kind"].annotation)),
            ("properties", "launcher", "properties", "backend"): list(BACKENDS),
            ("properties", "report", "properties", "clock"): list(CLOCKS)}


def _slurm_resources() -> dict[str, Any]:
    """The schema of ``slurm.pretrain``/``slurm.finetune``: :class:`~d2v2.launch.slurm.SlurmOptions`' fields
    but the partition, without their defaults (an unset resource keeps the shared setting or the default)."""
    from d2v2.launch.slurm import SlurmOptions

    fields = SlurmOptions.model_json_schema()["properties"]
    return {name: {k: v for k, v in prop.items() if k not in ("default", "title")}
            for name, prop in fields.items() if name != "partition"}


def _filling_defaults(cls):
    """``cls`` that also sets every absent property that has a ``default`` (the jsonschema FAQ's recipe,
    as Snakemake's ``validate`` does)."""
    from jsonschema.validators import extend

    validate_properties = cls.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        for name, sub in props.items():
            if "default" in sub and isinstance(instance, dict):
                instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, props, instance, schema)

    return extend(cls, {"properties": properties})


def _refuse_old_modality_names(node: Any, where: str = "") -> None:
    """A modality written by its old name (``methods.audio``, ``modalities: [audio]``) stops the workflow with
    the new name, instead of an unknown-key error or, worse, a second set of runs."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{where}.{key}" if where else str(key)
            if (message := renamed_modality(key)) is not None:
                raise WorkflowConfigError(f"{dotted}: {message} (runs made under the old name are in "
                                          f"runs/{key}/: move them to runs/{RENAMED_MODALITIES[key]}/ to keep them)")
            _refuse_old_modality_names(value, dotted)
    elif isinstance(node, list) and where == "modalities":
        for i, value in enumerate(node):
            if (message := renamed_modality(value)) is not None:
                raise WorkflowConfigError(f"modalities[{i}]: {message}")


def check_schema(config: dict[str, Any], schema_path: str | Path) -> None:
    """Check ``config``'s shape against the workflow schema and fill its defaults in place; the enums the
    engine's models own are added from them (:func:`_model_enums`). Raises :class:`WorkflowConfigError`
    naming the key."""
    import jsonschema           # only the Snakefile checks the schema, not the rules' helper processes

    _refuse_old_modality_names(config)
    schema = yaml.safe_load(Path(schema_path).read_text())
    for where, values in _model_enums().items():
        node = schema
        for key in where:
            node = node[key]
        node["enum"] = values
    schema["definitions"]["slurm_resources"].update(properties=_slurm_resources(), additionalProperties=False)
    error = jsonschema.exceptions.best_match(_filling_defaults(jsonschema.Draft202012Validator)(schema)
                                             .iter_errors(config))
    if error is not None:
        raise WorkflowConfigError(schema_error(error))


def _check_data(config: Mapping[str, Any], modalities) -> None:
    """The data config is valid and the external data it points at exists (the embedded data is made by
    prepare-data, so only its sources are checked)."""
    from d2v2.config import validate
    from d2v2.data import DataConfig
    from d2v2.data.common import MissingDataError, require_path

    try:
        data = validate(DataConfig, active_data(config), where="data")
    except ConfigError as err:
        raise WorkflowConfigError(str(err)) from None
    checks = []
    if "image" in modalities:
        if data.image.dataset == "imagenet":
            checks.append(("data.image.imagenet_dir", data.image.imagenet_dir))
        else:
            checks.append(("data.image.fmnist_source", data.image.fmnist_source))
    if "speech" in modalities:
        if data.speech.source == "manifest":
            checks.append(("data.speech.manifest_dir", data.speech.manifest_dir))
        elif data.speech.source == "librispeech":
            checks.append(("data.speech.librispeech_root", data.speech.librispeech_root))
    if "text" in modalities and data.text.corpus == "raw":
        checks += [("data.text.gpt2_vocab", data.text.gpt2_vocab), ("data.text.gpt2_merges", data.text.gpt2_merges)]
        checks += [(f"data.text.train_shards[{i}]", p) for i, p in enumerate(data.text.train_shards)]
        checks += [(f"data.text.valid_shards[{i}]", p) for i, p in enumerate(data.text.valid_shards)]
        if data.text.glue_dir is not None:
            checks.append(("data.text.glue_dir", data.text.glue_dir))
    for key, path in checks:
        try:
            require_path(path, key)
        except MissingDataError as err:
            raise WorkflowConfigError(f"missing data: {err}") from None


def validate_workflow(config: Mapping[str, Any]) -> list[Run]:
    """Validate everything a run needs, before any job is scheduled; return the runs.

    Raises :class:`WorkflowConfigError` naming the key (``budget.speech``, ``methods.text``,
    ``ablations.image.data2vec2 variant decoder.depth=0: method.decoder.depth: ...``, ``slurm.partition``).
    """
    from d2v2.engine.ftconfig import finetune_config
    from d2v2.engine.runconfig import resolve_run_config

    for modality in config["modalities"]:
        if not config["methods"].get(modality):
            raise WorkflowConfigError(f"methods.{modality}: no methods listed for modality '{modality}'")
        if modality not in config["budget"]:
            raise WorkflowConfigError(f"budget.{modality}: missing (one matched budget per modality: kind + value)")
    for modality, per_method in config["ablations"].items():
        for method in per_method:
            if method not in config["methods"].get(modality, []):
                raise WorkflowConfigError(f"ablations.{modality}.{method}: '{method}' is not in methods.{modality}")
    if config["launcher"]["backend"] == "slurm":
        from d2v2.launch.slurm import SlurmOptions

        for kind in ("pretrain", "finetune"):     # the options each kind of job is submitted with
            try:
                SlurmOptions.for_job(config["slurm"], kind, config["launcher"][f"{kind}_threads"])
            except ConfigError as err:
                raise WorkflowConfigError(str(err)) from None
    for modality in config.get("budget_sweep", {}):
        budget_sweep(config, modality)
    tags = [fraction_tag(f) for f in config["checkpoint_fractions"]]
    if len(set(tags)) != len(tags):             # checkpoint and metrics file names keep 3 decimals
        raise WorkflowConfigError(f"checkpoint_fractions: {list(config['checkpoint_fractions'])} has fractions "
                                  "equal to 3 decimals (they would share a checkpoint file)")
    for modality, fractions in config.get("finetune_fractions", {}).items():
        extra = sorted(set(fractions) - set(config["checkpoint_fractions"]))
        if extra:
            raise WorkflowConfigError(f"finetune_fractions.{modality}: {extra} not in checkpoint_fractions "
                                      f"{list(config['checkpoint_fractions'])}")
    _check_data(config, config["modalities"])
    try:
        runs = expand_runs(config)
    except WorkflowConfigError as err:
        raise WorkflowConfigError(f"ablations: {err}") from None
    for run in runs:
        try:
            resolve_run_config(run_config(config, run))
        except ConfigError as err:
            if run.variant != "default":
                where = f"ablations.{run.modality}.{run.method} variant {run.variant}"
            elif str(err).startswith("method:"):
                where = f"methods.{run.modality}"
            else:
                where = f"pretrain ({run.modality}/{run.method})"
            raise WorkflowConfigError(f"{where}: {err}") from None
    for owner in label_chains(config, runs).values():
        _check_hubert(config, owner)
    for run in {r.modality: r for r in runs}.values():
        try:
            finetune_config(finetune_request(config, run, 1.0))
        except ConfigError as err:
            raise WorkflowConfigError(f"finetune.{run.modality}: {err}") from None
        if config["finetune_random_init"]:
            try:
                finetune_config(random_init_request(config, run.modality, run.seed))
            except ConfigError as err:
                raise WorkflowConfigError(f"finetune.{run.modality} (random init): {err}") from None
    return runs


def _check_hubert(config: Mapping[str, Any], run: Run) -> None:
    """The label chain of a HuBERT run: its iteration-1 config and the layer it clusters exist."""
    from d2v2.engine.runconfig import resolve_run_config
    from d2v2.method import method_config

    try:
        cfg = resolve_run_config(hubert_iteration1_config(config, run))
    except ConfigError as err:
        raise WorkflowConfigError(f"hubert (iteration 1 of {run.key}): {err}") from None
    depth = method_config(run.modality, HUBERT, config["preset"], cfg.method.overrides).encoder.depth
    if config["hubert"]["layer"] > depth:
        raise WorkflowConfigError(f"hubert.layer: {config['hubert']['layer']} but the {config['preset']} "
                                  f"encoder has {depth} blocks")
