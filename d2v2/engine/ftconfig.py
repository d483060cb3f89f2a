"""The fine-tuning config (`FinetuneConfig`), resolved over a preset's recipe (METHOD.md#fine-tuning).

Fine-tuning is the same for every pretraining method: it only sees the Encoder of a checkpoint. A config
is resolved as the preset's recipe (``finetune`` in ``d2v2/presets/<preset>.yaml``: ``common`` with the
modality's section over it) with the user's YAML and ``key=value`` overrides on top, then validated
(unknown keys, wrong types and impossible values name the dotted key), all before any data or model is
touched. :func:`finetune_config` does exactly that and is what the workflow calls at
DAG-build time.

Recipes: ``base`` is the paper's (ImageNet ViT-B: METHOD.md#fine-tuning-images; the ``vox_10h`` CTC
recipe: METHOD.md#fine-tuning-speech; GLUE: METHOD.md#fine-tuning-text); ``tiny`` is sized for the
embedded data on a 2-core CPU; ``smoke`` only checks that everything runs. Deviations from the paper,
all written down here:

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

from d2v2.config import Config, ConfigError, Modality, check_modality, merge, validate
from d2v2.data import DataConfig, task_info
from d2v2.engine.optim import OptimConfig
from d2v2.engine.precision import LossScaling
from d2v2.presets import finetune_recipe

__all__ = ["BudgetConfig", "SpeechMaskConfig", "IdentityConfig", "ArchConfig", "FinetuneConfig",
           "finetune_config"]



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
    # batched in length order. Text may do the same (fairseq's sentence-prediction batches are random; the
    # tiny preset buckets them). False: random batches padded to their longest item, evaluation in order.
    bucket_by_length: bool = False
    # Text
    pooler_dropout: float = Field(0.0, ge=0, lt=1)   # RoBERTa classification head dropout
    # Run
    seed: int = 0
    device: str = "auto"                             # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast dtype; fp16 is the paper's
    loss_scaling: LossScaling = LossScaling()             # fp16 only: fairseq's (METHOD.md#mixed-precision)
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
        if self.bucket_by_length and self.modality == "image":
            raise ValueError("bucket_by_length: images have no lengths (speech and text do)")
        try:
            metrics = task_info(self.modality, self.task)["metrics"]
        except ValueError as err:
            raise ValueError(f"task: {err}") from None
        if self.primary_metric is not None and self.primary_metric not in metrics:
            raise ValueError(f"primary_metric: '{self.primary_metric}' is not a metric of task '{self.task}' "
                             f"(have {', '.join(metrics)})")
        return self


def finetune_config(data: Mapping[str, Any]) -> FinetuneConfig:
    """Resolve ``data`` (YAML + overrides, with ``modality`` and optionally ``preset``) over the preset's
    fine-tuning recipe (:func:`d2v2.presets.finetune_recipe`)."""
    modality, preset = data.get("modality"), data.get("preset", "tiny")
    try:
        check_modality(modality)
    except ConfigError as err:
        raise ConfigError(f"modality: {err}") from None
    return validate(FinetuneConfig, merge(finetune_recipe(preset, modality), data))
