"""HuBERT's label chain on a small synthesised corpus: MFCC features, k-means labels (deterministic for a
seed), pretraining on them through the engine, the iteration-1 model's layer features, labels of those, and
iteration 2 on the new labels."""
import json

import numpy as np
import pytest
import torch
import torchaudio

from baselines.hubert_labels import LayerFeatures, make_labels, mfcc_features
from d2v2.config import ConfigError, validate
from d2v2.data import DataConfig, speech_root
from d2v2.data.speech import LabelFile, load_audio, read_split
from d2v2.data.speech_synth import prepare_speech
from d2v2.engine.pretrain import run
from d2v2.engine.runconfig import resolve_run_config

TINY = {"num_pretrain": 8, "num_train": 2, "num_valid": 2, "num_test": 2, "num_test_flite": 2, "asterisk": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("hubert-data")
    cfg = validate(DataConfig, {"root": str(root), "num_workers": 0, "speech": {"synth": TINY}}, where="data")
    prepare_speech(root / "speech", cfg.speech, workers=2)
    return cfg


def test_mfcc_features_are_kaldi_mfccs_with_their_deltas():
    wav = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    feats = mfcc_features(wav, 16_000)
    assert feats.shape == ((16_000 - 400) // 160 + 1, 39)                   # 25 ms windows every 10 ms
    mfcc = torchaudio.compliance.kaldi.mfcc(torch.from_numpy(wav)[None], use_energy=False)
    torch.testing.assert_close(feats[:, :13], mfcc)
    torch.testing.assert_close(feats[:, 13:26], torchaudio.functional.compute_deltas(mfcc.T).T)


def test_mfcc_labels_cover_every_utterance_and_repeat_for_a_seed(data, tmp_path):
    info = make_labels(data, tmp_path / "a", clusters=8, seed=3)
    utts = read_split(speech_root(data), data.speech, "pretrain")
    lines = (tmp_path / "a" / "pretrain.km").read_text().splitlines()
    assert len(lines) == len(utts.paths) == info["utterances"]
    for line, path, size in zip(lines, utts.paths, utts.sizes):
        ids = [int(x) for x in line.split()]
        assert len(ids) == len(mfcc_features(load_audio(path, int(size), 16_000), 16_000))
        assert 0 <= min(ids) and max(ids) < 8
    assert len({x for line in lines for x in line.split()}) > 4          # the clusters are used
    meta = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert meta["label_rate"] == 100.0 and meta["features"] == {"kind": "mfcc"} and meta["clusters"] == 8
    assert meta["seconds"]["fit"]["wall_s"] > 0 and meta["seconds"]["label"]["cpu_s"] > 0
    make_labels(data, tmp_path / "b", clusters=8, seed=3)
    assert (tmp_path / "b" / "pretrain.km").read_text() == "\n".join(lines) + "\n"


def hubert_run(data: DataConfig, labels: str, out, overrides: dict, input_costs: list[str] = ()) -> None:
    cfg = resolve_run_config({"input_costs": list(input_costs),
        "method": {"modality": "speech", "name": "hubert", "preset": "smoke", "overrides": overrides},
        "data": {**data.model_dump(), "speech": {**data.speech.model_dump(), "pretrain_labels": labels,
                                                "min_sample_size": 16_000, "max_sample_size": 32_000}},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.5}, "batch_size": 2, "budget": {"kind": "updates", "value": 2},
        "log_every": 1, "threads": 1, "progress": False, "device": "cpu"})
    assert run(cfg, str(out)) == 0


def test_two_iterations_through_the_engine(data, tmp_path):
    """Iteration 1 on MFCC clusters; its block 1 clustered at 50 per second; iteration 2 on those."""
    make_labels(data, tmp_path / "mfcc", clusters=8)
    hubert_run(data, str(tmp_path / "mfcc" / "pretrain.km"), tmp_path / "iter1", {"num_classes": 8})
    checkpoint = tmp_path / "iter1" / "checkpoint_last.pt"
    info = make_labels(data, tmp_path / "layer", clusters=6, checkpoint=checkpoint, layer=1)
    assert info["label_rate"] == 50.0 and info["features"]["layer"] == 1 and info["features"]["device"] == "cpu"
    utts = read_split(speech_root(data), data.speech, "pretrain")
    first = LabelFile(tmp_path / "layer" / "pretrain.km", len(utts.paths))[0]
    assert len(first) == (utts.sizes[0] - 400) // 320 + 1                # one label per encoder frame
    costs = [tmp_path / "mfcc" / "labels.json", tmp_path / "iter1" / "summary.json", tmp_path / "layer" / "labels.json"]
    hubert_run(data, str(tmp_path / "layer" / "pretrain.km"), tmp_path / "iter2",
               {"num_classes": 6, "label_rate": 50}, [str(c) for c in costs])
    summary = json.loads((tmp_path / "iter2" / "summary.json").read_text())
    assert summary["status"] == "success" and summary["updates"] == 2
    # the inputs' cost (PROTOCOL.md#input-costs): both label jobs and iteration 1, on every clock
    records = [json.loads(c.read_text()) for c in costs]
    for clock in ("train_time_s", "e2e_time_s", "train_cpu_s", "device_hours"):
        assert summary["inputs"][clock] == pytest.approx(sum(r[clock] for r in records))
    assert records[0]["train_cpu_s"] == pytest.approx(sum(v["cpu_s"] for v in records[0]["seconds"].values()), abs=0.01)
    checkpoint = torch.load(tmp_path / "iter2" / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["pretrain"]["inputs"]["sources"] == [str(c) for c in costs]
    with pytest.raises(ConfigError, match="input_costs: .*none.json"):
        hubert_run(data, str(tmp_path / "layer" / "pretrain.km"), tmp_path / "bad", {"num_classes": 6, "label_rate": 50},
                   [str(tmp_path / "none.json")])


def test_a_layer_past_the_encoder_is_an_error(data, tmp_path):
    make_labels(data, tmp_path / "mfcc", clusters=8)
    hubert_run(data, str(tmp_path / "mfcc" / "pretrain.km"), tmp_path / "run", {"num_classes": 8})
    with pytest.raises(ValueError, match="has blocks 1..2"):
        LayerFeatures(tmp_path / "run" / "checkpoint_last.pt", layer=3, sample_rate=16_000)


def test_the_command_line(data, tmp_path, capsys):
    from baselines.hubert_labels import main

    inline = json.dumps(data.model_dump())
    assert main(["--data", inline, "--out", str(tmp_path / "a"), "--clusters", "4"]) == 0
    assert (tmp_path / "a" / "pretrain.km").is_file() and "-> 4 clusters" in capsys.readouterr().out
    assert main(["--data", inline, "--out", str(tmp_path / "b"), "--clusters", "4",
                 "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
