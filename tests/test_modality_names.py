"""One name per modality: ``speech`` (the paper's) everywhere. What was saved under the old name (``audio``)
still loads; what a user writes with it now is refused with the new name."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from d2v2 import workflow as wfc
from d2v2.config import ConfigError, validate
from d2v2.engine.checkpoint import load_checkpoint, pretraining_checkpoint, save_checkpoint
from d2v2.engine.runconfig import MethodSpec, config_differences, resolve_run_config
from d2v2.method import build_method
from d2v2.model.encoder import Encoder, EncoderConfig


def _as_saved_before_the_rename(obj):
    """What the same object looked like when the modality was called ``audio`` (checkpoint version 1)."""
    text = yaml.safe_dump(obj).replace("modality: speech", "modality: audio").replace("speech:", "audio:")
    return yaml.safe_load(text)


def test_a_version_1_checkpoint_of_an_audio_model_loads_as_speech(tmp_path):
    method = build_method("speech", "data2vec2", "smoke")
    enc = method.encoder()
    ckpt = pretraining_checkpoint(
        identity={"modality": "speech", "method": "data2vec2", "preset": "smoke", "seed": 0},
        method_config=method.cfg.model_dump(mode="json"), encoder=enc, encoder_prefix="student.",
        model={f"student.{k}": v for k, v in enc.state_dict().items()}, pretrain={"train_time_s": 1.0},
        budget_fraction=1.0, fraction_consumed=1.0, provenance={"fairseq": {"modalities": {"audio": {"x": 1}}}})
    path = save_checkpoint(ckpt, tmp_path / "checkpoint_f1.000.pt")
    raw = torch.load(path, weights_only=True)
    old = {**raw, "version": 1, "identity": _as_saved_before_the_rename(raw["identity"]),
           "method_config": _as_saved_before_the_rename(raw["method_config"]),
           "encoder_config": _as_saved_before_the_rename(raw["encoder_config"])}
    assert old["encoder_config"]["modality"] == "audio" and "audio" in old["encoder_config"]
    torch.save(old, path)

    loaded = load_checkpoint(path)
    assert loaded["version"] == 2 and loaded["identity"]["modality"] == "speech"
    assert loaded["method_config"]["encoder"]["modality"] == "speech"
    assert loaded["provenance"] == {"fairseq": {"modalities": {"audio": {"x": 1}}}}      # kept as recorded
    cfg = EncoderConfig.model_validate(loaded["encoder_config"])
    assert cfg.modality == "speech" and cfg.speech.conv_layers == enc.cfg.speech.conv_layers
    again = Encoder(cfg)
    again.load_state_dict({k[len("student."):]: v for k, v in loaded["model"].items() if k.startswith("student.")})


def test_a_run_dir_saved_under_the_old_name_is_the_same_run():
    new = resolve_run_config({"method": {"modality": "speech", "name": "data2vec2", "preset": "smoke"},
                              "budget": {"kind": "updates", "value": 4}, "batch_size": 2}).model_dump(mode="json")
    saved = _as_saved_before_the_rename(new)
    assert saved["method"]["modality"] == "audio"
    assert config_differences(saved, new) == []
    assert config_differences({**saved, "seed": 1}, new) == ["seed: 1 -> 0"]


def test_the_old_name_is_refused_with_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match="method.modality: .*'audio' is now called 'speech'"):
        validate(MethodSpec, {"modality": "audio", "name": "data2vec2"}, where="method")
    with pytest.raises(ConfigError, match="'audio' is now called 'speech'"):
        build_method("audio", "data2vec2", "smoke")
    for config in ({"methods": {"audio": ["data2vec2"]}}, {"modalities": ["image", "audio"]}):
        with pytest.raises(wfc.WorkflowConfigError, match="(methods.audio|modalities\\[1\\]): the modality 'audio' is now"):
            wfc.check_schema(config, "workflow/schemas/config.schema.yaml")
    cli = subprocess.run([sys.executable, "-m", "d2v2", "prepare-data", "--root", str(tmp_path), "--modalities", "audio"],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "'audio' is now called 'speech'" in cli.stderr
