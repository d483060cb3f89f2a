"""wav2vec 2.0 (Baevski et al. 2020, arXiv:2006.11477) on the shared speech backbone (METHOD.md#baseline-wav2vec2).

    f = CNN(waveform)                                     (B, T, C)   gradient x 0.1 into the CNN
    z = Linear(LN(f)); masked frames (wav2vec 2.0 spans) replaced by a learned mask embedding
    c = final_proj(Transformer(z)) at the masked frames   (B, T_m, F)
    q = project_q(GumbelQuantizer(LN(f))) at the masked frames (no masking in its input)
    loss = sum over masked frames of -log softmax_k(cos(c, [q, q_neg_1..K]) / kappa)[0]
           + 0.1 * (G V - perplexity) / (G V) * #masked + 10 * mean(f^2) * #masked,   / #masked

K distractors per masked frame are other masked frames of the same utterance (never the frame itself),
drawn in the data-loader workers with the masks; a distractor equal to the positive gets no logit
(fairseq ``compute_preds``). The Gumbel temperature decays exponentially from 2 to 0.5, then stays; its
length is a fraction of the budget like every schedule here (fairseq: 0.999995 per update over 400k
updates reaches 0.5 at 69% of the run).

Deviations (docs/FIDELITY_BASELINES.md): the backbone is data2vec 2.0's speech encoder (ALiBi and a
5-layer positional convolution instead of one 128-wide convolution), as for every method in the harness;
fairseq's ``dropout_input`` is the backbone's own input dropout.
"""
from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from baselines.masking import SpanMaskConfig, SpanMasker
from d2v2.config import Config
from d2v2.model.blocks import Dropout
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.model.masking import mask_indices
from d2v2.method import MethodOutput, PretrainMethod, register_method

__all__ = ["QuantizerConfig", "Wav2Vec2Config", "GumbelQuantizer", "Wav2Vec2Masker", "Wav2Vec2", "frontend"]


class QuantizerConfig(Config):
    """Product quantiser: ``groups`` codebooks of ``entries`` vectors, concatenated to ``dim``; Gumbel
    temperature ``temp_start -> temp_end`` over ``temp_anneal_end_fraction`` of the budget."""

    groups: int = pydantic.Field(2, ge=1)
    entries: int = pydantic.Field(320, ge=2)
    dim: int = pydantic.Field(256, ge=1)
    temp_start: float = pydantic.Field(2.0, gt=0)
    temp_end: float = pydantic.Field(0.5, gt=0)
    # fairseq: max(2 * 0.999995^n, 0.5) reaches 0.5 at n = ln(1/4) / ln(0.999995) = 277,258 of 400k updates
    temp_anneal_end_fraction: float = pydantic.Field(277_258 / 400_000, gt=0, le=1)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "QuantizerConfig":
        if self.dim % self.groups:
            raise ValueError(f"quantizer.dim {self.dim} must be divisible by quantizer.groups {self.groups}")
        if self.temp_end > self.temp_start:
            raise ValueError("quantizer.temp_end must not exceed temp_start")
        return self

    def temperature(self, fraction: float) -> float:
        """Exponential decay from ``temp_start`` to ``temp_end`` at ``temp_anneal_end_fraction``, then constant."""
        progress = min(max(fraction, 0.0) / self.temp_anneal_end_fraction, 1.0)
        return self.temp_start * (self.temp_end / self.temp_start) ** progress


class Wav2Vec2Config(Config):
    encoder: EncoderConfig
    mask: SpanMaskConfig = SpanMaskConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    final_dim: int = pydantic.Field(256, ge=1)                # F: the space of the contrastive task
    num_negatives: int = pydantic.Field(100, ge=1)           # K
    logit_temp: float = pydantic.Field(0.1, gt=0)            # kappa
    diversity_weight: float = pydantic.Field(0.1, ge=0)      # alpha
    feature_penalty_weight: float = pydantic.Field(10.0, ge=0)
    feature_grad_mult: float = pydantic.Field(0.1, ge=0)
    dropout_features: float = pydantic.Field(0.1, ge=0, lt=1)  # on the quantiser's input

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Wav2Vec2Config":
        if self.encoder.modality != "speech":
            raise ValueError(f"wav2vec 2.0 needs an audio encoder (got {self.encoder.modality})")
        return self


