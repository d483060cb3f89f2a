"""WavLM (Chen et al. 2022, arXiv:2110.13900) on the shared speech backbone (METHOD.md#baseline-wavlm).

WavLM is HuBERT (:mod:`baselines.hubert`: masked prediction of k-means cluster ids, same loss, same head)
with two changes:

1. Gated relative position bias in every block (Sec. 3.2; the encoder option ``relative_position``,
   METHOD.md#gated-relative-position-bias), which takes the place of the backbone's ALiBi bias.
2. Utterance mixing (Sec. 3.1, "denoising masked speech modeling"): with probability ``mixing.prob`` an
   utterance of the batch gets a segment of another utterance of the batch added onto it,

       x_i[s : s + L] += g * x_c[t : t + L],   L ~ U{0, ..., floor(max_fraction * N)},
       g = sqrt(P_i / (P_c * 10^(r / 10))),    r ~ U(energy_ratio_db)   (P: mean power of the row)

   at uniform positions s and t, and the model still predicts the labels of the main utterance x_i (the
   overlap covers at most half of it, so the main speaker stays the dominant one). A mixed row is
   normalised again when the data pipeline normalised its utterances. The draws follow the public
   implementation of utterance mixing by the WavLM authors (UniSpeech-SAT's ``UtteranceMixingDataset``:
   ``mixing_prob`` 0.2, ``mixing_max_len`` half the crop, ratio U(-5, 5) dB, the other utterance drawn
   from the whole batch), done here in the batch's masker from its seeded generator.

Labels: WavLM Base trains on k-means labels of a HuBERT Base model's hidden layer (Sec. 4.1); the
workflow gives it the labels HuBERT's second iteration trains on (its label chain, METHOD.md#baseline-hubert).
Deviations: docs/FIDELITY_BASELINES.md#wavlm.
"""
from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F

from baselines.hubert import Hubert, HubertConfig, HubertMasker
from d2v2.config import Config
from d2v2.method import register_method

__all__ = ["MixingConfig", "UtteranceMixer", "WavlmConfig", "WavlmMasker", "Wavlm"]


class MixingConfig(Config):
    """Utterance mixing (WavLM Sec. 3.1); ``prob`` 0 turns it off (HuBERT's objective with WavLM's bias)."""

    prob: float = pydantic.Field(0.2, ge=0, le=1)                 # share of utterances that get a mixed-in segment
    max_fraction: float = pydantic.Field(0.5, gt=0, le=1)         # longest segment, as a share of the crop
    energy_ratio_db: tuple[float, float] = (-5.0, 5.0)            # main over mixed-in power, drawn uniformly

    @pydantic.model_validator(mode="after")
    def _check(self) -> "MixingConfig":
        low, high = self.energy_ratio_db
        if low > high:
            raise ValueError(f"energy_ratio_db {list(self.energy_ratio_db)}: the low end is above the high end")
        return self


@dataclass(frozen=True)
class UtteranceMixer:
    """Picklable: ``(source (B, N), normalized) -> source`` with segments of other rows mixed in (rows are
    processed in order, each mixing from the batch as it stands, as the reference does)."""

    prob: float
    max_fraction: float
    energy_ratio_db: tuple[float, float]

    def __call__(self, source: torch.Tensor, generator: torch.Generator, normalized: bool) -> torch.Tensor:
        B, N = source.shape
        longest = min(int(N * self.max_fraction), N)
        mixed = source.clone()
        for i in range(B):
            if float(torch.rand((), generator=generator)) >= self.prob:
                continue
            c = int(torch.randint(B, (), generator=generator))
            length = int(torch.randint(longest + 1, (), generator=generator))
            t = int(torch.randint(N - length + 1, (), generator=generator))      # in the other utterance
            s = int(torch.randint(N - length + 1, (), generator=generator))      # in the main one
            low, high = self.energy_ratio_db
            ratio_db = low + (high - low) * float(torch.rand((), generator=generator))
            main_power, other_power = mixed[i].pow(2).mean(), mixed[c].pow(2).mean()
            gain = 0.0 if other_power == 0 else float(torch.sqrt(main_power / (other_power * 10 ** (ratio_db / 10))))
            mixed[i, s:s + length] += gain * mixed[c, t:t + length].clone()
            if normalized:
                mixed[i] = F.layer_norm(mixed[i], (N,))                         # eps 1e-5, as the data pipeline
        return mixed


@dataclass(frozen=True)
class WavlmMasker:
    """HuBERT's masker (labels cropped and aligned to the frames, spans drawn), then utterance mixing of
    the waveforms; the labels stay the main utterances'."""

    hubert: HubertMasker
    mixer: UtteranceMixer

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.hubert(batch, generator)
        normalized = bool(batch["normalized"]) if "normalized" in batch else True
        return {**batch, "source": self.mixer(batch["source"], generator, normalized)}


class WavlmConfig(HubertConfig):
    mixing: MixingConfig = MixingConfig()

    @pydantic.model_validator(mode="after")
    def _check_bias(self) -> "WavlmConfig":
        if self.encoder.relative_position is None:
            raise ValueError("WavLM needs encoder.relative_position (its gated relative position bias)")
        return self


class Wavlm(Hubert):
    """HuBERT's model and loss; the encoder carries the gated relative position bias, the masker mixes."""

    def masker(self) -> WavlmMasker:
        m = self.cfg.mixing
        return WavlmMasker(super().masker(), UtteranceMixer(m.prob, m.max_fraction, tuple(m.energy_ratio_db)))


# The settings per preset (data2vec 2.0's speech encoders with WavLM's positional scheme) are in
# d2v2/presets/<preset>.yaml.
register_method("speech", "wavlm", WavlmConfig)(Wavlm)
