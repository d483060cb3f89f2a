"""HuBERT (baselines/hubert.py) through the shared registry: presets, the masker's label alignment, the
prediction head against torchaudio's (fairseq's formulation); tests/test_baselines.py: its loss falls on one batch."""
import pytest
import torch
import torch.nn.functional as F
from torchaudio.models.wav2vec2.components import LogitGenerator

from d2v2.config import ConfigError
from d2v2.method import available_methods, build_method, method_config
from d2v2.model.modalities.speech import receptive_field


def batch(B=3, seconds=1.0, label_rate=100, classes=20, short_by=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = int(16000 * seconds)
    labels = torch.randint(0, classes, (B, int(N * label_rate / 16000) - short_by), generator=g)
    return {"source": torch.randn(B, N, generator=g), "labels": labels, "id": torch.arange(B)}


@pytest.mark.parametrize("preset", ["base", "tiny", "smoke"])
def test_builds_at_every_preset(preset):
    assert ("speech", "hubert") in available_methods()
    cfg = method_config("speech", "hubert", preset)
    assert cfg.encoder == method_config("speech", "data2vec2", preset).encoder      # one backbone
    if preset == "base":                                   # the released HuBERT base config, iteration 1
        assert (cfg.num_classes, cfg.label_rate, cfg.final_dim, cfg.logit_temp) == (100, 100.0, 256, 0.1)
        assert (cfg.mask.mask_prob, cfg.mask.span, cfg.masked_weight, cfg.unmasked_weight) == (0.8, 10, 1.0, 0.0)
        assert (cfg.feature_penalty_weight, cfg.feature_grad_mult) == (10.0, 0.1)
        assert cfg.labels_per_frame() == 2.0
    with pytest.raises(ConfigError, match="nothing to learn"):
        method_config("speech", "hubert", preset, {"masked_weight": 0.0})


@pytest.mark.parametrize("label_rate", [100, 50])
def test_frames_read_their_labels(label_rate):
    method = build_method("speech", "hubert", "smoke", {"label_rate": label_rate, "num_classes": 20})
    b = batch(label_rate=label_rate)
    out = method.masker()(b, torch.Generator().manual_seed(1))
    T = out["mask"].shape[1]
    ratio = label_rate // 50
    assert torch.equal(out["frame_labels"], b["labels"][:, ::ratio][:, :T])   # frame t reads label floor(t * ratio)
    assert torch.equal(out["source"], b["source"])                           # the labels cover every frame
    mask = out["mask"]
    assert (mask.sum(1) == out["masked"].shape[1]).all()
    assert 0.4 < mask.float().mean().item() < 0.9                            # p = 0.8, spans of 10 frames


def test_frames_without_labels_are_dropped_with_their_samples():
    """Labels that end early (fairseq trims the features) cut the waveform so the CNN makes no unlabelled
    frame; the frames that remain see exactly the samples they saw before."""
    method = build_method("speech", "hubert", "smoke", {"num_classes": 20})
    b = batch(short_by=7)
    out = method.masker()(b, torch.Generator().manual_seed(1))
    T = out["mask"].shape[1]
    assert T == b["labels"].shape[1] // 2 and torch.equal(out["frame_labels"], b["labels"][:, ::2][:, :T])
    size, stride = receptive_field(method.cfg.encoder.speech.conv_layers)
    assert out["source"].shape[1] == size + (T - 1) * stride
    cnn = method.student.local_encoder.cnn
    with torch.no_grad():
        torch.testing.assert_close(cnn(out["source"]), cnn(b["source"])[:, :T])


def test_a_batch_without_labels_is_an_error_that_says_so():
    method = build_method("speech", "hubert", "smoke")
    with pytest.raises(ValueError, match="k-means labels"):
        method.masker()({"source": torch.randn(2, 16000)}, torch.Generator().manual_seed(0))


def test_the_prediction_head_matches_torchaudio():
    """Our softmax over the C cluster embeddings against torchaudio's LogitGenerator (fairseq's [positive,
    every class with the positive's duplicate at -inf]): the positive's logit and every frame's loss."""
    method = build_method("speech", "hubert", "smoke", {"num_classes": 20})
    D, C, Fd = method.cfg.encoder.embed_dim, method.cfg.num_classes, method.cfg.final_dim
    theirs = LogitGenerator(D, C, Fd, skip_masked=False, skip_nomask=True)
    with torch.no_grad():
        method.final_proj.load_state_dict(theirs.final_proj.state_dict())
        method.label_embs.copy_(theirs.label_embeddings)
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(2, 30, D, generator=g), torch.randint(0, C, (2, 30), generator=g)
    mask = torch.rand(2, 30, generator=g) < 0.5
    logit_theirs, _ = theirs(x, labels, mask, ~mask)
    logits = method.logits(x[mask])
    rows = torch.arange(len(logits))
    torch.testing.assert_close(logits[rows, labels[mask]], logit_theirs[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.cross_entropy(logits, labels[mask], reduction="none"),
                               F.cross_entropy(logit_theirs, torch.zeros_like(rows), reduction="none"),
                               rtol=1e-5, atol=1e-5)


def test_the_unmasked_term_adds_its_frames_to_the_sample_size():
    """fairseq's criterion: each weighted term adds its frames to the sample size the loss is divided by."""
    b = batch()
    masked_only = build_method("speech", "hubert", "smoke", {"num_classes": 20})
    both = build_method("speech", "hubert", "smoke", {"num_classes": 20, "unmasked_weight": 0.5})
    masked = masked_only.masker()(b, torch.Generator().manual_seed(1))
    assert masked_only(masked).sample_size == int(masked["mask"].sum())
    out = both(masked)
    assert out.sample_size == masked["mask"].numel() and "loss_unmasked" in out.logs
