"""A preset is one file (d2v2/presets/<name>.yaml) that holds a scale's whole recipe; the workflow and the
fine-tuning command read the same file."""
from __future__ import annotations

import pytest

from d2v2 import workflow as wfc
from d2v2.config import ConfigError
from d2v2.engine.ftconfig import finetune_config
from d2v2.presets import available_presets, finetune_recipe, load_preset


def test_every_preset_is_a_file_with_its_own_name():
    assert {"smoke", "tiny", "gpu", "base"} <= set(available_presets())
    for name in available_presets():
        assert load_preset(name)["preset"] == name
    with pytest.raises(ConfigError, match="preset: 'huge' unknown \\(have base, gpu, smoke, tiny"):
        load_preset("huge")


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_the_workflow_and_the_finetune_command_resolve_the_same_recipe(preset):
    config = wfc.with_preset({"preset": preset, "data": {"root": "data"}})
    wfc.check_schema(config, "workflow/schemas/config.schema.yaml")
    for run in wfc.expand_runs(config):
        request = wfc.finetune_request(config, run, 1.0)
        by_hand = {"modality": run.modality, "preset": preset, "data": request["data"], "identity": request["identity"]}
        assert finetune_config(by_hand) == finetune_config(request), run.key


def test_a_recipe_is_read_from_the_file_and_a_missing_one_is_named():
    assert finetune_config({"modality": "speech", "preset": "tiny"}).budget.value == \
        load_preset("tiny")["finetune"]["speech"]["budget"]["value"] == 1000
    assert finetune_recipe("tiny", "image")["device"] == "cpu"            # finetune.common under the modality's
    with pytest.raises(ConfigError, match="preset: 'gpu' has no fine-tuning recipe for speech \\(have image\\)"):
        finetune_config({"modality": "speech", "preset": "gpu"})
    with pytest.raises(ConfigError, match="modality: unknown modality 'video'"):
        finetune_config({"modality": "video"})
