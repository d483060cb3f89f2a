"""Image data: Fashion-MNIST (embedded, tiny) and ImageNet-1k in ImageFolder layout (paper scale).

Fashion-MNIST (DATA.md#images) is read from the IDX files that :func:`prepare_image` decompresses out of
the Debian package into ``<root>/fashion_mnist/FashionMNIST/raw/`` (torchvision's layout), as uint8 tensors,
without torchvision: its import is a second of every job's start, and only ImageNet needs it. 28x28 with
patch size 2 is the same 14x14 grid as ViT-B/16 at 224 px, so inverse block masking applies unchanged.

- Pretraining: the 60k training images without labels. Light augmentation (our choice for 28 px,
  where the paper's scale (0.2, 1) crop would destroy most of a garment): random-resized-crop back to
  28x28 over ``fmnist_crop_scale`` = (0.6, 1) of the area, then a horizontal flip (every class is
  left/right symmetric), then normalisation with the training-set mean/std.
- Fine-tuning ``fmnist`` (or ``fmnist-<N>`` for N labels per class): ``labels_per_class`` images per
  class drawn from the training set with ``split_seed``, a class-balanced validation set disjoint from
  them, and the official 10k test set.

ImageNet-1k uses the paper's transforms (METHOD.md#image-encoder for pretraining,
METHOD.md#fine-tuning-images for fine-tuning) and :class:`MixupCutmix` as the fine-tuning batch transform.
"""
from __future__ import annotations

import copy
import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from d2v2.atomic import atomic_dir, atomic_write_json
from d2v2.data.common import (
    MANIFEST, CorruptDataError, dpkg_version, file_record, manifest_is_current, read_manifest, require_path,
    sha256_file,
)
from d2v2.data.config import DataConfig, ImageDataConfig

__all__ = [
    "FMNIST_MEAN", "FMNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "FMNIST_FILES", "prepare_image",
    "pretrain_dataset", "finetune_datasets", "collate", "finetune_collater", "task_info",
    "class_balanced_split", "MixupCutmix", "ImageItems", "FashionMNIST", "FmnistTransform", "random_resized_crop_box",
]

# Pixel mean/std of the 60k Fashion-MNIST training images in [0, 1] (checked by the tests).
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_CLASSES = 10
IMAGENET_CLASSES = 1000
# IDX file -> (magic number, shape)
FMNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}
_FMNIST_DIR = "fashion_mnist"
FORMAT_VERSION = 2           # bump when the prepared files change for the same inputs


def _raw_dir(folder: Path) -> Path:
    """Where the IDX files are (torchvision's ``FashionMNIST(folder)`` layout)."""
    return folder / "FashionMNIST" / "raw"


def _idx_bytes(name: str) -> int:
    """Size of a complete IDX file: 4-byte magic, 4 bytes per dimension, one byte per value."""
    _, shape = FMNIST_FILES[name]
    return 4 * (1 + len(shape)) + int(np.prod(shape))


def _check_idx(data: bytes, name: str, where: Path) -> None:
    """IDX header and length must match Fashion-MNIST's (catches truncated or foreign files)."""
    magic, shape = FMNIST_FILES[name]
    got = tuple(int.from_bytes(data[4 * (i + 1):4 * (i + 2)], "big") for i in range(len(shape)))
    if int.from_bytes(data[:4], "big") != magic or got != shape or len(data) != _idx_bytes(name):
        raise CorruptDataError(
            f"{where}: not a valid Fashion-MNIST IDX file {name} ({len(data)} bytes; expected magic {magic}, "
            f"shape {shape}, {_idx_bytes(name)} bytes); re-install dataset-fashion-mnist "
            f"or delete it and run `python -m d2v2 prepare-data --modalities image`")


