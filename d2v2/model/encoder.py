"""The encoder every method pretrains and fine-tuning starts from (docs/ARCHITECTURE.md "Encoder").

    source --local_encoder--> (B, T, D) tokens          patch-embed + sin-cos / CNN + proj / token + pos
           --mask: drop (sparse) or fill--> context_encoder (CLS, conv-pos, ALiBi, LN, dropout)
           --blocks (prenet first, then main; layer-drop)--> [final LN if pre-LN]

Data2vec 2.0 encodes only the visible tokens (``sparse=True``, METHOD.md#sparse-encoding); data2vec 1.0 and speech
fine-tuning keep every position and replace masked ones by ``fill`` (``sparse=False``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch
from torch import nn

from d2v2.model.blocks import Block, RelativePositionBias, init_bert_params
from d2v2.config import MODALITIES, Config, Modality
from d2v2.model.masking import gather_tokens, keep_indices
from d2v2.model.modalities import ContextEncoder
from d2v2.model.modalities.speech import SpeechConfig, SpeechContextEncoder, SpeechLocalEncoder
from d2v2.model.modalities.image import ImageConfig, ImageContextEncoder, ImageLocalEncoder
from d2v2.model.modalities.text import TextConfig, TextContextEncoder, TextLocalEncoder

__all__ = ["RelativePositionConfig", "EncoderConfig", "Encoder", "EncoderOutput", "Prepared"]


class RelativePositionConfig(Config):
    """WavLM's gated relative position bias (METHOD.md#gated-relative-position-bias; WavLM Base: 320 buckets,
    distances up to 800 frames, gated). Off (``None``) for every method but WavLM."""

    num_buckets: int = pydantic.Field(320, ge=4)
    max_distance: int = pydantic.Field(800, ge=2)
    gated: bool = True

    @pydantic.model_validator(mode="after")
    def _check(self) -> "RelativePositionConfig":
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"relative_position.max_distance {self.max_distance} must exceed num_buckets / 4 "
                             f"= {self.num_buckets // 4} (the offsets bucketed exactly)")
        return self


class EncoderConfig(Config):
    """Transformer encoder for one modality. Defaults: ViT-B-sized post-LN data2vec 2.0 encoder.

    ``depth`` counts the main blocks; ``prenet_depth`` blocks come first (image B: 2 + 10, METHOD.md#transformer-block).
    Dropouts follow fairseq's names: ``dropout`` (after attention projection), ``attention_dropout``,
    ``activation_dropout`` (inside the MLP), ``post_mlp_dropout``, ``prenet_dropout`` (after the context
    LN); ``drop_path`` rises linearly from 0 to this value over all blocks; ``layerdrop`` /
    ``prenet_layerdrop`` skip whole blocks during training. ``layer_norm_first`` selects pre-LN blocks
    and adds a final LayerNorm (MAE); post-LN blocks have no final LN (METHOD.md#transformer-block).
    """

    modality: Modality
    embed_dim: int = pydantic.Field(768, ge=1)
    num_heads: int = pydantic.Field(12, ge=1)
    depth: int = pydantic.Field(12, ge=0)
    prenet_depth: int = pydantic.Field(0, ge=0)
    mlp_ratio: float = pydantic.Field(4.0, gt=0)
    norm_eps: float = pydantic.Field(1e-5, gt=0)
    layer_norm_first: bool = False
    dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    attention_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    activation_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    post_mlp_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    prenet_dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    drop_path: float = pydantic.Field(0.0, ge=0, lt=1)
    layerdrop: float = pydantic.Field(0.0, ge=0, lt=1)
    prenet_layerdrop: float = pydantic.Field(0.0, ge=0, lt=1)
    relative_position: RelativePositionConfig | None = None
    image: ImageConfig | None = None
    speech: SpeechConfig | None = None
    text: TextConfig | None = None

    @pydantic.model_validator(mode="after")
    def _check(self) -> "EncoderConfig":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth + self.prenet_depth < 1:
            raise ValueError("the encoder needs at least one block (depth + prenet_depth >= 1)")
        for other in set(MODALITIES) - {self.modality}:
            if getattr(self, other) is not None:
                raise ValueError(f"'{other}' settings given for a {self.modality} encoder")
        if getattr(self, self.modality) is None:       # default sub-config for this modality
            defaults = {"image": ImageConfig, "speech": SpeechConfig, "text": TextConfig}[self.modality]()
            object.__setattr__(self, self.modality, defaults)
        return self

    @property
    def num_blocks(self) -> int:
        return self.prenet_depth + self.depth


@dataclass
class EncoderOutput:
    x: torch.Tensor                                     # (B, T_kept + extra, D)
    layer_results: list[torch.Tensor] = field(default_factory=list)   # per block (B, T_kept, D)
    padding_mask: torch.Tensor | None = None            # (B, T_kept + extra) True = pad
    num_extra_tokens: int = 0


@dataclass
class Prepared:
    """Tokens after masking and the context encoder, ready for the blocks."""

    x: torch.Tensor
    padding_mask: torch.Tensor | None
    bias: torch.Tensor | None
    num_extra_tokens: int
    rel_bias: torch.Tensor | None = None       # WavLM's relative position bias, gated in each block


class Encoder(nn.Module):
    """``local_encoder`` + ``context_encoder`` + ``blocks`` (+ ``norm`` when pre-LN); see module doc."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        D, m = cfg.embed_dim, cfg.modality
        # context LN: post-LN models only; text has none when it has no prenet blocks (METHOD.md#transformer-block)
        ctx_norm = not cfg.layer_norm_first and not (m == "text" and cfg.prenet_depth == 0)
        ctx = dict(norm=ctx_norm, norm_eps=cfg.norm_eps, dropout=cfg.prenet_dropout)
        if m == "image":
            self.local_encoder = ImageLocalEncoder(cfg.image, D)
            self.context_encoder: ContextEncoder | None = ImageContextEncoder(cfg.image, D, **ctx)
        elif m == "speech":
            self.local_encoder = SpeechLocalEncoder(cfg.speech, D)
            self.context_encoder = SpeechContextEncoder(cfg.speech, D, cfg.num_heads, **ctx)
        else:
            self.local_encoder = TextLocalEncoder(cfg.text, D, cfg.norm_eps)
            self.context_encoder = TextContextEncoder(cfg.text, D, **ctx)
        n = cfg.num_blocks
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                  activation_dropout=cfg.activation_dropout, post_mlp_dropout=cfg.post_mlp_dropout,
                  drop_path=cfg.drop_path * i / max(n - 1, 1), layer_norm_first=cfg.layer_norm_first,
                  norm_eps=cfg.norm_eps, gated_rel_pos=bool(cfg.relative_position and cfg.relative_position.gated))
            for i in range(n)])
        rel = cfg.relative_position
        self.relative_position = None if rel is None else \
            RelativePositionBias(cfg.num_heads, rel.num_buckets, rel.max_distance)
        self.layerdrop = [cfg.prenet_layerdrop] * cfg.prenet_depth + [cfg.layerdrop] * cfg.depth
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.layer_norm_first else None
        self.apply(init_bert_params)                       # METHOD.md#initialisation, then modality-specific re-inits
        if hasattr(self.local_encoder, "reset_parameters"):
            self.local_encoder.reset_parameters()

    # ---- the three stages -------------------------------------------------------------------------
    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Raw input -> ``(x (B, T, D), padding_mask (B, T) | None)``; images include sin-cos positions."""
        return self.local_encoder(source, padding_mask)

    def prepare(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, *, sparse: bool = True, fill: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, clones: int = 1) -> Prepared:
        """Apply ``mask`` (True = masked) to local features and run the context encoder.

        ``sparse=True`` drops masked tokens (every row must mask the same number; ``keep``: the visible
        positions, d2v2.model.masking.mask_indices, else found from ``mask``); ``sparse=False`` replaces them by
        ``fill`` (broadcastable to x: a (D,) embedding or (B, T, D) noise). ``clones`` (sparse only): ``mask``
        has a row for each of ``clones`` copies of every sample, in ``repeat_interleave`` order (data2vec 2.0's
        M masks); the visible tokens are gathered from the one copy in ``x``, so that the input is never
        repeated and its gradient sums over the clones in the gather's backward (speech's positional
        convolution sees each clone's mask: there ``x`` is repeated first).
        """
        ctx = self.context_encoder
        if ctx is None:
            raise RuntimeError("this encoder has no context encoder (a teacher sharing the student's)")
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)[None]
        if clones != 1 and (mask is None or not sparse or clones < 1):
            raise ValueError(f"clones={clones} needs a positive count and a sparse mask")
        if mask is not None and mask.shape != (B * clones, T):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the {T} tokens of {B} samples"
                             + (f" x {clones} clones" if clones > 1 else ""))
        if clones > 1 and ctx.positions_see_mask:
            x = x.repeat_interleave(clones, 0)
            padding_mask = None if padding_mask is None else padding_mask.repeat_interleave(clones, 0)
            B, clones = B * clones, 1
        if mask is not None and not sparse:
            if fill is None:
                raise ValueError("sparse=False needs a fill value for masked positions")
            x = torch.where(mask[..., None], fill.to(x.dtype), x)
        # the mask goes with x row for row: with clones, only where x was repeated (positions that see the mask)
        x = ctx.add_positions(x, mask if sparse and clones == 1 else None)
        if mask is not None and sparse:
            positions = keep_indices(mask) if keep is None else keep.to(x.device, non_blocking=True)
            per_sample = positions.reshape(B, -1)               # each sample's clones side by side
            B *= clones
            x = gather_tokens(x, per_sample).view(B, -1, x.shape[-1])
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, per_sample).view(B, -1)
        bias = ctx.attention_bias(positions)
        rel_bias = None if self.relative_position is None else self.relative_position(positions)
        extra = ctx.extra_tokens_for(B)
        E = 0 if extra is None else extra.shape[1]
        if E:
            x = torch.cat([extra.to(x.dtype), x], dim=1)
            if padding_mask is not None:
                padding_mask = nn.functional.pad(padding_mask, (E, 0), value=False)
            if bias is not None:
                bias = nn.functional.pad(bias, (E, 0, E, 0))
            if rel_bias is not None:
                rel_bias = nn.functional.pad(rel_bias, (E, 0, E, 0))
        return Prepared(ctx.finish(x), padding_mask, bias, E, rel_bias)

    def run_blocks(self, p: Prepared, layer_results: Literal["ffn", "block", "none"] = "ffn") -> EncoderOutput:
        """The Transformer blocks. ``layer_results``: keep each block's FFN output (data2vec 2.0
        targets), block output (``end_of_block_targets``), or nothing (saves memory); extra tokens are
        removed from the kept results. Layer-drop only in training mode."""
        x, results = p.x, []
        bias, padding_mask = p.bias, p.padding_mask
        if bias is not None and padding_mask is not None and p.rel_bias is None:
            # the key padding folded into the bias every block shares, once (not once per block, forward and backward)
            bias, padding_mask = bias.masked_fill(padding_mask[:, None, None, :], float("-inf")), None
        for block, drop in zip(self.blocks, self.layerdrop):
            if self.training and drop > 0 and torch.rand(()) < drop:
                continue
            x, ffn = block(x, bias, padding_mask, p.rel_bias)
            if layer_results != "none":
                results.append((ffn if layer_results == "ffn" else x)[:, p.num_extra_tokens:])
        if self.norm is not None:
            x = self.norm(x)
        return EncoderOutput(x, results, p.padding_mask, p.num_extra_tokens)

    def contextualize(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                      padding_mask: torch.Tensor | None = None, *, sparse: bool = True,
                      fill: torch.Tensor | None = None, keep: torch.Tensor | None = None, clones: int = 1,
                      layer_results: Literal["ffn", "block", "none"] = "ffn") -> EncoderOutput:
        """:meth:`prepare` then :meth:`run_blocks`."""
        return self.run_blocks(self.prepare(x, mask, padding_mask, sparse=sparse, fill=fill, keep=keep,
                                            clones=clones), layer_results)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> EncoderOutput:
        """Unmasked feature extraction (fine-tuning, evaluation)."""
        x, padding_mask = self.local_features(source, padding_mask)
        return self.contextualize(x, None, padding_mask)

    # ---- helpers for the engine -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Blocks + 1: the exponent base of layer-wise LR decay."""
        return len(self.blocks) + 1

    def no_weight_decay(self) -> set[str]:
        """Parameter names (last component) never weight-decayed beyond biases and 1-D tensors: the context
        encoder's (speech: the ALiBi scales; METHOD.md#pretraining-recipes)."""
        return set(self.context_encoder.no_weight_decay)

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise LR decay (METHOD.md#fine-tuning-images): ``blocks.{i}`` -> i + 1;
        everything else (patch-embed, CLS, context LN, and a head outside the encoder) -> ``num_layers``,
        i.e. scale 1.0. Names may carry a prefix (``encoder.blocks.3.attn.qkv.weight``); pass only
        encoder and head parameters (a pretraining decoder also has ``blocks``)."""
        match = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        return int(match.group(1)) + 1 if match else self.num_layers
