"""data2vec 2.0 end to end: the training step of METHOD.md#the-training-step through the method registry."""
import math
import pickle

import pytest
import torch

from d2v2.config import ConfigError
from d2v2.data2vec2 import Data2Vec2
from d2v2.model.decoder import Decoder, DecoderConfig
from d2v2.model.masking import keep_indices
from d2v2.method import MethodOutput, build_method, method_config
from d2v2.model.modalities.speech import WAV2VEC2_CONV
from d2v2.model.targets import make_targets, position_share

MODALITIES = ["image", "speech", "text"]
NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "post_mlp_dropout": 0.0, "prenet_dropout": 0.0,
              "layerdrop": 0.0, "prenet_layerdrop": 0.0}


def batch_for(modality, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = {"image": lambda: torch.randn(B, 1, 28, 28, generator=g),
              "speech": lambda: torch.randn(B, 12000, generator=g),
              "text": lambda: torch.randint(5, 8192, (B, 48), generator=g)}[modality]()
    return {"source": source, "id": torch.arange(B)}


def build(modality, overrides=None, preset="smoke"):
    torch.manual_seed(0)
    return build_method(modality, "data2vec2", preset, overrides)


@pytest.mark.parametrize("modality", MODALITIES)
def test_forward_through_the_registry(modality):
    method = build(modality)
    assert isinstance(method, Data2Vec2) and method.encoder() is method.student
    batch = method.masker()(batch_for(modality), torch.Generator().manual_seed(1))
    M, T = method.cfg.num_masks, batch["mask"].shape[1]
    assert batch["mask"].shape == (3 * M, T)
    out = method(batch)
    assert isinstance(out, MethodOutput) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.sample_size == int(batch["mask"].sum())
    assert set(out.logs) >= {"target_var", "pred_var", "masked_pct"}
    snapshot = method.log_snapshot()        # weight norms and tau: read at logging intervals, not every step
    assert set(snapshot) == {"model_norm", "ema_norm", "ema_decay"} and float(snapshot["model_norm"]) > 0
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())              # teacher: no gradient
    assert method.student.blocks[0].attn.qkv.weight.grad is not None
    assert method.decoder.proj.weight.grad is not None if hasattr(method.decoder.proj, "weight") else True
    before = [p.clone() for p in method.teacher.model.blocks.parameters()]
    with torch.no_grad():
        for p in method.student.blocks.parameters():
            p.add_(0.1)
    method.after_step(1, fraction=0.0)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.teacher.model.blocks.parameters()))
    pickle.loads(pickle.dumps(method.masker()))                                     # data-loader workers


@pytest.mark.parametrize("modality", MODALITIES)
def test_student_sees_visible_tokens_teacher_runs_once_per_sample(modality):
    method = build(modality)
    batch = method.masker()(batch_for(modality), torch.Generator().manual_seed(1))
    B, M, T = 3, method.cfg.num_masks, batch["mask"].shape[1]
    student_inputs, teacher_inputs = [], []
    method.student.blocks[0].register_forward_hook(lambda m, a, o: student_inputs.append(a[0].shape))
    method.teacher.model.blocks[0].register_forward_hook(lambda m, a, o: teacher_inputs.append(a[0].shape))
    method(batch)
    E = method.student.context_encoder.num_extra_tokens
    visible = T - int(T * method.cfg.mask_ratio) if modality == "speech" else int(T * (1 - method.cfg.mask_ratio))
    assert visible == method.masker().num_visible(T)
    assert student_inputs == [(B * M, visible + E, method.cfg.encoder.embed_dim)]
    assert teacher_inputs == [(B, T + E, method.cfg.encoder.embed_dim)]
    assert method.encoder_tokens(batch) == B * M * (visible + E) + B * (T + E)


