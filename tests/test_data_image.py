"""Image data: Fashion-MNIST (real, prepared once) and ImageNet in ImageFolder layout (tiny fixture)."""
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v2.data import DataConfig, finetune_collater, finetune_datasets, pretrain_dataset, prepare, task_info
from d2v2.data.common import CorruptDataError, MissingDataError
from d2v2.data.image import FMNIST_MEAN, FMNIST_STD, MixupCutmix, class_balanced_split, random_resized_crop_box

ROOT = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def cfg():
    cfg = DataConfig(root=str(ROOT))
    prepare(["image"], cfg)
    return cfg


def test_pretrain_items(cfg):
    ds = pretrain_dataset("image", cfg)
    assert len(ds) == 60000 and len(pretrain_dataset("image", cfg, "valid")) == 10000
    item = ds[0]
    assert item["source"].shape == (1, 28, 28) and item["source"].dtype == torch.float32
    assert item["id"] == 0 and "label" not in item
    batch = torch.stack([ds[i]["source"] for i in range(256)])
    assert abs(batch.mean()) < 0.3 and 0.7 < batch.std() < 1.3      # normalised (augmented crops)
    assert not torch.equal(ds[1]["source"], ds[1]["source"])              # augmented ...
    valid = pretrain_dataset("image", cfg, "valid")
    assert torch.equal(valid[1]["source"], valid[1]["source"])           # ... but not the held-out images


def test_items_are_torchvisions_images_with_the_same_augmentation(cfg):
    """Our reader and augmentation skip torchvision, nothing else: with the same random state each item is
    what torchvision's FashionMNIST image through ToImage and torchvision's own transforms gives, and
    importing the image data does not import torchvision (a second of every job's start)."""
    import subprocess
    import sys

    from torchvision import datasets
    from torchvision.transforms import v2

    code = "import sys, d2v2.data.image; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(FMNIST_MEAN, FMNIST_STD)]
    augment = [v2.RandomResizedCrop(28, scale=cfg.image.fmnist_crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    root = str(ROOT / "fashion_mnist")
    for split, transforms in (("train", augment + normalise), ("valid", normalise)):
        ds = pretrain_dataset("image", cfg, split)
        reference = datasets.FashionMNIST(root, train=split == "train", download=False,
                                          transform=v2.Compose([v2.ToImage(), *transforms]))
        for i in range(0, 2000, 7):
            torch.manual_seed(i)
            ours = ds[i]["source"]
            torch.manual_seed(i)
            assert type(ours) is torch.Tensor and torch.equal(ours, reference[i][0]), (split, i)


def test_crop_box_falls_back_to_torchvisions_central_crop():
    """Where no try fits (a scale above the image), the box is torchvision's central crop at an allowed ratio."""
    from torchvision.transforms import v2

    for height, width in ((28, 28), (20, 40), (40, 20)):
        torch.manual_seed(0)
        ours = random_resized_crop_box(height, width, (2.0, 3.0))
        torch.manual_seed(0)
        assert ours == tuple(v2.RandomResizedCrop(8, scale=(2.0, 3.0)).make_params([torch.zeros(1, height, width)])[k]
                             for k in ("top", "left", "height", "width"))


def test_mean_std_constants_match_the_training_set(cfg):
    raw = ROOT / "fashion_mnist" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    counts = np.bincount(np.frombuffer(raw.read_bytes(), dtype=np.uint8, offset=16), minlength=256)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert mean == pytest.approx(FMNIST_MEAN[0], abs=5e-4) and std == pytest.approx(FMNIST_STD[0], abs=5e-4)


def test_finetune_splits_balanced_disjoint_deterministic(cfg):
    splits = finetune_datasets("image", cfg, "fmnist")
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    labels = train.base.targets.numpy()
    assert np.bincount(labels[train.indices], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels[valid.indices], minlength=10).tolist() == [500] * 10
    assert not set(train.indices) & set(valid.indices)
    assert len(test) == 10000 and test.base.train is False     # the official test set
    item = train[0]
    assert item["source"].shape == (1, 28, 28) and 0 <= item["label"] < 10
    again = finetune_datasets("image", cfg, "fmnist")["train"].indices
    assert np.array_equal(again, train.indices)
    other = finetune_datasets("image", cfg.model_copy(update={"image": cfg.image.model_copy(update={"split_seed": 1})}),
                              "fmnist")["train"].indices
    assert not np.array_equal(other, train.indices)
    assert len(finetune_datasets("image", cfg, "fmnist-10")["train"]) == 100
    batch = finetune_collater("image", cfg, "fmnist")([train[i] for i in range(4)])
    assert batch["source"].shape == (4, 1, 28, 28) and batch["label"].dtype == torch.int64
    assert task_info("image", "fmnist-10") == {"task": "fmnist-10", "num_classes": 10, "regression": False,
                                               "metrics": ["accuracy"], "primary_metric": "accuracy",
                                               "higher_is_better": True}


def test_manifest_counts_from_the_files(cfg):
    manifest = prepare(["image"], cfg)["image"]
    assert manifest["skipped"] and manifest["counts"] == {"train": [6000] * 10, "test": [1000] * 10}
    assert manifest["inputs"]["packages"]["dataset-fashion-mnist"].startswith("0.0~git2020")


def test_class_balanced_split_needs_enough_images():
    with pytest.raises(ValueError, match="class 1: 2 images"):
        class_balanced_split(np.array([0, 0, 0, 1, 1]), 1, 2, seed=0)


def test_truncated_gz_and_idx_give_clear_errors(cfg, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(cfg.image.fmnist_source, source)
    gz = source / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-100])
    bad = DataConfig(root=str(tmp_path / "root"), image={"fmnist_source": str(source)})
    with pytest.raises(CorruptDataError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip"):
        prepare(["image"], bad)
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20))    # valid gzip, wrong IDX content
    with pytest.raises(CorruptDataError, match="not a valid Fashion-MNIST IDX file t10k-labels-idx1-ubyte"):
        prepare(["image"], bad)
    assert not (tmp_path / "root" / "fashion_mnist").exists()         # nothing half-written
    # a prepared file truncated afterwards
    shutil.copytree(ROOT / "fashion_mnist", tmp_path / "copy" / "fashion_mnist")
    raw = tmp_path / "copy" / "fashion_mnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte: 1000 bytes, expected 7840016"):
        pretrain_dataset("image", DataConfig(root=str(tmp_path / "copy")), "valid")
    with pytest.raises(MissingDataError, match="data.root: not found: .*train-images-idx3-ubyte"):
        pretrain_dataset("image", DataConfig(root=str(tmp_path / "empty")))


