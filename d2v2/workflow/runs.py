"""The workflow's runs and their configs: the run matrix (methods x ablation variants x seeds x budget sweep),
each run's pretraining and fine-tuning config, and HuBERT's label chain (the package docstring has the whole
picture).
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping


from d2v2.config import MODALITIES, ConfigError, merge
from d2v2.presets import MODEL_KEYS, load_preset

__all__ = ["MODALITIES", "WorkflowConfigError", "Run", "coerce_scalars", "with_preset", "run_field", "variants",
           "expand_runs", "run_config", "data_key", "finetune_fractions", "finetune_request", "random_init_request",
           "schema_error", "fraction_tag", "budget_sweep", "active_data", "LABEL_CHAIN_METHODS", "HUBERT",
           "HUBERT_INPUT_COSTS", "chain_owner", "label_chains", "hubert_chain", "hubert_labels_args",
           "hubert_iteration1_config", "job_priority", "PRIORITY_STAGES"]


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


def with_preset(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (scalars coerced, see :func:`coerce_scalars`) laid over its preset
    (``d2v2/presets/<preset>.yaml``, :mod:`d2v2.presets`)."""
    config = coerce_scalars(config)
    for key in MODEL_KEYS:
        if key in config:
            raise WorkflowConfigError(
                f"{key}: the models are the preset's (d2v2/presets/<preset>.yaml); change a method's settings for "
                f"the workflow with pretrain.per_method.<modality>.<method>.method.overrides or ablations")
    try:
        preset = load_preset(config.get("preset", "tiny"))
    except ConfigError as err:
        raise WorkflowConfigError(str(err)) from None
    return merge({k: v for k, v in preset.items() if k not in MODEL_KEYS}, config)


def schema_error(err: Exception) -> str:
    """A one-line message naming the key, from a jsonschema error (or one inside another error)."""
    chain = [err, err.__cause__, err.__context__, *getattr(err, "args", ())]
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


# An ablation field is a method field (``num_masks``, ``decoder.depth``), or with this prefix a field of the
# pretraining run config (``pretrain.optim.lr``), except those the run matrix sets for every run.
PRETRAIN_FIELD = "pretrain."
MATRIX_KEYS = ("method", "data", "budget", "checkpoint", "seed", "input_costs")


def run_field(name: str) -> str | None:
    """The run config path of an ablation field (``pretrain.optim.lr`` -> ``optim.lr``); None for a method field."""
    return name[len(PRETRAIN_FIELD):] if name.startswith(PRETRAIN_FIELD) else None


def variants(fields: Mapping[str, Any], mode: str = "one_at_a_time") -> list[tuple[str, dict[str, Any]]]:
    """``[(name, params)]``: the ``default`` variant, then the ablation variants of ``fields``."""
    for key, values in fields.items():
        if not isinstance(values, list) or not values:
            raise WorkflowConfigError(f"{key}: expected a non-empty list of values (got {values!r})")
        field_path = run_field(key)
        if field_path is not None:
            if not field_path or field_path.split(".")[0] in MATRIX_KEYS:
                raise WorkflowConfigError(
                    f"{key}: not a field an ablation can vary: the run matrix sets {', '.join(MATRIX_KEYS)} "
                    f"(method fields are written without the '{PRETRAIN_FIELD}' prefix)")
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
    run_fields = {run_field(k): v for k, v in run.params.items() if run_field(k) is not None}
    method_fields = {k: v for k, v in run.params.items() if run_field(k) is None}
    cfg = merge(cfg, _nest(run_fields))
    method_overrides = merge(cfg.pop("method", {}).get("overrides", {}), _nest(method_fields))
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
    from d2v2.config import validate
    from d2v2.data import SpeechDataConfig
    from d2v2.method import method_config
    from d2v2.model.modalities.speech import receptive_field

    sample_rate = validate(SpeechDataConfig, cfg["data"].get("speech", {}), where="data.speech").sample_rate
    method = method_config(run.modality, run.method, config["preset"], cfg["method"]["overrides"])
    defaults = type(method).model_fields                 # HuBERT's and WavLM's: MFCC labels at 16 kHz
    if iteration == 1:
        rate = defaults["label_rate"].default
    else:
        rate = sample_rate / receptive_field(method.encoder.speech.conv_layers)[1]
    labels = {"num_classes": config["hubert"]["clusters"][iteration - 1], "label_rate": rate}
    if sample_rate != defaults["sample_rate"].default:    # the frames' labels need the data's rate
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
    """The data config without the sections of modalities the workflow does not run: their
    paper-scale paths may be unset (``base`` with ``modalities=[image]``) and must not fail validation."""
    return {k: v for k, v in config["data"].items() if k not in MODALITIES or k in config["modalities"]}


