"""Encoder API for the three modalities: shapes, sparse masking, positions, padding, config errors."""
import pytest
import torch

from d2v2.config import ConfigError, validate
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.model.masking import block_mask, keep_indices, random_mask
from d2v2.model.modalities.speech import CPU_LENGTH_MULTIPLE, WAV2VEC2_CONV, frame_count
from d2v2.model.modalities.image import sincos_2d

SMALL_CONV = [(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2


def make(modality, **kw):
    extra = {"image": {"image": {"img_size": 28, "patch_size": 2, "in_chans": 1}},
             "speech": {"speech": {"conv_layers": SMALL_CONV, "conv_pos_width": 6, "conv_pos_depth": 2,
                                 "conv_pos_groups": 4}},
             "text": {"text": {"vocab_size": 50, "max_positions": 40}}}[modality]
    cfg = dict(modality=modality, embed_dim=16, num_heads=4, depth=2, prenet_depth=1, **extra)
    cfg.update(kw)
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**cfg)).eval()


def source(modality, B=2):
    g = torch.Generator().manual_seed(1)
    return {"image": lambda: torch.randn(B, 1, 28, 28, generator=g),
            "speech": lambda: torch.randn(B, 8000, generator=g),
            "text": lambda: torch.randint(5, 50, (B, 24), generator=g)}[modality]()


@pytest.mark.parametrize("modality,T,E", [("image", 196, 1), ("speech", 24, 0), ("text", 24, 0)])
def test_shapes_dense_and_sparse(modality, T, E):
    enc = make(modality)
    x, pm = enc.local_features(source(modality))
    assert x.shape == (2, T, 16) and pm is None
    out = enc(source(modality))
    assert out.x.shape == (2, T + E, 16) and out.num_extra_tokens == E
    assert len(out.layer_results) == 3 and all(r.shape == (2, T, 16) for r in out.layer_results)
    mask = random_mask(2, T, 0.5, torch.Generator().manual_seed(0))
    kept = T - int(mask[0].sum())
    sparse = enc.contextualize(x, mask)
    assert sparse.x.shape == (2, kept + E, 16)
    assert sparse.layer_results[0].shape == (2, kept, 16)
    assert enc.contextualize(x, mask, layer_results="none").layer_results == []


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_sparse_student_never_sees_masked_tokens(modality):
    """Changing the features at masked positions must not change the sparse output (for audio this
    also checks that the conv positional encoder sees masked frames as zeros)."""
    enc = make(modality)
    x, _ = enc.local_features(source(modality))
    mask = random_mask(2, x.shape[1], 0.6, torch.Generator().manual_seed(0))
    y1 = enc.contextualize(x, mask).x
    x2 = x.clone()
    x2[mask] = 50 * torch.randn_like(x2[mask])
    torch.testing.assert_close(enc.contextualize(x2, mask).x, y1)
    y_dense = enc.contextualize(x, mask, sparse=False, fill=torch.zeros(16)).x
    assert y_dense.shape[1] == x.shape[1] + enc.context_encoder.num_extra_tokens


def test_fill_path_replaces_masked_positions():
    enc = make("text")
    x, _ = enc.local_features(source("text"))
    mask = random_mask(2, 24, 0.5, torch.Generator().manual_seed(0))
    fill = torch.randn(16)
    a = enc.contextualize(x, mask, sparse=False, fill=fill).x
    x2 = x.clone()
    x2[mask] = fill
    torch.testing.assert_close(a, enc.contextualize(x2).x)
    with pytest.raises(ValueError, match="fill"):
        enc.contextualize(x, mask, sparse=False)