@pytest.fixture
def imagenet(tmp_path):
    """A tiny ImageFolder tree: 2 classes x 4 JPEGs in train/ and 2 in val/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / wnid / f"{i}.JPEG")
    return DataConfig(image={"dataset": "imagenet", "imagenet_dir": str(tmp_path), "input_size": 32,
                             "eval_resize": 36})


def test_imagenet_transforms_and_splits(imagenet):
    assert prepare(["image"], imagenet)["image"]["dataset"] == "imagenet"
    item = pretrain_dataset("image", imagenet)[0]
    assert item["source"].shape == (3, 32, 32) and item["source"].dtype == torch.float32
    splits = finetune_datasets("image", imagenet, "imagenet")
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (8, 4, 4)
    assert splits["train"][0]["source"].shape == (3, 32, 32) and splits["test"][3]["label"] == 1
    held = imagenet.model_copy(update={"image": imagenet.image.model_copy(update={"imagenet_holdout_per_class": 1})})
    splits = finetune_datasets("image", held, "imagenet")
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (6, 2, 4)
    assert not set(splits["train"].indices) & set(splits["valid"].indices)
    with pytest.raises(ValueError, match="does not match data.image.dataset='imagenet'"):
        finetune_datasets("image", imagenet, "fmnist")


def test_imagenet_missing_dir_names_the_key(tmp_path):
    cfg = DataConfig(image={"dataset": "imagenet", "imagenet_dir": str(tmp_path / "nope")})
    with pytest.raises(MissingDataError, match=r"data\.image\.imagenet_dir: not found: .*nope"):
        pretrain_dataset("image", cfg)
    with pytest.raises(MissingDataError, match=r"data\.image\.imagenet_dir: not set"):
        prepare(["image"], DataConfig(image={"dataset": "imagenet"}))


def test_mixup_cutmix_soft_labels():
    torch.manual_seed(0)
    batch = {"source": torch.randn(8, 3, 16, 16), "label": torch.arange(8) % 4, "id": torch.arange(8)}
    mixed = [MixupCutmix(DataConfig().image, num_classes=4)(batch) for _ in range(20)]
    for out in mixed:
        assert out["label"].shape == (8, 4) and torch.allclose(out["label"].sum(1), torch.ones(8))
    assert any(not torch.equal(out["source"], batch["source"]) for out in mixed)
    off = MixupCutmix(DataConfig(image={"mix_prob": 0.0}).image, num_classes=4)(batch)
    assert torch.equal(off["source"], batch["source"]) and torch.equal(off["label"].argmax(1), batch["label"])
