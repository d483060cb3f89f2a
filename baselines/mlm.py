"""RoBERTa-style masked language modelling (Liu et al. 2019) on the shared text encoder (METHOD.md#baseline-mlm).

    x = BERT-corrupt(tokens): 15% selected; 80% <mask>, 10% random token, 10% unchanged
    h = post-LN Transformer on all tokens                    (B, L, D)
    logits = LMHead(h at the selected positions)             (N_selected, V)
    loss = cross-entropy(logits, original tokens), averaged over ALL selected positions

The LM head is RoBERTa's: dense -> GELU -> LayerNorm -> projection whose weight IS the input token
embedding (tied), plus a per-token bias. The encoder is data2vec 2.0's text encoder of the same preset
(RoBERTa-base sized at ``base``: 12 x 768, learned positions, embedding LN, dropout 0.1).
"""
from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import ensure_masked
from baselines.masking import BertMaskConfig, WithMaskedPositions, masked_positions
from d2v2.model.blocks import init_bert_params
from d2v2.config import Config
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.method import MethodOutput, PretrainMethod, register_method

__all__ = ["MLMConfig", "MLM", "LMHead"]


class MLMConfig(Config):
    """RoBERTa MLM settings: the text encoder and BERT masking (METHOD.md#baseline-mlm)."""

    encoder: EncoderConfig
    mask: BertMaskConfig = BertMaskConfig()

    @pydantic.model_validator(mode="after")
    def _check(self) -> "MLMConfig":
        if self.encoder.modality != "text":
            raise ValueError(f"MLM is a text method; got a {self.encoder.modality} encoder")
        return self


class LMHead(nn.Module):
    """dense -> GELU -> LN -> ``F.linear(., embedding weight) + bias`` (RoBERTa's ``lm_head``)."""

    def __init__(self, embed_tokens: nn.Embedding, norm_eps: float):
        super().__init__()
        vocab, dim = embed_tokens.weight.shape
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.weight = embed_tokens.weight                  # tied: the same Parameter, not a copy
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(h))), self.weight) + self.bias


class MLM(PretrainMethod):
    """``student`` text Encoder + tied ``lm_head``."""

    modality = "text"

    def __init__(self, cfg: MLMConfig):
        super().__init__()
        self.cfg = cfg
        self.student = Encoder(cfg.encoder)
        self.lm_head = LMHead(self.student.local_encoder.embed_tokens, cfg.encoder.norm_eps)
        self.lm_head.apply(init_bert_params)                      # as the encoder (fairseq RoBERTa)

    def masker(self) -> WithMaskedPositions:
        return WithMaskedPositions(self.cfg.mask.masker(self.cfg.encoder, loss_on="selected"))

    def encoder(self) -> Encoder:
        return self.student

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["source"].numel()

    def masked_lm(self, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> MethodOutput:
        """The MLM term on encoder outputs ``h`` (B, L, D): logits at the selected positions only (as
        fairseq), cross-entropy against the original tokens averaged over them."""
        rows, cols = masked_positions(batch, h.device)
        logits = self.lm_head(h[rows, cols]).float()
        target = batch["mlm_target"].to(h.device)[rows, cols]
        sample_size = int(target.numel())
        loss = F.cross_entropy(logits, target, reduction="sum") / max(sample_size, 1)
        accuracy = (logits.argmax(-1) == target).float().mean() if sample_size else logits.new_zeros(())
        return MethodOutput(loss, sample_size, {"accuracy": accuracy.detach(),
                                                "masked_pct": sample_size / batch["mask"].numel()})

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        batch = ensure_masked(batch, self.masker(), needs=("mlm_target",))
        return self.masked_lm(self.student(batch["source"], batch.get("padding_mask")).x, batch)


# The settings per preset (data2vec 2.0's text encoders) are in d2v2/presets/<preset>.yaml.
register_method("text", "mlm", MLMConfig)(MLM)