class GumbelQuantizer(nn.Module):
    """fairseq ``GumbelVectorQuantizer`` (``combine_groups=False``, one projection layer): logits over each
    group's entries from a Linear layer (N(0, 1) weights, zero bias); a hard Gumbel-softmax sample in training
    (straight-through), the argmax in evaluation; entries initialised U(0, 1)."""

    def __init__(self, in_dim: int, cfg: QuantizerConfig):
        super().__init__()
        self.groups, self.entries = cfg.groups, cfg.entries
        self.weight_proj = nn.Linear(in_dim, cfg.groups * cfg.entries)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.vars = nn.Parameter(torch.rand(cfg.groups * cfg.entries, cfg.dim // cfg.groups))

    def forward(self, x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (N, C) -> quantised (N, dim) and the perplexities: ``prob_perplexity`` of the mean softmax
        (what the diversity loss raises) and ``code_perplexity`` of the chosen entries, summed over groups."""
        N = x.shape[0]
        logits = self.weight_proj(x).view(N, self.groups, self.entries).float()
        hard = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)   # one_hot checks on the host
        stats = {"code_perplexity": _perplexity(hard.mean(0)), "prob_perplexity": _perplexity(logits.softmax(-1).mean(0))}
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=temperature, hard=True)
        else:
            onehot = hard
        codes = onehot.type_as(self.vars).unsqueeze(-1) * self.vars.view(self.groups, self.entries, -1)
        return codes.sum(-2).reshape(N, -1), stats


def _perplexity(probs: torch.Tensor) -> torch.Tensor:
    """exp(entropy) per group (G, V) -> summed over groups."""
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()


@dataclass(frozen=True)
class Wav2Vec2Masker:
    """Picklable masker: wav2vec 2.0 spans (the same count per utterance), the masked frames' indices, and
    ``negatives`` (B, T_m, K): for each masked frame, K others of the same utterance drawn uniformly with
    replacement, never the frame itself (fairseq ``sample_negatives``)."""

    spans: SpanMasker
    num_negatives: int

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.spans(batch, generator)
        index = mask_indices(batch["mask"])
        B, T_m = index["masked"].shape
        if T_m < 2:
            raise ValueError(f"wav2vec 2.0 needs at least 2 masked frames per utterance for distractors (got {T_m})")
        draw = torch.randint(0, T_m - 1, (B, T_m, self.num_negatives), generator=generator)
        negatives = draw + (draw >= torch.arange(T_m)[None, :, None]).long()     # skip the frame itself
        return {**batch, **index, "negatives": negatives}


def frontend(student: Encoder, source: torch.Tensor, padding_mask: torch.Tensor | None, grad_mult: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """wav2vec 2.0's (and HuBERT's) front end: CNN features f (B, T, C) with their gradient into the CNN
    multiplied by ``grad_mult`` (fairseq ``GradMultiply``), the feature penalty mean(f^2) (fp32), and the
    projected frames Linear(LN(f)) (B, T, D) with their padding mask."""
    local = student.local_encoder
    features = local.cnn(source)
    if grad_mult != 1.0:
        features = features * grad_mult + features.detach() * (1 - grad_mult)    # same values, gradient x g
    x, padding_mask = local.project(features, padding_mask)
    return features, features.float().pow(2).mean(), x, padding_mask


class Wav2Vec2(PretrainMethod):
    """``student`` speech Encoder + ``mask_emb``, ``final_proj``, ``quantizer``, ``project_q``."""

    modality = "speech"

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        D, C = cfg.encoder.embed_dim, cfg.encoder.speech.conv_layers[-1][0]
        self.student = Encoder(cfg.encoder)
        self.mask_emb = nn.Parameter(torch.rand(D))                # fairseq: uniform_()
        self.final_proj = nn.Linear(D, cfg.final_dim)
        self.quantizer = GumbelQuantizer(C, cfg.quantizer)
        self.project_q = nn.Linear(cfg.quantizer.dim, cfg.final_dim)
        self.feature_dropout = Dropout(cfg.dropout_features)
        self.temperature = cfg.quantizer.temperature(0.0)

    # ---- PretrainMethod interface -----------------------------------------------------------------
    def masker(self) -> Wav2Vec2Masker:
        return Wav2Vec2Masker(self.cfg.mask.masker(self.cfg.encoder), self.cfg.num_negatives)

    def encoder(self) -> Encoder:
        return self.student

    def after_step(self, num_updates: int, fraction: float) -> None:
        """The Gumbel temperature at the budget fraction consumed."""
        self.temperature = self.cfg.quantizer.temperature(fraction)

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The student encodes every frame of every utterance (masked ones as the mask embedding)."""
        B, N = batch["source"].shape
        return B * self.masker().spans.num_frames(N)

    # ---- the training step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        if "negatives" not in batch:                  # draw masks from the global RNG (seedable)
            seed = int(torch.randint(0, 2**62, (1,)))
            batch = self.masker()(batch, torch.Generator().manual_seed(seed))
        features, feature_penalty, x, padding_mask = frontend(self.student, batch["source"], batch.get("padding_mask"),
                                                              self.cfg.feature_grad_mult)
        unmasked = self.feature_dropout(self.student.local_encoder.project_features[0](features))  # LN(f): quantiser input
        B, T = x.shape[:2]
        mask = batch["mask"].to(x.device, non_blocking=True)
        if mask.shape != (B, T):
            raise ValueError(f"batch['mask'] has shape {tuple(mask.shape)}; expected (B, T) = {(B, T)}")
        masked, negatives = (batch[k].to(x.device, non_blocking=True) for k in ("masked", "negatives"))

        out = self.student.contextualize(x, mask, padding_mask, sparse=False, fill=self.mask_emb,
                                         layer_results="none")
        rows = torch.arange(B, device=x.device)[:, None]
        c = self.final_proj(out.x[:, out.num_extra_tokens:][rows, masked])           # (B, T_m, F)
        q, stats = self.quantizer(unmasked[rows, masked].flatten(0, 1), self.temperature)
        q = self.project_q(q).view(B, -1, self.cfg.final_dim)                         # (B, T_m, F)

        candidates = torch.cat([q[:, :, None], q[rows[..., None], negatives]], dim=2)  # (B, T_m, 1+K, F)
        logits = F.cosine_similarity(c[:, :, None].float(), candidates.float(), dim=-1) / self.cfg.logit_temp
        same = (candidates[:, :, 1:] == candidates[:, :, :1]).all(-1)                # a distractor equal to q
        logits = torch.cat([logits[..., :1], logits[..., 1:].masked_fill(same, float("-inf"))], dim=-1)
        logits = logits.flatten(0, 1)
        sample_size = logits.shape[0]
        contrastive = F.cross_entropy(logits, logits.new_zeros(sample_size, dtype=torch.long), reduction="sum")
        num_vars = self.cfg.quantizer.groups * self.cfg.quantizer.entries
        diversity = (num_vars - stats["prob_perplexity"]) / num_vars
        loss = (contrastive + (self.cfg.diversity_weight * diversity
                               + self.cfg.feature_penalty_weight * feature_penalty) * sample_size) / sample_size
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == 0).float().mean()
        logs = {"contrastive": contrastive.detach() / sample_size, "accuracy": accuracy,
                "prob_perplexity": stats["prob_perplexity"].detach(), "code_perplexity": stats["code_perplexity"],
                "feature_penalty": feature_penalty.detach(), "temperature": self.temperature,
                "masked_pct": sample_size / mask.numel()}
        return MethodOutput(loss, sample_size, logs)


# The settings per preset (data2vec 2.0's speech encoders) are in d2v2/presets/<preset>.yaml.
register_method("speech", "wav2vec2", Wav2Vec2Config)(Wav2Vec2)
