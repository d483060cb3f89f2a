"""wav2vec 2.0 (baselines/wav2vec2.py) through the shared registry: presets, the masker's spans and
distractors, the quantiser's perplexity and temperature schedule, and a training step that lowers the loss."""
import math

import pytest
import torch

from baselines.wav2vec2 import GumbelQuantizer, QuantizerConfig
from d2v2.config import ConfigError
from d2v2.method import available_methods, build_method, method_config


def batch(B=3, seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"source": torch.randn(B, int(16000 * seconds), generator=g), "id": torch.arange(B)}


@pytest.mark.parametrize("preset", ["base", "tiny", "smoke"])
def test_builds_at_every_preset(preset):
    assert ("speech", "wav2vec2") in available_methods()
    cfg = method_config("speech", "wav2vec2", preset)
    assert cfg.encoder == method_config("speech", "data2vec2", preset).encoder      # one backbone
    if preset == "base":                                   # the released base config
        q = cfg.quantizer
        assert (q.groups, q.entries, q.dim, cfg.final_dim, cfg.num_negatives) == (2, 320, 256, 256, 100)
        assert (cfg.logit_temp, cfg.diversity_weight, cfg.feature_penalty_weight, cfg.feature_grad_mult) == \
            (0.1, 0.1, 10.0, 0.1)
    with pytest.raises(ConfigError, match="quantizer.dim"):
        method_config("speech", "wav2vec2", preset, {"quantizer": {"groups": 3, "dim": 64}})


def test_distractors_are_other_masked_frames_of_the_same_utterance():
    method = build_method("speech", "wav2vec2", "smoke")
    out = method.masker()(batch(B=4, seconds=2.0), torch.Generator().manual_seed(1))
    mask, masked, negatives = out["mask"], out["masked"], out["negatives"]
    B, T_m = masked.shape
    assert negatives.shape == (B, T_m, method.cfg.num_negatives)
    assert (mask.sum(1) == T_m).all()                                 # the same count per utterance
    assert torch.equal(torch.gather(mask.long(), 1, masked), torch.ones_like(masked))
    assert negatives.min() >= 0 and negatives.max() < T_m
    assert not (negatives == torch.arange(T_m)[None, :, None]).any()  # never the positive itself
    share = mask.float().mean().item()
    assert 0.3 < share < 0.7                                          # p = 0.65, spans of 10 frames overlap


def test_quantiser_perplexity_and_temperature_schedule():
    cfg = QuantizerConfig(groups=2, entries=8, dim=16)
    assert cfg.temperature(0.0) == 2.0 and cfg.temperature(1.0) == 0.5
    half = cfg.temperature(cfg.temp_anneal_end_fraction / 2)
    assert half == pytest.approx(1.0)                                 # geometric midpoint of 2 and 0.5
    assert cfg.temperature(cfg.temp_anneal_end_fraction) == pytest.approx(0.5)
    # fairseq's per-update decay over the released 400k updates lands at the same point
    assert 2 * 0.999995 ** (cfg.temp_anneal_end_fraction * 400_000) == pytest.approx(0.5, rel=1e-4)
    quantizer = GumbelQuantizer(4, cfg).eval()
    torch.manual_seed(0)
    codes, stats = quantizer(torch.randn(4096, 4), temperature=1.0)
    assert codes.shape == (4096, 16)
    # every code is one entry of each group's codebook
    first = quantizer.vars[:8]
    assert all(any(torch.equal(row[:8], e) for e in first) for row in codes[:5])
    assert 1.0 <= stats["code_perplexity"] <= 2 * 8 and 1.0 <= stats["prob_perplexity"] <= 2 * 8
    uniform = torch.full((2, 8), 1 / 8)
    from baselines.wav2vec2 import _perplexity
    assert _perplexity(uniform).item() == pytest.approx(16, rel=1e-5)


def test_a_training_step_lowers_the_loss_and_follows_the_temperature():
    torch.manual_seed(0)
    method = build_method("speech", "wav2vec2", "smoke").train()
    b = method.masker()(batch(B=4, seconds=1.0), torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for step in range(8):
        out = method(b)
        assert math.isfinite(out.loss.item()) and out.sample_size == b["masked"].numel()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_step(step + 1, fraction=(step + 1) / 8)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert method.temperature == pytest.approx(method.cfg.quantizer.temperature(1.0))
    # the contrastive term is a (1+K)-way classification: at the start about log(1+K)
    assert out.logs["contrastive"].item() < math.log(1 + method.cfg.num_negatives) + 1


def test_the_feature_extractor_gets_a_tenth_of_the_gradient():
    torch.manual_seed(0)
    b = None
    grads = {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        method = build_method("speech", "wav2vec2", "smoke", {"feature_grad_mult": mult,
                                                             "feature_penalty_weight": 0.0}).eval()
        b = b or method.masker()(batch(B=2), torch.Generator().manual_seed(0))
        method(b).loss.backward()
        grads[mult] = method.student.local_encoder.feature_extractor[0].conv.weight.grad.clone()
    assert torch.allclose(grads[0.1], grads[1.0] * 0.1, rtol=1e-4, atol=1e-8)