def prepare_image(root: str | Path, cfg: ImageDataConfig) -> dict:
    """Decompress and check the Fashion-MNIST IDX files under ``<root>/fashion_mnist`` (idempotent).

    ImageNet is the user's download: only its presence is checked. Returns the manifest (with
    ``"skipped": True`` when the existing files already matched).
    """
    root = Path(root)
    if cfg.dataset == "imagenet":
        base = require_path(cfg.imagenet_dir, "data.image.imagenet_dir", "ImageNet-1k in ImageFolder layout")
        for split in ("train", "val"):
            require_path(base / split, "data.image.imagenet_dir", f"needs {split}/<class>/*.JPEG")
        return {"modality": "image", "dataset": "imagenet", "path": str(base), "skipped": True}

    source = require_path(cfg.fmnist_source, "data.image.fmnist_source",
                          "apt-get install -y dataset-fashion-mnist")
    gz = {name: require_path(source / f"{name}.gz", "data.image.fmnist_source",
                             "apt-get install -y dataset-fashion-mnist") for name in FMNIST_FILES}
    inputs = {"format": FORMAT_VERSION, "dataset": "fmnist",
              "sources": {n: sha256_file(p) for n, p in gz.items()},
              "packages": {"dataset-fashion-mnist": dpkg_version("dataset-fashion-mnist")}}
    folder = root / _FMNIST_DIR
    if manifest_is_current(folder, inputs):
        return {**read_manifest(folder), "skipped": True}

    with atomic_dir(folder) as tmp:
        raw = _raw_dir(tmp)
        raw.mkdir(parents=True)
        counts = {}
        for name, path in gz.items():
            try:
                data = gzip.decompress(path.read_bytes())
            except (OSError, EOFError, zlib.error) as err:
                raise CorruptDataError(f"{path}: corrupt gzip file ({err}); re-install dataset-fashion-mnist") from None
            _check_idx(data, name, path)
            (raw / name).write_bytes(data)
            if "labels" in name:   # images per class, e.g. {"train": [6000] * 10}
                counts["train" if name.startswith("train") else "test"] = np.bincount(np.frombuffer(data, np.uint8, offset=8)).tolist()
        manifest = {"modality": "image", "dataset": "fmnist", "inputs": inputs, "counts": counts,
                    "files": [file_record(p, tmp) for p in sorted(raw.iterdir())]}
        atomic_write_json(tmp / MANIFEST, manifest)
    return {**manifest, "skipped": False}


class FashionMNIST(Dataset):
    """Fashion-MNIST's training (60k) or test (10k) set from the prepared IDX files: ``(image, label)`` with the
    image a (1, 28, 28) uint8 tensor through ``transform``; ``data`` (N, 28, 28) uint8, ``targets`` (N,) int64,
    as torchvision's ``FashionMNIST`` has them."""

    def __init__(self, root: Path, train: bool, transform=None):
        raw = _raw_dir(root / _FMNIST_DIR)
        images, labels = [name for name in FMNIST_FILES if name.startswith("train" if train else "t10k")]
        self.train, self.transform = train, transform
        self.data = torch.from_numpy(self._read(raw, images))
        self.targets = torch.from_numpy(self._read(raw, labels).astype(np.int64))

    @staticmethod
    def _read(raw: Path, name: str) -> np.ndarray:
        path = require_path(raw / name, "data.root", "run `python -m d2v2 prepare-data --modalities image`")
        data = path.read_bytes()
        if len(data) != _idx_bytes(name):
            raise CorruptDataError(f"{path}: {len(data)} bytes, expected {_idx_bytes(name)} (truncated?); "
                                   f"delete {raw.parents[1]} and prepare again")
        _check_idx(data, name, path)
        _, shape = FMNIST_FILES[name]
        return np.frombuffer(data, np.uint8, offset=4 * (1 + len(shape))).reshape(shape).copy()

    def with_transform(self, transform) -> FashionMNIST:
        """The same images and labels, not read again, through another ``transform``."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index][None]
        return (image if self.transform is None else self.transform(image)), int(self.targets[index])


def class_balanced_split(labels: np.ndarray, labels_per_class: int, valid_per_class: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (labelled, valid) index sets with exactly that many indices per class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < labels_per_class + valid_per_class:
            raise ValueError(f"class {c}: {len(idx)} images < labels_per_class + valid_per_class "
                             f"({labels_per_class} + {valid_per_class})")
        train.append(idx[:labels_per_class])
        valid.append(idx[labels_per_class:labels_per_class + valid_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(valid))


class ImageItems(Dataset):
    """``(image, label)`` dataset -> dict items ``{"source", "id"}`` (+ ``"label"``) over ``indices``."""

    def __init__(self, base: Dataset, indices=None, labelled: bool = False):
        self.base, self.labelled = base, labelled
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i])
        image, label = self.base[index]
        item = {"source": image, "id": index}
        if self.labelled:
            item["label"] = int(label)
        return item


def _normalise(mean, std) -> list:
    """uint8 image tensor -> float in [0, 1] -> (x - mean) / std."""
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))     # RandomResizedCrop's default aspect ratios


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop`` box ``(top, left, h, w)`` for an image of ``height x width``: the same
    draws from the default generator in the same order (10 tries at an area in ``scale`` and an aspect ratio
    in (3/4, 4/3), then the central crop)."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(*_LOG_RATIO)).item()
        w, h = round(math.sqrt(target_area * aspect_ratio)), round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    ratio = width / height
    w, h = ((width, round(width / 0.75)) if ratio < 0.75 else (round(height * 4 / 3), height) if ratio > 4 / 3
            else (width, height))
    return (height - h) // 2, (width - w) // 2, h, w


class FmnistTransform:
    """Fashion-MNIST's pretraining / fine-tuning augmentation (module docstring) of a (C, H, W) uint8 tensor,
    or, with ``crop_scale=None`` (evaluation), the normalisation alone.

    The same as torchvision's ``v2.Compose([RandomResizedCrop(H, crop_scale, antialias=True),
    RandomHorizontalFlip(), ToDtype(float32, scale=True), Normalize(FMNIST_MEAN, FMNIST_STD)])``, draw for
    draw and kernel for kernel (tested equal), without its per-call dispatch, which at 28x28 costs more than
    the resampling: 2.2x faster per image (docs/BENCHMARKS.md#fashion-mnist-augmentation)."""

    def __init__(self, crop_scale: tuple[float, float] | None):
        self.crop_scale = crop_scale
        self.mean, self.std = torch.tensor(FMNIST_MEAN).view(-1, 1, 1), torch.tensor(FMNIST_STD).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.crop_scale is not None:
            height, width = image.shape[-2:]
            top, left, h, w = random_resized_crop_box(height, width, self.crop_scale)
            if (h, w) != (height, width):
                image = F.interpolate(image[None, :, top:top + h, left:left + w], size=(height, width),
                                      mode="bilinear", antialias=True, align_corners=False)[0]
            if torch.rand(1) < 0.5:
                image = image.flip(-1)
        return image.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)