def data_key(config: Mapping[str, Any], modality: str) -> str:
    """The part of the data config that one modality's data preparation depends on (its params)."""
    data = config["data"]
    return json.dumps({"root": data.get("root", "data"), modality: data.get(modality, {})}, sort_keys=True)


def _finetune_recipe(config: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """``finetune.common`` with ``finetune.<modality>`` over it, for ``modality`` of the preset; its ``data``
    settings over the workflow's ``data``."""
    ft = config["finetune"]
    cfg = merge(ft.get("common", {}), ft.get(modality, {}))
    return merge(cfg, {"modality": modality, "preset": config["preset"],
                       "data": merge(active_data(config), cfg.get("data", {}))})


def finetune_request(config: Mapping[str, Any], run: Run, fraction: float) -> dict[str, Any]:
    """The fine-tuning config (FinetuneConfig fields) of ``run``'s checkpoint at ``fraction``."""
    return merge(_finetune_recipe(config, run.modality), {
        "identity": {"variant": run.variant, "params": dict(run.params), "seed": run.seed,
                     "budget_fraction": fraction, **({"budget_scale": run.budget_scale} if run.sweep else {})},
    })


def random_init_request(config: Mapping[str, Any], modality: str, seed: int) -> dict[str, Any]:
    """Fine-tuning of a randomly initialised encoder (data2vec 2.0's architecture): the no-pretraining
    reference every method should beat."""
    return merge(_finetune_recipe(config, modality), {
        "seed": seed, "init": "random", "arch": {"method": "data2vec2", "preset": config["preset"]},
        "identity": {"variant": "default", "seed": seed, "budget_fraction": 0.0},
    })


PRIORITY_STAGES = ("finetune", "pretrain", "label_chain")


def job_priority(config: Mapping[str, Any], modality: str, stage: str) -> int:
    """Snakemake priority of a training job (when jobs wait for cores, the highest runs first; results never
    depend on it). On a few cores the DAG ends when its longest chain of jobs does, so jobs go by the work
    still behind them (docs/ARCHITECTURE.md, "Workflow and launchers"): HuBERT's label chains, then
    every pretraining run, then the fine-tunes; within each stage, modalities with longer fine-tunes first
    (the recipe's update count; an ``epochs`` budget counts as none, after the others). Values stay far
    below ``prepare_data``'s 1000, which must outrank any two jobs together (Snakemake sums them).
    """
    if stage not in PRIORITY_STAGES:
        raise ValueError(f"job_priority: stage '{stage}' is not one of {PRIORITY_STAGES}")

    from d2v2.engine.ftconfig import BudgetConfig

    def updates(m: str) -> float:
        budget = BudgetConfig.model_validate(_finetune_recipe(config, m).get("budget", {}))   # with its defaults
        return budget.value if budget.kind == "updates" else 0.0

    order = sorted(config["modalities"], key=updates)           # shortest fine-tunes first: rank 1
    rank = order.index(modality) + 1 if modality in order else 0
    return 10 * PRIORITY_STAGES.index(stage) + rank
