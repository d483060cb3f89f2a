"""Data configuration: where the data lives, how it is split and augmented, how it is loaded.

Defaults are the embedded (``tiny``) data: Fashion-MNIST, the KJV + Austen + WordNet corpus with the VADER
sentiment tasks, and the speech engineer's synthesised corpus. The paper-scale sources (ImageNet-1k,
Books+Wiki shards with GPT-2 BPE, GLUE) are selected with ``image.dataset=imagenet`` /
``text.corpus=raw`` and the path keys below; their augmentation defaults are the paper's (METHOD.md#modality-encoders,
METHOD.md#fine-tuning). docs/DATA.md lists every source.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from d2v2.config import Config
from d2v2.data.speech import SpeechDataConfig  # owned by the speech data module

__all__ = ["ImageDataConfig", "TextDataConfig", "SpeechDataConfig", "DataConfig"]


class ImageDataConfig(Config):
    """Images: Fashion-MNIST (embedded) or ImageNet-1k in ImageFolder layout (paper)."""

    dataset: Literal["fmnist", "imagenet"] = "fmnist"
    # --- Fashion-MNIST (28x28 grey, 10 classes) ---
    fmnist_source: str = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist
    labels_per_class: int = Field(100, ge=1)        # labelled fine-tuning subset, class-balanced
    valid_per_class: int = Field(500, ge=1)         # validation images, disjoint from the labelled subset
    split_seed: int = 0                             # draws the labelled and validation subsets
    # Light pretraining augmentation for 28x28 (our choice, documented in image.py): random-resized-crop
    # at 28 px over this area range + horizontal flip (garments are left/right symmetric classes).
    fmnist_crop_scale: tuple[float, float] = (0.6, 1.0)
    # --- ImageNet-1k (METHOD.md#image-encoder, METHOD.md#fine-tuning-images) ---
    imagenet_dir: str | None = None                 # contains train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
    imagenet_holdout_per_class: int = Field(0, ge=0)  # >0: valid = this many train images per class
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)    # pretraining RandomResizedCrop (MAE / data2vec 2.0)
    randaug_num_ops: int = 2                        # timm rand-m9-mstd0.5-inc1 ~ RandAugment(2, 9)
    randaug_magnitude: int = 9
    reprob: float = Field(0.25, ge=0, le=1)         # random erasing probability (fine-tuning)
    eval_resize: int = 256                          # resize 256 (bicubic) + center crop 224
    # --- MixUp / CutMix batch transform for fine-tuning (METHOD.md#fine-tuning-images) ---
    mixup_alpha: float = Field(0.7, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    mix_prob: float = Field(0.9, ge=0, le=1)
    mix_switch_prob: float = Field(0.5, ge=0, le=1)

    @field_validator("fmnist_crop_scale", "crop_scale")
    @classmethod
    def _check_scale(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("need 0 < min <= max <= 1")
        return value


class TextDataConfig(Config):
    """Text: the embedded corpus with our BPE (tiny) or raw text shards with GPT-2 BPE (paper)."""

    corpus: Literal["embedded", "raw"] = "embedded"
    block_len: int = Field(512, ge=2)               # `<s>` + block_len-1 tokens (METHOD.md#text-encoder: 512)
    valid_fraction: float = Field(0.02, gt=0, lt=0.5)  # embedded corpus: documents held out for "valid"
    split_seed: int = 0                             # draws the held-out documents and the task splits
    # --- embedded corpus (KJV + Jane Austen + WordNet glosses) and its byte-level BPE ---
    vocab_size: int = Field(8192, ge=300)
    # --- raw text shards + GPT-2 BPE (Books + Wiki at paper scale) ---
    gpt2_vocab: str | None = None                   # GPT-2 encoder vocab.json
    gpt2_merges: str | None = None                  # GPT-2 merges.txt
    # fairseq's dict.txt: token ids as in the official RoBERTa / data2vec text checkpoints (specials 0-3,
    # dict.txt's lines from 4, <mask> last) instead of GPT-2 ids + 5. For fine-tuning those checkpoints.
    gpt2_dict: str | None = None
    train_shards: list[str] = []                    # raw text files, one sentence/paragraph per line
    valid_shards: list[str] = []
    # --- labelled tasks ---
    max_len: int = Field(512, ge=8)                 # fine-tuning sequences are truncated to this
    glue_dir: str | None = None                     # contains CoLA/, SST-2/, MRPC/, ... with .tsv files
    task_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)   # VADER train/valid/test split

    @model_validator(mode="after")
    def _check_dict(self):
        if self.gpt2_dict is not None and self.corpus != "raw":
            raise ValueError("gpt2_dict: needs corpus=raw (the GPT-2 BPE of gpt2_vocab / gpt2_merges)")
        return self

    @field_validator("task_fractions")
    @classmethod
    def _check_fractions(cls, value):
        if abs(sum(value) - 1) > 1e-6 or min(value) <= 0:
            raise ValueError("need three positive numbers summing to 1")
        return value


class DataConfig(Config):
    """Everything the data side needs: the root folder, the modalities and the loader settings."""

    root: str = "data"
    image: ImageDataConfig = ImageDataConfig()
    speech: SpeechDataConfig = SpeechDataConfig()
    text: TextDataConfig = TextDataConfig()
    num_workers: int | None = Field(None, ge=0)     # None: chosen from the CPUs (see loader_kwargs)
    pin_memory: bool | None = None                  # None: on for CUDA devices
    prefetch_factor: int = Field(4, ge=1)           # batches in flight per worker
    persistent_workers: bool = True                 # keep workers across epochs (no fork per epoch)
