"""data2vec 2.0's convolutional decoder (METHOD.md#decoder).

The student's visible outputs are put back at their positions, every masked position gets a fresh
N(0, sigma^2) "mask token" (noise, not a learned embedding; sigma = ``mask_noise_std``), and a stack of
``Conv -> LayerNorm over channels (no affine) -> GELU`` layers (2-D over the patch grid for images, 1-D
otherwise, grouped) with residual connections where input and output widths match maps the sequence to
predictions of the teacher's targets. No positional embedding is added: the layout carries position.
"""
from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from d2v2.model.blocks import Dropout, conv_channels_last
from d2v2.config import Config
from d2v2.model.masking import gather_tokens, scatter_tokens

__all__ = ["DecoderConfig", "Decoder"]


class DecoderConfig(Config):
    """Decoder of METHOD.md#decoder (defaults: image ViT-B). ``head_layers``: 1 = Linear(dim, D);
    2 = Linear(dim, 2*dim) -> GELU -> Linear(2*dim, D) (text)."""

    dim: int = pydantic.Field(768, ge=1)
    kernel: int = pydantic.Field(3, ge=1)
    groups: int = pydantic.Field(16, ge=1)
    depth: int = pydantic.Field(6, ge=1)
    residual: bool = True
    input_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    head_layers: int = pydantic.Field(1, ge=1, le=2)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "DecoderConfig":
        if self.dim % self.groups:
            raise ValueError(f"dim {self.dim} is not divisible by groups {self.groups}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-length convolution), got {self.kernel}")
        return self


class _DecoderLayer(nn.Module):
    """Conv (1-D or 2-D, grouped, same padding) -> LN over channels without affine -> GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int, ndim: int):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv1d
        self.conv = conv(c_in, c_out, kernel, padding=kernel // 2, groups=groups)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # (B, *spatial, C), channels last
        return F.gelu(F.layer_norm(conv_channels_last(x, self.conv), (self.out_channels,)))


class Decoder(nn.Module):
    """Conv decoder; ``grid=(H, W)`` makes it 2-D over the patch grid, ``None`` 1-D over time."""

    def __init__(self, cfg: DecoderConfig, embed_dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        if embed_dim % cfg.groups:
            raise ValueError(f"decoder groups {cfg.groups} must divide embed_dim {embed_dim}")
        self.cfg, self.grid = cfg, grid
        ndim = 2 if grid is not None else 1
        self.input_dropout = Dropout(cfg.input_dropout)
        self.blocks = nn.ModuleList([
            _DecoderLayer(embed_dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, cfg.groups, ndim)
            for i in range(cfg.depth)])
        if cfg.head_layers == 1:
            self.proj = nn.Linear(cfg.dim, embed_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, embed_dim))

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, length: int,
                noise_std: float, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``visible`` (B, T_vis, D) student outputs (extra tokens removed) at positions ``keep``
        (B, T_vis); returns predictions (B, T, D) for every position, or (B, K, D) for ``positions``
        (B, K) only (the masked ones, which the loss reads: the projection works token by token, so it
        runs on those alone; fairseq projects every position and then selects)."""
        B, _, D = visible.shape
        filler = visible.new_empty(B, length, D).normal_(0.0, noise_std) if noise_std > 0 \
            else visible.new_zeros(B, length, D)
        x = scatter_tokens(filler, keep, self.input_dropout(visible))
        if self.grid is not None:
            x = x.reshape(B, *self.grid, D)                     # tokens are the grid's rows, left to right
        residual = x
        for layer in self.blocks:
            x = layer(x)
            if self.cfg.residual and x.shape[-1] == residual.shape[-1]:
                x = x + residual
            residual = x
        x = x.reshape(B, length, -1)
        return self.proj(x if positions is None else gather_tokens(x, positions))