def fmnist_transform(cfg: ImageDataConfig, train: bool) -> FmnistTransform:
    """Pretraining / fine-tuning augmentation for 28x28 (see module docstring); eval: normalise only."""
    return FmnistTransform(cfg.fmnist_crop_scale if train else None)


def imagenet_transform(cfg: ImageDataConfig, kind: str):
    """``pretrain`` (METHOD.md#image-encoder), ``finetune`` and ``eval`` (METHOD.md#fine-tuning-images) transforms."""
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    if kind == "pretrain":
        return v2.Compose([v2.RandomResizedCrop(cfg.input_size, scale=cfg.crop_scale, interpolation=bicubic,
                                                antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToImage(), *_normalise(IMAGENET_MEAN, IMAGENET_STD)])
    if kind == "finetune":   # timm create_transform(is_training=True): RRC(0.08, 1) + flip + RandAugment + erasing
        return v2.Compose([v2.RandomResizedCrop(cfg.input_size, interpolation=bicubic, antialias=True),
                           v2.RandomHorizontalFlip(),
                           v2.RandAugment(cfg.randaug_num_ops, cfg.randaug_magnitude, interpolation=bicubic),
                           v2.ToImage(), *_normalise(IMAGENET_MEAN, IMAGENET_STD),
                           v2.RandomErasing(p=cfg.reprob, value="random")])
    return v2.Compose([v2.Resize(cfg.eval_resize, interpolation=bicubic, antialias=True),
                       v2.CenterCrop(cfg.input_size), v2.ToImage(), *_normalise(IMAGENET_MEAN, IMAGENET_STD)])


def _imagenet_folder(cfg: ImageDataConfig, split: str, transform):
    from torchvision import datasets

    base = require_path(cfg.imagenet_dir, "data.image.imagenet_dir", "ImageNet-1k in ImageFolder layout")
    path = require_path(base / split, "data.image.imagenet_dir", f"needs {split}/<class>/*.JPEG")
    return datasets.ImageFolder(str(path), transform=transform)


def pretrain_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """Unlabelled images ``{"source": (C,H,W) float32, "id"}``: ``train`` augmented, ``valid`` (the
    official test / val images) with the evaluation transform."""
    icfg, train = cfg.image, split == "train"
    if split not in ("train", "valid"):
        raise ValueError(f"image pretraining split must be 'train' or 'valid' (got {split!r})")
    if icfg.dataset == "fmnist":
        return ImageItems(FashionMNIST(Path(cfg.root), train, fmnist_transform(icfg, train=train)))
    return ImageItems(_imagenet_folder(icfg, "train" if train else "val",
                                       imagenet_transform(icfg, "pretrain" if train else "eval")))


_FMNIST_TASK = re.compile(r"fmnist(?:-(\d+))?$")


def finetune_datasets(cfg: DataConfig, task: str) -> dict[str, Dataset]:
    """``train`` / ``valid`` / ``test`` labelled datasets for ``fmnist[-N]`` or ``imagenet``."""
    icfg, root = cfg.image, Path(cfg.root)
    if (match := _FMNIST_TASK.match(task)) and icfg.dataset == "fmnist":
        per_class = int(match.group(1) or icfg.labels_per_class)
        train_aug = FashionMNIST(root, True, fmnist_transform(icfg, train=True))
        train_eval = train_aug.with_transform(fmnist_transform(icfg, train=False))
        labelled, valid = class_balanced_split(train_aug.targets.numpy(), per_class, icfg.valid_per_class,
                                              icfg.split_seed)
        return {"train": ImageItems(train_aug, labelled, labelled=True),
                "valid": ImageItems(train_eval, valid, labelled=True),
                "test": ImageItems(FashionMNIST(root, False, fmnist_transform(icfg, train=False)), labelled=True)}
    if task == "imagenet" and icfg.dataset == "imagenet":
        train = _imagenet_folder(icfg, "train", imagenet_transform(icfg, "finetune"))
        test = ImageItems(_imagenet_folder(icfg, "val", imagenet_transform(icfg, "eval")), labelled=True)
        if icfg.imagenet_holdout_per_class == 0:   # the paper selects and reports on val
            return {"train": ImageItems(train, labelled=True), "valid": test, "test": test}
        holdout_eval = type(train)(train.root, transform=imagenet_transform(icfg, "eval"))
        labelled, valid = class_balanced_split(np.asarray(train.targets), 0, icfg.imagenet_holdout_per_class,
                                              icfg.split_seed)
        rest = np.setdiff1d(np.arange(len(train)), valid)
        return {"train": ImageItems(train, rest, labelled=True),
                "valid": ImageItems(holdout_eval, valid, labelled=True), "test": test}
    raise ValueError(f"image task {task!r} does not match data.image.dataset={icfg.dataset!r} "
                     f"(tasks: 'fmnist', 'fmnist-<labels per class>' with fmnist; 'imagenet' with imagenet)")


def collate(items: list[dict]) -> dict:
    """Stack images and ids (and labels when present)."""
    batch = {"source": torch.stack([it["source"] for it in items]),
             "id": torch.tensor([it["id"] for it in items], dtype=torch.int64)}
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.int64)
    return batch


