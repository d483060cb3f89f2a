"""The shared data API: atomic files, manifests, errors, the masking collater, loader settings, prepare-data."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from baselines.masking import BlockMasker
from d2v2.config import ConfigError
from d2v2.data import (DataConfig, MaskingCollater, finetune_collater, finetune_datasets, loader_kwargs,
                       prepare, pretrain_collater, pretrain_dataset, task_info)
from d2v2.atomic import atomic_dir, atomic_write, atomic_write_json
from d2v2.data.common import (MissingDataError, OneStorageCollater, file_record, manifest_is_current, one_storage,
                               require_path, stable_seed)
from d2v2.data.prepare_cli import build_config, main as prepare_main

ROOT = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def prepared():
    """The embedded image + text data under <repo>/data (prepared once; later runs only verify it)."""
    assert prepare_main(["--root", str(ROOT), "--modalities", "image", "text"]) == 0
    return DataConfig(root=str(ROOT))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_replaces_the_old_folder_only_on_success(tmp_path):
    folder = tmp_path / "d"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash")
    assert (folder / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with atomic_dir(folder) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]


def test_require_path_names_key_and_path(tmp_path):
    with pytest.raises(MissingDataError, match=r"data\.text\.glue_dir: not found: .*nope \(GLUE\)"):
        require_path(tmp_path / "nope", "data.text.glue_dir", "GLUE")
    with pytest.raises(MissingDataError, match=r"data\.image\.imagenet_dir: not set"):
        require_path(None, "data.image.imagenet_dir")


def test_manifest_detects_changed_inputs_and_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abcd")
    inputs = {"vocab_size": 8, "sources": {"a": "123"}}
    record = file_record(tmp_path / "x.bin", tmp_path)
    atomic_write_json(tmp_path / "manifest.json", {"inputs": inputs, "files": [record]})
    assert manifest_is_current(tmp_path, inputs)
    assert not manifest_is_current(tmp_path, {**inputs, "vocab_size": 9})
    (tmp_path / "x.bin").write_bytes(b"abce")                       # same size, other content
    assert manifest_is_current(tmp_path, inputs, verify=False)
    assert not manifest_is_current(tmp_path, inputs)


def test_stable_seed_is_a_fixed_function():
    # a golden value: the same in every process, Python version and machine (unlike hash())
    assert stable_seed(3, 1, [5, 7, 9]) == stable_seed(3, 1, torch.tensor([5, 7, 9])) == 2701197391439500629
    assert len({stable_seed(3, 1, [5, 7, 9]), stable_seed(3, 2, [5, 7, 9]), stable_seed(4, 1, [5, 7, 9]),
                stable_seed(3, 1, [5, 7, 8])}) == 4


class _WithEpoch(torch.utils.data.Dataset):
    """What the engine's sampler wrapper does: tag each item with its epoch."""

    def __init__(self, base, epoch):
        self.base, self.epoch = base, epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {**self.base[i], "epoch": self.epoch}


def _masks(dataset, collater, workers):
    loader = DataLoader(dataset, batch_size=8, collate_fn=collater, num_workers=workers)
    return [(b["id"], b["mask"]) for b in loader]