def test_image_positions_are_mae_sincos_added_before_masking():
    enc = make("image")
    src = source("image")
    x, _ = enc.local_features(src)
    patches = enc.local_encoder.proj(src).flatten(2).transpose(1, 2)
    torch.testing.assert_close(x - patches, sincos_2d(16, 14)[None].expand(2, -1, -1))
    table = sincos_2d(16, 14)
    # MAE's layout: first half encodes the column, second half the row; each half is [sin, cos] of
    # position * 10000^(-k / (dim / 4))
    omega = torch.tensor([1.0, 0.1, 0.01, 0.001])
    expected = torch.cat([omega.sin(), omega.cos(), torch.zeros(4), torch.ones(4)])      # row 0, col 1
    torch.testing.assert_close(table[1], expected)
    assert torch.equal(table[14, 8:], table[1, :8])          # row 1 == column 1 pattern
    assert enc.context_encoder.extra_tokens.shape == (1, 1, 16)


def test_patch_init_fan_in_gives_tokens_the_pixels_variance_and_is_xavier_at_vit_b():
    # a narrow patch (fan-in 16) into a wide token (384): xavier shrinks the tokens, fan_in keeps unit variance
    pixels = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    stds = {}
    for init in ("xavier", "fan_in"):
        enc = make("image", embed_dim=384, num_heads=6, image={"img_size": 28, "patch_size": 4, "in_chans": 1,
                                                               "patch_init": init})
        with torch.no_grad():
            stds[init] = (enc.local_encoder.proj(pixels) - enc.local_encoder.proj.bias[:, None, None]).std().item()
    assert stds["fan_in"] == pytest.approx(1.0, abs=0.05)
    assert stds["xavier"] == pytest.approx((16 * 2 / (16 + 384)) ** 0.5, abs=0.02)          # ~0.28
    # fan-in = width (ViT-B/16 on RGB: 3 x 16 x 16 = 768): the same weights as xavier, draw for draw
    weights = {}
    for init in ("xavier", "fan_in"):
        enc = make("image", embed_dim=48, num_heads=4, image={"img_size": 16, "patch_size": 4, "in_chans": 3,
                                                              "patch_init": init})
        weights[init] = enc.local_encoder.proj.weight
    assert torch.equal(weights["xavier"], weights["fan_in"])
    with pytest.raises(ConfigError, match="patch_init"):
        validate(EncoderConfig, dict(modality="image", image={"patch_init": "kaiming"}), where="encoder")


def test_speech_frame_count_matches_the_cnn_and_padding():
    assert frame_count(16000, WAV2VEC2_CONV) == 49 and frame_count(320000, WAV2VEC2_CONV) == 999
    enc = make("speech")
    for n in (3000, 8000, 8321):
        assert enc.local_features(torch.randn(1, n))[0].shape[1] == frame_count(n, SMALL_CONV)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 4000:] = True
    _, fpm = enc.local_features(torch.randn(2, 8000), pad)
    assert fpm.shape == (2, 24) and not fpm[0].any()
    assert int((~fpm[1]).sum()) == frame_count(4000, SMALL_CONV)


def test_speech_cnn_on_a_padded_length_gives_the_frames_of_the_waveform_itself():
    """On a CPU the CNN runs on waveforms padded to CPU_LENGTH_MULTIPLE samples and cuts its frames back:
    outputs and weight gradients are those of the unpadded waveform."""
    enc = make("speech").local_encoder

    def frames_and_grads(run, wave, out_grad):
        enc.zero_grad()
        frames = run(wave)
        (frames * out_grad).sum().backward()
        return frames.detach(), [p.grad.clone() for p in enc.feature_extractor.parameters()]

    for n in (3000, CPU_LENGTH_MULTIPLE, CPU_LENGTH_MULTIPLE + 321):
        wave = torch.randn(2, n)
        out_grad = torch.randn(2, frame_count(n, SMALL_CONV), SMALL_CONV[-1][0])
        padded, padded_grads = frames_and_grads(enc.cnn, wave, out_grad)
        plain, plain_grads = frames_and_grads(lambda w: enc.feature_extractor(w[:, :, None]), wave, out_grad)
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(padded_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_speech_alibi_uses_original_distances_after_masking():
    enc = make("speech")
    ctx = enc.context_encoder
    with torch.no_grad():
        ctx.alibi_scale.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]).view(1, 1, 4, 1, 1))
    mask = block_mask(2, (24,), 0.5, 5, 0.05, False, torch.Generator().manual_seed(0))
    keep = keep_indices(mask)
    full = ctx.attention_bias(torch.arange(24)[None])[0]                      # (H, T, T)
    sparse = ctx.attention_bias(keep)
    for b in range(2):
        torch.testing.assert_close(sparse[b], full[:, keep[b]][:, :, keep[b]])
    assert (full[3] == 0).all()                                                   # scale clamped at 0


