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


def test_fine_tuning_jobs_take_the_recipes_data_settings_over_the_workflows():
    """tiny fine-tunes without a loader worker (finetune.common.data) while its pretraining runs keep one
    (data.num_workers); a user's finetune.<modality>.data wins over both."""
    config = wfc.with_preset({"preset": "tiny", "data": {"root": "data"}})
    wfc.check_schema(config, "workflow/schemas/config.schema.yaml")
    run = next(r for r in wfc.expand_runs(config) if r.modality == "text")
    assert wfc.run_config(config, run)["data"]["num_workers"] == 1
    assert wfc.finetune_request(config, run, 1.0)["data"]["num_workers"] == 0
    assert wfc.random_init_request(config, "text", 0)["data"]["num_workers"] == 0
    assert wfc.finetune_request(config, run, 1.0)["data"]["root"] == "data"       # the rest still the workflow's
    mine = wfc.with_preset({"preset": "tiny", "data": {"root": "data"},
                            "finetune": {"text": {"data": {"num_workers": 2}}}})
    wfc.check_schema(mine, "workflow/schemas/config.schema.yaml")
    assert wfc.finetune_request(mine, run, 1.0)["data"]["num_workers"] == 2


def test_a_recipe_is_read_from_the_file_and_a_missing_one_is_named():
    assert finetune_config({"modality": "speech", "preset": "tiny"}).budget.value == \
        load_preset("tiny")["finetune"]["speech"]["budget"]["value"] == 1000
    assert finetune_recipe("tiny", "image")["device"] == "cpu"            # finetune.common under the modality's
    with pytest.raises(ConfigError, match="preset: 'gpu' has no fine-tuning recipe for speech \\(have image\\)"):
        finetune_config({"modality": "speech", "preset": "gpu"})
    with pytest.raises(ConfigError, match="modality: unknown modality 'video'"):
        finetune_config({"modality": "video"})


def test_a_method_config_is_the_presets_encoder_with_the_methods_settings_over_it():
    from d2v2.method import method_config

    tiny = load_preset("tiny")
    mae = method_config("image", "mae", "tiny")
    assert mae.encoder.embed_dim == tiny["encoders"]["image"]["embed_dim"] and mae.encoder.layer_norm_first
    assert mae.decoder_dim == tiny["method_settings"]["image"]["mae"]["decoder_dim"]
    assert method_config("image", "mae", "tiny", {"decoder_dim": 16}).decoder_dim == 16
    with pytest.raises(ConfigError, match="preset: 'gpu' has no settings for speech/hubert \\(presets with them: "
                                          "base, smoke, tiny\\)"):
        method_config("speech", "hubert", "gpu")


def test_a_method_of_another_package_brings_its_own_settings():
    from d2v2.method import _REGISTRY, method_config, register_method
    from baselines.mlm import MLM, MLMConfig

    register_method("text", "mlm_plugin", MLMConfig, {"tiny": {"encoder": {"modality": "text", "depth": 1}}})(MLM)
    try:
        assert method_config("text", "mlm_plugin", "tiny").encoder.depth == 1
        with pytest.raises(ConfigError, match="presets with them: tiny"):
            method_config("text", "mlm_plugin", "base")
    finally:
        del _REGISTRY[("text", "mlm_plugin")]


def test_the_workflow_config_cannot_set_the_models():
    with pytest.raises(wfc.WorkflowConfigError, match="method_settings: the models are the preset's .*method.overrides"):
        wfc.with_preset({"method_settings": {"image": {"mae": {"decoder_dim": 8}}}})
    assert "encoders" not in wfc.with_preset({"preset": "tiny"})


def _full_runs(preset: str, data: dict) -> dict:
    """The preset's full-budget pretraining run configs by (modality, method)."""
    from d2v2.engine.runconfig import resolve_run_config

    config = wfc.with_preset({"preset": preset, "data": {"root": "data", **data}})
    wfc.check_schema(config, "workflow/schemas/config.schema.yaml")
    return {(r.modality, r.method): resolve_run_config(wfc.run_config(config, r))
            for r in wfc.expand_runs(config) if not r.sweep}


