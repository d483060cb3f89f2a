"""HuBERT (Hsu et al. 2021, arXiv:2106.07447) on the shared speech backbone (METHOD.md#baseline-hubert).

    f = CNN(waveform)                               (B, T, C)   gradient x 0.1 into the CNN
    z = Linear(LN(f)); masked frames (wav2vec 2.0 spans, p = 0.8) replaced by a learned mask embedding
    h = Transformer(z)
    p(c | t) = softmax_c(cos(final_proj(h_t), e_c) / tau)      over the C cluster embeddings e_c
    loss = sum over masked frames of -log p(label_t | t)  [+ w_u * the same over unmasked frames]
           + 10 * mean(f^2) * #masked,   / #masked

The labels are k-means cluster ids, one per label frame at ``label_rate`` Hz: iteration 1 clusters MFCC
features (100 Hz), iteration 2 an intermediate layer of the iteration-1 model (50 Hz, the CNN's rate).
Encoder frame t reads label ``floor(t * label_rate * stride / sample_rate)`` (fairseq ``forward_targets``);
when the labels end before the frames do, the last frames are dropped (here: the waveform is cut so the CNN
makes no frame without a label, which leaves every other frame's features unchanged).

fairseq's logits are [positive, every class] with the positive's duplicate set to -inf; that is the
softmax over all C classes with the label as the target, which is what this computes.

Deviations (docs/FIDELITY_BASELINES.md#hubert): the backbone is data2vec 2.0's speech encoder, as for every
method here; one label set per run (fairseq allows several, with ``untie_final_proj``, equivalent for one).
"""
from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import ensure_masked, num_tokens
from baselines.masking import SpanMaskConfig, SpanMasker
from baselines.wav2vec2 import frontend
from d2v2.config import Config
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.model.masking import mask_indices
from d2v2.method import MethodOutput, PretrainMethod, register_method
from d2v2.model.modalities.speech import receptive_field

__all__ = ["MFCC_RATE", "HubertConfig", "HubertMasker", "Hubert"]

MFCC_RATE = 100.0      # iteration 1's labels per second: kaldi MFCC frames, 25 ms windows every 10 ms


