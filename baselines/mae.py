"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners") on the shared backbone (METHOD.md#baseline-mae).

    x = patch_embed(img) + sin-cos positions          (B, T, D)
    keep a random 25% of the patches per image        (B, T_vis, D)   (d2v2.model.masking.random_mask)
    h = pre-LN ViT blocks on [CLS, visible] + final LN
    z = decoder_embed(h); masked slots get the learned mask token; + decoder sin-cos positions
    p = decoder_pred(LN(decoder blocks(z)))           (B, T, patch*patch*C) pixels
    loss = mean over MASKED patches of mean_pixels (p - normalise_per_patch(patch))^2

The encoder is the data2vec 2.0 image encoder of the same preset with ``layer_norm_first=True`` (MAE's
timm blocks are pre-LN with a final LN), so the comparison keeps width, depth and positions. All Linear
layers are xavier-uniform initialised and CLS / mask token N(0, 0.02), as MAE does.
"""
from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
from torch import nn

from baselines.common import ensure_masked, num_tokens
from d2v2.model.blocks import Block
from d2v2.config import Config
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.model.masking import keep_indices, num_kept, random_mask, scatter_tokens
from d2v2.method import MethodOutput, PretrainMethod, register_method
from d2v2.model.modalities.image import sincos_2d

__all__ = ["MAEConfig", "MAE", "MAEMasker", "patchify"]


class MAEConfig(Config):
    """MAE settings (METHOD.md#baseline-mae); the decoder defaults are MAE's ViT-B decoder (8 x 512, 16 heads)."""

    encoder: EncoderConfig
    mask_ratio: float = pydantic.Field(0.75, gt=0, lt=1)
    decoder_dim: int = pydantic.Field(512, ge=4)
    decoder_depth: int = pydantic.Field(8, ge=1)
    decoder_heads: int = pydantic.Field(16, ge=1)
    norm_pix_loss: bool = True                    # per-patch normalised pixel targets (MAE's reported setting)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "MAEConfig":
        if self.encoder.modality != "image":
            raise ValueError(f"MAE is an image method; got a {self.encoder.modality} encoder")
        if not self.encoder.layer_norm_first:
            raise ValueError("MAE uses pre-LN blocks with a final LayerNorm: set encoder.layer_norm_first=true")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads "
                             f"{self.decoder_heads} and by 4 (sin-cos positions)")
        grid = self.encoder.image.grid
        if num_kept(grid * grid, self.mask_ratio) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {grid * grid}")
        return self


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C) in row-major patch order, pixels ordered (row, col, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


@torch.no_grad()
def _mae_init(module: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class MAEMasker:
    """Picklable masker: per-image uniform random masks ``(B, T)``, keeping ``int(T * (1 - R))``."""

    num_patches: int
    mask_ratio: float

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask = random_mask(batch["source"].shape[0], self.num_patches, self.mask_ratio, generator)
        return {**batch, "mask": mask, "keep": keep_indices(mask)}


class MAE(PretrainMethod):
    """``student`` (pre-LN image Encoder) + Transformer decoder predicting the pixels of masked patches."""

    modality = "image"

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.patch_size, grid = enc.image.patch_size, enc.image.grid
        self.student = Encoder(enc)
        Dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(enc.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        # fixed sin-cos positions of the decoder (MAE's CLS slot is zero: CLS gets none)
        self.register_buffer("decoder_pos_embed", sincos_2d(Dd, grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_heads, enc.mlp_ratio, layer_norm_first=True, norm_eps=enc.norm_eps)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=enc.norm_eps)
        self.decoder_pred = nn.Linear(Dd, self.patch_size ** 2 * enc.image.in_chans)

        self.apply(_mae_init)                    # patch-embed conv keeps the encoder's xavier init
        cls = self.student.context_encoder.extra_tokens
        for token in (self.mask_token,) + ((cls,) if cls is not None else ()):
            nn.init.normal_(token, std=0.02)

    # ---- PretrainMethod interface -----------------------------------------------------------------
    def masker(self) -> MAEMasker:
        grid = self.cfg.encoder.image.grid
        return MAEMasker(grid * grid, self.cfg.mask_ratio)

    def encoder(self) -> Encoder:
        return self.student

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Visible patches + CLS per image (the decoder's tokens are not encoder tokens)."""
        T = num_tokens(self.cfg.encoder, batch["source"])
        extra = self.student.context_encoder.num_extra_tokens
        return batch["source"].shape[0] * (num_kept(T, self.cfg.mask_ratio) + extra)

    # ---- the training step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        batch = ensure_masked(batch, self.masker())
        images = batch["source"]
        x, _ = self.student.local_features(images)
        mask = batch["mask"].to(x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"batch['mask'] has shape {tuple(mask.shape)}; expected (B, T) = {tuple(x.shape[:2])}")
        # the visible positions, from the masker (found here when a caller gave only the mask)
        keep = batch["keep"].to(x.device, non_blocking=True) if "keep" in batch else keep_indices(mask)
        out = self.student.contextualize(x, mask, keep=keep, layer_results="none")   # [CLS, visible], final LN
        pred = self.decode(out.x, keep, mask.shape[1], out.num_extra_tokens)
        target = patchify(images, self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target.float()).pow(2).mean(-1)         # (B, T)
        sample_size = mask.numel() - keep.numel()
        loss = (per_patch * mask).sum() / sample_size
        return MethodOutput(loss, sample_size, {"masked_pct": sample_size / mask.numel()})

    def decode(self, h: torch.Tensor, keep: torch.Tensor, T: int, num_extra: int) -> torch.Tensor:
        """Encoder output [extra, visible at ``keep``] -> pixel predictions (B, T, p*p*C) for every patch."""
        z = self.decoder_embed(h)
        slots = self.mask_token.to(z.dtype).expand(keep.shape[0], T, -1)
        patches = scatter_tokens(slots, keep, z[:, num_extra:]) + self.decoder_pos_embed.to(z.dtype)
        z = torch.cat([z[:, :num_extra], patches], dim=1)
        for block in self.decoder_blocks:
            z, _ = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, num_extra:]


# The settings per preset (data2vec 2.0's image encoders made pre-LN) are in d2v2/presets/<preset>.yaml.
register_method("image", "mae", MAEConfig)(MAE)