def _base_runs() -> dict:
    """base's, with stand-in paths for the paper-scale data."""
    text = {"gpt2_vocab": "v", "gpt2_merges": "m", "train_shards": ["t"], "valid_shards": ["v"], "glue_dir": "g"}
    return _full_runs("base", {"image": {"imagenet_dir": "i"}, "speech": {"manifest_dir": "s"}, "text": text})


def test_base_trains_every_baseline_on_its_released_recipe():
    """METHOD.md#baseline-mae, #baseline-data2vec1, #baseline-mlm: a baseline that shared data2vec 2.0's
    recipe would be measured at another method's learning rate and batch (data2vec 1.0 collapsed at data2vec
    2.0's LR in the gpu preset's replay, docs/BENCHMARKS.md#the-gpu-preset-replayed-on-a-cpu)."""
    runs = _base_runs()
    d2v2 = runs["image", "data2vec2"]
    assert (d2v2.batch_size, d2v2.optim.lr, d2v2.optim.clip_grad) == (16, 1e-3, 4.0)
    mae = runs["image", "mae"]                      # lr = 1.5e-4 x (16 x 64) / 256
    assert (mae.batch_size * 16, mae.optim.lr, mae.optim.clip_grad) == (1024, 1.5e-4 * 1024 / 256, None)
    assert mae.optim.betas == (0.9, 0.95) and mae.optim.warmup_fraction == pytest.approx(50_040 / 375_300, abs=1e-5)
    d2v1 = runs["image", "data2vec1"]
    assert (d2v1.batch_size * 16, d2v1.reference_batch_size, d2v1.optim.lr) == (2048, 2048, 2e-3)   # the paper's
    assert (d2v1.optim.betas, d2v1.optim.clip_grad, d2v1.optim.warmup_fraction) == ((0.9, 0.999), 3.0, 40 / 800)
    speech = runs["speech", "data2vec1"].optim      # tri-stage: 0.01 x peak -> peak (3%) -> hold (90%) -> 0.01 x
    assert speech.lr_at(0.0) == pytest.approx(5e-6) and speech.lr_at(0.03) == speech.lr_at(0.93) == 5e-4
    assert speech.lr_at(1.0) == pytest.approx(5e-6) and runs["speech", "data2vec2"].optim.lr == 7.5e-4
    # speech batches count utterances: a baseline's total batch is data2vec 2.0's (1M samples x 16 devices)
    # accumulated as many times as its config's max_tokens x devices holds it, rounded
    for method, samples in {"data2vec2": 1e6 * 16, "data2vec1": 3.8e6 * 16, "wav2vec2": 1.4e6 * 64,
                            "hubert": 1.4e6 * 32, "wavlm": 1.4e6 * 32}.items():
        run = runs["speech", method]
        assert run.batch_size == 8 and run.grad_accum == round(samples / 16e6), method
        assert run.data.speech.max_sample_size == (320_000 if "data2vec" in method else 250_000), method
    text = runs["text", "data2vec1"]
    assert (text.batch_size * 16, text.optim.lr, text.optim.clip_grad, text.optim.warmup_fraction) == \
        (256, 2e-4, 5.0, 0.01)
    assert runs["text", "data2vec2"].batch_size * 16 == 32
    mlm = runs["text", "mlm"]                       # RoBERTa in BERT's setup: 256 sequences, lr 1e-4
    assert (mlm.batch_size * 16, mlm.optim.lr, mlm.optim.schedule, mlm.optim.clip_grad) == (256, 1e-4, "linear", None)


def test_gpu_gives_each_image_baseline_its_own_recipes_lr_at_the_presets_batch():
    """gpu (one process, 256 images): MAE's rule 1.5e-4 x 256 / 256, data2vec 1.0's paper LR 2e-3 at 2,048
    scaled linearly (METHOD.md#baseline-mae, METHOD.md#baseline-data2vec1); data2vec 2.0 keeps 1e-3."""
    runs = {method: run for (_, method), run in _full_runs("gpu", {}).items()}
    assert {m: r.batch_size for m, r in runs.items()} == {"data2vec2": 256, "mae": 256, "data2vec1": 256}
    assert (runs["mae"].optim.lr, runs["mae"].optim.clip_grad) == (1.5e-4, None)
    assert runs["data2vec1"].optim.lr == 2e-3 * 256 / 2048 and runs["data2vec2"].optim.lr == 1e-3
