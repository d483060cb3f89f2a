"""Length-bucketed fine-tuning batches (sampler.LengthBucketedBatchSampler, ``bucket_by_length``): every
utterance once per epoch in full batches, much less padding than random batches on the real speech and text
lengths, reproducible per seed and reshuffled per epoch; evaluation in length order; fine-tuning still runs."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from d2v2 import data as D
from d2v2.config import ConfigError
from d2v2.data.speech import read_fairseq_manifest
from d2v2.engine import finetune as F
from d2v2.engine.ftconfig import finetune_config
from d2v2.engine.sampler import LengthBucketedBatchSampler
from d2v2.method import build_method
from test_finetune import _data

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def train_sizes() -> np.ndarray:
    """Lengths in samples of the real tiny-recipe training utterances (300, 2-4 s)."""
    return read_fairseq_manifest(_data("speech") / "speech", "train").sizes


def _epoch(sampler: LengthBucketedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _random_batches(num_items: int, batch_size: int, seed) -> list[np.ndarray]:
    """Full batches of a random permutation, as without bucketing."""
    perm = np.random.default_rng(seed).permutation(num_items)
    return [perm[i:i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size)]


def _padding(batches, sizes: np.ndarray) -> float:
    """Padded samples per real sample when each batch is padded to its longest item."""
    return sum(sizes[b].max() * len(b) - sizes[b].sum() for b in batches) / sum(sizes[b].sum() for b in batches)


@pytest.mark.parametrize("num_items, chunk_batches", [(288, 64), (300, 64), (300, 2)])
def test_every_item_once_in_full_batches(train_sizes, num_items, chunk_batches):
    sizes, batch_size = train_sizes[:num_items], 16
    sampler = LengthBucketedBatchSampler(sizes, batch_size, seed=0, chunk_batches=chunk_batches)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == num_items // batch_size
        assert all(len(b) == batch_size for b in batches)
        seen = [i for b in batches for i in b]
        assert len(set(seen)) == len(seen) == len(batches) * batch_size     # nobody twice
        if num_items % batch_size == 0:
            assert sorted(seen) == list(range(num_items))                   # everybody once
    # the remainder left out (drop_last) is a different random few every epoch
    left_out = [set(range(300)) - {i for b in _epoch(sampler, e) for i in b} for e in range(3)]
    if num_items == 300:
        assert all(len(s) == 300 % 16 for s in left_out) and left_out[0] != left_out[1]


def test_less_padding_than_random_batches(train_sizes):
    batch_size, bucketed, random = 16, [], []
    for epoch in range(3):
        bucketed += _epoch(LengthBucketedBatchSampler(train_sizes, batch_size, seed=0), epoch)
        random += _random_batches(len(train_sizes), batch_size, [0, epoch])
    # measured: 0.41 padded samples per real sample at random, 0.02 bucketed (0.10 with chunks of 4 batches)
    assert _padding(random, train_sizes) > 0.2
    assert _padding(bucketed, train_sizes) < 0.25 * _padding(random, train_sizes)
    chunked = _epoch(LengthBucketedBatchSampler(train_sizes, batch_size, seed=0, chunk_batches=4), 0)
    assert _padding(chunked, train_sizes) < 0.5 * _padding(random, train_sizes)


def test_reproducible_per_seed_and_reshuffled_per_epoch(train_sizes):
    a, b = (LengthBucketedBatchSampler(train_sizes, 16, seed=0) for _ in range(2))
    assert _epoch(a, 0) == _epoch(b, 0) and _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)                                     # batch order differs by epoch
    assert _epoch(a, 0) != _epoch(LengthBucketedBatchSampler(train_sizes, 16, seed=1), 0)
    with pytest.raises(ValueError, match="batch_size=16"):
        LengthBucketedBatchSampler(train_sizes[:10], 16, seed=0)


def test_option_where_items_have_lengths():
    """Speech buckets in every preset (fairseq's recipe), text in tiny only (fairseq's text batches are
    random), images have no lengths."""
    with pytest.raises(ConfigError, match="bucket_by_length"):
        finetune_config({"modality": "image", "preset": "smoke", "bucket_by_length": True})
    for preset in ("base", "tiny"):
        assert finetune_config({"modality": "speech", "preset": preset}).bucket_by_length
    assert finetune_config({"modality": "text", "preset": "tiny"}).bucket_by_length
    assert not finetune_config({"modality": "text", "preset": "base"}).bucket_by_length


def test_text_batches_less_padding():
    """The tiny text task's real sentences (33 tokens on average): random batches of 32 pad to about twice
    that, bucketed ones hardly at all."""
    cfg = finetune_config({"modality": "text", "preset": "tiny", "data": {"root": str(_data("text"))}})
    sizes = D.finetune_datasets("text", cfg.data, cfg.task)["train"].sizes
    assert sizes.dtype == np.int64 and 20 < sizes.mean() < 50
    sampler = LengthBucketedBatchSampler(sizes, cfg.batch_size, seed=0)
    random = _random_batches(len(sizes), cfg.batch_size, 0)
    assert _padding(random, sizes) > 0.5
    assert _padding(_epoch(sampler, 0), sizes) < 0.1 * _padding(random, sizes)


@pytest.mark.parametrize("modality, task", [("speech", "ctc"), ("text", "movie")])
def test_evaluation_batches_in_length_order(modality, task):
    root = _data(modality)
    cfg = finetune_config({"modality": modality, "preset": "smoke", "eval_max_samples": 40, "bucket_by_length": True,
                           "data": {"root": str(root), "num_workers": 0}})
    valid = D.finetune_datasets(modality, cfg.data, task)["valid"]
    loader = F.make_loader(valid, cfg, 16, False, CPU)
    chosen = loader.dataset.indices                                         # the fixed evaluation subset
    order = [chosen[i] for b in loader.batch_sampler for i in b]
    assert sorted(order) == sorted(chosen) and len(order) == 40
    assert np.all(np.diff(valid.sizes[order]) >= 0)
    assert [len(b) for b in loader.batch_sampler] == [16, 16, 8]


class _Utterances(Dataset):
    """Random waveforms of known lengths shaped like SpeechFinetuneDataset items; records what is read."""

    def __init__(self, lengths: list[int]):
        g = torch.Generator().manual_seed(0)
        self.sizes = np.asarray(lengths)
        self.waves = [torch.randn(n, generator=g) for n in lengths]
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return {"source": self.waves[i], "target": torch.tensor([2, 3, 4]), "transcript": "ABC", "id": i}


def test_training_reshuffles_each_epoch_reproducibly():
    """``train`` sets the sampler's epoch: 5 updates over 8 utterances in batches of 4 = 3 epochs, each
    reading all 8, in an order that differs by epoch and repeats run to run."""
    cfg = finetune_config({"modality": "speech", "preset": "smoke", "budget": {"value": 5}, "freeze_updates": 0,
                           "data": {"num_workers": 0}})
    info = D.task_info("speech", "ctc")
    reads = []
    for _ in range(2):
        torch.manual_seed(0)
        data = _Utterances([3000, 7000, 3200, 6800, 4000, 5000, 3100, 6900])
        loader = F.make_loader(data, cfg, 4, True, CPU)
        assert isinstance(loader.batch_sampler, LengthBucketedBatchSampler)
        model = F.build_model(cfg, info, build_method("speech", "data2vec2", "smoke").encoder())
        F.train(model, cfg, 1e-3, loader, CPU, log=lambda *_: None)
        assert loader.batch_sampler.epoch == 2
        reads.append(data.read)
    assert reads[0] == reads[1]
    epochs = [reads[0][k:k + 8] for k in range(0, 24, 8)][:2] + [reads[0][16:20]]
    assert all(sorted(e) == list(range(8)) for e in epochs[:2]) and epochs[0] != epochs[1]
    batches = [sorted(reads[0][k:k + 4]) for k in range(0, 16, 4)]
    assert all(b in ([0, 2, 4, 6], [1, 3, 5, 7]) for b in batches)          # short with short, long with long


def test_smoke_text_finetune_with_bucketing():
    cfg = finetune_config({"modality": "text", "preset": "smoke", "init": "random", "bucket_by_length": True,
                           "arch": {"method": "data2vec2", "preset": "smoke"},
                           "data": {"root": str(_data("text")), "num_workers": 0}})
    record = F.finetune(cfg, None, log=lambda *_: None)
    assert record["finetune"]["updates"] == 4 and record["finetune"]["config"]["bucket_by_length"] is True
    assert 0 <= record["metrics"]["test_accuracy"] <= 1


def test_smoke_finetune_with_bucketing(tmp_path):
    root = _data("speech")
    cfg = finetune_config({"modality": "speech", "preset": "smoke", "init": "random", "eval_max_samples": 8,
                           "arch": {"method": "data2vec2", "preset": "smoke"}, "primary_metric": "cer",
                           "data": {"root": str(root), "num_workers": 0}})
    assert cfg.bucket_by_length
    record = F.finetune(cfg, None, log=lambda *_: None)
    assert record["finetune"]["updates"] == 4 and record["primary_metric"] == "test_cer"
    assert record["finetune"]["config"]["bucket_by_length"] is True
    assert 0 <= record["metrics"]["valid_cer"] and 0 <= record["metrics"]["test_wer"]
