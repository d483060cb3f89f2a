"""Image modality (METHOD.md#image-encoder): patch embedding + fixed 2-D sin-cos positions, learned CLS."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from d2v2.config import Config
from d2v2.model.modalities import ContextEncoder

__all__ = ["ImageConfig", "ImageLocalEncoder", "ImageContextEncoder", "sincos_2d"]


class ImageConfig(Config):
    """Image input: ``in_chans`` x ``img_size`` x ``img_size`` pixels cut into ``patch_size`` patches."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_extra_tokens: int = 1          # learned CLS token(s), N(0, 1) init
    # the patch projection's init: "xavier" (fairseq's and MAE's) or "fan_in" (variance 1 / fan-in, so that tokens
    # have the pixels' variance at any patch size and width); at ViT-B/16 on RGB (fan-in 768 = width) the two
    # draw the same weights (METHOD.md#image-encoder)
    patch_init: Literal["xavier", "fan_in"] = "xavier"

    @property
    def grid(self) -> int:
        """Patches per side: the image is a ``grid`` x ``grid`` grid of patches."""
        return self.img_size // self.patch_size


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double().flatten()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (grid*grid, dim): first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need embed_dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


class ImageLocalEncoder(nn.Module):
    """Conv2d patch embedding (``proj``, xavier init on the flattened kernel by default) + fixed sin-cos positions,
    added BEFORE masking so visible tokens keep their position (METHOD.md#sparse-encoding)."""

    def __init__(self, cfg: ImageConfig, dim: int):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.grid
        self.proj = nn.Conv2d(cfg.in_chans, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid)[None], persistent=False)

    def reset_parameters(self) -> None:
        """Xavier on the flattened kernel (fairseq and MAE alike), or uniform with variance 1 / fan-in
        (``patch_init``); the bias keeps Conv2d's default."""
        weight = self.proj.weight.view(self.proj.weight.shape[0], -1)
        if self.cfg.patch_init == "xavier":
            nn.init.xavier_uniform_(weight)
        else:
            bound = math.sqrt(3.0 / weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, source: torch.Tensor, padding_mask=None) -> tuple[torch.Tensor, None]:
        c, s = self.cfg.in_chans, self.cfg.img_size
        if source.dim() != 4 or tuple(source.shape[1:]) != (c, s, s):
            raise ValueError(f"image encoder expects source (B, {c}, {s}, {s}), got {tuple(source.shape)}")
        x = self.proj(source).flatten(2).transpose(1, 2)
        return x + self.pos_embed.to(x.dtype), None


class ImageContextEncoder(ContextEncoder):
    """Context LN + dropout; prepends the learned CLS token(s) ``extra_tokens`` after masking."""

    def __init__(self, cfg: ImageConfig, dim: int, norm: bool, norm_eps: float, dropout: float):
        super().__init__(dim, norm, norm_eps, dropout)
        self.num_extra_tokens = cfg.num_extra_tokens
        self.extra_tokens = nn.Parameter(torch.randn(1, cfg.num_extra_tokens, dim)) \
            if cfg.num_extra_tokens else None

    def extra_tokens_for(self, batch_size: int) -> torch.Tensor | None:
        return None if self.extra_tokens is None else self.extra_tokens.expand(batch_size, -1, -1)