@pytest.mark.parametrize("modality", MODALITIES)
def test_targets_and_predictions_match_a_direct_computation(modality):
    method = build(modality, {"encoder": NO_DROPOUT, "decoder": {"input_dropout": 0.0}}).eval()
    batch = method.masker()(batch_for(modality), torch.Generator().manual_seed(2))
    out, details = method.forward_details(batch, mask_noise_std=0.0)
    c, M = method.cfg, method.cfg.num_masks
    teacher_layers = method.extract_features(batch["source"], teacher=True).layer_results
    y = make_targets(teacher_layers[-c.encoder.depth:], c.average_top_k_layers,
                     layer_norm_targets=c.layer_norm_targets)
    mask = batch["mask"]
    expected_targets = y.repeat_interleave(M, 0)[mask]
    torch.testing.assert_close(details.targets, expected_targets)
    # predictions: student on the visible tokens, decoder with zeros at masked positions
    x, _ = method.student.local_features(batch["source"])
    enc = method.student.contextualize(x.repeat_interleave(M, 0), mask)
    dec = method.decoder(enc.x[:, enc.num_extra_tokens:], keep_indices(mask), mask.shape[1], 0.0)
    torch.testing.assert_close(details.predictions, dec[mask].float())
    D = c.encoder.embed_dim
    scale = c.loss_scale if c.loss_scale is not None else D ** -0.5
    reg = ((details.predictions - expected_targets) ** 2).sum() * scale
    if c.cls_loss:
        reg = reg + c.cls_loss * ((details.cls_prediction - details.cls_target) ** 2).sum() * scale * mask.sum()
    torch.testing.assert_close(out.loss, reg / mask.sum())


def test_decoder_shapes_residuals_and_noise():
    torch.manual_seed(0)
    dec2d = Decoder(DecoderConfig(dim=8, groups=2, depth=3, kernel=3), embed_dim=16, grid=(4, 4))
    dec1d = Decoder(DecoderConfig(dim=16, groups=1, depth=2, kernel=9, residual=False, head_layers=2), 16)
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    vis = torch.randn(2, 3, 16)
    assert dec2d(vis, keep, 16, 0.01).shape == (2, 16, 16)
    assert dec1d(vis, keep, 20, 0.0).shape == (2, 20, 16)
    assert isinstance(dec1d.proj, torch.nn.Sequential) and dec1d.proj[0].out_features == 32
    # noise 0 -> deterministic; noise > 0 -> fresh every call
    torch.testing.assert_close(dec2d(vis, keep, 16, 0.0), dec2d(vis, keep, 16, 0.0))
    assert not torch.allclose(dec2d(vis, keep, 16, 0.5), dec2d(vis, keep, 16, 0.5))
    # 2-D: a visible token influences only its 3x3 neighbourhood per layer (depth 1 here)
    one = Decoder(DecoderConfig(dim=8, groups=2, depth=1, kernel=3, residual=False), 16, grid=(4, 4))
    v2 = vis.clone()
    v2[0, 0] += 10.0                                        # position 0 = grid (0, 0)
    diff = (one(vis, keep, 16, 0.0) - one(v2, keep, 16, 0.0))[0].abs().sum(-1).view(4, 4)
    assert (diff[:2, :2] > 0).all() and (diff[2:] == 0).all() and (diff[:, 2:] == 0).all()


@pytest.mark.parametrize("head_layers,grid", [(1, (4, 4)), (2, None)])
def test_decoder_at_given_positions_is_the_full_output_there(head_layers, grid):
    """The loss reads the masked positions only, so the step projects only those: the same values and
    gradients as projecting every position and selecting."""
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(dim=8, groups=2, depth=2, kernel=3, head_layers=head_layers), 16, grid=grid)
    keep, masked = torch.tensor([[0, 5, 9], [1, 2, 15]]), torch.tensor([[3, 4, 12], [0, 7, 8]])
    vis = torch.randn(2, 3, 16, requires_grad=True)
    full, some = dec(vis, keep, 16, 0.0), dec(vis, keep, 16, 0.0, positions=masked)
    expected = full[torch.arange(2)[:, None], masked]
    torch.testing.assert_close(some, expected)
    g = torch.randn_like(some)
    params = [vis, *dec.parameters()]
    torch.testing.assert_close(torch.autograd.grad(some, params, g), torch.autograd.grad(expected, params, g))