def test_masking_collater_reproducible_across_worker_counts(prepared):
    dataset = Subset(pretrain_dataset("image", prepared), range(48))
    collater = pretrain_collater("image", prepared, BlockMasker(patch_size=2), seed=7)
    pickle.loads(pickle.dumps(collater))
    one, two = _masks(dataset, collater, 0), _masks(dataset, collater, 2)
    for (ids_a, m_a), (ids_b, m_b) in zip(one, two, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(m_a, m_b)
    assert m_a.shape == (8, 196) and m_a.dtype == torch.bool
    # another epoch or seed gives other masks
    next_epoch = _masks(_WithEpoch(dataset, 1), collater, 0)
    assert not torch.equal(next_epoch[0][1], one[0][1])
    other_seed = _masks(dataset, pretrain_collater("image", prepared, BlockMasker(patch_size=2), seed=8), 0)
    assert not torch.equal(other_seed[0][1], one[0][1])


def test_masking_collater_rejects_mixed_epochs():
    collater = MaskingCollater(lambda items: {"id": torch.tensor([i["id"] for i in items])}, None, 0)
    with pytest.raises(ValueError, match="different epochs"):
        collater([{"id": 0, "epoch": 0}, {"id": 1, "epoch": 1}])


def test_loader_kwargs():
    cfg = DataConfig(num_workers=0)
    assert loader_kwargs(cfg, "cpu") == {"num_workers": 0, "pin_memory": False}
    kw = loader_kwargs(DataConfig(num_workers=3, prefetch_factor=2), "cuda")
    assert kw["num_workers"] == 3 and kw["pin_memory"] and kw["persistent_workers"] and kw["prefetch_factor"] == 2
    auto = loader_kwargs(DataConfig(), "cpu")
    assert 0 <= auto["num_workers"] <= 10
    DataLoader(range(4), **auto)   # accepted by DataLoader as is


def test_worker_batches_come_in_one_storage_and_equal_in_process_batches():
    """A worker's batch: every tensor a view of one storage, values, dtypes and shapes unchanged (also
    zero-size and non-contiguous ones), other values kept; through a real worker process the batches equal
    those collated in the training process."""
    batch = {"source": torch.randn(3, 5).t(), "mask": torch.rand(4, 7) > 0.5, "id": torch.arange(3),
             "empty": torch.zeros(2, 0, dtype=torch.int64), "flag": torch.tensor(True), "transcript": ["a", "b"]}
    packed = one_storage(batch)
    assert list(packed) == list(batch) and packed["transcript"] is batch["transcript"]
    tensors = [v for v in packed.values() if isinstance(v, torch.Tensor)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert packed[key].dtype == value.dtype and torch.equal(packed[key], value), key

    def collate(items):
        return {"x": torch.stack([torch.full((3,), float(i)) for i in items]), "id": torch.tensor(items),
                "mask": torch.tensor(items) % 2 == 0, "names": [str(i) for i in items]}

    in_process = DataLoader(range(8), batch_size=4, **loader_kwargs(DataConfig(num_workers=0), "cpu", collate))
    worker = DataLoader(range(8), batch_size=4, **loader_kwargs(DataConfig(num_workers=1), "cpu", collate))
    assert isinstance(worker.collate_fn, OneStorageCollater) and in_process.collate_fn is collate
    for a, b in zip(in_process, worker, strict=True):
        assert a["names"] == b["names"] and all(torch.equal(a[k], b[k]) for k in ("x", "id", "mask"))
        assert len({b[k].untyped_storage().data_ptr() for k in ("x", "id", "mask")}) == 1


def test_loader_workers_shared_by_the_processes_of_a_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert loader_kwargs(DataConfig(), "cuda")["num_workers"] == 7        # 32 CPUs / 4 tasks - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_kwargs(DataConfig(), "cuda")["num_workers"] == 10       # capped
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert loader_kwargs(DataConfig(), "cpu")["num_workers"] == 1         # 2-core CPU: one worker


def test_config_errors_name_the_key():
    typo = r"data\.image\.labels_per_clas: unknown key \(did you mean 'labels_per_class'"
    with pytest.raises(ConfigError, match=typo):
        build_config(None, None, ["image.labels_per_clas=5"])
    with pytest.raises(ConfigError, match=r"data\.text\.task_fractions"):
        build_config(None, None, ["text.task_fractions=[0.5,0.5,0.5]"])
    assert build_config(None, "/x", ["data.text.vocab_size=4096"]).text.vocab_size == 4096


def test_config_from_run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: data2vec2}\ndata:\n  image: {labels_per_class: 10}\n")
    cfg = build_config(str(path), None, ["num_workers=1"])
    assert cfg.image.labels_per_class == 10 and cfg.num_workers == 1


def test_unknown_modality_and_task(prepared):
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        task_info("video", "x")
    with pytest.raises(ValueError, match="unknown text task 'sst3'"):
        finetune_datasets("text", prepared, "sst3")
    assert task_info("speech", "ctc")["primary_metric"] == "wer"
    assert task_info("speech", "ctc")["higher_is_better"] is False


def test_prepare_is_idempotent(prepared, capsys):
    assert prepare_main(["--root", str(ROOT), "--modalities", "image", "text"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, nothing to do") == 2
    manifest = json.loads((ROOT / "text" / "embedded" / "manifest.json").read_text())
    assert manifest["inputs"]["packages"]["bible-kjv-text"] and manifest["counts"]["vocab_size"] == 8192
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_prepare_reports_missing_source(tmp_path, capsys):
    code = prepare_main(["--root", str(tmp_path), "--modalities", "image", f"image.fmnist_source={tmp_path}/none"])
    assert code == 1
    assert "data.image.fmnist_source: not found" in capsys.readouterr().err
    assert prepare_main(["--modalities", "image", "image.nope=1"]) == 2


def test_speech_dispatch(tmp_path):
    """The API serves the speech module's corpus (a tiny synthesised one) like the other modalities."""
    synth = {"num_pretrain": 4, "num_train": 2, "num_valid": 1, "num_test": 1, "num_test_flite": 1, "asterisk": False}
    cfg = DataConfig(root=str(tmp_path), speech={"synth": synth, "min_sample_size": 0})
    assert not prepare(["speech"], cfg)["speech"]["skipped"] and prepare(["speech"], cfg)["speech"]["skipped"]
    dataset = pretrain_dataset("speech", cfg)
    batch = pretrain_collater("speech", cfg, None, seed=0)([dataset[i] for i in range(4)])
    assert len(dataset) == 4 and batch["source"].dtype == torch.float32
    assert batch["source"].shape[1] == min(len(dataset[i]["source"]) for i in range(4))   # cropped to shortest
    splits = finetune_datasets("speech", cfg, "ctc")
    assert set(splits) == {"train", "valid", "test", "test_flite"}
    ft = finetune_collater("speech", cfg, "ctc")([splits["train"][0], splits["train"][1]])
    assert ft["padding_mask"].dtype == torch.bool and ft["target"].dtype == torch.int64
