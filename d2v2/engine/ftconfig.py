"""The fine-tuning config (`FinetuneConfig`) and its presets per modality (METHOD.md#fine-tuning).

Fine-tuning is the same for every pretraining method: it only sees the Encoder of a checkpoint. A config
is resolved as ``PRESETS[modality][preset]`` with the user's YAML and ``key=value`` overrides on top,
then validated (unknown keys, wrong types and impossible values name the dotted key), all before any
data or model is touched. :func:`finetune_config` does exactly that and is what the workflow calls at
DAG-build time.

Presets: ``base`` is the paper's recipe (ImageNet ViT-B: METHOD.md#fine-tuning-images; the ``vox_10h``
CTC recipe: METHOD.md#fine-tuning-speech; GLUE: METHOD.md#fine-tuning-text); ``tiny`` is sized for the
embedded data on a 2-core CPU (a few hundred updates, evaluation on fixed subsets of at most
``eval_max_samples`` per split; how each was sized: docs/TINY_SCALE.md, "Calibrating the tiny
recipes"); ``smoke`` only checks that everything runs.
Deviations, all written down here:

* fine-tuning runs on one device (no DDP); batches are counted in samples (fairseq's speech recipe
  counts ``max_tokens`` over 4 GPUs x 5 accumulation steps; ``batch_size`` 512 utterances approximates
  its ~400 s of audio);
* the tiny presets use larger LRs than the paper (short runs from a small model) and drop the
  100-epoch image regularisers (drop path, label smoothing, MixUp/CutMix) that only slow a 2-epoch run;
* the model is scored at the end of fine-tuning, not at its best validation checkpoint (METHOD.md#fine-tuning-text
  selects the best dev checkpoint); the LR sweep selects on validation only and reports that run's test;
* speech is decoded greedily (no 4-gram LM, METHOD.md#fine-tuning-speech).
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, model_validator

from d2v2.config import Config, ConfigError, Modality, merge, validate
from d2v2.data import DataConfig, task_info
from d2v2.engine.optim import OptimConfig

__all__ = ["BudgetConfig", "SpeechMaskConfig", "IdentityConfig", "ArchConfig", "FinetuneConfig",
           "PRESETS", "finetune_config"]



class BudgetConfig(Config):
    """How long to fine-tune; the LR schedule runs on the fraction of this budget consumed."""

    kind: Literal["updates", "epochs"] = "updates"
    value: float = Field(1000, gt=0)


class SpeechMaskConfig(Config):
    """wav2vec 2.0 masking during CTC fine-tuning (METHOD.md#fine-tuning-speech): masked frames are kept and replaced by noise."""

    prob: float = Field(0.75, ge=0, lt=1)            # mask_prob (fairseq): spans start at prob/length per frame
    length: int = Field(10, ge=1)                    # mask_length (frames)
    noise_std: float = Field(0.01, ge=0)             # masked frames := N(0, noise_std^2) (data2vec 2.0)
    channel_prob: float = Field(0.25, ge=0, lt=1)    # mask_channel_prob; 0 disables channel masking
    channel_length: int = Field(64, ge=1)            # mask_channel_length (feature channels, zeroed)


class IdentityConfig(Config):
    """What the workflow knows about the run that the checkpoint may not: the variant's name and parameters.

    ``seed`` and ``budget_fraction`` default to the checkpoint's values; if given they must agree with it.
    ``budget_scale``: the run's budget as a fraction of the modality's (below 1 in a budget sweep).
    """

    variant: str = "default"
    params: dict[str, Any] = {}
    seed: int | None = None
    budget_fraction: float | None = Field(None, ge=0, le=1)
    budget_scale: float = Field(1.0, gt=0, le=1)


class ArchConfig(Config):
    """The architecture to build when there is no checkpoint to take it from (random initialisation)."""

    method: str = "data2vec2"
    preset: str = "tiny"
    overrides: dict[str, Any] = {}


class FinetuneConfig(Config):
    """One fine-tuning run: task, recipe, and the identity of what is being fine-tuned."""

    modality: Modality
    preset: str = "tiny"
    task: str                                        # d2v2.data.task_info(modality, task)
    # the metric that picks the LR sweep's winner and that the report's curves and speedups use; one of
    # the task's metrics, None = the task's own (the paper's: accuracy, WER, the GLUE task's metric)
    primary_metric: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    arch: ArchConfig | None = None                   # random init without a checkpoint
    mode: Literal["finetune", "linear_probe"] = "finetune"   # linear_probe: frozen encoder, BN + linear
    data: DataConfig = DataConfig()
    optim: OptimConfig
    budget: BudgetConfig = BudgetConfig()
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    # Score at most this many samples per evaluation split (a fixed random subset, the same for every
    # run); None = the whole split. Only the CPU presets set it: Fashion-MNIST's 10k test images
    # would otherwise cost more than the fine-tuning itself.
    eval_max_samples: int | None = Field(None, ge=1)
    lr_sweep: list[float] = []                       # peak LRs to try; the best on valid is reported
    # Regularisation of the encoder during fine-tuning (applied on top of its pretraining config).
    layer_decay: float = Field(1.0, gt=0, le=1)      # METHOD.md#fine-tuning-images; 1.0 = no layer-wise decay
    drop_path: float = Field(0.0, ge=0, lt=1)
    dropout: float | None = Field(None, ge=0, lt=1)  # encoder dropouts; None keeps the pretraining values
    activation_dropout: float | None = Field(None, ge=0, lt=1)   # inside the MLP; None keeps pretraining's
    layerdrop: float = Field(0.0, ge=0, lt=1)
    # Image
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: bool = False                              # MixUp/CutMix with data.image.{mixup,cutmix}_alpha...
    # Speech
    freeze_updates: int = Field(0, ge=0)             # Transformer frozen (only the head trains) until then
    mask: SpeechMaskConfig = SpeechMaskConfig()
    final_dropout: float = Field(0.0, ge=0, lt=1)    # before the CTC projection
    # Compute the frozen CNN's output once per training utterance and reuse it every epoch (exact: see
    # heads.FrozenFeatureCache). Costs ~4 bytes x channels x 50 per second of training audio on the device:
    # ~6 MB for the tiny recipe, 3.7 GB for the paper's 10 h at 512 channels, hence off unless a preset
    # turns it on.
    cache_frozen_features: bool = False
    # fairseq's speech fine-tuning batches utterances of similar length (length-ordered, batch order shuffled
    # every epoch: sampler.LengthBucketedBatchSampler), still counted in samples here; evaluation splits are
    # batched in length order. False: random batches padded to their longest utterance, evaluation in order.
    bucket_by_length: bool = False
    # Text
    pooler_dropout: float = Field(0.0, ge=0, lt=1)   # RoBERTa classification head dropout
    # Run
    seed: int = 0
    device: str = "auto"                             # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"      # bf16: autocast for forward passes (the paper: fp16)
    threads: int | None = Field(None, ge=1)
    log_every: int = Field(50, ge=1)
    identity: IdentityConfig = IdentityConfig()

    @model_validator(mode="after")
    def _check(self):
        if any(lr <= 0 for lr in self.lr_sweep):
            raise ValueError(f"lr_sweep: learning rates must be > 0 (got {self.lr_sweep})")
        if self.mixup and self.modality != "image":
            raise ValueError("mixup: MixUp/CutMix apply to images only")
        if self.cache_frozen_features and self.modality != "speech":
            raise ValueError("cache_frozen_features: only speech fine-tuning has a frozen feature extractor")
        if self.bucket_by_length and self.modality != "speech":
            raise ValueError("bucket_by_length: only speech fine-tuning datasets have item lengths")
        try:
            metrics = task_info(self.modality, self.task)["metrics"]
        except ValueError as err:
            raise ValueError(f"task: {err}") from None
        if self.primary_metric is not None and self.primary_metric not in metrics:
            raise ValueError(f"primary_metric: '{self.primary_metric}' is not a metric of task '{self.task}' "
                             f"(have {', '.join(metrics)})")
        return self


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "image": {
        # METHOD.md#fine-tuning-images, ViT-B: 250,200 updates at batch 512, warmup 16k, cosine to 1e-6, LD 0.65, DP 0.1.
        "base": {
            "task": "imagenet", "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05,
                                          "warmup_fraction": 16000 / 250200, "final_lr": 1e-6,
                                          "schedule": "cosine", "clip_grad": None},
            "budget": {"kind": "updates", "value": 250200}, "batch_size": 512,
            "layer_decay": 0.65, "drop_path": 0.1, "dropout": 0.0, "activation_dropout": 0.0,
            "label_smoothing": 0.1, "mixup": True,
        },
        # Short on purpose: a long fine-tune from random init catches up with a pretrained one, and the
        # tiny run must show what pretraining bought.
        "tiny": {
            "task": "fmnist", "optim": {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05,
                                        "warmup_fraction": 0.1, "final_lr": 1e-6,
                                        "schedule": "cosine", "clip_grad": None},
            "budget": {"kind": "updates", "value": 400}, "batch_size": 32, "eval_max_samples": 1000,
            # a ~13-epoch run on 1,000 labels: the paper's 100-epoch regularisers only slow it down
            "layer_decay": 0.75, "drop_path": 0.0, "dropout": 0.0, "activation_dropout": 0.0,
            "label_smoothing": 0.0, "mixup": False,
        },
        "smoke": {
            "task": "fmnist", "optim": {"lr": 1e-3, "warmup_fraction": 0.1}, "budget": {"value": 4},
            "batch_size": 8, "eval_batch_size": 64, "layer_decay": 0.75,
        },
        # gpu: tiny's recipe (1,000 labels) for the ViT-S-width encoder, at a third of its LR (a wider model)
        # and a larger batch; uncalibrated until a GPU run calibrates it (docs/BENCHMARKS.md#the-gpu-path).
        "gpu": {
            "task": "fmnist", "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05,
                                        "warmup_fraction": 0.1, "final_lr": 1e-6,
                                        "schedule": "cosine", "clip_grad": None},
            "budget": {"kind": "updates", "value": 400}, "batch_size": 64, "eval_batch_size": 1000,
            "eval_max_samples": 10000,
            "layer_decay": 0.75, "drop_path": 0.0, "dropout": 0.0, "activation_dropout": 0.0,
            "label_smoothing": 0.0, "mixup": False,
        },
    },
    "speech": {
        # METHOD.md#fine-tuning-speech, vox_10h: Adam (0.9, 0.98) eps 1e-8, lr 1e-4, tri-stage 10/40/50 to 0.05x, 20k updates,
        # 10k frozen, mask 0.75 x 10, channel mask 0.25 x 64, layerdrop 0.1, dropouts 0.
        "base": {
            "task": "ctc",
            "optim": {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0, "schedule": "tristage",
                      "warmup_fraction": 0.1, "hold_fraction": 0.4, "final_lr": 5e-6, "init_lr_scale": 0.01,
                      "clip_grad": None},
            "budget": {"kind": "updates", "value": 20000}, "batch_size": 512,
            "freeze_updates": 10000, "dropout": 0.0, "activation_dropout": 0.1, "layerdrop": 0.1,
            "final_dropout": 0.0, "bucket_by_length": True,
            "mask": {"prob": 0.75, "length": 10, "noise_std": 0.01, "channel_prob": 0.25, "channel_length": 64},
        },
        # CTC leaves its all-blank plateau only after several hundred updates, so this is the longest tiny
        # fine-tune and the Transformer is not frozen at its start. Caching the frozen CNN's output and
        # length-bucketed batches make it faster with identical results (docs/TINY_SCALE.md). It is
        # scored on CER: WER stays around 1 from every start at this scale, CER separates the starts.
        "tiny": {
            "task": "ctc", "primary_metric": "cer",
            "optim": {"lr": 2e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0, "schedule": "tristage",
                      "warmup_fraction": 0.1, "hold_fraction": 0.4, "final_lr": 1e-4, "init_lr_scale": 0.01,
                      "clip_grad": None},
            "budget": {"kind": "updates", "value": 1000}, "batch_size": 16, "eval_max_samples": 100,
            "eval_batch_size": 16,
            "freeze_updates": 0, "dropout": 0.0, "layerdrop": 0.0, "log_every": 100,
            "mask": {"prob": 0.1, "length": 5, "noise_std": 0.01, "channel_prob": 0.0, "channel_length": 8},
            "cache_frozen_features": True, "bucket_by_length": True,
        },
        "smoke": {
            "task": "ctc", "optim": {"lr": 1e-3, "schedule": "tristage", "warmup_fraction": 0.1, "final_lr": 5e-5},
            "budget": {"value": 4}, "batch_size": 4, "eval_batch_size": 16, "freeze_updates": 2,
            "cache_frozen_features": True, "bucket_by_length": True,
            "mask": {"prob": 0.3, "length": 2, "channel_prob": 0.0},
        },
    },
    "text": {
        # METHOD.md#fine-tuning-text (SST-2): AdamW (0.9, 0.98) eps 1e-6 wd 0.1, linear decay after 6% warmup, 10 epochs,
        # batch 32, LR swept over {1e-5, 2e-5, 4e-5, 6e-5}.
        "base": {
            "task": "sst2", "optim": {"lr": 2e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1,
                                      "schedule": "linear", "warmup_fraction": 0.06, "final_lr": 0.0,
                                      "clip_grad": None},
            "budget": {"kind": "epochs", "value": 10}, "batch_size": 32,
            "lr_sweep": [1e-5, 2e-5, 4e-5, 6e-5], "pooler_dropout": 0.0,
        },
        "tiny": {
            "task": "movie", "optim": {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1,
                                       "schedule": "linear", "warmup_fraction": 0.06, "final_lr": 0.0,
                                      "clip_grad": None},
            "budget": {"kind": "updates", "value": 250}, "batch_size": 32,
            "pooler_dropout": 0.0,
        },
        "smoke": {
            "task": "movie", "optim": {"lr": 1e-4, "schedule": "linear", "warmup_fraction": 0.1},
            "budget": {"value": 4}, "batch_size": 8, "eval_batch_size": 64,
        },
    },
}


def finetune_config(data: Mapping[str, Any]) -> FinetuneConfig:
    """Resolve ``data`` (YAML + overrides, with ``modality`` and optionally ``preset``) over its preset."""
    modality, preset = data.get("modality"), data.get("preset", "tiny")
    if modality not in PRESETS:
        raise ConfigError(f"modality: must be one of {sorted(PRESETS)} (got {modality!r})")
    if preset not in PRESETS[modality]:
        raise ConfigError(f"preset: '{preset}' unknown for {modality} fine-tuning (have {sorted(PRESETS[modality])})")
    return validate(FinetuneConfig, merge(PRESETS[modality][preset], data))
