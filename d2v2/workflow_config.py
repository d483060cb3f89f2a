"""The workflow's run matrix and its DAG-build-time validation (used by the Snakefile).

The workflow config (``config/config.yaml`` laid over ``config/presets/<preset>.yaml``, shape checked by
``workflow/schemas/config.schema.yaml``) names modalities, methods per modality, seeds, one matched
budget per modality, the checkpoint fractions, the fine-tuning task per modality and ablations. This
module turns it into runs and per-run configs, and validates every one of them with the engine's own
models (:func:`d2v2.engine.runconfig.resolve_run_config`, :func:`d2v2.engine.ftconfig.finetune_config`)
before Snakemake schedules anything: a bad key, an impossible value or a missing data path fails the
whole workflow at DAG-build time with a message that names the key.

Ablations: ``ablations: {image: {data2vec2: {num_masks: [1, 2, 4], decoder.depth: [1, 3]}}}`` adds
variant runs next to each method's ``default`` run. ``ablation_mode: one_at_a_time`` (default; the
paper's ablations, METHOD.md#paper-results) varies one field at a time (variants ``num_masks=1``, ``num_masks=2``,
..., ``decoder.depth=3``); ``grid`` runs every combination (``decoder.depth=1,num_masks=2``). Paths
hold modality/method/variant/seed, so variants never share outputs, and each run's Snakemake params
hold only that run's own config: editing an ablation list adds or removes only the affected jobs.

Budget sweeps (the paper's protocol, PROTOCOL.md#protocols): ``budget_sweep: {image: [0.125, 0.25, 0.5, 1.0]}``
adds, for every run of the modality, a separate run per listed fraction ``s < 1`` of the modality's budget,
with every schedule fitted to its own budget ``s x budget`` and only its final checkpoint kept and
fine-tuned (``.../seed0-budget0.250``); the full-budget run (``.../seed0``) is the sweep's point at 1.0 and
still gives the anytime points (its checkpoints at ``checkpoint_fractions``).
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from d2v2.atomic import atomic_write_json
from d2v2.config import ConfigError, merge

__all__ = ["WorkflowConfigError", "Run", "coerce_scalars", "with_preset", "variants", "expand_runs", "run_config",
           "data_key", "finetune_fractions", "finetune_request", "random_init_request", "schema_error",
           "validate_workflow", "fraction_tag", "launch_command", "prepare_run_dir", "DATA_MODALITY", "active_data",
           "LABEL_CHAIN_METHODS", "chain_owner", "label_chains", "hubert_chain", "hubert_labels_args",
           "hubert_iteration1_config"]

DATA_MODALITY = {"image": "image", "audio": "speech", "text": "text"}   # method modality -> data modality


class WorkflowConfigError(ValueError):
    """A problem in the workflow config, found before any job runs; the message names the key."""


@dataclass(frozen=True)
class Run:
    """One pretraining run: (modality, method, variant, seed) at ``budget_scale`` x the modality's budget
    (1: the full run; less: a budget sweep's run); ``params`` are the variant's dotted fields."""

    modality: str
    method: str
    variant: str
    seed: int
    params: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    budget_scale: float = 1.0

    @property
    def sweep(self) -> str:
        """The run folder's suffix: empty for the full run, ``-budget0.250`` for a sweep's run."""
        return "" if self.budget_scale == 1.0 else f"-budget{fraction_tag(self.budget_scale)}"

    @property
    def key(self) -> str:
        """The run's path below the runs/metrics folders: ``modality/method/variant/seed<seed>[-budget<s>]``."""
        return f"{self.modality}/{self.method}/{self.variant}/seed{self.seed}{self.sweep}"

    @property
    def fractions(self) -> list[float] | None:
        """A sweep run keeps only its final checkpoint; ``None``: the config's checkpoint fractions."""
        return None if self.budget_scale == 1.0 else [1.0]


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)$")
_WORDS = {"true": True, "false": False, "null": None}


def coerce_scalars(value: Any) -> Any:
    """Numbers, ``true``/``false`` and ``null`` written as strings, read back as such.

    Snakemake parses nested ``--config key='{a: 2}'`` values with YAML's BaseLoader, which leaves every
    scalar a string (``'2'``); this restores the types a YAML file would have given.
    """
    if isinstance(value, Mapping):
        return {k: coerce_scalars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_scalars(v) for v in value]
    if isinstance(value, str):
        if value in _WORDS:
            return _WORDS[value]
        if _NUMBER.match(value):
            return int(value) if value.lstrip("+-").isdigit() else float(value)
    return value