def test_relative_position_bias_is_off_by_default_and_uses_original_offsets_after_masking():
    """WavLM's option (METHOD.md#gated-relative-position-bias): no parameter exists without it; with it the
    bias of the kept tokens is the full sequence's at their original offsets, and the blocks gate it."""
    assert not [n for n, _ in make("speech").named_parameters() if n.startswith("relative_position.") or ".gate" in n]
    enc = make("speech", relative_position={"num_buckets": 8, "max_distance": 12})
    assert {n for n, _ in enc.named_parameters() if ".gate" in n} == {
        f"blocks.{i}.attn.{p}" for i in range(3) for p in ("gate.weight", "gate.bias", "gate_scale")}
    mask = block_mask(2, (24,), 0.5, 5, 0.05, False, torch.Generator().manual_seed(0))
    keep = keep_indices(mask)
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        full, sparse = enc.prepare(x).rel_bias, enc.prepare(x, mask, keep=keep).rel_bias
    assert full.shape == (1, 4, 24, 24) and sparse.shape == (2, 4, 12, 12)
    for b in range(2):
        torch.testing.assert_close(sparse[b], full[0][:, keep[b]][:, :, keep[b]])
    assert torch.equal(full[0, :, 3, 10], full[0, :, 5, 12])                   # a function of the offset j - i
    with pytest.raises(ConfigError, match="max_distance 2 must exceed num_buckets / 4"):
        validate(EncoderConfig, {"modality": "speech", "relative_position": {"num_buckets": 32, "max_distance": 2}})


def test_text_positions_follow_fairseq_padding_convention():
    enc = make("text")
    src = source("text")
    padded = torch.cat([src, torch.ones(2, 5, dtype=torch.long)], 1)           # right padding (pad=1)
    a, pm_a = enc.local_features(src)
    b, pm_b = enc.local_features(padded)
    assert pm_a is None and pm_b[:, 24:].all() and not pm_b[:, :24].any()
    torch.testing.assert_close(a, b[:, :24])
    out_a, out_b = enc(src), enc(padded)
    torch.testing.assert_close(out_a.x, out_b.x[:, :24], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_positions"):
        enc.local_features(torch.randint(5, 50, (1, 41)))


def test_layer_ids_for_layer_wise_decay():
    enc = make("image")                              # 1 prenet + 2 main blocks
    assert enc.num_layers == 4
    assert enc.layer_id("blocks.0.attn.qkv.weight") == 1
    assert enc.layer_id("encoder.blocks.2.mlp.fc1.bias") == 3
    for name in ("local_encoder.proj.weight", "context_encoder.extra_tokens", "context_encoder.norm.weight",
                 "head.weight"):                   # LR scale 1 (the scales themselves: test_finetune.py)
        assert enc.layer_id(name) == enc.num_layers


def test_pre_ln_option_has_final_norm_and_no_context_norm():
    enc = make("image", layer_norm_first=True)
    assert enc.norm is not None and enc.context_encoder.norm is None
    out = enc(source("image"))
    torch.testing.assert_close(out.x.mean(-1), torch.zeros(2, 197), atol=1e-5, rtol=0)
    assert make("text", prenet_depth=0).context_encoder.norm is None
    assert make("speech").context_encoder.norm is not None


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"encoder\.embed_dm: unknown key"):
        validate(EncoderConfig, {"modality": "image", "embed_dm": 3}, where="encoder")
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        validate(EncoderConfig, {"modality": "image", "embed_dim": 10, "num_heads": 3})
    with pytest.raises(ConfigError, match="'speech' settings given for a text encoder"):
        validate(EncoderConfig, {"modality": "text", "speech": {}})
    with pytest.raises(ConfigError, match="modality"):
        validate(EncoderConfig, {"modality": "video"})
    enc = make("image")
    with pytest.raises(ValueError, match=r"expects source \(B, 1, 28, 28\)"):
        enc.local_features(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="mask shape"):
        enc.contextualize(torch.randn(2, 196, 16), torch.zeros(2, 100, dtype=torch.bool))