def finetune_collater(cfg: DataConfig, task: str):
    """Fine-tuning batches ``{"source", "label", "id"}``; MixUp/CutMix is :class:`MixupCutmix`."""
    return collate


def task_info(task: str) -> dict:
    num_classes = IMAGENET_CLASSES if task == "imagenet" else FMNIST_CLASSES
    if task != "imagenet" and not _FMNIST_TASK.match(task):
        raise ValueError(f"unknown image task {task!r} (have 'fmnist', 'fmnist-<N>', 'imagenet')")
    return {"task": task, "num_classes": num_classes, "regression": False, "metrics": ["accuracy"],
            "primary_metric": "accuracy", "higher_is_better": True}


class MixupCutmix:
    """Batch transform for fine-tuning (METHOD.md#fine-tuning-images): with probability ``mix_prob`` apply MixUp (alpha 0.7)
    or, with ``mix_switch_prob``, CutMix (alpha 1.0). Labels become soft ``(B, num_classes)`` float32;
    label smoothing is left to the loss (``F.cross_entropy(..., label_smoothing=0.1)`` accepts soft
    targets), unlike timm which folds it into the mixed targets.
    """

    def __init__(self, cfg: ImageDataConfig, num_classes: int):
        from torchvision.transforms import v2

        choices, probs = [], []
        if cfg.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
            probs.append(1 - cfg.mix_switch_prob if cfg.cutmix_alpha > 0 else 1.0)
        if cfg.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
            probs.append(cfg.mix_switch_prob if cfg.mixup_alpha > 0 else 1.0)
        self.num_classes, self.mix_prob = num_classes, cfg.mix_prob if choices else 0.0
        self.mix = v2.RandomChoice(choices, p=probs) if choices else None

    def __call__(self, batch: dict) -> dict:
        label = batch["label"]
        if self.mix is not None and torch.rand(()) < self.mix_prob:
            source, soft = self.mix(batch["source"], label)
        else:
            source, soft = batch["source"], torch.nn.functional.one_hot(label, self.num_classes).float()
        return {**batch, "source": source, "label": soft}
