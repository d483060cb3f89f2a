"""WavLM (baselines/wavlm.py): presets, utterance mixing's statistics, HuBERT's masks and labels kept, the
gated relative position bias trained; tests/test_baselines.py: its loss falls on one batch;
tests/test_torchaudio_fidelity.py: the bias against torchaudio's WavLM."""
import pickle

import pytest
import torch

from baselines.wavlm import UtteranceMixer
from d2v2.config import ConfigError
from d2v2.method import available_methods, build_method, method_config


def batch(B=3, N=16000, classes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"source": torch.randn(B, N, generator=g), "labels": torch.randint(0, classes, (B, N // 320), generator=g),
            "id": torch.arange(B)}


@pytest.mark.parametrize("preset", ["base", "tiny", "smoke"])
def test_builds_at_every_preset(preset):
    assert ("speech", "wavlm") in available_methods()
    cfg, hubert = method_config("speech", "wavlm", preset), method_config("speech", "hubert", preset)
    ours, theirs = cfg.encoder.model_dump(), hubert.encoder.model_dump()
    # data2vec 2.0's speech encoder with WavLM's gated relative position bias in place of ALiBi
    assert ours.pop("relative_position") == {"num_buckets": 320, "max_distance": 800, "gated": True}
    assert theirs.pop("relative_position") is None
    assert not ours["speech"].pop("use_alibi") and theirs["speech"].pop("use_alibi")
    assert ours == theirs
    assert cfg.labels_per_frame() == 1.0                        # labels of a model's layer, at its frame rate
    assert (cfg.mixing.prob, cfg.mixing.max_fraction, cfg.mixing.energy_ratio_db) == (0.2, 0.5, (-5.0, 5.0))
    if preset == "base":          # WavLM Base: HuBERT Base's head and loss, 500 clusters
        assert (cfg.num_classes, cfg.final_dim, cfg.logit_temp, cfg.mask.mask_prob) == (500, 256, 0.1, 0.8)
        assert (cfg.masked_weight, cfg.unmasked_weight, cfg.feature_grad_mult) == (1.0, 0.0, 0.1)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="relative_position"):
        method_config("speech", "wavlm", "smoke", {"encoder": {"relative_position": None}})
    with pytest.raises(ConfigError, match="energy_ratio_db"):
        method_config("speech", "wavlm", "smoke", {"mixing": {"energy_ratio_db": [5, -5]}})
    with pytest.raises(ConfigError, match="prob"):
        method_config("speech", "wavlm", "smoke", {"mixing": {"prob": 1.5}})


def test_mixing_keeps_hubert_masks_and_labels_and_travels_to_workers():
    # no layer-drop: the gradient checks below need every block in the step
    method = build_method("speech", "wavlm", "smoke", {"num_classes": 20, "mixing": {"prob": 1.0},
                                                       "encoder": {"layerdrop": 0.0, "prenet_layerdrop": 0.0}})
    hubert = build_method("speech", "hubert", "smoke", {"num_classes": 20, "label_rate": method.cfg.label_rate})
    b = batch()
    ours = method.masker()(b, torch.Generator().manual_seed(1))
    plain = hubert.masker()(b, torch.Generator().manual_seed(1))
    for key in ("mask", "masked", "frame_labels", "labels"):
        assert torch.equal(ours[key], plain[key]), key
    assert not torch.equal(ours["source"], plain["source"])           # every row got a segment
    again = pickle.loads(pickle.dumps(method.masker()))(b, torch.Generator().manual_seed(1))
    assert torch.equal(again["source"], ours["source"])
    assert method.encoder_tokens(ours) == hubert.encoder_tokens(plain) == ours["mask"].numel()
    out = method(ours)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.sample_size == int(ours["mask"].sum())
    # the gated relative position bias is part of the model and learns
    assert method.student.relative_position.embed.weight.grad.abs().sum() > 0
    assert method.student.blocks[0].attn.gate.weight.grad.abs().sum() > 0


def _segment(before: torch.Tensor, after: torch.Tensor):
    """(start, length) of the changed samples of one row."""
    changed = torch.nonzero(before != after).flatten()
    return (0, 0) if len(changed) == 0 else (int(changed[0]), int(changed[-1]) + 1 - int(changed[0]))


def test_mixing_statistics():
    """The first row of many two-row batches: mixed with probability prob; one segment of at most half the
    crop, a scaled copy of a segment of a row of the batch (found by least squares over every row and
    offset) at an energy ratio within the range."""
    mixer = UtteranceMixer(prob=0.3, max_fraction=0.5, energy_ratio_db=(-5.0, 5.0))
    N, draws, mixed, lengths, ratios = 400, 1500, 0, [], []
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        source = torch.randn(2, N, generator=torch.Generator().manual_seed(10_000 + seed))
        out = mixer(source, g, normalized=False)
        start, length = _segment(source[0], out[0])
        if length == 0:
            continue
        mixed += 1
        lengths.append(length)
        if length < 20:                       # too short to tell which row and offset it came from
            continue
        added = out[0, start:start + length] - source[0, start:start + length]
        windows = source.unfold(1, length, 1)                             # (2, N - length + 1, length)
        gains = (windows @ added) / windows.pow(2).sum(-1)                 # least-squares gain per window
        err = (added - gains[..., None] * windows).pow(2).sum(-1)
        c, t = divmod(int(err.argmin()), windows.shape[1])
        gain = float(gains[c, t])
        assert err[c, t] < 1e-6 * added.pow(2).sum()                       # an exact scaled copy
        ratios.append(10 * torch.log10(source[0].pow(2).mean() / (gain ** 2 * source[c].pow(2).mean())).item())
    assert abs(mixed / draws - 0.3) < 0.04
    assert max(lengths) <= N // 2 and min(lengths) < N // 8 and max(lengths) > 3 * N // 8
    assert -5.0 - 1e-3 <= min(ratios) and max(ratios) <= 5.0 + 1e-3
    assert min(ratios) < -4 and max(ratios) > 4                             # the whole range is drawn


def test_a_mixed_row_is_normalised_again_when_the_data_was():
    mixer = UtteranceMixer(prob=1.0, max_fraction=0.5, energy_ratio_db=(-5.0, -5.0))   # louder segments
    source = torch.nn.functional.layer_norm(torch.randn(4, 8000, generator=torch.Generator().manual_seed(0)), (8000,))
    again = mixer(source, torch.Generator().manual_seed(0), normalized=True)
    raw = mixer(source, torch.Generator().manual_seed(0), normalized=False)
    torch.testing.assert_close(again.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(again.var(1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    assert (raw.var(1, unbiased=False) > 1.01).any()                        # mixing did raise the power
    off = UtteranceMixer(prob=0.0, max_fraction=0.5, energy_ratio_db=(-5.0, 5.0))
    assert torch.equal(off(source, torch.Generator().manual_seed(0), normalized=True), source)
