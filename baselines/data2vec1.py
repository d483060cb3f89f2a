"""data2vec 1.0 (Baevski et al. 2022, arXiv:2202.03555) for images, speech and text (METHOD.md#baseline-data2vec1).

    z = local_encoder(x)                                  (B, T, D)   (text: of the BERT-corrupted tokens)
    h = student blocks on ALL T tokens, masked ones replaced by a learned mask embedding (one mask/sample)
    y = top-K teacher layer outputs on the UNMASKED input, normalised per layer, averaged   (no grad)
    loss = sum over masked positions of sum_d SmoothL1_beta(head(h) - y) * s / #masked

Differences from data2vec 2.0 (METHOD.md#baseline-data2vec1 table): the student encodes every token (mask embeddings, not
dropped), one mask per sample, a Linear head (text: Linear-GELU-Linear) instead of the conv decoder,
per-modality target normalisation and loss, BEiT / wav2vec 2.0 / BERT masking, and an EMA teacher that
holds only the Transformer blocks: the student's local encoder and context stage (CLS, positions, conv
positions, ALiBi scale, context LN) produce the teacher's input, in eval mode (no dropout).

Per modality (``base`` presets; paper values where the paper and fairseq's yamls differ):

| | image | audio | text |
|---|---|---|---|
| masking | BEiT blocks, 60% (paper) | spans p=0.65, len 10 | BERT 15%, loss on ``<mask>`` only (#4229) |
| K / per-layer norm | 6 / parameter-free LN (paper) | 8 / instance norm | 10 / parameter-free LN |
| loss | Smooth-L1 beta 2, scale 1/sqrt(D) | L2, 1/sqrt(D) | Smooth-L1 beta 4, scale 1 |
| EMA tau0 -> tau_e over n | 0.9998 constant (paper) | 0.999 -> 0.9999 over 30k | 0.999 -> 0.9999 over 100k (paper) |

docs/FIDELITY_BASELINES.md lists what differs from the original models (BEiT backbone for vision).
"""
from __future__ import annotations

from typing import Annotated, Union

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import ensure_masked, eval_mode, num_tokens
from baselines.masking import BertMaskConfig, BlockMaskConfig, SpanMaskConfig, WithMaskedPositions, masked_positions
from d2v2.model.blocks import init_bert_params
from d2v2.config import MODALITIES, Config
from d2v2.model.ema import EMATeacher
from d2v2.model.encoder import Encoder, EncoderConfig, EncoderOutput
from d2v2.method import Masker, MethodOutput, SelfDistillation, register_method
from d2v2.model.targets import feature_std, make_targets

__all__ = ["Data2Vec1Config", "Data2Vec1"]

_MASKING_OF = {"image": "block", "speech": "span", "text": "bert"}


