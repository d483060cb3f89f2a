"""The shared Transformer block: post-/pre-LN formulas, attention with ALiBi bias and padding, slopes, and
the channels-last convolutions."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2v2.model.blocks import (Attention, Block, Dropout, alibi_bias, alibi_slopes, conv_channels_last, dropout,
                               written_out_attention)

SLOPES4 = torch.tensor(alibi_slopes(4))        # m_h of 4 heads


def manual_attention(attn: Attention, x, bias=None, padding_mask=None):
    B, T, D = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if bias is not None:
        logits = logits + bias
    if padding_mask is not None:
        logits = logits.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, T, D))


def test_attention_matches_softmax_with_bias_and_padding():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    bias = torch.randn(2, 4, 7, 7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for b, p in [(None, None), (bias, None), (None, pad), (bias, pad)]:
        torch.testing.assert_close(attn(x, b, p), manual_attention(attn, x, b, p), atol=1e-5, rtol=1e-5)


def test_a_learned_bias_gets_the_same_outputs_and_gradients_on_either_attention_path():
    """With a bias that needs a gradient (ALiBi's learned scale) the CPU path writes attention out; it must
    give SDPA's outputs and gradients (inputs, weights and the bias itself), padding included."""
    torch.manual_seed(0)
    attn = Attention(16, 4).train()
    x = torch.randn(2, 7, 16, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    scale = torch.ones(1, 4, 1, 1, requires_grad=True)
    results = []
    for needs_grad in (True, False):             # False: SDPA (the bias is a constant for autograd)
        bias = alibi_bias(torch.arange(7)[None], SLOPES4) * (scale if needs_grad else scale.detach())
        out = attn(x, bias, pad)
        grads = torch.autograd.grad(out.square().sum(), [x, attn.qkv.weight])
        results.append((out, *grads))
    for ours, sdpa in zip(*results):
        torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
    bias = alibi_bias(torch.arange(7)[None], SLOPES4) * scale
    (grad_scale,) = torch.autograd.grad(attn(x, bias, pad).square().sum(), [scale])
    reference = manual_attention(attn, x, alibi_bias(torch.arange(7)[None], SLOPES4) * scale, pad)
    (expected,) = torch.autograd.grad(reference.square().sum(), [scale])
    torch.testing.assert_close(grad_scale, expected, atol=1e-4, rtol=1e-4)


def test_written_out_attention_is_sdpa_for_every_kind_of_mask():
    """No mask, a bool key-padding mask (B, 1, 1, T), an additive bias shared over the batch (1, H, T, T) or per
    item (B, H, T, T): SDPA's outputs and gradients (q, k, v and the bias)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8, requires_grad=True) for _ in range(3))
    pad = torch.zeros(3, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., 5:] = True
    for mask in (None, ~pad, torch.randn(1, 4, 7, 7, requires_grad=True),
                 torch.randn(3, 4, 7, 7).masked_fill(pad, float("-inf")).requires_grad_()):
        inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
        ours = written_out_attention(q, k, v, mask, 0.0)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
        grads = [torch.autograd.grad(out.square().sum(), inputs) for out in (ours, sdpa)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 8, 3, stride=2), nn.Conv1d(1, 8, 10, stride=5, bias=False),
                                  nn.Conv1d(8, 8, 5, padding=2, groups=4), nn.Conv2d(8, 4, 3, padding=1, groups=4)],
                         ids=["strided", "one-channel", "grouped-same", "2d-grouped"])
def test_channels_last_convolution_is_the_convolution(conv):
    torch.manual_seed(0)
    shape = (2, 9, 7, conv.in_channels) if isinstance(conv, nn.Conv2d) else (2, 40, conv.in_channels)
    x = torch.randn(*shape, requires_grad=True)
    y = conv_channels_last(x, conv)
    expected = conv(x.movedim(-1, 1)).movedim(1, -1)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous()                     # what the LayerNorm after it reads without a copy
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, [x, conv.weight], g),
                               torch.autograd.grad(expected, [x, conv.weight], g), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv", [nn.Conv1d(1, 8, 10, stride=5, bias=False), nn.Conv2d(8, 4, 3, padding=1, groups=4)],
                         ids=["one-channel", "2d-grouped"])
def test_channels_last_convolution_without_autograd(conv):
    """Without autograd (a teacher, evaluation) the convolution skips oneDNN on a CPU: the same result, and
    oneDNN is on again afterwards."""
    torch.manual_seed(0)
    shape = (2, 9, 7, conv.in_channels) if isinstance(conv, nn.Conv2d) else (2, 400, conv.in_channels)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = conv_channels_last(x, conv)
    assert torch.backends.mkldnn.enabled and y.is_contiguous()
    torch.testing.assert_close(y, conv(x.movedim(-1, 1)).movedim(1, -1).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="PyTorch built without NNPACK")
def test_channels_last_convolution_without_autograd_skips_nnpack_from_a_batch_of_16():
    """PyTorch sends a batch of 16 or more to NNPACK, which copies in and out of channels-last and is
    slower than its own kernel: the frozen CNN of a fine-tuning batch of 16 must not go there."""
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 3, stride=2)
    x = torch.randn(16, 400, 8)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = conv_channels_last(x, conv)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_slow_conv2d_forward" in ops and "aten::_nnpack_spatial_convolution" not in ops, ops
    assert torch._C._get_nnpack_enabled() and torch.backends.mkldnn.enabled      # both on again
    with torch.no_grad():
        torch.testing.assert_close(y, conv(x.movedim(-1, 1)).movedim(1, -1), atol=1e-5, rtol=1e-5)


def test_padded_keys_do_not_influence_real_positions():
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    x = torch.randn(1, 6, 16)
    pad = torch.tensor([[False] * 4 + [True] * 2])
    y1, _ = block(x, padding_mask=pad)
    x2 = x.clone()
    x2[:, 4:] = 100 * torch.randn(1, 2, 16)
    y2, _ = block(x2, padding_mask=pad)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])


def test_post_ln_block_formula_and_ffn_layer_result():
    torch.manual_seed(0)
    block = Block(16, 4, layer_norm_first=False).eval()
    x = torch.randn(2, 5, 16)
    y, f = block(x)
    h = x + block.attn(x)
    r = block.norm1(h)
    f_ref = block.mlp(r)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(y, block.norm2(r + f_ref))


def test_pre_ln_block_formula():
    torch.manual_seed(0)
    block = Block(16, 4, layer_norm_first=True).eval()
    x = torch.randn(2, 5, 16)
    y, f = block(x)
    h = x + block.attn(block.norm1(x))
    f_ref = block.mlp(block.norm2(h))
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(y, h + f_ref)


def test_dropouts_and_drop_path_only_in_training():
    torch.manual_seed(0)
    block = Block(16, 4, dropout=0.5, attention_dropout=0.5, activation_dropout=0.5, post_mlp_dropout=0.5,
                  drop_path=0.5)
    x = torch.randn(4, 5, 16)
    block.eval()
    torch.testing.assert_close(block(x)[0], block(x)[0])
    block.train()
    assert not torch.allclose(block(x)[0], block(x)[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1e-4])
def test_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales(p):
    """The CPU mask: p rounded to a multiple of 2^-16, kept elements scaled by one over the rounded keep
    probability (mean exactly 1); independent of the shape's divisibility by four; seeded by torch's RNG."""
    torch.manual_seed(0)
    x = torch.randn(400_001, requires_grad=True)
    state = torch.get_rng_state()
    y = dropout(x, p)
    kept = y != 0
    keep_p = 1 - round(p * 65536) / 65536
    assert abs(keep_p - (1 - p)) <= 2**-17
    assert abs(kept.float().mean().item() - keep_p) < 4 * math.sqrt(keep_p * (1 - keep_p) / x.numel())   # 4 sigma
    torch.testing.assert_close(y[kept], x[kept] / keep_p)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(grad, kept.float() / keep_p)
    lanes = kept.view(-1)[:400_000].view(-1, 4).float().mean(0)       # the four 16-bit lanes of each draw
    assert (lanes - keep_p).abs().max() < 4 * 2 * math.sqrt(keep_p * (1 - keep_p) / 100_000)
    torch.set_rng_state(state)
    torch.testing.assert_close(dropout(x, p), y, rtol=0, atol=0)
    m = dropout(torch.ones(3, 5, 7), p)                                 # any shape, values 0 or 1 / keep_p
    assert m.shape == (3, 5, 7)
    assert torch.isin(m, torch.tensor([0.0, 1 / keep_p], dtype=torch.float32)).all()
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(p).eval()
    assert module(x) is x and module.train()(x).eq(0).any()


def test_attention_dropout_on_the_written_out_path_drops_probabilities():
    """With attention dropout the CPU path writes attention out: in training each query's output is a
    dropped-out (rescaled) mix of values, in evaluation SDPA's exact result, padding excluded either way."""
    torch.manual_seed(0)
    attn = Attention(16, 4, attention_dropout=0.5)
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    torch.testing.assert_close(attn.eval()(x, None, pad), manual_attention(attn, x, None, pad), atol=1e-5, rtol=1e-5)
    attn.train()
    a, b = attn(x, None, pad), attn(x, None, pad)
    assert not torch.allclose(a, b)
    x2 = x.clone()
    x2[1, 5:] = 100.0                                  # padded keys never reach a real query
    torch.manual_seed(1)
    out = attn(x, None, pad)
    torch.manual_seed(1)
    torch.testing.assert_close(attn(x2, None, pad)[:, :5], out[:, :5])


def test_alibi_slopes_follow_the_spec():
    assert alibi_slopes(8) == pytest.approx([2.0 ** -i for i in range(1, 9)])
    twelve = alibi_slopes(12)
    assert twelve[:8] == pytest.approx([2.0 ** -i for i in range(1, 9)])
    assert twelve[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])
    bias = alibi_bias(torch.arange(5)[None], SLOPES4)
    assert bias.shape == (1, 4, 5, 5)
    assert bias[0, 0, 1, 4].item() == pytest.approx(-alibi_slopes(4)[0] * 3)
    gathered = alibi_bias(torch.tensor([[0, 3, 4]]), SLOPES4)             # distances of original positions
    assert gathered[0, 1, 0, 1].item() == pytest.approx(-alibi_slopes(4)[1] * 3)


def test_bad_head_count_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Block(10, 3)


def test_block_under_bf16_autocast_with_bias():
    torch.manual_seed(0)
    block = Block(16, 4)
    x = torch.randn(2, 5, 16, requires_grad=True)
    bias = torch.randn(1, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, f = block(x, bias, torch.zeros(2, 5, dtype=torch.bool))
    (y.float().sum() + f.float().sum()).backward()
    assert x.grad is not None and bias.grad is not None and torch.isfinite(x.grad).all()


def test_the_alibi_slopes_travel_with_the_model_and_stay_out_of_checkpoints():
    """The slopes are a non-persistent buffer: on the model's device without a host copy each step (a
    synchronising copy on a GPU), and absent from state dicts (checkpoints and fairseq conversion unchanged)."""
    from d2v2.method import build_method

    method = build_method("speech", "data2vec2", "smoke")
    ctx = method.student.context_encoder
    assert torch.equal(ctx.alibi_slopes, torch.tensor(alibi_slopes(ctx.num_heads)))
    assert not any(k.endswith("alibi_slopes") for k in method.state_dict())
    assert method.to(torch.float64).student.context_encoder.alibi_slopes.dtype == torch.float64
