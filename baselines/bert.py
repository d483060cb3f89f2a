"""BERT (Devlin et al. 2019, arXiv:1810.04805) on the shared text encoder (METHOD.md#baseline-bert).

    input = <s> A </s> B </s>        A: the first sentences of a run of a document; B: the rest of the run,
                                     or (half of the time) sentences from another document
    x     = BERT-corrupt(input)      15% of A's and B's tokens; 80% <mask>, 10% random, 10% unchanged;
                                     static: an instance's masks are drawn once per duplicate of the corpus
    h     = post-LN Transformer(x) with segment embeddings (0: <s> A </s>, 1: B </s>)
    loss  = mean over the selected tokens of CE(LMHead(h_t), token_t)
            + nsp_weight * mean over the pairs of CE(W tanh(P h_<s>), is_next)

The encoder, the LM head (tied to the input embedding) and the MLM term are :class:`baselines.mlm.MLM`'s;
the next-sentence head is
fairseq's ``MaskedLMEncoder`` (``masked_lm_pooler`` + tanh, ``sentence_projection_layer`` without bias) and
the loss its ``legacy_masked_lm`` criterion. The instances come from
:func:`d2v2.data.text.sentence_pairs` (BERT's ``create_instances_from_document``). ``mlm`` stays RoBERTa's
setup (dynamic masking, full-length blocks, no NSP). Deviations: docs/FIDELITY_BASELINES.md#bert.
"""
from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import ensure_masked
from baselines.masking import BertMaskConfig, WithMaskedPositions, bert_mask
from baselines.mlm import MLM
from d2v2.model.blocks import init_bert_params
from d2v2.config import Config
from d2v2.model.encoder import EncoderConfig
from d2v2.method import MethodOutput, register_method
from d2v2.model.modalities.text import BOS, EOS, PAD

__all__ = ["BertConfig", "StaticBertMasker", "Bert"]


class BertConfig(Config):
    """BERT's settings: the text encoder (with segment embeddings), its masking, NSP and its instances."""

    encoder: EncoderConfig
    mask: BertMaskConfig = BertMaskConfig()
    nsp_weight: float = pydantic.Field(1.0, ge=0)                  # fairseq nsp_loss_weight
    short_seq_prob: float = pydantic.Field(0.1, ge=0, le=1)        # instances with a shorter random target length
    duplicates: int = pydantic.Field(10, ge=1)                     # dupe_factor: distinct masks per instance

    @pydantic.model_validator(mode="after")
    def _check(self) -> "BertConfig":
        if self.encoder.modality != "text":
            raise ValueError(f"BERT is a text method; got a {self.encoder.modality} encoder")
        if self.encoder.text.num_segments < 2:
            raise ValueError("BERT needs encoder.text.num_segments >= 2 (segment embeddings for A and B)")
        return self


@dataclass(frozen=True)
class StaticBertMasker:
    """BERT-corrupts each row with a generator seeded by the row's ``mask_seed`` (drawn by the dataset,
    once per duplicate of the corpus), never at ``<s>``, ``</s>`` or padding; adds ``mlm_target`` and
    ``mask`` (the selected positions, the loss positions) as :class:`baselines.masking.BertMasker` does."""

    vocab_size: int
    prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if "mask_seed" not in batch or "next_sentence" not in batch:
            raise ValueError("BERT needs sentence-pair batches ('mask_seed', 'next_sentence'): its instances come "
                             "from Bert.pretrain_dataset (d2v2.data.text.sentence_pairs)")
        tokens = batch["source"]
        candidates = (tokens != PAD) & (tokens != BOS) & (tokens != EOS)
        rows = [bert_mask(tokens[b:b + 1], torch.Generator().manual_seed(seed), self.vocab_size, prob=self.prob,
                          mask_token_prob=self.mask_token_prob, random_token_prob=self.random_token_prob,
                          candidates=candidates[b:b + 1])
                for b, seed in enumerate(batch["mask_seed"].tolist())]
        return {**batch, "source": torch.cat([r.source for r in rows]), "mlm_target": tokens,
                "mask": torch.cat([r.selected for r in rows])}


class Bert(MLM):
    """MLM's ``student`` text Encoder and tied ``lm_head``, plus the next-sentence ``pooler`` and ``nsp_head``."""

    def __init__(self, cfg: BertConfig):
        super().__init__(cfg)
        D = cfg.encoder.embed_dim
        self.pooler = nn.Linear(D, D)
        self.nsp_head = nn.Linear(D, 2, bias=False)
        for head in (self.pooler, self.nsp_head):
            head.apply(init_bert_params)                      # N(0, 0.02), as Google's BERT (every weight)

    # ---- PretrainMethod interface -----------------------------------------------------------------
    @classmethod
    def pretrain_dataset(cls, cfg: BertConfig, data_cfg, split: str = "train"):
        from d2v2.data.text import sentence_pairs

        return sentence_pairs(data_cfg, split, short_seq_prob=cfg.short_seq_prob, duplicates=cfg.duplicates)

    def masker(self) -> WithMaskedPositions:
        m = self.cfg.mask
        return WithMaskedPositions(StaticBertMasker(self.cfg.encoder.text.vocab_size, m.prob, m.mask_token_prob,
                                                    m.random_token_prob))

    def stand_in_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A synthetic block as a pair: ``</s>`` after its middle and at its end, random NSP labels and seeds."""
        source = batch["source"].clone()
        B, L = source.shape
        source[:, 0], source[:, L // 2], source[:, -1] = BOS, EOS, EOS
        return {**batch, "source": source, "next_sentence": torch.randint(0, 2, (B,), generator=generator),
                "mask_seed": torch.randint(0, 2**62, (B,), generator=generator)}

    # ---- the training step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        batch = ensure_masked(batch, self.masker(), needs=("mlm_target",))
        h = self.student(batch["source"], batch.get("padding_mask")).x
        mlm = self.masked_lm(h, batch)
        nsp_logits = self.nsp_head(torch.tanh(self.pooler(h[:, 0]))).float()
        is_next = batch["next_sentence"].to(h.device)
        loss_nsp = F.cross_entropy(nsp_logits, is_next)
        with torch.no_grad():
            logs = {**mlm.logs, "loss_mlm": mlm.loss.detach(), "loss_nsp": loss_nsp.detach(),
                    "accuracy_nsp": (nsp_logits.argmax(-1) == is_next).float().mean()}
        return MethodOutput(mlm.loss + self.cfg.nsp_weight * loss_nsp, mlm.sample_size, logs)


# The settings per preset (data2vec 2.0's text encoders with two segment embeddings) are in d2v2/presets/<preset>.yaml.
register_method("text", "bert", BertConfig)(Bert)
