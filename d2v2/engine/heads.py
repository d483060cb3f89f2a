"""Task heads on top of a pretrained Encoder (METHOD.md#fine-tuning); the same for every pretraining method.

* :class:`ImageClassifier` (METHOD.md#fine-tuning-images): encoder run unmasked, CLS dropped, patch tokens mean-pooled,
  ``fc_norm`` LayerNorm (eps 1e-6), Linear head (trunc-normal 0.02, bias 0). As a linear probe the
  encoder is frozen and the norm is a BatchNorm without affine parameters (MAE's linear probing).
* :class:`CTCRecognizer` (METHOD.md#fine-tuning-speech): a Linear layer to the letters on every frame, CTC loss. The CNN
  feature extractor stays frozen; the Transformer can be frozen for the first updates (only the head
  trains); wav2vec 2.0 span masking keeps masked frames and fills them with N(0, sigma^2) noise, and
  optional channel masking zeroes spans of feature channels. Because the CNN is frozen, its output per
  training utterance can be computed once and reused every epoch (:class:`FrozenFeatureCache`).
* :class:`SentenceClassifier` (METHOD.md#fine-tuning-text): RoBERTa's head on the ``<s>`` position,
  dropout -> dense -> tanh -> dropout -> out_proj (one output for regression).

Each head's ``forward(batch)`` takes the fine-tuning batch of docs/ARCHITECTURE.md and returns logits;
:meth:`loss` turns them into the training loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2v2.data.speech import BLANK, LETTERS
from d2v2.model.blocks import Dropout
from d2v2.model.masking import span_mask
from d2v2.model.modalities.speech import SpeechLocalEncoder, frame_count, receptive_field, valid_samples

__all__ = ["ImageClassifier", "CTCRecognizer", "FrozenFeatureCache", "SentenceClassifier"]


class _Head(nn.Module):
    """An encoder plus a task head; with ``freeze_encoder`` the encoder never trains (linear probe)."""

    def __init__(self, encoder: nn.Module, freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()          # no dropout / drop-path in a frozen feature extractor
        return self


class ImageClassifier(_Head):
    """Mean-pooled patch tokens -> norm -> Linear (METHOD.md#fine-tuning-images)."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int, linear_probe: bool = False):
        super().__init__(encoder, freeze_encoder=linear_probe)
        self.fc_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if linear_probe else nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.encoder(batch["source"])
        pooled = out.x[:, out.num_extra_tokens:].mean(dim=1)
        return self.head(self.fc_norm(pooled))

    def loss(self, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy against class ids or, after MixUp/CutMix, soft targets (B, C)."""
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class SentenceClassifier(_Head):
    """RoBERTa classification head on the ``<s>`` token (METHOD.md#fine-tuning-text); ``num_outputs=1`` is regression."""

    def __init__(self, encoder: nn.Module, dim: int, num_outputs: int, pooler_dropout: float = 0.0,
                 linear_probe: bool = False):
        super().__init__(encoder, freeze_encoder=linear_probe)
        self.dropout = Dropout(pooler_dropout)
        # PyTorch's default Linear init, as fairseq's RobertaClassificationHead: the head is built after
        # init_bert_params ran (weight std 1/sqrt(3 dim): 0.021 at dim 768, like N(0, 0.02); 0.083 at 48)
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_outputs)

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.encoder(batch["source"], batch.get("padding_mask")).x[:, 0]
        x = torch.tanh(self.dense(self.dropout(x)))
        logits = self.out_proj(self.dropout(x))
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or mean squared error for regression (fairseq's sentence_prediction)."""
        if logits.ndim == 1:
            return F.mse_loss(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target)


class FrozenFeatureCache:
    """The frozen CNN's output for each training utterance, keyed by the batch's ``id``: computed the
    first time an utterance is seen, reused in every later epoch.

    Exact, not an approximation. The CNN has no padding and normalises each frame over its channels
    ("layer_norm" mode), so frame t depends only on samples ``[t * stride, t * stride + size)``
    (:func:`~d2v2.model.modalities.speech.receptive_field`), and fine-tuning batches whole utterances padded with
    zeros (``collate_finetune``). In a padded batch, an utterance of n samples therefore has the frames of
    the utterance followed by zeros for its first ``ceil(n / stride)`` frames (stored per utterance: its
    valid frames plus the one or two that reach past its end), and after them frames that see only zeros,
    all one constant vector (stored once). :meth:`__call__` rebuilds the CNN output of the padded batch
    from these, padded frames included (the convolutional positional encoder sees them).

    Memory, on the training device: ``sum(ceil(n / 320)) x C`` values of the CNN's dtype, i.e. 4 bytes x
    C x 50 per second of training audio (tiny recipe, C = 32: ~6 MB for its 300 utterances; C = 512 as in
    the paper: 100 kB per second, 3.7 GB for the 10 h labelled split).
    """

    def __init__(self, local_encoder: SpeechLocalEncoder):
        self.local_encoder = local_encoder
        self.size, self.stride = receptive_field(local_encoder.cfg.conv_layers)
        self.frames: dict[int, tuple[int, torch.Tensor]] = {}    # id -> (samples, (ceil(n / stride), C))
        self.zero_frame: torch.Tensor | None = None              # (C,) the CNN's output on zeros
        self.cnn_utterances = 0                                  # utterances the CNN has run on

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for _, f in self.frames.values())

    @torch.no_grad()
    def __call__(self, source: torch.Tensor, padding_mask: torch.Tensor | None,
                 ids: torch.Tensor) -> torch.Tensor:
        """The CNN output ``(B, T, C)`` of the zero-padded batch ``source (B, N)``."""
        lengths = [source.shape[1]] * source.shape[0] if padding_mask is None else valid_samples(padding_mask).tolist()
        ids = ids.tolist()
        missing = {i: b for b, i in enumerate(ids) if i not in self.frames}     # first sight (each id once)
        if missing:
            # checked with the batches the cache is filled from (the first epoch's), not at every step
            if padding_mask is not None and source.masked_select(padding_mask).any():
                raise ValueError("FrozenFeatureCache needs zero-padded waveforms (collate_finetune pads with 0)")
            self._compute(source, list(missing.values()), [lengths[b] for b in missing.values()], list(missing))
        frames = frame_count(source.shape[1], self.local_encoder.cfg.conv_layers)
        out = self.zero_frame.expand(len(ids), frames, -1).clone()
        for b, (i, n) in enumerate(zip(ids, lengths)):
            samples, stored = self.frames[i]
            if samples != n:
                raise ValueError(f"utterance id {i} has {n} samples but {samples} when it was cached: "
                                 "a feature cache serves one dataset")
            k = min(len(stored), frames)
            out[b, :k] = stored[:k]
        return out

    def _compute(self, source: torch.Tensor, rows: list[int], lengths: list[int], ids: list[int]) -> None:
        """Run the CNN once on the utterances ``rows`` of ``source``, each followed by zeros."""
        counts = [math.ceil(n / self.stride) for n in lengths]
        wave = source.new_zeros(len(rows), (max(counts) - 1) * self.stride + self.size)
        for r, (b, n) in enumerate(zip(rows, lengths)):
            wave[r, :n] = source[b, :n]
        features = self.local_encoder.cnn(wave)
        for r, (i, n, k) in enumerate(zip(ids, lengths, counts)):
            self.frames[i] = (n, features[r, :k].clone())
        self.cnn_utterances += len(rows)
        if self.zero_frame is None:
            self.zero_frame = self.local_encoder.cnn(source.new_zeros(1, self.size))[0, 0]


class CTCRecognizer(_Head):
    """Frame-wise letter logits for CTC (METHOD.md#fine-tuning-speech, wav2vec 2.0 ``wav2vec_ctc`` recipe).

    ``feature_extractor`` names the CNN submodule of the encoder that stays frozen throughout
    (fairseq ``feature_grad_mult=0``). Call :meth:`set_transformer_frozen` each update: while frozen,
    the encoder runs without gradients and only the output projection trains (``freeze_finetune_updates``).
    With :attr:`feature_cache` set (the training loop does, ``cache_frozen_features``), training batches
    that carry ``id`` take the CNN output from the cache; the LN + projection after it still run every step.
    """

    def __init__(self, encoder: nn.Module, dim: int, vocab_size: int, feature_extractor: nn.Module, *,
                 mask_prob: float = 0.0, mask_length: int = 10, mask_noise_std: float = 0.01,
                 channel_prob: float = 0.0, channel_length: int = 64, final_dropout: float = 0.0,
                 linear_probe: bool = False):
        super().__init__(encoder, freeze_encoder=linear_probe)
        feature_extractor.requires_grad_(False)
        self.mask_prob, self.mask_length, self.mask_noise_std = mask_prob, mask_length, mask_noise_std
        self.channel_prob, self.channel_length = channel_prob, channel_length
        self.transformer_frozen = False
        self.feature_cache: FrozenFeatureCache | None = None
        self.dropout = Dropout(final_dropout)
        self.proj = nn.Linear(dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)       # fairseq wav2vec2_asr Linear()
        nn.init.zeros_(self.proj.bias)

    def set_transformer_frozen(self, frozen: bool) -> None:
        self.transformer_frozen = frozen

    def _time_mask(self, padding_mask: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor:
        """Span masks drawn over each utterance's own frames (padding never masked)."""
        lengths = [frames] * batch if padding_mask is None else (~padding_mask).sum(1).tolist()
        mask = torch.zeros(batch, frames, dtype=torch.bool)
        for row, n in enumerate(lengths):
            if n > self.mask_length:
                mask[row, :n] = span_mask(1, n, None, mask_prob=self.mask_prob, span=self.mask_length,
                                          same_count=False)[0]
        return mask

    def _channel_mask(self, batch: int, channels: int) -> torch.Tensor:
        return span_mask(batch, channels, None, mask_prob=self.channel_prob, span=self.channel_length,
                         min_spans=0, same_count=False)

    def local_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's local features; in training, the CNN part comes from :attr:`feature_cache` if set."""
        source, padding_mask = batch["source"], batch.get("padding_mask")
        if self.feature_cache is None or not self.training or "id" not in batch:
            return self.encoder.local_features(source, padding_mask)
        return self.encoder.local_encoder.project(self.feature_cache(source, padding_mask, batch["id"]), padding_mask)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Letter logits (B, T, V) and the number of valid frames per utterance (B,)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.transformer_frozen):
            x, padding_mask = self.local_features(batch)
            mask, fill = None, None
            if self.training and self.channel_prob > 0:
                x = x.masked_fill(self._channel_mask(x.shape[0], x.shape[-1]).to(x.device)[:, None, :], 0.0)
            if self.training and self.mask_prob > 0:
                mask = self._time_mask(padding_mask, x.shape[0], x.shape[1]).to(x.device)
                fill = torch.randn_like(x) * self.mask_noise_std
            out = self.encoder.contextualize(x, mask, padding_mask, sparse=False, fill=fill, layer_results="none")
            features = out.x[:, out.num_extra_tokens:]
        logits = self.proj(self.dropout(features))
        frames = torch.full((x.shape[0],), x.shape[1], device=x.device) if padding_mask is None \
            else (~padding_mask).sum(1)
        return logits, frames

    def loss(self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
        """CTC averaged over utterances (fairseq ``sentence_avg``), ``zero_infinity`` as in the recipe."""
        logits, frames = output
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)        # (T, B, V)
        return F.ctc_loss(log_probs, target.clamp(min=0), frames, target_lengths, blank=LETTERS.index(BLANK),
                          reduction="sum", zero_infinity=True) / target.shape[0]