@pytest.mark.parametrize("modality,ratio", [("image", 0.5), ("speech", 0.5), ("text", 0.42)])
def test_tiny_model_overfits_one_batch(modality, ratio):
    overrides = {"encoder": dict(NO_DROPOUT), "decoder": {"input_dropout": 0.0, "depth": 3},
                 "ema_decay": 1.0, "ema_end_decay": 1.0, "mask_ratio": ratio}
    if modality == "text":
        overrides["encoder"]["text"] = {"dropout": 0.0}
    method = build(modality, overrides)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    batch = method.masker()(batch_for(modality, B=4), torch.Generator().manual_seed(0))
    losses = []
    for step in range(80):
        out = method(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_step(step + 1, fraction=0.0)
        losses.append(out.loss.item())
    assert losses[0] / min(losses[-5:]) > 5.0, losses[::10]


@pytest.mark.parametrize("modality", MODALITIES)
def test_deterministic_under_a_seed(modality):
    losses = []
    for _ in range(2):
        method = build(modality)
        torch.manual_seed(123)
        losses.append(method(batch_for(modality)).loss)                   # masks from the global RNG
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("modality", MODALITIES)
def test_local_grad_mult_scales_or_stops_the_local_encoders_gradient(modality):
    """fairseq's ``local_grad_mult``: the loss is unchanged, the local encoder's gradient is scaled by it
    (everything else unchanged), and 0 freezes the local encoder (no gradient, nothing to optimise)."""
    grads, losses = {}, {}
    for g in (1.0, 0.25, 0.0):
        method = build(modality, {"local_grad_mult": g})
        batch = method.masker()(batch_for(modality), torch.Generator().manual_seed(1))
        torch.manual_seed(5)                                  # same dropout and mask noise
        out = method(batch)
        out.loss.backward()
        losses[g] = out.loss.detach()
        grads[g] = {n: p.grad for n, p in method.student.named_parameters()}
    assert torch.allclose(losses[0.25], losses[1.0]) and torch.allclose(losses[0.0], losses[1.0])
    local = [n for n in grads[1.0] if n.startswith("local_encoder.") and grads[1.0][n] is not None]
    assert local
    for n, grad in grads[1.0].items():
        if grad is None:
            continue
        scale = 0.25 if n in local else 1.0
        assert torch.allclose(grads[0.25][n], scale * grad, rtol=1e-4, atol=1e-7), n
    assert all(grads[0.0][n] is None for n in local)
    frozen = build(modality, {"local_grad_mult": 0.0})
    assert not any(p.requires_grad for p in frozen.student.local_encoder.parameters())
    assert all(p.requires_grad for p in frozen.student.blocks.parameters())


@pytest.mark.parametrize("modality", MODALITIES)
def test_bf16_autocast_forward_backward(modality):
    method = build(modality)
    batch = method.masker()(batch_for(modality), torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.student.parameters() if p.grad is not None)


def test_speech_masker_counts_frames_from_samples():
    method = build("speech", {"encoder": {"speech": {"conv_layers": WAV2VEC2_CONV}}, "num_masks": 8})
    batch = method.masker()({"source": torch.zeros(2, 32000)}, torch.Generator().manual_seed(0))
    assert batch["mask"].shape == (16, 99)                               # T = floor((N-400)/320)+1
    assert (batch["mask"].sum(1) == int(99 * 0.5)).all()                 # fairseq: int(T*R) masked
    assert "alibi_scale" in next(iter(method.no_weight_decay()))


@pytest.mark.parametrize("modality,name", [("speech", "data2vec2"), ("speech", "wav2vec2"), ("image", "data2vec2"),
                                           ("text", "data2vec2")])
def test_only_the_alibi_scales_of_the_speech_encoder_escape_weight_decay(modality, name):
    """The no-decay rule is the encoder's (its context encoder's), so every method on it and fine-tuning share it."""
    from d2v2.engine.optim import param_groups

    method = build_method(modality, name, "smoke")
    assert method.no_weight_decay() == ({"alibi_scale"} if modality == "speech" else set())
    decay = {id(p) for g in param_groups(method, 0.05, method.no_weight_decay()) if g["weight_decay"] for p in g["params"]}
    scales = [p for n, p in method.named_parameters() if n.endswith("alibi_scale") and p.requires_grad]
    assert len(scales) == (modality == "speech") and not any(id(p) in decay for p in scales)
    assert any(id(p) in decay for n, p in method.named_parameters() if p.ndim > 1)


def test_collapse_guard_and_mask_shape_errors():
    method = build("image", {"min_target_var": 100.0, "collapse_check_after": 1})
    logs = method(batch_for("image")).logs
    method.after_step(1, fraction=0.0)
    method.check_health(logs)                            # not past collapse_check_after yet
    method.after_step(2, fraction=0.0)
    with pytest.raises(RuntimeError, match="collapse guard: target std"):
        method.check_health(logs)
    method = build("image")
    with pytest.raises(ValueError, match=r"expected \(B\*M, T\)"):
        method({**batch_for("image"), "mask": torch.zeros(3, 196, dtype=torch.bool)})


@pytest.mark.parametrize("overrides,message", [
    ({"encoder": {"embed_dm": 3}}, r"method\.encoder\.embed_dm: unknown key"),
    ({"mask_ratio": 0.999}, "leaves no visible patch"),
    ({"decoder": {"depth": 0}}, r"method\.decoder\.depth"),
    ({"encoder": {"embed_dim": 33}}, "not divisible by num_heads"),
    ({"average_top_k_layers": 9}, "exceeds the 2 main blocks"),
    ({"decoder": {"groups": 3, "dim": 33}}, "must divide embed_dim"),
])
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        method_config("image", "data2vec2", "smoke", overrides)


def test_base_presets_follow_the_paper():
    img = method_config("image", "data2vec2", "base")
    assert (img.num_masks, img.mask_ratio, img.mask_width, img.mask_adjust) == (16, 0.8, 3, 0.07)
    assert (img.encoder.prenet_depth, img.encoder.depth, img.average_top_k_layers) == (2, 10, 10)
    assert img.layer_norm_targets and img.cls_loss == 0.01
    audio = method_config("speech", "data2vec2", "base")
    assert (audio.num_masks, audio.mask_ratio, audio.decoder.dim, audio.decoder.kernel) == (8, 0.5, 384, 7)
    text = method_config("text", "data2vec2", "base")
    assert (text.mask_ratio, text.ema_end_decay, text.loss_scale, text.decoder.head_layers) == (0.42, 1.0, 1.0, 2)
    model = build("image", preset="base")
    n = sum(p.numel() for p in model.student.parameters())
    assert 85e6 < n < 87e6, n                                             # ViT-B/16: 86M
    assert math.isclose(model.loss_scale, 768 ** -0.5)


def test_position_share_separates_content_from_positional_targets():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(32, 50, 16, generator=g)                 # no positional structure
    positional = torch.randn(1, 50, 16, generator=g).expand(32, -1, -1)   # the same target at a position
    assert abs(float(position_share(content))) < 0.05
    assert float(position_share(positional)) == pytest.approx(1.0, abs=1e-5)
    half = float(position_share(content + positional))             # equal variance from each
    assert 0.4 < half < 0.6
    out = build("text")(batch_for("text", B=4))
    assert 0 <= float(out.logs["target_pos_share"]) <= 1           # logged every step (on the device)


def _is_bert_init(linear: torch.nn.Linear) -> bool:
    """N(0, 0.02) weights and zero biases (fairseq's init_bert_params), not PyTorch's default."""
    return abs(linear.weight.std().item() - 0.02) < 0.004 and not linear.bias.any()


def test_initialisation_follows_fairseq():
    """fairseq applies init_bert_params to the whole model, then the image and audio encoders reset their
    decoder's Linear layers (PyTorch default) and the image patch embedding's kernel (xavier, the bias
    keeps Conv2d's default); the text decoder keeps init_bert_params. At the tiny width 48 the PyTorch
    default has std 1/sqrt(3*48) = 0.083, so the two are far apart."""
    torch.manual_seed(0)
    text = build_method("text", "data2vec2", "tiny")
    assert all(_is_bert_init(m) for m in text.decoder.proj.modules() if isinstance(m, torch.nn.Linear))
    for modality in ("image", "speech"):
        proj = build_method(modality, "data2vec2", "tiny").decoder.proj
        assert not _is_bert_init(proj) and proj.bias.any()
    patch = build_method("image", "data2vec2", "tiny").student.local_encoder.proj
    fan_in = patch.weight[0].numel()
    assert patch.bias.any() and patch.bias.abs().max() <= fan_in ** -0.5
    assert abs(patch.weight.std().item() - (2 / (fan_in + patch.weight.shape[0])) ** 0.5) < 0.02


def test_the_collapse_diagnostics_are_fairseqs_compute_var():
    """target_var / pred_var: the per-dimension std over masked tokens, averaged (fairseq's compute_var); 0 for
    fewer than 2 rows. data2vec 1.0 logs the same."""
    from d2v2.model.targets import feature_std

    x = torch.randn(500, 12) * torch.linspace(0.1, 3.0, 12) + 5.0
    torch.testing.assert_close(feature_std(x), torch.sqrt(x.var(0) + 1e-6).mean(), rtol=1e-6, atol=1e-6)
    assert feature_std(x[:1]) == 0