class Data2Vec1Config(Config):
    """data2vec 1.0 settings (METHOD.md#baseline-data2vec1); names follow fairseq's ``data2vec_{audio,text,vision}``."""

    encoder: EncoderConfig
    mask: Annotated[Union[BlockMaskConfig, SpanMaskConfig, BertMaskConfig], pydantic.Field(discriminator="kind")]
    # targets
    average_top_k_layers: int = pydantic.Field(8, ge=1)            # K over all blocks
    instance_norm_target_layer: bool = False
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = False                               # final parameter-free LN (fairseq vision yaml)
    # head and loss
    head_layers: int = pydantic.Field(1, ge=1, le=2)               # 2: Linear(D,2D)-GELU-Linear(2D,D) (text)
    loss_beta: float = pydantic.Field(0.0, ge=0)                   # 0 = L2, else Smooth-L1 with this beta
    loss_scale: float | None = None                                # None -> 1/sqrt(D)
    # teacher
    ema_decay: float = pydantic.Field(0.999, gt=0, le=1)           # tau_0
    ema_end_decay: float = pydantic.Field(0.9999, gt=0, le=1)      # tau_e
    ema_anneal_end_step: int = pydantic.Field(30_000, ge=0)        # tau_n in updates
    ema_anneal_end_fraction: float | None = pydantic.Field(None, gt=0, le=1)   # tau_n in budget (d2v2.model.ema)
    # speech: the teacher averages the context stage's LayerNorm, its positional convolution copied from the student
    # (fairseq's data2vec_audio; base), instead of reading the student's whole context stage
    ema_context_norm: bool = False
    # collapse guard (METHOD.md#collapse-guard; 0 disables): fairseq's audio model has it (0.1 / 0.01 after 5,000
    # updates, the speech presets), its vision and text models none
    min_target_var: float = pydantic.Field(0.0, ge=0)
    min_pred_var: float = pydantic.Field(0.0, ge=0)
    collapse_check_after: int = pydantic.Field(5000, ge=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Data2Vec1Config":
        modality = self.encoder.modality
        if self.mask.kind != _MASKING_OF[modality]:
            raise ValueError(f"mask.kind '{self.mask.kind}' does not fit a {modality} encoder "
                             f"(data2vec 1.0 uses '{_MASKING_OF[modality]}')")
        if self.average_top_k_layers > self.encoder.num_blocks:
            raise ValueError(f"average_top_k_layers {self.average_top_k_layers} exceeds the "
                             f"{self.encoder.num_blocks} blocks")
        if self.instance_norm_target_layer and self.layer_norm_target_layer:
            raise ValueError("instance_norm_target_layer and layer_norm_target_layer are exclusive")
        if self.ema_context_norm and modality != "speech":
            raise ValueError(f"ema_context_norm is fairseq's audio teacher; a {modality} teacher shares the context "
                             "stage as fairseq's does")
        return self


class Data2Vec1(SelfDistillation):
    """``student`` Encoder + ``mask_emb`` + ``head``; EMA ``teacher`` of the student's blocks."""

    label = "data2vec 1.0"

    def __init__(self, cfg: Data2Vec1Config):
        super().__init__()
        self.cfg, self.modality = cfg, cfg.encoder.modality
        D = cfg.encoder.embed_dim
        self.student = Encoder(cfg.encoder)
        # The learned mask embedding (text uses the <mask> token of the corrupted input instead):
        # fairseq inits it U(0, 1) for speech and trunc-normal(0.02) for vision.
        self.mask_emb = None
        if self.modality == "speech":
            self.mask_emb = nn.Parameter(torch.rand(D))
        elif self.modality == "image":
            self.mask_emb = nn.Parameter(nn.init.trunc_normal_(torch.empty(D), std=0.02))
        self.head = nn.Linear(D, D) if cfg.head_layers == 1 else \
            nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        if self.modality == "text":     # fairseq's data2vec_text applies init_bert_params to its head too
            self.head.apply(init_bert_params)
        if cfg.ema_context_norm:
            self.teacher = EMATeacher(self.student, shared=("local_encoder",), copied=(
                "context_encoder.relative_positional_encoder.", "context_encoder.alibi_scale"))
        else:
            self.teacher = EMATeacher(self.student, shared=("local_encoder", "context_encoder"))
        self.loss_scale = cfg.loss_scale if cfg.loss_scale is not None else D ** -0.5
        self.current_decay = cfg.ema_decay

    # ---- PretrainMethod interface -----------------------------------------------------------------
    def masker(self) -> Masker:
        if self.modality == "text":
            return WithMaskedPositions(self.cfg.mask.masker(self.cfg.encoder, loss_on="masked"))
        return WithMaskedPositions(self.cfg.mask.masker(self.cfg.encoder))

    def log_snapshot(self) -> dict[str, float]:
        """``ema_decay``, the tau of the teacher's last EMA step, read at logging intervals (as data2vec 2.0's)."""
        return {"ema_decay": self.current_decay}

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Student and teacher both encode all T (+ CLS) tokens of every sample."""
        T = num_tokens(self.cfg.encoder, batch["source"])
        return 2 * batch["source"].shape[0] * (T + self.student.context_encoder.num_extra_tokens)

    # ---- the training step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        batch = ensure_masked(batch, self.masker(), needs=("mlm_target",) if self.modality == "text" else ())
        source, padding_mask = batch["source"], batch.get("padding_mask")
        x, padding_mask = self.student.local_features(source, padding_mask)
        mask = batch["mask"].to(x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"batch['mask'] has shape {tuple(mask.shape)}; expected (B, T) = {tuple(x.shape[:2])}")
        rows, cols = masked_positions(batch, x.device)
        y = self._targets(batch, x, padding_mask)[rows, cols]                   # (N_masked, D) fp32

        out = self.student.contextualize(x, mask if self.mask_emb is not None else None, padding_mask,
                                         sparse=False, fill=self._fill(), layer_results="none")
        h = out.x[:, out.num_extra_tokens:][rows, cols]
        pred = self.head(h).float()
        if self.cfg.loss_beta == 0:
            per_token = (pred - y).pow(2).sum(-1)
        else:
            per_token = F.smooth_l1_loss(pred, y, reduction="none", beta=self.cfg.loss_beta).sum(-1)
        sample_size = int(per_token.numel())
        loss = per_token.sum() * self.loss_scale / max(sample_size, 1)
        logs = {"target_var": feature_std(y), "pred_var": feature_std(pred), "masked_pct": sample_size / mask.numel()}
        return MethodOutput(loss, sample_size, logs)

    def _fill(self) -> torch.Tensor | None:
        """What replaces a masked token before the context stage: the mask embedding, plus (images) the
        sin-cos position that the local encoder added to the token it replaces."""
        if self.mask_emb is None:
            return None
        if self.modality == "image":
            return self.mask_emb + self.student.local_encoder.pos_embed
        return self.mask_emb

    @torch.no_grad()
    def _targets(self, batch: dict[str, torch.Tensor], x_local: torch.Tensor,
                 padding_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) targets: the EMA blocks on the unmasked input (text: the original tokens), embedded
        by the student's local stage and the student's context stage (``ema_context_norm``: the teacher's) in
        eval mode."""
        student, teacher, c = self.student, self.teacher.compute, self.cfg
        context = teacher if c.ema_context_norm else student
        with eval_mode(student.local_encoder, student.context_encoder):
            if self.modality == "text":
                x_local, padding_mask = student.local_features(batch["mlm_target"], batch.get("padding_mask"))
            out: EncoderOutput = teacher.run_blocks(context.prepare(x_local.detach(), None, padding_mask))
        return make_targets(out.layer_results, c.average_top_k_layers,
                            instance_norm_target_layer=c.instance_norm_target_layer,
                            layer_norm_target_layer=c.layer_norm_target_layer,
                            layer_norm_targets=c.layer_norm_targets)


# The settings per preset are in d2v2/presets/<preset>.yaml.
for _modality in MODALITIES:
    register_method(_modality, "data2vec1", Data2Vec1Config)(Data2Vec1)