def with_preset(config: Mapping[str, Any], presets_dir: str | Path) -> dict[str, Any]:
    """``config`` (scalars coerced, see :func:`coerce_scalars`) laid over ``presets_dir/<preset>.yaml``."""
    config = coerce_scalars(config)
    name = config.get("preset", "tiny")
    path = Path(presets_dir) / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))
        raise WorkflowConfigError(f"preset: '{name}' unknown (have {', '.join(have)})")
    preset = yaml.safe_load(path.read_text()) or {}
    return merge(preset, config)


def schema_error(err: Exception) -> str:
    """A one-line message naming the key, from the jsonschema error inside Snakemake's ``validate`` error."""
    chain = [err.__cause__, err.__context__, *getattr(err, "args", ())]
    cause = next((c for c in chain if hasattr(c, "absolute_path")), None)
    if cause is None:
        return str(err)
    key = ""
    for part in cause.absolute_path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    message = cause.message
    if cause.validator == "additionalProperties":
        unknown = sorted(set(cause.instance) - set(cause.schema.get("properties", {})))
        allowed = ", ".join(sorted(cause.schema.get("properties", {})))
        return "; ".join(f"{key + '.' if key else ''}{u}: unknown key (valid keys: {allowed})" for u in unknown)
    return f"{key or 'config'}: {message}"


def finetune_fractions(config: Mapping[str, Any], run: Run) -> list[float]:
    """The checkpoint fractions fine-tuned for ``run`` (``finetune_fractions`` of its modality, default: all
    kept; a sweep's run: its final checkpoint)."""
    return run.fractions or list(config.get("finetune_fractions", {}).get(run.modality)
                                 or config["checkpoint_fractions"])


def budget_sweep(config: Mapping[str, Any], modality: str) -> list[float]:
    """The budget fractions of ``modality``'s sweep below 1 (``budget_sweep``; each is a separate run).

    Raises :class:`WorkflowConfigError` naming ``budget_sweep.<modality>`` for an empty, unsorted or
    repeating list or a value outside (0, 1]."""
    values = config.get("budget_sweep", {}).get(modality)
    if values is None:
        return []
    key = f"budget_sweep.{modality}"
    if not isinstance(values, list) or not values:
        raise WorkflowConfigError(f"{key}: expected a non-empty list of budget fractions in (0, 1] (got {values!r})")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1]
    if bad:
        raise WorkflowConfigError(f"{key}: {bad} not in (0, 1] (fractions of budget.{modality})")
    if len({fraction_tag(v) for v in values}) != len(values):
        raise WorkflowConfigError(f"{key}: repeated values in {values}")
    if list(values) != sorted(values):
        raise WorkflowConfigError(f"{key}: {values} is not sorted (write the fractions in increasing order)")
    return [float(v) for v in values if v < 1.0]


def fraction_tag(fraction: float) -> str:
    """How a budget fraction appears in file names (the engine's ``checkpoint_f{fraction:.3f}.pt``)."""
    return f"{fraction:.3f}"


def _format_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if "/" in text or text.startswith("."):
        raise WorkflowConfigError(f"ablation value {value!r} cannot appear in a path")
    return text


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"decoder.depth": 3}`` -> ``{"decoder": {"depth": 3}}`` (method overrides)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return out


def variants(fields: Mapping[str, Any], mode: str = "one_at_a_time") -> list[tuple[str, dict[str, Any]]]:
    """``[(name, params)]``: the ``default`` variant, then the ablation variants of ``fields``."""
    for key, values in fields.items():
        if not isinstance(values, list) or not values:
            raise WorkflowConfigError(f"{key}: expected a non-empty list of values (got {values!r})")
    out: list[tuple[str, dict[str, Any]]] = [("default", {})]
    keys = sorted(fields)
    if mode == "grid":
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*(fields[k] for k in keys))] if keys else []
    else:
        combos = [{k: v} for k in keys for v in fields[k]]
    for params in combos:
        out.append((",".join(f"{k}={_format_value(v)}" for k, v in params.items()), params))
    return out