class HubertConfig(Config):
    encoder: EncoderConfig
    mask: SpanMaskConfig = SpanMaskConfig(mask_prob=0.8)
    num_classes: int = pydantic.Field(100, ge=2)             # C: k-means clusters of the label set
    label_rate: float = pydantic.Field(MFCC_RATE, gt=0)      # labels per second (MFCCs; model features: 50)
    sample_rate: int = pydantic.Field(16_000, gt=0)
    final_dim: int = pydantic.Field(256, ge=1)
    logit_temp: float = pydantic.Field(0.1, gt=0)            # tau
    masked_weight: float = pydantic.Field(1.0, ge=0)         # fairseq pred_masked_weight
    unmasked_weight: float = pydantic.Field(0.0, ge=0)       # fairseq pred_nomask_weight (w_u)
    feature_penalty_weight: float = pydantic.Field(10.0, ge=0)
    feature_grad_mult: float = pydantic.Field(0.1, ge=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "HubertConfig":
        if self.encoder.modality != "speech":
            raise ValueError(f"HuBERT needs an audio encoder (got {self.encoder.modality})")
        if self.masked_weight == 0 and self.unmasked_weight == 0:
            raise ValueError("masked_weight and unmasked_weight are both 0: nothing to learn")
        return self

    def labels_per_frame(self) -> float:
        """Label frames per encoder frame (fairseq ``feat2tar_ratio``: 2 for 100 Hz labels, 1 for 50 Hz)."""
        return self.label_rate * receptive_field(self.encoder.speech.conv_layers)[1] / self.sample_rate


@dataclass(frozen=True)
class HubertMasker:
    """Picklable masker: crops each utterance's ``labels`` to its audio (when the batch carries
    ``label_offsets``: the data pipeline's whole-utterance labels), aligns them to the encoder frames as
    ``frame_labels`` (B, T), cutting the waveform where the labels end, then draws wav2vec 2.0 spans and
    adds their indices."""

    spans: SpanMasker
    labels_per_frame: float
    conv_layers: tuple[tuple[int, int, int], ...]
    label_rate: float
    sample_rate: int

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if "labels" not in batch:
            raise ValueError("HuBERT needs k-means labels in the batch ('labels', one cluster id per label "
                             "frame): set data.speech.pretrain_labels (the workflow makes them, "
                             "METHOD.md#baseline-hubert)")
        source, labels = batch["source"], batch["labels"]
        if "label_offsets" in batch:
            labels = self.crop(labels, batch["label_offsets"], batch["utterance_samples"], source.shape[1])
        T = self.spans.num_frames(source.shape[1])
        if self.labels_per_frame * T > labels.shape[1]:                 # fairseq: drop unlabelled frames
            T = int(labels.shape[1] / self.labels_per_frame)
            size, stride = receptive_field(list(self.conv_layers))
            source = source[:, :size + (T - 1) * stride]
        frame_labels = labels[:, (torch.arange(T).float() * self.labels_per_frame).long()]
        batch = self.spans({**batch, "source": source, "labels": labels}, generator)
        return {**batch, **mask_indices(batch["mask"]), "frame_labels": frame_labels}

    def crop(self, labels: torch.Tensor, offsets: torch.Tensor, utterance_samples: torch.Tensor,
             num_samples: int) -> torch.Tensor:
        """Whole-utterance labels (B, L_max; -1 pads) -> those of the cropped audio (fairseq HubertDataset
        ``collater_label``: start ``round(offset * rate)``, length ``round(samples * rate)``, at most what is
        left in every row). A label count that does not fit the utterance's length at ``label_rate`` (labels
        made at another rate) is an error."""
        per_sample = self.label_rate / self.sample_rate
        lengths = (labels >= 0).sum(1).tolist()
        for n, samples in zip(lengths, utterance_samples.tolist()):
            expected = samples * per_sample
            if abs(n - expected) > 3 + 0.01 * expected:
                raise ValueError(f"an utterance of {samples} samples has {n} labels; at label_rate "
                                 f"{self.label_rate:g} Hz it should have about {expected:.0f} (labels made at "
                                 "another rate?)")
        starts = [int(round(o * per_sample)) for o in offsets.tolist()]
        size = min(int(round(num_samples * per_sample)), *(n - s for n, s in zip(lengths, starts)))
        if size < 1:
            raise ValueError(f"no labels left for the cropped audio (offsets {offsets.tolist()})")
        return torch.stack([labels[b, s:s + size] for b, s in enumerate(starts)])


class Hubert(PretrainMethod):
    """``student`` speech Encoder + ``mask_emb``, ``final_proj``, ``label_embs`` (C, F)."""

    modality = "speech"

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.encoder.embed_dim
        self.student = Encoder(cfg.encoder)
        self.mask_emb = nn.Parameter(torch.rand(D))                      # fairseq: uniform_()
        self.final_proj = nn.Linear(D, cfg.final_dim)
        self.label_embs = nn.Parameter(torch.rand(cfg.num_classes, cfg.final_dim))   # fairseq: uniform_()

    # ---- PretrainMethod interface -----------------------------------------------------------------
    def masker(self) -> HubertMasker:
        conv = tuple(tuple(c) for c in self.cfg.encoder.speech.conv_layers)
        return HubertMasker(self.cfg.mask.masker(self.cfg.encoder), self.cfg.labels_per_frame(), conv,
                            self.cfg.label_rate, self.cfg.sample_rate)

    def encoder(self) -> Encoder:
        return self.student

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The student encodes every frame of every utterance (masked ones as the mask embedding)."""
        return batch["source"].shape[0] * num_tokens(self.cfg.encoder, batch["source"])

    def stand_in_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Uniformly random cluster ids at ``label_rate`` for a synthetic batch."""
        B, N = batch["source"].shape
        L = int(N * self.cfg.label_rate / self.cfg.sample_rate)
        return {**batch, "labels": torch.randint(0, self.cfg.num_classes, (B, L), generator=generator)}

    # ---- the training step ------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) encoder outputs -> (N, C) cosine similarities to the cluster embeddings / tau."""
        proj = F.normalize(self.final_proj(h).float(), dim=-1, eps=1e-8)
        return proj @ F.normalize(self.label_embs.float(), dim=-1, eps=1e-8).T / self.cfg.logit_temp

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        batch = ensure_masked(batch, self.masker(), needs=("masked", "frame_labels"))
        _, feature_penalty, x, padding_mask = frontend(self.student, batch["source"], batch.get("padding_mask"),
                                                       self.cfg.feature_grad_mult)
        B, T = x.shape[:2]
        mask = batch["mask"].to(x.device, non_blocking=True)
        labels = batch["frame_labels"].to(x.device, non_blocking=True)
        if mask.shape != (B, T) or labels.shape != (B, T):
            raise ValueError(f"batch['mask'] {tuple(mask.shape)} and batch['frame_labels'] {tuple(labels.shape)} "
                             f"must both be (B, T) = {(B, T)}")
        out = self.student.contextualize(x, mask, padding_mask, sparse=False, fill=self.mask_emb,
                                         layer_results="none")
        h = out.x[:, out.num_extra_tokens:]
        rows = torch.arange(B, device=x.device)[:, None]
        masked = batch["masked"].to(x.device, non_blocking=True)
        logits_m = self.logits(h[rows, masked].flatten(0, 1))
        targets_m = labels[rows, masked].flatten()
        loss_m = F.cross_entropy(logits_m, targets_m, reduction="sum")
        logs = {"loss_masked": loss_m.detach() / targets_m.numel()}
        loss, sample_size = 0.0, 0                 # fairseq: each weighted term adds its frames to the sample size
        if self.cfg.masked_weight > 0:
            loss, sample_size = self.cfg.masked_weight * loss_m, targets_m.numel()
        if self.cfg.unmasked_weight > 0:
            keep = batch["keep"].to(x.device, non_blocking=True)
            loss_u = F.cross_entropy(self.logits(h[rows, keep].flatten(0, 1)), labels[rows, keep].flatten(),
                                     reduction="sum")
            loss, sample_size = loss + self.cfg.unmasked_weight * loss_u, sample_size + keep.numel()
            logs["loss_unmasked"] = loss_u.detach() / max(keep.numel(), 1)
        loss = (loss + self.cfg.feature_penalty_weight * feature_penalty * sample_size) / sample_size
        with torch.no_grad():
            logs["accuracy_masked"] = (logits_m.argmax(-1) == targets_m).float().mean()
        logs.update(feature_penalty=feature_penalty.detach(), masked_pct=targets_m.numel() / mask.numel())
        return MethodOutput(loss, sample_size, logs)


# The settings per preset (data2vec 2.0's speech encoders) are in d2v2/presets/<preset>.yaml.
register_method("speech", "hubert", HubertConfig)(Hubert)
