"""Fine-tune one pretrained encoder on a labelled task and write its metrics file (METHOD.md#fine-tuning).

``python -m d2v2 finetune --config ft.yaml --checkpoint CKPT --out METRICS.json [key=value ...]``

The recipe is the same for every pretraining method: only the checkpoint's Encoder is used
(``build_method(...).encoder()`` with the student weights), a task head is put on top
(:mod:`d2v2.engine.heads`), and it is trained with AdamW, optional layer-wise LR decay and the schedule
of :mod:`d2v2.engine.optim` evaluated on the fraction of the fine-tuning budget consumed. With an LR sweep
every learning rate is trained from the same checkpoint and seed; the run with the best *validation*
primary metric is kept and only that one is scored on the test split(s) (never selecting on test).
``init: random`` fine-tunes the same architecture from random weights (the "does pretraining help"
reference, reported at budget fraction 0).

The metrics file follows docs/ARCHITECTURE.md: ``identity``, the pretraining clocks stored in the
checkpoint (``pretrain``), ``metrics`` named ``<split>_<metric>``, ``primary_metric`` (a key of
``metrics``), ``higher_is_better``, ``provenance``, plus the fine-tuning clock and resolved config.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from d2v2 import data as D
from d2v2.config import ConfigError, apply_overrides, load_yaml, merge, validate
from d2v2.atomic import atomic_write_json
from d2v2.data.speech import BLANK, LETTERS, ids_to_letters, letters_to_words
from d2v2.data.text import load_tokenizer
from d2v2.engine import metrics as M
from d2v2.engine.checkpoint import CheckpointError, encoder_state_dict, load_checkpoint, save_checkpoint
from d2v2.engine.clock import synchronize
from d2v2.engine.errors import EXIT_USER_ERROR, USER_ERRORS
from d2v2.engine.ftconfig import FinetuneConfig, finetune_config
from d2v2.engine.heads import CTCRecognizer, FrozenFeatureCache, ImageClassifier, SentenceClassifier
from d2v2.engine.optim import OptimConfig, build_optimizer, param_groups, set_lr
from d2v2.engine.precision import autocast, loss_scaler
from d2v2.engine.provenance import provenance
from d2v2.engine.sampler import LengthBucketedBatchSampler
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.method import build_method

__all__ = ["Pretrained", "load_pretrained", "build_encoder", "build_model", "resolve_device", "make_loader", "train",
           "evaluate", "sweep_lr", "finetune", "resolve_config", "main"]

PRETRAIN_CLOCKS = ("train_time_s", "e2e_time_s", "device_hours", "device_count", "updates", "samples", "epochs",
                   "train_cpu_s")
OPTIONAL_CLOCKS = ("train_cpu_s",)          # absent from checkpoints written before it was recorded


# ----------------------------------------------------------------------------------------------------
# What is being fine-tuned
# ----------------------------------------------------------------------------------------------------
@dataclass
class Pretrained:
    """The encoder to start from and what the metrics file needs to say about it."""

    modality: str
    method: str                                     # registry name, e.g. "data2vec2"
    encoder_config: dict[str, Any]                  # EncoderConfig of the pretraining run, as a dict
    encoder_state: dict[str, torch.Tensor] | None   # None: random initialisation
    seed: int | None = None
    budget_fraction: float = 0.0
    clocks: dict[str, float] = field(default_factory=lambda: {k: 0 for k in PRETRAIN_CLOCKS})
    provenance: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None            # clocks of what made the run's inputs (PROTOCOL.md#input-costs)
    method_config: dict[str, Any] | None = None     # the pretraining run's method config (None: not recorded)
    run_config: dict[str, Any] | None = None        # the pretraining run's PretrainRunConfig (None: not recorded)


def _from_checkpoint(ckpt: dict[str, Any], path: Path) -> Pretrained:
    """Read a pretraining checkpoint written by d2v2.engine.pretrain (or converted from fairseq).

    ``checkpoint_last.pt`` has no nominal budget fraction: the fraction consumed is reported instead.
    """
    try:
        ident, clocks = ckpt["identity"], ckpt["pretrain"]
        fraction = ckpt["budget_fraction"] if ckpt.get("budget_fraction") is not None else ckpt["fraction_consumed"]
        return Pretrained(
            modality=ident["modality"], method=ident["method"], encoder_config=dict(ckpt["encoder_config"]),
            encoder_state=encoder_state_dict(ckpt), seed=ident.get("seed"), budget_fraction=float(fraction),
            clocks={k: clocks.get(k) if k in OPTIONAL_CLOCKS else clocks[k] for k in PRETRAIN_CLOCKS},
            provenance=ckpt.get("provenance"), inputs=clocks.get("inputs"), method_config=ckpt.get("method_config"),
            run_config=ckpt.get("run_config"))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a pretraining checkpoint (missing {err})") from None


def load_pretrained(cfg: FinetuneConfig, path: str | Path | None, fmt: str = "d2v2") -> Pretrained:
    """The starting point: a d2v2 or fairseq checkpoint, or random weights (``init: random``).

    With ``init: random`` the architecture is the checkpoint's if one is given, else ``cfg.arch``'s.
    """
    if path is None:
        if cfg.init != "random" or cfg.arch is None:
            raise ConfigError("checkpoint: required unless init=random with an 'arch' section")
        method = build_method(cfg.modality, cfg.arch.method, cfg.arch.preset, cfg.arch.overrides)
        return Pretrained(cfg.modality, cfg.arch.method, method.encoder().cfg.model_dump(), None)
    path = Path(path)
    if fmt == "fairseq":
        try:
            from d2v2.interop.fairseq import load_fairseq
        except ModuleNotFoundError as err:
            raise CheckpointError(f"{path}: fairseq checkpoints need d2v2.interop.fairseq ({err})") from None
        pre = _from_checkpoint(load_fairseq(path), path)
    else:
        pre = _from_checkpoint(load_checkpoint(path), path)
    if pre.modality != cfg.modality:
        raise ConfigError(f"modality: config says '{cfg.modality}' but {path} is a '{pre.modality}' checkpoint")
    if cfg.init == "random":
        pre = Pretrained(pre.modality, pre.method, pre.encoder_config, None, seed=pre.seed)
    return pre


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------
def build_encoder(pre: Pretrained, cfg: FinetuneConfig) -> Encoder:
    """The pretraining architecture with the fine-tuning regularisation (METHOD.md#fine-tuning), holding the
    pretrained weights (or fresh ones for random init)."""
    reg: dict[str, Any] = {"drop_path": cfg.drop_path, "layerdrop": cfg.layerdrop, "prenet_layerdrop": cfg.layerdrop}
    if cfg.dropout is not None:
        reg.update({k: cfg.dropout for k in ("dropout", "attention_dropout", "post_mlp_dropout", "prenet_dropout")})
    if cfg.activation_dropout is not None:
        reg["activation_dropout"] = cfg.activation_dropout
    encoder = Encoder(validate(EncoderConfig, merge(pre.encoder_config, reg), where="encoder"))
    if pre.encoder_state is not None:
        missing, unexpected = encoder.load_state_dict(pre.encoder_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"encoder weights do not fit the architecture: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    return encoder


def build_model(cfg: FinetuneConfig, info: dict[str, Any], encoder: nn.Module) -> nn.Module:
    """Encoder + the modality's head (METHOD.md#fine-tuning)."""
    dim, probe = encoder.cfg.embed_dim, cfg.mode == "linear_probe"
    if cfg.modality == "image":
        return ImageClassifier(encoder, dim, info["num_classes"], linear_probe=probe)
    if cfg.modality == "text":
        outputs = 1 if info["regression"] else info["num_classes"]
        return SentenceClassifier(encoder, dim, outputs, cfg.pooler_dropout, linear_probe=probe)
    m = cfg.mask
    return CTCRecognizer(encoder, dim, len(LETTERS), encoder.local_encoder.feature_extractor,
                         mask_prob=m.prob, mask_length=m.length, mask_noise_std=m.noise_std,
                         channel_prob=m.channel_prob, channel_length=m.channel_length,
                         final_dropout=cfg.final_dropout, linear_probe=probe)


def _optimizer(model: nn.Module, cfg: FinetuneConfig, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW groups: no weight decay on biases, 1-D tensors and ALiBi scales (METHOD.md#pretraining-recipes); with layer
    decay, block i of N gets LD^(N+1-i) and everything else (patch-embed, CLS, norms, head) 1 (METHOD.md#fine-tuning-images)."""
    encoder, no_decay = model.encoder, model.encoder.no_weight_decay()
    if cfg.layer_decay >= 1.0:
        groups = param_groups(model, optim.weight_decay, no_decay)
    else:
        groups = param_groups(model, optim.weight_decay, no_decay, layer_decay=cfg.layer_decay,
                              layer_id=encoder.layer_id, num_layers=encoder.num_layers)
    return build_optimizer(groups, optim)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but CUDA is not available")
    return device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(model: nn.Module, cfg: FinetuneConfig, batch: dict, device: torch.device) -> torch.Tensor:
    with autocast(device, cfg.precision):
        out = model(batch)
    if cfg.modality == "image":
        return model.loss(out, batch["label"], cfg.label_smoothing)
    if cfg.modality == "text":
        return model.loss(out, batch["label"])
    return model.loss(out, batch["target"], batch["target_lengths"])


def train(model: nn.Module, cfg: FinetuneConfig, peak_lr: float, loader: DataLoader,
          device: torch.device, mix=None, log=None) -> dict[str, float]:
    """Train ``model`` for the budget; return the train-only clock (device synchronised) and updates.

    With ``cache_frozen_features`` a speech model keeps its frozen CNN's output per training utterance for
    the duration of this call (:class:`~d2v2.engine.heads.FrozenFeatureCache`; computed inside the clock).
    """
    log = log or _log
    optim = validate(OptimConfig, {**cfg.optim.model_dump(), "lr": peak_lr}, where="optim")
    optimizer = _optimizer(model, cfg, optim)
    scaler = loss_scaler(device, cfg.precision, cfg.loss_scaling)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"the training split has fewer samples than batch_size={cfg.batch_size}")
    total = int(cfg.budget.value) if cfg.budget.kind == "updates" else math.ceil(cfg.budget.value * per_epoch)
    caching = isinstance(model, CTCRecognizer) and cfg.cache_frozen_features
    if caching:
        model.feature_cache = FrozenFeatureCache(model.encoder.local_encoder)
    # loading in this process, the dataset reads only the utterances the cache lacks (a worker has a copy)
    skip_reads = caching and loader.num_workers == 0 and hasattr(loader.dataset, "cached_ids")
    if skip_reads:
        loader.dataset.cached_ids = model.feature_cache.frames
    model.train()
    synchronize(device)
    start, step, epoch, running = time.perf_counter(), 0, 0, torch.zeros((), device=device)
    try:
        while step < total:
            if isinstance(loader.batch_sampler, LengthBucketedBatchSampler):
                loader.batch_sampler.set_epoch(epoch)
            else:
                loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # a fresh, reproducible order
            for batch in loader:
                if step >= total:
                    break
                batch = _to(batch, device)
                if mix is not None:
                    batch = mix(batch)
                set_lr(optimizer, optim.lr_at(step / total))
                if isinstance(model, CTCRecognizer):
                    model.set_transformer_frozen(step < cfg.freeze_updates)
                loss = _loss(model, cfg, batch, device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
                scaler.step(optimizer)                     # fp16: skipped when a gradient overflowed
                scaler.update()
                running += loss.detach()
                step += 1
                if step % cfg.log_every == 0 or step == total:
                    n = step % cfg.log_every or cfg.log_every
                    loss_value = float(running) / n           # the only host sync, at log intervals
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"fine-tuning diverged: loss {loss_value} at update {step}")
                    scale = scaler.get_scale() if scaler.is_enabled() else None      # fp16 only
                    if scale is not None and scale < cfg.loss_scaling.min_scale:
                        raise FloatingPointError(f"fine-tuning diverged: fp16 loss scale {scale:g} below "
                                                 f"{cfg.loss_scaling.min_scale:g} at update {step}")
                    log(f"update {step}/{total} lr {optim.lr_at(step / total):.3g} loss {loss_value:.4f}"
                        + (f" loss scale {scale:g}" if scale is not None else ""))
                    running.zero_()
            epoch += 1
    finally:
        if skip_reads:
            loader.dataset.cached_ids = ()
    synchronize(device)
    if caching:
        cache, model.feature_cache = model.feature_cache, None      # the cache serves this loader only
        log(f"frozen CNN features cached for {len(cache.frames)} utterances ({cache.nbytes / 2**20:.1f} MiB), "
            f"the CNN ran on {cache.cnn_utterances}")
    return {"train_time_s": time.perf_counter() - start, "updates": step, "epochs": step / per_epoch}


@torch.no_grad()
def evaluate(model: nn.Module, cfg: FinetuneConfig, info: dict[str, Any], loader: DataLoader,
             device: torch.device) -> dict[str, float]:
    """Every metric of the task on one split (``info`` from ``d2v2.data.task_info``)."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        batch = _to(batch, device)
        with autocast(device, cfg.precision):
            out = model(batch)
        if cfg.modality == "speech":
            logits, frames = out
            preds += [letters_to_words(ids_to_letters(ids)) for ids in M.ctc_greedy_decode(logits, frames, blank=LETTERS.index(BLANK))]
            labels += batch["transcript"]
        else:
            preds.append((out if info["regression"] else out.argmax(-1)).float().cpu())
            labels.append(batch["label"].float().cpu())
    if cfg.modality != "speech":
        preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return M.compute(info["metrics"], preds, labels)


def _sizes(dataset) -> np.ndarray:
    """Length of every item of ``dataset`` (of a ``Subset``: of its items), for length-ordered batches."""
    if isinstance(dataset, Subset):
        return _sizes(dataset.dataset)[dataset.indices]
    if not hasattr(dataset, "sizes"):
        raise ValueError(f"bucket_by_length: {type(dataset).__name__} has no item lengths ('sizes')")
    return np.asarray(dataset.sizes)


def make_loader(dataset, cfg: FinetuneConfig, batch_size: int, train: bool, device: torch.device) -> DataLoader:
    """Training loader (shuffled, re-seeded each epoch by :func:`train`) or evaluation loader (limited to
    ``cfg.eval_max_samples`` drawn once with a fixed seed).

    With ``cfg.bucket_by_length`` (speech, tiny text) training batches hold items of similar length
    (:class:`~d2v2.engine.sampler.LengthBucketedBatchSampler`) and evaluation batches are cut from the
    split sorted by length (the metrics do not depend on the order); otherwise training batches are random
    and evaluation is in dataset order.
    """
    kwargs = D.loader_kwargs(cfg.data, device, D.finetune_collater(cfg.modality, cfg.data, cfg.task))
    if not train and cfg.eval_max_samples is not None and len(dataset) > cfg.eval_max_samples:
        subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:cfg.eval_max_samples]
        dataset = Subset(dataset, subset.sort().values.tolist())
    if not cfg.bucket_by_length:
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                          generator=torch.Generator() if train else None, **kwargs)
    if train:
        return DataLoader(dataset, batch_sampler=LengthBucketedBatchSampler(_sizes(dataset), batch_size, cfg.seed),
                          **kwargs)
    order = np.argsort(_sizes(dataset), kind="stable").tolist()
    return DataLoader(dataset, batch_sampler=[order[i:i + batch_size] for i in range(0, len(order), batch_size)],
                      **kwargs)


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    """Is ``a`` better than ``b``? ``nan`` is never better."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if higher_is_better else a < b)


def sweep_lr(cfg: FinetuneConfig, pre: Pretrained, info: dict[str, Any], splits: dict, device: torch.device,
             log=None) -> tuple[nn.Module, float, dict[str, float], dict[str, float], list[dict]]:
    """Train once per learning rate (``lr_sweep`` or just ``optim.lr``) from the same weights and seed;
    keep the model with the best *validation* primary metric. Test splits are never looked at here.

    Returns ``(model, lr, valid metrics, train clock, sweep table)``.
    """
    primary, loader = info["primary_metric"], make_loader(splits["train"], cfg, cfg.batch_size, True, device)
    mix = None
    if cfg.mixup:
        from d2v2.data.image import MixupCutmix          # torchvision: only image fine-tuning needs it

        mix = MixupCutmix(cfg.data.image, info["num_classes"])
    sweep, best = [], None
    for lr in cfg.lr_sweep or [cfg.optim.lr]:
        torch.manual_seed(cfg.seed)                  # same head init and data order for every LR
        model = build_model(cfg, info, build_encoder(pre, cfg)).to(device)
        clock = train(model, cfg, lr, loader, device, mix, log)
        valid = evaluate(model, cfg, info, make_loader(splits["valid"], cfg, cfg.eval_batch_size, False, device), device)
        sweep.append({"lr": lr, **{f"valid_{k}": v for k, v in valid.items()}, **clock})
        (log or _log)(f"lr {lr:g}: valid {primary} {valid[primary]:.4f}")
        if best is None or _better(valid[primary], best[2][primary], info["higher_is_better"]):
            best = (model, lr, valid, clock)
        del model
    return (*best, sweep)


def _check_vocabulary(cfg: FinetuneConfig, pre: Pretrained) -> None:
    """Every token id the data's tokenizer can produce must have a row in the encoder's embedding."""
    data_vocab = load_tokenizer(cfg.data).vocab_size
    model_vocab = validate(EncoderConfig, pre.encoder_config, where="encoder").text.vocab_size
    if data_vocab > model_vocab:
        raise ConfigError(f"data.text: the tokenizer has {data_vocab} ids but the encoder's embedding only "
                          f"{model_vocab} rows (a model trained with another vocabulary? official "
                          "checkpoints need data.text.gpt2_dict, docs/CONVERT.md)")


def same_identity(key: str, given: float, stored: float) -> bool:
    """Whether a fine-tune's ``identity.key`` names the checkpoint's: a budget fraction as the exact value or
    as the 3 decimals of the checkpoint's file name (``checkpoint_f0.062.pt`` holds 0.0625)."""
    if key == "budget_fraction":
        return f"{given:.3f}" == f"{stored:.3f}"
    return given == stored


def finetune(cfg: FinetuneConfig, checkpoint: str | Path | None, checkpoint_format: str = "d2v2",
             save: str | Path | None = None, log=None) -> dict[str, Any]:
    """Fine-tune (with the LR sweep, if any) and return the metrics record of docs/ARCHITECTURE.md."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = D.task_info(cfg.modality, cfg.task)
    if cfg.primary_metric is not None:
        info = {**info, "primary_metric": cfg.primary_metric}
    pre = load_pretrained(cfg, checkpoint, checkpoint_format)
    for key in ("seed", "budget_fraction"):
        given, stored = getattr(cfg.identity, key), getattr(pre, key)
        if pre.encoder_state is not None and given is not None and stored is not None \
                and not same_identity(key, given, stored):
            raise ConfigError(f"identity.{key}: config says {given} but the checkpoint has {stored}")
    if cfg.modality == "text":
        _check_vocabulary(cfg, pre)
    splits = D.finetune_datasets(cfg.modality, cfg.data, cfg.task)
    for required in ("train", "valid", "test"):
        if required not in splits:
            raise ValueError(f"task '{cfg.task}' provides no '{required}' split")

    model, lr, valid, clock, sweep = sweep_lr(cfg, pre, info, splits, device, log)
    results = {f"valid_{k}": v for k, v in valid.items()}
    for name, dataset in splits.items():          # the test splits, scored for the selected LR only
        if name not in ("train", "valid"):
            scores = evaluate(model, cfg, info, make_loader(dataset, cfg, cfg.eval_batch_size, False, device), device)
            results.update({f"{name}_{k}": v for k, v in scores.items()})
    if save is not None:
        save_checkpoint({"kind": "finetuned", "config": cfg.model_dump(mode="json"), "task_info": info,
                         "pretrained": {"modality": pre.modality, "method": pre.method,
                                        "encoder_config": pre.encoder_config},
                         "model": model.state_dict()}, save, keep_previous=False)
    synchronize(device)
    pretrained = pre.encoder_state is not None
    seed = next(s for s in (pre.seed, cfg.identity.seed, cfg.seed) if s is not None)
    return {
        "identity": {"modality": pre.modality, "method": pre.method, "variant": cfg.identity.variant,
                     "params": cfg.identity.params, "seed": seed,
                     "budget_fraction": pre.budget_fraction if pretrained else 0.0,
                     "budget_scale": cfg.identity.budget_scale,
                     "task": cfg.task, "init": cfg.init, "mode": cfg.mode},
        "pretrain": {**pre.clocks, **({"inputs": pre.inputs} if pre.inputs else {}),
                     **({"method_config": pre.method_config} if pretrained and pre.method_config else {}),
                     **({"run_config": pre.run_config} if pretrained and pre.run_config else {})},
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()},
        "primary_metric": f"test_{info['primary_metric']}",
        "higher_is_better": info["higher_is_better"],
        "finetune": {"lr": lr, "sweep": sweep, "train_time_s": clock["train_time_s"],
                     "e2e_time_s": time.perf_counter() - start, "updates": clock["updates"],
                     "epochs": clock["epochs"], "clock": "time.perf_counter, device synchronised",
                     "config": cfg.model_dump(mode="json")},
        "provenance": provenance(cfg.preset, device),
        "pretrain_provenance": pre.provenance if pretrained else None,
    }


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def resolve_config(config: str | None, overrides: list[str]) -> FinetuneConfig:
    """YAML file (optional) + ``key=value`` overrides over the preset, validated."""
    return finetune_config(apply_overrides(load_yaml(config) if config else {}, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="fine-tuning YAML (FinetuneConfig; needs 'modality')")
    parser.add_argument("--checkpoint", help="pretraining checkpoint (omit with init=random and 'arch')")
    parser.add_argument("--checkpoint-format", choices=("d2v2", "fairseq"), default="d2v2")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--save", help="also write the fine-tuned model here (for `d2v2 evaluate`)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (values parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.overrides)
        record = finetune(cfg, args.checkpoint, args.checkpoint_format, args.save)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    atomic_write_json(args.out, record)
    print(json.dumps(record["metrics"], indent=1))
    return 0
