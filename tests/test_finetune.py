"""Fine-tuning and evaluation: config validation, layer decay, the metrics file of a real pretraining
checkpoint, the LR sweep's selection rule, and a real learning signal per modality on the embedded data."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from d2v2.analysis.collect import load_metrics
from d2v2.config import ConfigError
from d2v2.data.common import MissingDataError
from d2v2.model.encoder import Encoder
from d2v2.engine import evaluate as E
from d2v2.engine import finetune as F
from d2v2.engine.checkpoint import load_checkpoint
from d2v2.engine.ftconfig import finetune_config
from d2v2.engine.heads import ImageClassifier
from d2v2.method import build_method

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


def _data(modality: str) -> Path:
    """The embedded data, prepared if needed (idempotent, like ``python -m d2v2 prepare-data``); skips
    naming the missing piece only where a source package is not installed (a laptop, never CI)."""
    from d2v2 import data as D

    try:
        D.prepare([modality], D.DataConfig(root=str(DATA_ROOT)))
    except MissingDataError as err:
        pytest.skip(f"{modality} data cannot be prepared here: {err}")
    return DATA_ROOT


# ---- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data, key", [
    ({"modality": "image", "lr_swep": [1e-3]}, "lr_swep"),
    ({"modality": "image", "optim": {"lr": -1}}, "optim.lr"),
    ({"modality": "image", "budget": {"kind": "hours"}}, "budget.kind"),
    ({"modality": "speech", "mask": {"prob": 1.5}}, "mask.prob"),
    ({"modality": "text", "mixup": True}, "mixup"),
    ({"modality": "video"}, "modality"),
    ({"modality": "image", "preset": "huge"}, "preset"),
    ({"modality": "image", "task": "cifar10"}, "task"),
    ({"modality": "speech", "primary_metric": "accuracy"}, "primary_metric"),
])
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        finetune_config(data)


def test_cli_rejects_bad_config_before_any_compute(tmp_path, capsys):
    # the checkpoint does not exist: a config error must come first, naming the key
    rc = F.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.json"),
                 "modality=image", "layer_decay=2"])
    assert rc == 2
    assert "layer_decay" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_presets_resolve_for_every_modality():
    for modality in ("image", "speech", "text"):
        for preset in ("base", "tiny", "smoke"):
            cfg = finetune_config({"modality": modality, "preset": preset})
            assert cfg.optim.lr > 0 and cfg.task
    base = finetune_config({"modality": "image", "preset": "base"})
    assert (base.layer_decay, base.drop_path, base.label_smoothing, base.optim.lr) == (0.65, 0.1, 0.1, 1e-3)
    text = finetune_config({"modality": "text", "preset": "base"})
    assert text.lr_sweep == [1e-5, 2e-5, 4e-5, 6e-5]
    # the released configs fine-tune in fp16; GLUE's start their loss scale at 4 and double it every 128 updates
    assert base.precision == text.precision == "fp16" and base.loss_scaling.init_scale == 2 ** 7
    assert (text.loss_scaling.init_scale, text.loss_scaling.scale_window) == (4, 128)
    # speech is scored on WER at paper scale, on CER in tiny (where every WER is ~1)
    assert finetune_config({"modality": "speech", "preset": "base"}).primary_metric is None
    assert finetune_config({"modality": "speech", "preset": "tiny"}).primary_metric == "cer"


# ---- layer-wise LR decay (METHOD.md#fine-tuning-images) -----------------------------------------------------------------
def test_layer_decay_scales_follow_spec():
    encoder = build_method("image", "data2vec2", "smoke").encoder()
    model = ImageClassifier(Encoder(encoder.cfg), encoder.cfg.embed_dim, 10)
    cfg = finetune_config({"modality": "image", "preset": "smoke", "layer_decay": 0.5})
    optimizer = F._optimizer(model, cfg, cfg.optim)
    scale = {name: g["lr_scale"] for g in optimizer.param_groups for name in g["param_names"]}
    n = len(model.encoder.blocks)
    for i in range(n):                         # block i (1-indexed i+1) of N gets LD^(N+1-(i+1))
        assert scale[f"encoder.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (n - i))
    for name in ("head.weight", "fc_norm.weight", "encoder.local_encoder.proj.weight"):
        assert scale[name] == 1.0              # head, patch-embed, norms keep scale 1
    assert all(scale[n_] == 1.0 for n_ in scale if "context_encoder" in n_)
    assert any("extra_tokens" in n_ or "cls" in n_ for n_ in scale if "context_encoder" in n_)


# ---- a real pretraining checkpoint -> metrics file -> evaluate ----------------------------------------
@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """Two real data2vec 2.0 updates (smoke model) through the pretraining CLI."""
    root = _data("image")
    from d2v2.engine import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    cfg = {"method": {"modality": "image", "name": "data2vec2", "preset": "smoke"},
           "data": {"root": str(root), "num_workers": 0}, "batch_size": 8, "seed": 3,
           "budget": {"kind": "updates", "value": 2}, "checkpoint": {"fractions": [0.5, 1.0]}, "threads": 1}
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert pretrain.main(["--config", str(out / "run.yaml"), "--out", str(out / "run")]) == 0
    return out / "run" / "checkpoints" / "checkpoint_f0.500.pt"


def _smoke_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.num_workers=0", "threads=1", "eval_max_samples=64", "budget.value=3"]


def test_metrics_file_carries_identity_clocks_and_provenance(image_checkpoint, tmp_path):
    root = _data("image")
    out, saved = tmp_path / "m.json", tmp_path / "ft.pt"
    rc = F.main(["--checkpoint", str(image_checkpoint), "--out", str(out), "--save", str(saved),
                 "modality=image", "preset=smoke", "identity.variant=num_masks=2",
                 "identity.params={num_masks: 2}", "identity.budget_fraction=0.5", *_smoke_overrides(root)])
    assert rc == 0
    record, ckpt = json.loads(out.read_text()), load_checkpoint(image_checkpoint)
    ident = record["identity"]
    assert (ident["modality"], ident["method"], ident["seed"], ident["budget_fraction"]) == ("image", "data2vec2", 3, 0.5)
    assert ident["variant"] == "num_masks=2" and ident["params"] == {"num_masks": 2} and ident["task"] == "fmnist"
    for key in F.PRETRAIN_CLOCKS:
        assert record["pretrain"][key] == ckpt["pretrain"][key]
    assert record["pretrain"]["updates"] == 1 and record["pretrain"]["train_time_s"] > 0
    assert record["pretrain"]["method_config"] == ckpt["method_config"]     # the default variant's M, for collect
    assert record["pretrain"]["method_config"]["num_masks"] >= 1
    assert record["pretrain"]["run_config"] == ckpt["run_config"]           # its LR, for a pretrain.* ablation
    assert record["pretrain"]["run_config"]["seed"] == 3 and record["pretrain"]["run_config"]["optim"]["lr"] > 0
    assert record["primary_metric"] == "test_accuracy" and record["higher_is_better"] is True
    assert set(record["metrics"]) == {"valid_accuracy", "test_accuracy"}
    assert record["provenance"]["git_commit"] and record["provenance"]["preset"] == "smoke"
    assert record["finetune"]["updates"] == 3 and record["finetune"]["train_time_s"] > 0
    load_metrics(out)                          # the collector accepts it as it is

    # the saved model re-scores to the same numbers without the pretraining checkpoint
    scores = E.evaluate_checkpoint(saved, ["test"])
    assert scores["metrics"]["test_accuracy"] == pytest.approx(record["metrics"]["test_accuracy"])


def test_identity_must_agree_with_checkpoint(image_checkpoint, tmp_path):
    root = _data("image")
    cfg = finetune_config({"modality": "image", "preset": "smoke", "identity": {"seed": 99}, "data": {"root": str(root)}})
    with pytest.raises(ConfigError, match="identity.seed"):
        F.finetune(cfg, image_checkpoint)
    cfg = finetune_config({"modality": "image", "preset": "smoke", "identity": {"budget_fraction": 0.3},
                           "data": {"root": str(root)}})
    with pytest.raises(ConfigError, match="identity.budget_fraction"):
        F.finetune(cfg, image_checkpoint)
    cfg = finetune_config({"modality": "speech", "preset": "smoke"})
    with pytest.raises(ConfigError, match="modality"):
        F.finetune(cfg, image_checkpoint)


def test_a_budget_fraction_matches_as_its_file_name_writes_it():
    """The workflow passes a checkpoint's exact fraction; a user may pass the file name's 3 decimals."""
    assert F.same_identity("budget_fraction", 0.062, 0.0625) and F.same_identity("budget_fraction", 0.0625, 0.0625)
    assert F.same_identity("budget_fraction", 0.25, 0.25) and F.same_identity("budget_fraction", 0.333, 1 / 3)
    assert not F.same_identity("budget_fraction", 0.063, 0.0625)
    assert not F.same_identity("budget_fraction", 0.3, 0.25) and not F.same_identity("seed", 1, 2)


def test_random_init_reports_budget_fraction_zero(image_checkpoint, tmp_path):
    root = _data("image")
    cfg = finetune_config({"modality": "image", "preset": "smoke", "init": "random", "data": {"root": str(root),
                           "num_workers": 0}, "eval_max_samples": 32, "budget": {"value": 1}})
    record = F.finetune(cfg, image_checkpoint, log=lambda *_: None)
    assert record["identity"]["budget_fraction"] == 0.0 and record["identity"]["init"] == "random"
    assert record["pretrain"]["train_time_s"] == 0 and record["pretrain"]["updates"] == 0
    assert "method_config" not in record["pretrain"]                     # no pretraining, no method config


# ---- the LR sweep selects on validation only -----------------------------------------------------------
def test_lr_sweep_never_selects_on_test(image_checkpoint, monkeypatch):
    root = _data("image")
    scored = []

    def fake_evaluate(model, cfg, info, loader, device):
        # valid prefers lr 2e-3, test would prefer 1e-3: the sweep must follow valid
        lr = model._lr
        split = "valid" if len(scored) < 3 else "test"
        scored.append((split, lr))
        good = {"valid": 2e-3, "test": 1e-3}[split]
        return {"accuracy": 0.9 if lr == good else 0.1}

    real_train = F.train

    def tagged_train(model, cfg, peak_lr, *args, **kwargs):
        model._lr = peak_lr
        return real_train(model, cfg, peak_lr, *args, **kwargs)

    monkeypatch.setattr(F, "evaluate", fake_evaluate)
    monkeypatch.setattr(F, "train", tagged_train)
    cfg = finetune_config({"modality": "image", "preset": "smoke", "lr_sweep": [1e-3, 2e-3, 4e-3],
                           "data": {"root": str(root), "num_workers": 0}, "budget": {"value": 1}})
    record = F.finetune(cfg, image_checkpoint, log=lambda *_: None)
    assert record["finetune"]["lr"] == 2e-3
    assert scored == [("valid", 1e-3), ("valid", 2e-3), ("valid", 4e-3), ("test", 2e-3)]
    assert all(not k.startswith("test") for entry in record["finetune"]["sweep"] for k in entry)
    assert record["metrics"]["valid_accuracy"] == 0.9 and record["metrics"]["test_accuracy"] == 0.1


# ---- what trains when (linear probe; speech: frozen CNN, Transformer frozen for the first updates) -----
def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_linear_probe_trains_only_the_head():
    encoder = build_method("image", "data2vec2", "smoke").encoder()
    cfg = finetune_config({"modality": "image", "preset": "smoke", "mode": "linear_probe", "budget": {"value": 3}})
    model = ImageClassifier(Encoder(encoder.cfg), encoder.cfg.embed_dim, 10, linear_probe=True)
    before = _snapshot(model.encoder)
    batches = [{"source": torch.randn(4, 1, 28, 28), "label": torch.randint(0, 10, (4,))} for _ in range(3)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, generator=torch.Generator())
    F.train(model, cfg, 1e-2, loader, torch.device("cpu"), log=lambda *_: None)
    assert not _changed(before, model.encoder)
    assert not model.encoder.training          # frozen features: no dropout / drop-path either


def test_ctc_freezes_cnn_always_and_transformer_first():
    from d2v2.engine.heads import CTCRecognizer

    encoder = Encoder(build_method("speech", "data2vec2", "smoke").encoder().cfg)
    model = CTCRecognizer(encoder, encoder.cfg.embed_dim, 29, encoder.local_encoder.feature_extractor,
                          mask_prob=0.3, mask_length=2)
    wave = torch.randn(2, 8000)
    batch = {"source": wave, "padding_mask": torch.zeros_like(wave, dtype=torch.bool),
             "target": torch.randint(2, 29, (2, 5)), "target_lengths": torch.tensor([5, 4]),
             "transcript": ["A", "B"]}
    loader = torch.utils.data.DataLoader([batch], batch_size=None, generator=torch.Generator())
    cfg = finetune_config({"modality": "speech", "preset": "smoke", "freeze_updates": 2, "budget": {"value": 2}})
    before = _snapshot(model)
    F.train(model, cfg, 1e-2, loader, torch.device("cpu"), log=lambda *_: None)
    assert _changed(before, model) == {"proj.weight", "proj.bias"}          # only the head while frozen
    cfg = finetune_config({"modality": "speech", "preset": "smoke", "freeze_updates": 0, "budget": {"value": 2}})
    before = _snapshot(model)
    F.train(model, cfg, 1e-2, loader, torch.device("cpu"), log=lambda *_: None)
    changed = _changed(before, model)
    assert any(k.startswith("encoder.blocks.") for k in changed)
    assert not any("feature_extractor" in k for k in changed)                # the CNN never trains


def test_heads_are_initialised_as_in_fairseq():
    """Image head trunc-normal 0.02 with zero bias (mae_image_classification), CTC projection xavier with
    zero bias (wav2vec2_asr ``Linear``), sentence head PyTorch's default Linear init
    (RobertaClassificationHead is built after init_bert_params): uniform +-1/sqrt(fan_in), biases too."""
    from d2v2.engine.heads import CTCRecognizer, SentenceClassifier

    torch.manual_seed(0)
    dim = 192
    image = ImageClassifier(torch.nn.Identity(), dim, 1000)
    assert abs(image.head.weight.std().item() - 0.02) < 0.002 and not image.head.bias.any()
    ctc = CTCRecognizer(torch.nn.Identity(), dim, 32, torch.nn.Identity())
    assert abs(ctc.proj.weight.std().item() - (2 / (dim + 32)) ** 0.5) < 0.01 and not ctc.proj.bias.any()
    text = SentenceClassifier(torch.nn.Identity(), dim, 2)
    bound = dim ** -0.5
    for layer in (text.dense, text.out_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.8 * bound / 3 ** 0.5
        assert layer.bias.any() and layer.bias.abs().max() <= bound


def test_text_vocabulary_must_fit_the_encoder():
    """A tokenizer with more ids than the encoder's embedding (a checkpoint from another vocabulary) is
    a clear error before any compute, not an index error mid-run."""
    root = _data("text")
    cfg = finetune_config({"modality": "text", "preset": "tiny", "init": "random",
                           "arch": {"method": "data2vec2", "overrides": {"encoder": {"text": {"vocab_size": 300}}}},
                           "data": {"root": str(root), "num_workers": 0}})
    with pytest.raises(ConfigError, match=r"data\.text: the tokenizer has 8192 ids but the encoder's embedding "
                                          r"only 300 rows"):
        F.finetune(cfg, None, log=lambda *_: None)


# ---- a real learning signal per modality (embedded data, random init: the encoder and head must learn) --
def _learn(modality: str, arch: dict, overrides: dict, log=lambda *_: None) -> dict:
    root = _data(modality)
    cfg = finetune_config({"modality": modality, "preset": "tiny", "init": "random",
                           "arch": {"method": "data2vec2", **arch},
                           "data": {"root": str(root), "num_workers": 0}, "threads": 1, **overrides})
    return F.finetune(cfg, None, log=log)["metrics"]


def test_image_classification_learns():
    # smoke-sized ViT on 7x7 patches (49 tokens) so that 100 updates fit in a few seconds
    m = _learn("image", {"preset": "smoke", "overrides": {"encoder": {"image": {"patch_size": 4}}}},
               {"budget": {"value": 100}, "eval_max_samples": 500})
    assert m["test_accuracy"] > 0.18           # 10 classes: chance 0.1 (500 samples: 5 standard errors)


def test_image_classification_learns_in_fp16_with_loss_scaling():
    """fp16 (the paper's fine-tuning precision, METHOD.md#mixed-precision) on a CPU: autocast, the loss scaled
    from GLUE's 4 and doubled every 10 updates without an overflow, the optimiser stepping through the scaler."""
    lines = []
    m = _learn("image", {"preset": "smoke", "overrides": {"encoder": {"image": {"patch_size": 4}}}},
               {"budget": {"value": 100}, "eval_max_samples": 500, "precision": "fp16",
                "loss_scaling": {"init_scale": 4, "scale_window": 10}}, log=lines.append)
    assert m["test_accuracy"] > 0.18
    scales = [float(line.rsplit("loss scale ", 1)[1]) for line in lines if "loss scale" in line]
    assert len(scales) == 2 and 4 < scales[0] < scales[1]       # logged at updates 50 and 100, growing


@pytest.mark.slow
def test_text_classification_learns():
    m = _learn("text", {"preset": "tiny"}, {"budget": {"value": 250}})
    assert m["test_accuracy"] > 0.58           # balanced binary, ~1,000 test sentences: chance 0.5


def test_ctc_learns_letters():
    """CTC end to end (loss, greedy decoding, WER/CER) on real utterances: a smoke model memorises four
    of them. (Generalising from random init needs far more updates than a test can afford: a short run
    stays on CTC's all-blank plateau, CER 1.0.)"""
    from d2v2 import data as D

    root = _data("speech")
    torch.manual_seed(0)
    cfg = finetune_config({"modality": "speech", "preset": "tiny", "freeze_updates": 0, "budget": {"value": 300},
                           "mask": {"prob": 0.0}, "data": {"root": str(root), "num_workers": 0}})
    info = D.task_info("speech", "ctc")
    train = D.finetune_datasets("speech", cfg.data, "ctc")["train"]
    batch = D.finetune_collater("speech", cfg.data, "ctc")([train[i] for i in range(4)])
    model = F.build_model(cfg, info, Encoder(build_method("speech", "data2vec2", "smoke").encoder().cfg))
    loader = torch.utils.data.DataLoader([batch], batch_size=None, generator=torch.Generator())
    assert F.evaluate(model, cfg, info, [batch], torch.device("cpu"))["cer"] >= 0.9     # untrained
    F.train(model, cfg, 3e-3, loader, torch.device("cpu"), log=lambda *_: None)
    assert F.evaluate(model, cfg, info, [batch], torch.device("cpu"))["cer"] < 0.3


def test_corrupt_task_data_is_a_clean_error(tmp_path, capsys):
    """An invalid UTF-8 byte in a task's TSV: one line naming the file, exit 2, no traceback or metrics."""
    root = tmp_path / "data"
    shutil.copytree(_data("text") / "text", root / "text")
    train = next((root / "text").rglob("tasks/movie/train.tsv"))
    train.write_bytes(train.read_bytes().replace(b"\n", b"\n\xff", 1))
    out = tmp_path / "m.json"
    rc = F.main(["--out", str(out), "modality=text", "preset=smoke", "init=random", "arch={preset: smoke}",
                 f"data.root={root}", "data.num_workers=0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and str(train) in err and "Traceback" not in err
    assert not out.exists()
