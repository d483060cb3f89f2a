"""Modality encoders (METHOD.md#modality-encoders): for each modality a *local encoder* (raw input -> (B, T, D) tokens)
and a *context encoder* (what happens between masking and the Transformer blocks).

The split follows what data2vec 2.0's teacher shares with the student (METHOD.md#teacher): the image teacher
EMA-copies both parts, the audio teacher shares the local encoder (CNN + projection), the text teacher
shares both. :class:`ContextEncoder` holds the parts common to every modality (context LayerNorm and
dropout, METHOD.md#transformer-block); subclasses add relative positions before masking (audio), an attention bias
(audio ALiBi) and extra tokens (image CLS).
"""
from __future__ import annotations

import torch
from torch import nn

from d2v2.model.blocks import Dropout

__all__ = ["ContextEncoder"]


class ContextEncoder(nn.Module):
    """Context LN -> dropout applied to the (masked) token sequence, plus modality hooks."""

    num_extra_tokens: int = 0
    # parameter names (last component) never weight-decayed beyond biases and 1-D tensors, by every method's
    # pretraining and by fine-tuning (Encoder.no_weight_decay)
    no_weight_decay: frozenset[str] = frozenset()

    def __init__(self, dim: int, norm: bool, norm_eps: float, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm else None
        self.dropout = Dropout(dropout)

    def add_positions(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Add positional information to the full (B, T, D) sequence before masked tokens are dropped;
        ``mask`` (True = masked) is given on the sparse path. Default: nothing (positions, if any, are
        already in the local features)."""
        return x

    @property
    def positions_see_mask(self) -> bool:
        """Whether :meth:`add_positions` reads the mask (then each masked clone of a sample needs its own copy)."""
        return False

    def attention_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Additive attention bias for tokens at original ``positions`` (B or 1, T'); default none."""
        return None

    def extra_tokens_for(self, batch_size: int) -> torch.Tensor | None:
        """(B, E, D) tokens prepended after masking (image CLS); default none."""
        return None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