def expand_runs(config: Mapping[str, Any]) -> list[Run]:
    """Every pretraining run of the config, in a stable order (each full run before its budget sweep's runs)."""
    runs = []
    for modality in config["modalities"]:
        scales = [1.0, *budget_sweep(config, modality)]
        for method in config["methods"].get(modality, []):
            fields = config["ablations"].get(modality, {}).get(method, {})
            for name, params in variants(fields, config["ablation_mode"]):
                runs += [Run(modality, method, name, seed, params, scale) for scale in scales
                         for seed in config["seeds"]]
    return runs


def run_config(config: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The pretraining run config (PretrainRunConfig fields) of ``run``: only what this run depends on."""
    pre = config["pretrain"]
    cfg = merge(merge(pre.get("common", {}), pre.get(run.modality, {})),
                pre.get("per_method", {}).get(run.modality, {}).get(run.method, {}))
    method_overrides = merge(cfg.pop("method", {}).get("overrides", {}), _nest(run.params))
    budget = dict(config["budget"][run.modality])
    if run.sweep:                         # a full run's budget stays as written (its params, hence its job, unchanged)
        budget = _scaled(budget, run.budget_scale)
    cfg = merge(cfg, {
        "method": {"modality": run.modality, "name": run.method, "preset": config["preset"],
                   "overrides": method_overrides},
        "data": active_data(config),
        "budget": budget,
        "checkpoint": {"fractions": run.fractions or list(config["checkpoint_fractions"])},
        "seed": run.seed,
    })
    if run.method not in LABEL_CHAIN_METHODS:
        return cfg
    chain = hubert_chain(config, run)
    return {**_hubert_labels(config, run, cfg, 2),
            "input_costs": [f"{chain}/{step}" for step in HUBERT_INPUT_COSTS]}


# ---- HuBERT's label chain (METHOD.md#baseline-hubert) ------------------------------------------------------
# MFCC labels -> iteration 1 (its own run, iteration1_budget x the run's budget) -> labels of its block
# `layer` -> the compared run (iteration 2, the run's budget). The chain of a run lives next to the runs,
# in hubert_chain/<variant>/seed<seed>[-budget<s>]/, so that replacing the compared run's folder (its
# config changed) never takes its labels with it. WavLM trains on the same labels (METHOD.md#baseline-wavlm):
# a WavLM run reads the chain of the default HuBERT run of its seed and budget.
HUBERT = "hubert"
LABEL_CHAIN_METHODS = (HUBERT, "wavlm")        # audio methods whose runs train on a chain's second labels
# what the compared run's inputs cost (PROTOCOL.md#input-costs), in its chain folder
HUBERT_INPUT_COSTS = ("labels1/labels.json", "iteration1/summary.json", "labels2/labels.json")


def chain_owner(run: Run) -> Run:
    """The HuBERT run whose label chain ``run`` (a HuBERT or WavLM run) trains on: a HuBERT run's own (its
    variant's iteration 1), a WavLM run's the default HuBERT run's of the same seed and budget."""
    if run.method == HUBERT:
        return run
    return Run(run.modality, HUBERT, "default", run.seed, budget_scale=run.budget_scale)


def label_chains(config: Mapping[str, Any], runs) -> dict[str, Run]:
    """Every label chain ``runs`` need: its folder -> the HuBERT run it belongs to."""
    owners = [chain_owner(r) for r in runs if r.method in LABEL_CHAIN_METHODS]
    return {hubert_chain(config, owner): owner for owner in owners}


def hubert_chain(config: Mapping[str, Any], run: Run) -> str:
    """The folder of ``run``'s label chain: ``labels1/``, ``iteration1/`` (a run dir), ``labels2/``."""
    owner = chain_owner(run)
    return f"{config['paths']['runs']}/hubert_chain/{owner.variant}/seed{owner.seed}{owner.sweep}"


def hubert_labels_args(config: Mapping[str, Any], run: Run, iteration: int) -> list[str]:
    """The ``python -m d2v2 hubert-labels`` arguments of ``run``'s labels for ``iteration`` (1: MFCC
    clusters; 2: clusters of iteration 1's block ``layer``), written to ``<chain>/labels<iteration>/``."""
    chain, settings = hubert_chain(config, run), config["hubert"]
    args = ["--data", json.dumps(active_data(config), sort_keys=True),
            "--out", f"{chain}/labels{iteration}", "--clusters", str(settings["clusters"][iteration - 1]),
            "--percent", str(settings["percent"]), "--seed", str(run.seed)]
    if iteration == 2:
        args += ["--checkpoint", f"{chain}/iteration1/checkpoints/checkpoint_f1.000.pt", "--layer",
                 str(settings["layer"])]
    return args


def _hubert_labels(config: Mapping[str, Any], run: Run, cfg: dict[str, Any], iteration: int) -> dict[str, Any]:
    """``cfg`` (a HuBERT or WavLM run config) reading ``run``'s labels of ``iteration``: their file, cluster
    count and rate (MFCCs: 100 per second; a model's layer: its frame rate)."""
    from baselines.hubert import MFCC_RATE, HubertConfig
    from d2v2.config import validate
    from d2v2.data import SpeechDataConfig
    from d2v2.method import method_config
    from d2v2.modalities.audio import receptive_field

    sample_rate = validate(SpeechDataConfig, cfg["data"].get("speech", {}), where="data.speech").sample_rate
    if iteration == 1:
        rate = MFCC_RATE
    else:
        encoder = method_config(run.modality, run.method, config["preset"], cfg["method"]["overrides"]).encoder
        rate = sample_rate / receptive_field(encoder.audio.conv_layers)[1]
    labels = {"num_classes": config["hubert"]["clusters"][iteration - 1], "label_rate": rate}
    if sample_rate != HubertConfig.model_fields["sample_rate"].default:    # the frames' labels need the data's rate
        labels["sample_rate"] = sample_rate
    return merge(cfg, {
        "method": {"overrides": labels},
        "data": {"speech": {"pretrain_labels": f"{hubert_chain(config, run)}/labels{iteration}/pretrain.km"}}})


def hubert_iteration1_config(config: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The run config of ``run``'s iteration 1: on the MFCC labels, ``iteration1_budget`` x its budget, its
    final checkpoint kept (the one clustered for iteration 2)."""
    cfg = _hubert_labels(config, run, {k: v for k, v in run_config(config, run).items() if k != "input_costs"}, 1)
    return {**cfg, "budget": _scaled(cfg["budget"], config["hubert"]["iteration1_budget"]),
            "checkpoint": {**cfg["checkpoint"], "fractions": [1.0]}}


def _scaled(budget: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """``budget`` x ``scale``; a count of updates stays a whole number, at least 1."""
    value = budget["value"] * scale
    return {**budget, "value": max(1, round(value)) if budget["kind"] == "updates" else value}


def active_data(config: Mapping[str, Any]) -> dict[str, Any]:
    """The data config without the sections of data modalities the workflow does not run: their
    paper-scale paths may be unset (``base`` with ``modalities=[image]``) and must not fail validation."""
    used = {DATA_MODALITY[m] for m in config["modalities"]}
    return {k: v for k, v in config["data"].items() if k not in DATA_MODALITY.values() or k in used}


def data_key(config: Mapping[str, Any], data_modality: str) -> str:
    """The part of the data config that one data modality's preparation depends on (its params)."""
    data = config["data"]
    return json.dumps({"root": data.get("root", "data"), data_modality: data.get(data_modality, {})}, sort_keys=True)


def finetune_request(config: Mapping[str, Any], run: Run, fraction: float) -> dict[str, Any]:
    """The fine-tuning config (FinetuneConfig fields) of ``run``'s checkpoint at ``fraction``."""
    ft = config["finetune"]
    cfg = merge(ft.get("common", {}), ft.get(run.modality, {}))
    return merge(cfg, {
        "modality": run.modality, "preset": config["preset"], "data": active_data(config),
        "identity": {"variant": run.variant, "params": dict(run.params), "seed": run.seed,
                     "budget_fraction": fraction, **({"budget_scale": run.budget_scale} if run.sweep else {})},
    })


def random_init_request(config: Mapping[str, Any], modality: str, seed: int) -> dict[str, Any]:
    """Fine-tuning of a randomly initialised encoder (data2vec 2.0's architecture): the no-pretraining
    reference every method should beat."""
    ft = config["finetune"]
    cfg = merge(ft.get("common", {}), ft.get(modality, {}))
    return merge(cfg, {
        "modality": modality, "preset": config["preset"], "data": active_data(config), "seed": seed,
        "init": "random", "arch": {"method": "data2vec2", "preset": config["preset"]},
        "identity": {"variant": "default", "seed": seed, "budget_fraction": 0.0},
    })


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
    if "audio" in modalities:
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

    Raises :class:`WorkflowConfigError` naming the key (``budget.audio``, ``methods.text``,
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
    if config["launcher"]["backend"] == "slurm" and not config["slurm"].get("partition"):
        raise WorkflowConfigError("slurm.partition: required when launcher.backend is slurm "
                                  "(set it in the slurm profile or with --config slurm='{partition: NAME}')")
    for modality in config.get("budget_sweep", {}):
        budget_sweep(config, modality)
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


def launch_command(config: Mapping[str, Any], kind: str, name: str, folder: str,
                   job_file: str | None = None) -> str:
    """The ``python -m d2v2 launch ... --`` prefix of a training rule's shell command (kind: pretrain|finetune).

    A Snakemake shell template: ``name``, ``folder`` and ``job_file`` are inserted as given, as shell words
    (the rules pass quoted placeholders such as ``{params.job_file:q}``); everything taken from the config
    is shell-quoted and has its braces escaped.
    """
    def lit(value: Any) -> str:
        return str(value).replace("{", "{{").replace("}", "}}")

    launcher = config["launcher"]
    threads = launcher[f"{kind}_threads"]
    args = [lit(sys.executable), "-m", "d2v2", "launch", "--backend", launcher["backend"], "--threads", str(threads)]
    if launcher["backend"] == "slurm":
        slurm = config["slurm"]
        res = dict(slurm.get(kind, {}))
        opts = {"partition": slurm["partition"], "account": slurm.get("account"), "qos": slurm.get("qos"),
                "constraint": slurm.get("constraint"), "cpus_per_task": threads}
        opts.update({k: v for k, v in res.items() if k not in ("setup", "sbatch") and v is not None})
        args += ["--name", "{name}", "--folder", "{folder}", "--poll-s", str(launcher["poll_s"])]
        for key, value in opts.items():
            if value is not None:
                args += ["--" + key.replace("_", "-"), lit(value)]
        for line in list(slurm.get("setup", [])) + list(res.get("setup", [])):
            args += ["--setup", lit(line)]
        for key, value in merge(slurm.get("sbatch", {}), res.get("sbatch", {})).items():
            args += ["--sbatch", lit(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")]
        if job_file:
            args += ["--job-file", "{job_file}"]
        if kind == "pretrain":
            args += ["--checkpointable", "--grace-s", str(launcher["grace_s"])]
    words = {"{name}": name, "{folder}": folder, "{job_file}": job_file}
    return " ".join(words.get(arg) or shlex.quote(arg) for arg in args) + " --"


def prepare_run_dir(run_dir: str | Path, request: Mapping[str, Any]) -> Path | None:
    """Make ``run_dir`` ready for ``request``: a run dir holding another config is moved aside.

    The pretraining runner resumes a run dir only with the same config (and refuses otherwise). When
    Snakemake re-runs a run because its config changed, the old run is kept as
    ``<run_dir>.replaced-<UTC time>`` (never deleted) and the new one starts fresh. Returns the new
    location of the old run, if one was moved.
    """
    from d2v2.engine.runconfig import config_differences, resolve_run_config

    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    new = resolve_run_config(request).model_dump(mode="json")
    if not config_differences(yaml.safe_load(saved.read_text()) or {}, new):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    run_dir.rename(moved)
    return moved


def main(argv: list[str] | None = None) -> int:
    """``python -m d2v2.workflow_config prepare-run RUN_DIR REQUEST_JSON``: what the pretrain rule runs before
    launching: move a run dir holding another config aside (:func:`prepare_run_dir`), write ``RUN_DIR/run.yaml``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "prepare-run":
        print("usage: python -m d2v2.workflow_config prepare-run RUN_DIR REQUEST_JSON", file=sys.stderr)
        return 2
    run_dir, request = Path(args[1]), json.loads(args[2])
    moved = prepare_run_dir(run_dir, request)
    if moved is not None:
        print(f"{run_dir}: its config changed; the previous run was moved to {moved}")
    atomic_write_json(run_dir / "run.yaml", request)        # JSON is YAML
    return 0


if __name__ == "__main__":
    sys.exit(main())
