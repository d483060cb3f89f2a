"""Text modality (METHOD.md#text-encoder): token + learned absolute positions (+ segments, BERT), embedding
LayerNorm, dropout."""
from __future__ import annotations

import torch
from torch import nn

import pydantic

from d2v2.config import Config
from d2v2.model.blocks import Dropout
from d2v2.model.modalities import ContextEncoder

__all__ = ["TextConfig", "TextLocalEncoder", "TextContextEncoder", "SPECIALS", "BOS", "PAD", "EOS", "UNK", "MASK"]

# The special tokens and their ids, in fairseq's dictionary order: the one table the tokenizer (d2v2.data.text),
# the encoder and the maskers share.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BOS, PAD, EOS, UNK, MASK = range(len(SPECIALS))


class TextConfig(Config):
    vocab_size: int = 50265      # RoBERTa's GPT-2 BPE dictionary
    max_positions: int = 512
    pad_idx: int = PAD
    dropout: float = 0.1         # after the embedding LayerNorm
    num_segments: int = pydantic.Field(0, ge=0)   # segment embeddings (BERT: 2; 0: none, every other method)


class TextLocalEncoder(nn.Module):
    """``embed_tokens`` (no sqrt(D) scaling) + ``embed_positions`` (fairseq padding-offset convention:
    real tokens get positions pad_idx+1, pad_idx+2, ...; pad tokens get pad_idx) [+ ``embed_segments``]
    -> LN -> dropout.

    With ``num_segments`` (BERT's token types, METHOD.md#baseline-bert) a token's segment is the number of
    ``</s>`` before it, at most ``num_segments - 1``: ``<s> A </s> B </s>`` gives 0 to ``<s> A </s>`` and 1
    to ``B </s>``, BERT's segments for a pair; a single sentence is all segment 0."""

    def __init__(self, cfg: TextConfig, dim: int, norm_eps: float):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, dim, padding_idx=cfg.pad_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions + cfg.pad_idx + 1, dim, padding_idx=cfg.pad_idx)
        self.embed_segments = nn.Embedding(cfg.num_segments, dim) if cfg.num_segments else None
        self.layernorm_embedding = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if source.dim() != 2 or source.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text encoder expects integer token ids (B, L), got {tuple(source.shape)} "
                             f"{source.dtype}")
        if source.shape[1] > self.cfg.max_positions:
            raise ValueError(f"sequence length {source.shape[1]} exceeds max_positions {self.cfg.max_positions}")
        padding_mask = source.eq(self.cfg.pad_idx)
        real = (~padding_mask).long()
        positions = torch.cumsum(real, dim=1) * real + self.cfg.pad_idx
        x = self.embed_tokens(source) + self.embed_positions(positions)
        if self.embed_segments is not None:
            separators = source.eq(EOS).long()
            segments = (torch.cumsum(separators, dim=1) - separators).clamp(max=self.cfg.num_segments - 1)
            x = x + self.embed_segments(segments)
        x = self.dropout(self.layernorm_embedding(x))
        # no padding: no mask, so SDPA takes its faster path; reading .any() on a GPU would stall the host
        # until the step so far is done, so there the mask is always passed
        return x, (padding_mask if padding_mask.is_cuda or padding_mask.any() else None)


class TextContextEncoder(ContextEncoder):
    """Nothing beyond the shared context LN/dropout (text's LN is absent when there are no prenet
    blocks, METHOD.md#transformer-block)."""

    def __init__(self, cfg: TextConfig, dim: int, norm: bool, norm_eps: float, dropout: float):
        super().__init__(dim, norm, norm_eps, dropout)
