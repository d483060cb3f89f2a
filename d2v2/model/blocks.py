"""The Transformer block shared by every method (METHOD.md#transformer-block), plus ALiBi slopes, BERT init,
channels-last convolutions (:func:`conv_channels_last`) and the dropout every model uses (:class:`Dropout`).

data2vec 2.0 uses *post-LN* blocks (fairseq ``AltBlock`` with ``layer_norm_first=False``)::

    x = x + DropPath(Attn(x))
    r = LN1(x)
    f = MLP(r)                                  # <- the block's "layer result" (data2vec 2.0 targets)
    x = LN2(r + DropPath(Dropout(f)))

``layer_norm_first=True`` gives the standard pre-LN block of ViT / MAE::

    x = x + DropPath(Attn(LN1(x)))
    f = MLP(LN2(x))                             # <- layer result
    x = x + DropPath(Dropout(f))

In both cases :meth:`Block.forward` returns ``(x, f)``: the block output and the FFN output ``f``
before the last residual (and, post-LN, before LN2). Targets built from block outputs
(``end_of_block_targets``) use the first element instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dropout", "Dropout", "Attention", "written_out_attention", "Mlp", "Block", "alibi_slopes",
           "alibi_bias", "relative_position_bucket", "RelativePositionBias", "init_bert_params", "conv_channels_last"]


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``: each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``.

    On a CPU in fp32 the keep-mask compares 16-bit uniform integers, four from each 64-bit draw of the
    generator, with ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.100006); kept elements are scaled by one
    over the rounded keep probability, so that the mask's mean is exactly 1. Cheaper there than ``F.dropout``'s
    Bernoulli sampler or one uniform float per element (docs/BENCHMARKS.md#dropout-masks). Elsewhere, and
    inside ``torch.compile`` (which fuses its own masks), ``F.dropout``."""
    if not training or p == 0.0:
        return x
    dropped = round(p * 65536)                    # P(drop) = dropped / 2^16
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < dropped < 65536
            or torch.compiler.is_compiling()):
        return F.dropout(x, p, training)
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)      # the full 64-bit range
    keep = draws.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
    return x * keep.to(torch.float32).mul_(65536 / (65536 - dropped))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` (bias), SDPA, optional additive bias and key padding.

    ``bias`` is added to the attention logits (METHOD.md#alibi), broadcastable to (B, H, T, T);
    ``padding_mask`` (B, T) True = padded key, excluded from every query's softmax. ``rel_bias`` (B, H, T, T)
    is WavLM's relative position bias (:class:`RelativePositionBias`), added too; with ``gated`` each query
    scales it by a gate computed from its own input vector (METHOD.md#gated-relative-position-bias).
    """

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, dropout: float = 0.0,
                 gated: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout
        self.proj_drop = Dropout(dropout)
        if gated:              # WavLM's gru_rel_pos_linear and gru_rel_pos_const
            self.gate = nn.Linear(dim // num_heads, 8)
            self.gate_scale = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        else:
            self.gate = None

    def gated(self, x: torch.Tensor, rel_bias: torch.Tensor) -> torch.Tensor:
        """``rel_bias`` scaled per query by ``a (b s_h - 1) + 2``, with gates a, b = sigmoid of two sums of
        four outputs of one Linear map of the query's input vector in each head (WavLM, Sec. 3.2)."""
        B, T, D = x.shape
        heads = x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)         # (B, H, T, D/H)
        a, b = torch.sigmoid(self.gate(heads).view(B, self.num_heads, T, 2, 4).sum(-1)).unbind(-1)
        return (a * (b * self.gate_scale[..., 0] - 1.0) + 2.0)[..., None] * rel_bias

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, rel_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        if rel_bias is not None:
            rel_bias = self.gated(x, rel_bias) if self.gate is not None else rel_bias
            bias = rel_bias if bias is None else bias + rel_bias
        # q, k, v as (B, H, T, D/H) views of one (B, T, 3, H, D/H) output: their gradients are stacked straight
        # back into that layout (one copy; split off dim 0 they took a stack and a clone)
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        attn_mask = None
        if bias is not None:
            attn_mask = bias.to(q.dtype)
            if padding_mask is not None:
                attn_mask = attn_mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        elif padding_mask is not None:
            attn_mask = ~padding_mask[:, None, None, :]          # bool: True = attend
        dropout_p = self.attention_dropout if self.training else 0.0
        if q.device.type == "cpu" and (dropout_p > 0 or attn_mask is not None and attn_mask.requires_grad):
            # Attention dropout or a learned bias (ALiBi's scale) sends SDPA on a CPU to its slow generic
            # path; written out, as fairseq's AltAttention computes it, the step is faster
            # (docs/BENCHMARKS.md#ours-against-fairseq, #dropout-attention-and-the-optimiser-on-a-cpu).
            x = written_out_attention(q, k, v, attn_mask, dropout_p)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                          dropout_p: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as matrix products: ``softmax(q k^T / sqrt(d) + mask)`` with
    :func:`dropout`, times ``v``; q, k, v (B, H, T, d), ``attn_mask`` additive or bool (True = attend),
    broadcastable to (B, H, T, T). The mask enters the product itself (``baddbmm``'s input), not as another
    pass over the (B, H, T, T) logits forward and backward (docs/BENCHMARKS.md, "Attention written out")."""
    B, H, T, d = q.shape
    q, k, v = (t.reshape(B * H, -1, d) for t in (q, k, v))
    if attn_mask is None:
        logits = torch.bmm(q * d ** -0.5, k.transpose(1, 2))
    else:
        if attn_mask.dtype == torch.bool:
            attn_mask = q.new_zeros(attn_mask.shape).masked_fill_(~attn_mask, float("-inf"))
        rows, cols = attn_mask.shape[-2:]
        bias = attn_mask.expand(B, H, rows, cols).reshape(B * H, rows, cols)
        logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=d ** -0.5)
    return torch.bmm(dropout(logits.softmax(-1), dropout_p), v).view(B, H, T, d)


class Mlp(nn.Module):
    """timm-style MLP: fc1 -> GELU -> Dropout -> fc2 -> Dropout (both ``activation_dropout``)."""

    def __init__(self, dim: int, hidden: int, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One Transformer block (post-LN by default, pre-LN with ``layer_norm_first``); see module doc.

    Dropouts: ``dropout`` after the attention output projection, ``attention_dropout`` on attention
    probabilities, ``activation_dropout`` inside the MLP, ``post_mlp_dropout`` on the FFN output before
    the residual; ``drop_path`` is stochastic depth on both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 post_mlp_dropout: float = 0.0, drop_path: float = 0.0, layer_norm_first: bool = False,
                 norm_eps: float = 1e-5, gated_rel_pos: bool = False):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.drop_path = drop_path
        self.stochastic_depth = None
        if drop_path:           # torchvision's import takes about a second of every process: only where it is used
            from torchvision.ops import stochastic_depth
            self.stochastic_depth = stochastic_depth
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attention_dropout, dropout, gated=gated_rel_pos)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout)
        self.post_mlp_dropout = Dropout(post_mlp_dropout)

    def _drop_path(self, x: torch.Tensor) -> torch.Tensor:
        return self.stochastic_depth(x, self.drop_path, "row", self.training) if self.drop_path else x

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                rel_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(block output, FFN output)``, both (B, T, D)."""
        if self.layer_norm_first:
            x = x + self._drop_path(self.attn(self.norm1(x), bias, padding_mask, rel_bias))
            f = self.mlp(self.norm2(x))
            x = x + self._drop_path(self.post_mlp_dropout(f))
        else:
            x = x + self._drop_path(self.attn(x, bias, padding_mask, rel_bias))
            r = self.norm1(x)
            f = self.mlp(r)
            x = self.norm2(r + self._drop_path(self.post_mlp_dropout(f)))
        return x, f


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes m_h (Press et al. 2022): geometric 2^(-8/n)..., and for a head count that
    is not a power of two, the power-of-two set plus every other slope of the next set (METHOD.md#alibi)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """ALiBi bias ``-m_h * |i - j|`` (B, H, T, T) for tokens at original ``positions`` (B, T), so that
    after masking distances stay those of the full sequence (METHOD.md#sparse-encoding); ``slopes``: the
    (H,) ``m_h`` of :func:`alibi_slopes`, on the positions' device (a buffer: no copy from the host per step)."""
    distance = (positions[:, None, :] - positions[:, :, None]).abs().float()
    return -slopes[None, :, None, None] * distance[:, None]


def relative_position_bucket(offset: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """WavLM's (and T5's) bidirectional buckets of the offset ``j - i``: half the buckets per direction; in
    each, offsets below a quarter of ``num_buckets`` exactly, larger ones logarithmically up to
    ``max_distance``, beyond it the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=half - 1))


class RelativePositionBias(nn.Module):
    """WavLM's relative position bias (Chen et al. 2022, Sec. 3.2): one learned value per head for each
    bucket of the offset between two tokens' original positions; one table serves every block, each block
    gating it (:class:`Attention`)."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embed = nn.Embedding(num_buckets, num_heads)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(B|1, T) original positions -> (B|1, H, T, T) bias for query i, key j."""
        offset = positions[:, None, :] - positions[:, :, None]
        return self.embed(relative_position_bucket(offset, self.num_buckets, self.max_distance)).permute(0, 3, 1, 2)


@torch.no_grad()
def init_bert_params(module: nn.Module) -> None:
    """fairseq's ``init_bert_params`` (METHOD.md#initialisation): Linear/Embedding weights N(0, 0.02), biases 0,
    the padding row of an embedding 0. Use with ``model.apply``."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, 0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, 0.02)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()


def conv_channels_last(x: torch.Tensor, conv: nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    """``conv`` on channels-last input, (B, T, C) or (B, H, W, C), returning the same layout, contiguous.

    Same weights and arithmetic as moving the channels first, convolving and moving them back, without
    the copies: the channels-first view of ``x`` is a channels-last tensor (a 1-D convolution runs as a
    2-D one of height 1), which the convolution reads in place and answers in the same memory format. The
    LayerNorms over channels and the GELUs between such layers (the audio CNN, the positional convolution,
    the decoder) then work on contiguous memory, forward and backward.

    On a CPU without autograd (the speech teacher, evaluation, the frozen CNN in fine-tuning, HuBERT's label
    features) the convolution runs PyTorch's own kernel, which computes the same: oneDNN prepares a kernel
    for every new input shape, and speech changes its length at every batch and utterance; NNPACK, which
    PyTorch picks from a batch of 16, copies each layer's input and output out of channels-last and is
    slower (docs/BENCHMARKS.md#the-frozen-cnn-without-nnpack)."""
    if x.device.type == "cpu" and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False        # set directly: mkldnn.flags() also resets TF32 options
        try:
            with torch.backends.nnpack.flags(enabled=False):
                return conv_channels_last(x, conv)
        finally:
            torch.backends.mkldnn.enabled = True
    if isinstance(conv, nn.Conv1d):
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias,
                     stride=(1, conv.stride[0]), padding=(0, conv.padding[0]), groups=conv.groups)
        return y.squeeze(2).transpose(1, 2)
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
