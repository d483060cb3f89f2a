"""Speech modality (METHOD.md#speech-encoder): wav2vec 2.0 CNN feature extractor ("layer_norm" mode),
LN + Linear projection, a convolutional relative positional encoder and learned-scale ALiBi."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from d2v2.model.blocks import alibi_bias, alibi_slopes, conv_channels_last
from d2v2.config import Config
from d2v2.model.modalities import ContextEncoder

__all__ = ["SpeechConfig", "SpeechLocalEncoder", "SpeechContextEncoder", "WAV2VEC2_CONV", "frame_count",
           "valid_samples", "receptive_field"]

# (channels, kernel, stride) per CNN layer: total stride 320 (20 ms at 16 kHz), receptive field 400.
WAV2VEC2_CONV: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
# On a CPU the CNN runs on waveforms zero-padded to a multiple of this many samples (0.5 s at 16 kHz) and its
# frames are cut back: oneDNN builds its convolution kernels anew for every input length, and pretraining
# crops give nearly every batch a new one (docs/BENCHMARKS.md#speech-cnn-lengths).
CPU_LENGTH_MULTIPLE = 8000


class SpeechConfig(Config):
    conv_layers: list[tuple[int, int, int]] = WAV2VEC2_CONV
    conv_pos_width: int = 95           # total width; each of the conv_pos_depth layers has kernel
    conv_pos_depth: int = Field(5, ge=0)   #   max(3, conv_pos_width // conv_pos_depth); 0: none
    conv_pos_groups: int = 16
    use_alibi: bool = True             # ALiBi with a learned per-head scale (init alibi_scale)
    alibi_scale: float = 1.0


def frame_count(num_samples: int | torch.Tensor, conv_layers: list[tuple[int, int, int]]):
    """Frames T produced from N samples: per layer ``T = floor((T - kernel) / stride) + 1``."""
    for _, kernel, stride in conv_layers:
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


def valid_samples(padding_mask: torch.Tensor) -> torch.Tensor:
    """Samples per utterance (B,) of a waveform padding mask (B, N), True = pad.

    Counted on the mask's bytes into int32: summing the negated mask (a negated copy, widened to int64)
    takes about three times as long on a CPU, milliseconds per step at 16 kHz (docs/BENCHMARKS.md)."""
    return padding_mask.shape[1] - padding_mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def receptive_field(conv_layers: list[tuple[int, int, int]]) -> tuple[int, int]:
    """``(size, stride)`` in samples: frame t of the CNN sees exactly samples ``[t * stride, t * stride + size)``
    (400 and 320 for wav2vec 2.0's CNN)."""
    size, stride = 1, 1
    for _, kernel, layer_stride in conv_layers:
        size += (kernel - 1) * stride
        stride *= layer_stride
    return size, stride


class _ConvLayer(nn.Module):
    """Conv1d (no bias, kaiming-normal) -> LayerNorm over channels (affine, fp32) -> GELU, on frames-last
    (B, T, C) input (:func:`~d2v2.model.blocks.conv_channels_last`: fairseq's ``ConvFeatureExtractionModel``
    computes the same in (B, C, T), with a copy at every transpose)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (B, T, C) -> (B, T', C')
        x = conv_channels_last(x, self.conv)
        x = F.layer_norm(x.float(), self.norm.normalized_shape, self.norm.weight.float(),
                         self.norm.bias.float(), self.norm.eps).type_as(x)
        return F.gelu(x)


class SpeechLocalEncoder(nn.Module):
    """``feature_extractor`` (CNN) -> ``project_features`` (LN(C) -> Linear(C, D)); the frame padding
    mask is derived from the sample padding mask through :func:`frame_count`."""

    def __init__(self, cfg: SpeechConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        channels = [1] + [c for c, _, _ in cfg.conv_layers]
        self.feature_extractor = nn.Sequential(*[
            _ConvLayer(channels[i], c, k, s) for i, (c, k, s) in enumerate(cfg.conv_layers)])
        self.project_features = nn.Sequential(nn.LayerNorm(channels[-1]), nn.Linear(channels[-1], dim))

    def reset_parameters(self) -> None:
        self.project_features[1].reset_parameters()       # PyTorch default, not BERT init (METHOD.md#initialisation)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self.project(self.cnn(source), padding_mask)

    def cnn(self, source: torch.Tensor) -> torch.Tensor:
        """The CNN feature extractor alone: waveforms (B, N) -> frames (B, T, C)."""
        if source.dim() != 2 or not source.is_floating_point():
            raise ValueError(f"audio encoder expects a float waveform (B, N), got {tuple(source.shape)} "
                             f"{source.dtype}")
        frames = frame_count(source.shape[1], self.cfg.conv_layers)
        if frames < 1:
            raise ValueError(f"waveform of {source.shape[1]} samples is shorter than the CNN's receptive field")
        if source.device.type == "cpu" and source.shape[1] % CPU_LENGTH_MULTIPLE:
            # the same frames: each sees only its own samples and is normalised over channels alone
            source = F.pad(source, (0, CPU_LENGTH_MULTIPLE - source.shape[1] % CPU_LENGTH_MULTIPLE))
        return self.feature_extractor(source[:, :, None])[:, :frames]

    def project(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """CNN frames (B, T, C) -> ``(project_features(frames) (B, T, D), frame padding mask (B, T) | None)``;
        ``padding_mask`` is the waveform's (B, N), True = pad."""
        x = self.project_features(features)
        if padding_mask is not None:
            samples = valid_samples(padding_mask)
            if (samples < padding_mask.shape[1]).any():
                lengths = frame_count(samples, self.cfg.conv_layers)
                return x, torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        return x, None


class _PosConv(nn.Module):
    """Conv1d(D, D, k, groups) with "same" length -> LN(no affine) -> GELU, on frames-last (B, T, D) input."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (B, T, D)
        y = conv_channels_last(x, self.conv)[:, : x.shape[1]]
        return F.gelu(self.norm(y))


class SpeechContextEncoder(ContextEncoder):
    """``relative_positional_encoder`` (conv_pos_depth conv layers) added to the features; on the sparse
    path it sees the full sequence with masked frames zeroed and is gathered at visible frames
    (METHOD.md#sparse-encoding). ALiBi bias ``-alibi_scale_h * m_h * |i - j|`` over ORIGINAL positions, one
    learned ``alibi_scale`` per head (clamped >= 0) shared by all layers."""

    no_weight_decay = frozenset({"alibi_scale"})     # the ALiBi scales, 5-D tensors (METHOD.md#pretraining-recipes)

    def __init__(self, cfg: SpeechConfig, dim: int, num_heads: int, norm: bool, norm_eps: float,
                 dropout: float):
        super().__init__(dim, norm, norm_eps, dropout)
        if cfg.conv_pos_depth and dim % cfg.conv_pos_groups:
            raise ValueError(f"embed_dim {dim} is not divisible by conv_pos_groups {cfg.conv_pos_groups}")
        kernel = max(3, cfg.conv_pos_width // max(cfg.conv_pos_depth, 1))          # depth 0: no convolution
        self.relative_positional_encoder = nn.Sequential(*[
            _PosConv(dim, kernel, cfg.conv_pos_groups) for _ in range(cfg.conv_pos_depth)])
        self.num_heads = num_heads
        if cfg.use_alibi:
            self.alibi_scale = nn.Parameter(torch.full((1, 1, num_heads, 1, 1), cfg.alibi_scale))
            self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)
        else:
            self.alibi_scale = None

    @property
    def positions_see_mask(self) -> bool:
        return len(self.relative_positional_encoder) > 0

    def add_positions(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not len(self.relative_positional_encoder):
            return x
        inp = x if mask is None else x.masked_fill(mask[..., None], 0.0)
        return x + self.relative_positional_encoder(inp)

    def attention_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        if self.alibi_scale is None:
            return None
        scale = self.alibi_scale.clamp_min(0).view(1, -1, 1, 1).float()
        return alibi_bias(positions, self.alibi_slopes) * scale                           # (B|1, H, T', T')