def test_key_padding_folded_into_the_shared_bias_changes_nothing():
    """The speech encoder folds the key padding into the ALiBi bias once for all blocks; each block masking
    the padded keys itself gives the same outputs and the same gradient for the learned ALiBi scale."""
    enc = make("speech")
    with torch.no_grad():
        enc.context_encoder.alibi_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.3]).view(1, 1, 4, 1, 1))
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 4000:] = True
    x, fpm = enc.local_features(source("speech"), pad)
    p = enc.prepare(x, None, fpm, sparse=False)
    assert p.bias.requires_grad and fpm[1].any()
    folded = enc.run_blocks(p, layer_results="none").x
    per_block = p.x
    for block in enc.blocks:
        per_block, _ = block(per_block, p.bias, p.padding_mask)
    torch.testing.assert_close(folded, per_block)
    scale = enc.context_encoder.alibi_scale
    (g_folded,) = torch.autograd.grad(folded.square().sum(), [scale], retain_graph=True)
    (g_per_block,) = torch.autograd.grad(per_block.square().sum(), [scale])
    torch.testing.assert_close(g_folded, g_per_block)


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_clones_gathered_from_one_copy_equal_the_repeated_input(modality):
    """data2vec 2.0's M masks: gathering each clone's visible tokens from one copy of the sample gives the
    outputs and the input gradient of encoding ``repeat_interleave(x, M)`` (padding and CLS included)."""
    enc = make(modality).train()
    raw = source(modality, B=3)
    pad = None
    if modality == "speech":
        pad = torch.zeros(3, 8000, dtype=torch.bool)
        pad[1, 5000:] = True
    x, fpm = enc.local_features(raw, pad)
    M, T = 4, x.shape[1]
    mask = random_mask(3 * M, T, 0.5, torch.Generator().manual_seed(0))
    x = x.detach().requires_grad_(True)
    outs, grads = [], []
    ctx, seen = enc.context_encoder, []
    add_positions = ctx.add_positions

    def record(x, mask):                              # add_positions gets a mask only row for row with x
        seen.append(None if mask is None else mask.shape[0] == x.shape[0])
        return add_positions(x, mask)

    ctx.add_positions = record
    for clones in (1, M):
        torch.manual_seed(0)                          # the same dropout draws on both sides
        inp, pm = (x, fpm) if clones > 1 else (x.repeat_interleave(M, 0),
                                               None if fpm is None else fpm.repeat_interleave(M, 0))
        out = enc.contextualize(inp, mask, pm, clones=clones, layer_results="none")
        (g,) = torch.autograd.grad(out.x.square().sum(), [x])
        outs.append(out.x)
        grads.append(g)
    assert seen == [True, True if ctx.positions_see_mask else None]
    assert outs[1].shape == (3 * M, T - int(mask[0].sum()) + enc.context_encoder.num_extra_tokens, 16)
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0])
    with pytest.raises(ValueError, match="clones"):
        enc.contextualize(x, mask, sparse=False, fill=torch.zeros(16), clones=M)
    with pytest.raises(ValueError, match="x 4 clones"):
        enc.contextualize(x, mask[:M], clones=M)
