"""The data API every other module uses (docs/ARCHITECTURE.md, "Batches").

One function per question, dispatching on the modality (``image``, ``speech``, ``text``) to
:mod:`d2v2.data.image`, :mod:`d2v2.data.speech`, :mod:`d2v2.data.text`:

- :func:`pretrain_dataset` / :func:`pretrain_collater`: unlabelled items ``{"source", "id"}`` and the
  collater that batches them and draws the method's masks (:class:`~d2v2.data.common.MaskingCollater`);
- :func:`finetune_datasets` / :func:`finetune_collater` / :func:`task_info`: labelled splits, batches
  and what to measure on them;
- :func:`loader_kwargs`: DataLoader settings; :func:`prepare`: the preparation step (``prepare-data``).

The modality modules are imported on first use, so ``import d2v2.data`` stays light.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Callable

from torch.utils.data import Dataset

from d2v2.config import MODALITIES, check_modality
from d2v2.data.common import MaskingCollater, MissingDataError, CorruptDataError, loader_kwargs
from d2v2.data.config import DataConfig, ImageDataConfig, SpeechDataConfig, TextDataConfig

__all__ = [
    "DataConfig", "ImageDataConfig", "SpeechDataConfig", "TextDataConfig", "MODALITIES",
    "pretrain_dataset", "pretrain_collater", "finetune_datasets", "finetune_collater", "task_info",
    "loader_kwargs", "prepare", "speech_root", "MissingDataError", "CorruptDataError",
]

SPEECH_TASKS = ("ctc",)
_SPEECH_SPLITS = ("pretrain", "train", "valid", "test")


def _module(modality: str) -> ModuleType:
    return importlib.import_module(f"d2v2.data.{check_modality(modality)}")


def speech_root(cfg: DataConfig) -> Path:
    """Where the prepared speech corpus lives."""
    return Path(cfg.root) / "speech"


def pretrain_dataset(modality: str, cfg: DataConfig, split: str = "train") -> Dataset:
    """Unlabelled items ``{"source", "id"}`` of ``split`` (``train`` or ``valid``)."""
    if modality == "speech":
        from d2v2.data.speech import SpeechPretrainDataset

        return SpeechPretrainDataset(speech_root(cfg), cfg.speech, "pretrain" if split == "train" else split)
    return _module(modality).pretrain_dataset(cfg, split)


def _pretrain_collate(modality: str) -> Callable[[list[dict]], dict]:
    if modality == "speech":
        from d2v2.data.speech import collate_pretrain

        return collate_pretrain      # crops to the shortest utterance of the batch
    return _module(modality).collate


def pretrain_collater(modality: str, cfg: DataConfig, masker, seed: int) -> MaskingCollater:
    """Batch the modality's items, then add the method's masks (``masker`` may be None: no masks)."""
    return MaskingCollater(_pretrain_collate(modality), masker, seed)


def finetune_datasets(modality: str, cfg: DataConfig, task: str) -> dict[str, Dataset]:
    """``{"train", "valid", "test", (extra test sets)}`` labelled datasets of ``task``."""
    if modality == "speech":
        from d2v2.data.speech import SPLITS, SpeechFinetuneDataset

        task_info(modality, task)
        root = speech_root(cfg)
        # extra test sets: those the synthesised corpus wrote (test_flite, test_asterisk) or split_names adds
        written = {s for s in SPLITS if s not in _SPEECH_SPLITS and (root / f"{s}.tsv").is_file()}
        extra = sorted((written if cfg.speech.source == "synth" else set())
                       | (set(cfg.speech.split_names) - set(_SPEECH_SPLITS)))
        return {s: SpeechFinetuneDataset(root, cfg.speech, s) for s in ["train", "valid", "test", *extra]}
    return _module(modality).finetune_datasets(cfg, task)


def finetune_collater(modality: str, cfg: DataConfig, task: str) -> Callable[[list[dict]], dict]:
    """Collater of fine-tuning items (padding + ``padding_mask`` where lengths differ)."""
    if modality == "speech":
        from d2v2.data.speech import collate_finetune

        return collate_finetune
    return _module(modality).finetune_collater(cfg, task)


def task_info(modality: str, task: str) -> dict:
    """``{"task", "num_classes" (1 for regression), "regression", "metrics", "primary_metric",
    "higher_is_better"}``; metric names are those of :mod:`d2v2.engine.metrics`."""
    if modality == "speech":
        if task not in SPEECH_TASKS:
            raise ValueError(f"unknown speech task {task!r} (have {', '.join(SPEECH_TASKS)})")
        from d2v2.data.speech import LETTERS

        return {"task": task, "num_classes": len(LETTERS), "regression": False, "metrics": ["wer", "cer"],
                "primary_metric": "wer", "higher_is_better": False}
    return _module(modality).task_info(task)


def prepare(modalities, cfg: DataConfig) -> dict[str, dict]:
    """Prepare each modality's data under ``cfg.root``; returns ``{modality: manifest}`` (each with
    ``"skipped": True`` when the existing files already matched and nothing was done)."""
    out = {}
    for modality in modalities:
        name = check_modality(modality)
        if name == "image":
            from d2v2.data.image import prepare_image

            out[name] = prepare_image(cfg.root, cfg.image)
        elif name == "text":
            from d2v2.data.text import prepare_text

            out[name] = prepare_text(cfg.root, cfg.text)
        else:
            from d2v2.data.speech_synth import prepare_speech

            out[name] = prepare_speech(speech_root(cfg), cfg.speech)
    return out
