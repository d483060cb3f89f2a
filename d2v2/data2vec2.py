"""data2vec 2.0 (Baevski et al. 2022, arXiv:2212.07525): one training step of METHOD.md#the-training-step.

    z = local_encoder(x)                             (B, T, D)    once per sample
    y = targets(EMA teacher on the unmasked z)       (B, T, D)    once per sample, no grad
    z' = M clones of z (repeat_interleave order); M independent masks with the same masked count per row
    h = student blocks on the VISIBLE tokens of z'   (B*M, T_vis (+CLS), D), gathered from z itself
    p = conv decoder(h scattered back + N(0, sigma) noise at masked positions), read at the masked ones
    loss = sum over masked positions of ||p - y||^2 * s / #masked   (+ CLS term for images)

Presets: ``base`` follows the paper (Base models of each modality) and ``tiny`` / ``smoke`` are the
same recipe sized for a 2-core CPU. Where the paper and the released fairseq configs disagree
(METHOD.md#paper-versus-released-configs) the ``base`` preset takes the PAPER's value and the field is explicit:

- text ``mask_ratio`` 0.42 (paper; yaml 0.48);
- text ``ema_end_decay`` 1.0 (paper; yaml 0.99999): the teacher freezes after ``ema_anneal_end_step``;
- image ``average_top_k_layers`` 10 / audio 8 / text 12 agree; image ``cls_loss`` 0.01 (yaml);
- batch size, GPU count and update counts belong to the engine config, not to this method.

Known differences from fairseq: the collapse guard's statistics are per process (fairseq all-reduces
them), and it is checked at logging intervals, not in every forward; with ``teacher_shares="embeddings"``
(text) prenet blocks, if any (no released text config has them), are EMA-copied instead of run by the
student; drop-path rises linearly over prenet + main blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F

from d2v2.model.blocks import init_bert_params
from d2v2.config import MODALITIES, Config
from d2v2.model.decoder import Decoder, DecoderConfig
from d2v2.model.ema import EMATeacher
from d2v2.model.encoder import Encoder, EncoderConfig, EncoderOutput
from d2v2.model.masking import block_mask, mask_indices, num_kept, random_mask
from d2v2.method import MethodOutput, SelfDistillation, register_method
from d2v2.model.modalities.speech import frame_count
from d2v2.model.targets import feature_std, make_targets, position_share

__all__ = ["Data2Vec2Config", "Data2Vec2", "Data2Vec2Masker", "Details"]

# Which student parts the teacher uses instead of EMA copies (METHOD.md#teacher). "nothing": the teacher
# re-embeds the input itself (image); "local_encoder": it consumes the student's pre-mask local
# features (audio: CNN + projection shared); "embeddings": the student also runs the context stage and
# the teacher holds only the blocks (text, fairseq ``ema_encoder_only``).
TEACHER_SHARES = {"image": "nothing", "speech": "local_encoder", "text": "embeddings"}
_SHARED_MODULES = {"nothing": (), "local_encoder": ("local_encoder",),
                   "embeddings": ("local_encoder", "context_encoder")}


class Data2Vec2Config(Config):
    """Everything of METHOD.md#the-training-step that is a choice. Names follow fairseq where one exists."""

    encoder: EncoderConfig
    decoder: DecoderConfig = DecoderConfig()
    # multi-mask training and masking (METHOD.md#multi-mask-training, METHOD.md#masking)
    num_masks: int = pydantic.Field(16, ge=1)                     # M, fairseq clone_batch
    mask_ratio: float = pydantic.Field(0.8, gt=0, lt=1)          # R
    mask_width: int = pydantic.Field(3, ge=1)                    # Bw (1 = random masking)
    mask_adjust: float = pydantic.Field(0.07, ge=0)              # A
    inverse_mask: bool = True                                    # blocks mark what is kept
    mask_noise_std: float = pydantic.Field(0.01, ge=0)           # sigma of the decoder's mask tokens
    # targets (METHOD.md#targets)
    average_top_k_layers: int = pydantic.Field(10, ge=1)         # K
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = False
    instance_norm_targets: bool = False
    end_of_block_targets: bool = False                           # block outputs instead of FFN outputs
    # loss (METHOD.md#loss)
    loss_scale: float | None = None                              # None -> 1/sqrt(D)
    cls_loss: float = pydantic.Field(0.0, ge=0)                  # images: 0.01
    # teacher (METHOD.md#teacher)
    ema_decay: float = pydantic.Field(0.9998, gt=0, le=1)        # tau_0
    ema_end_decay: float = pydantic.Field(0.99999, gt=0, le=1)   # tau_e
    ema_anneal_end_step: int = pydantic.Field(100_000, ge=0)     # tau_n in updates
    # tau_n as a fraction of the budget (the schedule fitted to any budget, like the LR); None: in updates.
    # Base: the released configs' ratio ema_anneal_end_step / max_update.
    ema_anneal_end_fraction: float | None = pydantic.Field(None, gt=0, le=1)
    teacher_shares: Literal["nothing", "local_encoder", "embeddings"] | None = None  # None: per modality
    # gradient multiplier into the student's local encoder (fairseq ``local_grad_mult``; every released
    # pretraining config: 1). 0 freezes it at its initialisation.
    local_grad_mult: float = pydantic.Field(1.0, ge=0)
    # collapse guard (METHOD.md#loss; 0 disables)
    min_target_var: float = pydantic.Field(0.1, ge=0)
    min_pred_var: float = pydantic.Field(0.01, ge=0)
    collapse_check_after: int = pydantic.Field(5000, ge=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Data2Vec2Config":
        enc = self.encoder
        if self.average_top_k_layers > enc.depth:
            raise ValueError(f"average_top_k_layers {self.average_top_k_layers} exceeds the "
                             f"{enc.depth} main blocks")
        if enc.embed_dim % self.decoder.groups:
            raise ValueError(f"decoder.groups {self.decoder.groups} must divide embed_dim {enc.embed_dim}")
        if enc.modality == "image":
            length = enc.image.grid ** 2
            if num_kept(length, self.mask_ratio) < 1:
                raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {length}")
        if self.cls_loss > 0 and (enc.modality != "image" or enc.image.num_extra_tokens < 1):
            raise ValueError("cls_loss needs an image encoder with a CLS token (num_extra_tokens >= 1)")
        if self.instance_norm_target_layer and self.layer_norm_target_layer:
            raise ValueError("instance_norm_target_layer and layer_norm_target_layer are exclusive")
        return self


@dataclass(frozen=True)
class Data2Vec2Masker:
    """Picklable masker: adds ``mask`` (B*M, T) bool, True = masked, row order = repeat_interleave(M).

    ``mask_width == 1`` draws uniform random masks (text, fairseq ``random_masking``; ``adjust`` unused);
    otherwise (inverse) block masks over the patch grid (images) or frame axis (audio)."""

    modality: str
    num_masks: int
    mask_ratio: float
    mask_width: int
    mask_adjust: float
    inverse: bool
    grid: int | None = None                                        # image: patches per side
    conv_layers: tuple[tuple[int, int, int], ...] | None = None   # audio: T = frame_count(N)

    def token_shape(self, source: torch.Tensor) -> tuple[int, ...]:
        if self.modality == "image":
            return (self.grid, self.grid)
        if self.modality == "speech":
            return (int(frame_count(source.shape[-1], list(self.conv_layers))),)
        return (source.shape[-1],)

    def num_visible(self, length: int) -> int:
        """Visible tokens per row: ``int(T(1-R))`` for random and inverse block masks, ``T - int(TR)``
        for plain block masks (fairseq's counts)."""
        if self.mask_width == 1 or self.inverse:
            return num_kept(length, self.mask_ratio)
        return length - int(length * self.mask_ratio)

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        shape = self.token_shape(batch["source"])
        rows = batch["source"].shape[0] * self.num_masks
        length = math.prod(shape)
        if self.num_visible(length) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible token of {length}")
        if self.mask_width == 1:
            mask = random_mask(rows, length, self.mask_ratio, generator)
        else:
            mask = block_mask(rows, shape, self.mask_ratio, self.mask_width, self.mask_adjust,
                              self.inverse, generator)
        return {**batch, "mask": mask, **mask_indices(mask)}


@dataclass
class Details:
    """Everything needed to compare one training forward with another implementation."""

    mask: torch.Tensor            # (B*M, T) True = masked
    predictions: torch.Tensor     # (N_masked, D) decoder outputs at masked positions, row-major order
    targets: torch.Tensor         # (N_masked, D) fp32
    cls_prediction: torch.Tensor | None = None
    cls_target: torch.Tensor | None = None


class Data2Vec2(SelfDistillation):
    """data2vec 2.0: ``student`` Encoder, EMA ``teacher``, conv ``decoder`` (see module doc)."""

    label = "data2vec 2.0"

    def __init__(self, cfg: Data2Vec2Config):
        super().__init__()
        self.cfg, self.modality = cfg, cfg.encoder.modality
        self.student = Encoder(cfg.encoder)
        if cfg.local_grad_mult == 0:                   # frozen: no optimiser state, ignored by DDP
            self.student.local_encoder.requires_grad_(False)
        grid = None
        if self.modality == "image":
            side = cfg.encoder.image.grid
            grid = (side, side)
        self.decoder = Decoder(cfg.decoder, cfg.encoder.embed_dim, grid)
        if self.modality == "text":
            # fairseq applies init_bert_params to the whole model, then the image and audio encoders reset
            # their decoder's Linear layers to PyTorch's default; the text encoder does not (METHOD.md#initialisation
            # says every decoder is reset: the code says otherwise for text)
            self.decoder.proj.apply(init_bert_params)
        self.teacher_shares = cfg.teacher_shares or TEACHER_SHARES[self.modality]
        self.teacher = EMATeacher(self.student, shared=_SHARED_MODULES[self.teacher_shares])
        self.loss_scale = cfg.loss_scale if cfg.loss_scale is not None else cfg.encoder.embed_dim ** -0.5
        self.current_decay = cfg.ema_decay

    # ---- PretrainMethod interface -----------------------------------------------------------------
    def masker(self) -> Data2Vec2Masker:
        enc = self.cfg.encoder
        return Data2Vec2Masker(
            self.modality, self.cfg.num_masks, self.cfg.mask_ratio, self.cfg.mask_width, self.cfg.mask_adjust,
            self.cfg.inverse_mask,
            grid=enc.image.grid if self.modality == "image" else None,
            conv_layers=tuple(map(tuple, enc.speech.conv_layers)) if self.modality == "speech" else None)

    def encoder_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Student tokens (B*M clones x visible + extra) + teacher tokens (B x all + extra)."""
        masker = self.masker()
        length = math.prod(masker.token_shape(batch["source"]))
        B, M = batch["source"].shape[0], self.cfg.num_masks
        extra = self.student.context_encoder.num_extra_tokens
        return B * M * (masker.num_visible(length) + extra) + B * (length + extra)

    # ---- the training step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        return self.forward_details(batch)[0]

    def forward_details(self, batch: dict[str, torch.Tensor],
                        mask_noise_std: float | None = None) -> tuple[MethodOutput, Details]:
        """The training step (METHOD.md#the-training-step) end to end; ``mask_noise_std`` overrides the config (0 for exact comparisons)."""
        source, padding_mask = batch["source"], batch.get("padding_mask")
        if "mask" not in batch:                       # draw masks from the global RNG (seedable)
            seed = int(torch.randint(0, 2**62, (1,)))
            batch = self.masker()(batch, torch.Generator().manual_seed(seed))
        M, B = self.cfg.num_masks, source.shape[0]
        x, padding_mask = self._local_features(source, padding_mask)
        T = x.shape[1]
        mask = batch["mask"].to(x.device, non_blocking=True)
        if mask.shape != (B * M, T):
            raise ValueError(f"batch['mask'] has shape {tuple(mask.shape)}; expected (B*M, T) = "
                             f"({B * M}, {T}) for {B} samples, num_masks={M}, {T} tokens")

        # visible / masked positions, from the masker (found here when a caller gave only the mask)
        index = batch if "keep" in batch and "masked" in batch else mask_indices(mask)
        keep, masked = (index[k].to(x.device, non_blocking=True) for k in ("keep", "masked"))

        y = self._targets(source, batch.get("padding_mask"), x, padding_mask)     # (B, T, D) fp32

        out = self.student.contextualize(x, mask, padding_mask, keep=keep, clones=M, layer_results="none")
        E = out.num_extra_tokens
        noise = self.cfg.mask_noise_std if mask_noise_std is None else mask_noise_std
        # predictions at the masked positions only, row by row (row-major, as mask.nonzero() orders them)
        pred_m = self.decoder(out.x[:, E:], keep, T, noise, positions=masked).flatten(0, 1).float()
        sample = torch.arange(B * M, device=x.device)[:, None] // M
        y_m = y[sample, masked].flatten(0, 1)
        sample_size = masked.numel()
        loss = F.mse_loss(pred_m, y_m, reduction="sum") * self.loss_scale     # one fused pass, forward and backward
        details = Details(mask, pred_m, y_m)
        if self.cfg.cls_loss > 0:
            cls_pred, cls_target = out.x[:, 0].float(), y.mean(1).repeat_interleave(M, 0)
            # fairseq weights the per-clone CLS term by sample_size before the global division, i.e.
            # L += cls_loss * sum over the local clones (METHOD.md#loss)
            loss = loss + self.cfg.cls_loss * (cls_pred - cls_target).pow(2).sum() * self.loss_scale * sample_size
            details.cls_prediction, details.cls_target = cls_pred, cls_target
        loss = loss / sample_size
        logs = self._diagnostics(pred_m.detach(), y_m, sample_size, mask)
        if B > 1 and padding_mask is None:
            logs["target_pos_share"] = position_share(y)
        return MethodOutput(loss, sample_size, logs), details

    def _local_features(self, source, padding_mask):
        """The student's local encoder, its gradient scaled by ``local_grad_mult`` (at 0 its parameters
        do not require gradients, see ``__init__``, so autograd records nothing here)."""
        x, padding_mask = self.student.local_features(source, padding_mask)
        g = self.cfg.local_grad_mult
        if g not in (0.0, 1.0):
            x = x * g + x.detach() * (1 - g)            # same values, gradient times g
        return x, padding_mask

    @torch.no_grad()
    def _targets(self, source, raw_padding_mask, x_local, padding_mask) -> torch.Tensor:
        """Targets from the teacher run ONCE per distinct sample on the unmasked input (METHOD.md#targets)."""
        out = self._teacher_output(source, raw_padding_mask, x_local.detach(), padding_mask)
        c = self.cfg
        return make_targets(out.layer_results[-c.encoder.depth:], c.average_top_k_layers,    # main blocks
                            instance_norm_target_layer=c.instance_norm_target_layer,
                            layer_norm_target_layer=c.layer_norm_target_layer,
                            layer_norm_targets=c.layer_norm_targets,
                            instance_norm_targets=c.instance_norm_targets)

    def _teacher_output(self, source, raw_padding_mask, x_local, padding_mask) -> EncoderOutput:
        """Teacher forward on the unmasked input; what it shares with the student is METHOD.md#teacher's table."""
        teacher: Encoder = self.teacher.compute
        if self.teacher_shares == "nothing":
            prepared = teacher.prepare(*teacher.local_features(source, raw_padding_mask))
        elif self.teacher_shares == "local_encoder":
            prepared = teacher.prepare(x_local, None, padding_mask)
        else:
            prepared = self.student.prepare(x_local, None, padding_mask)
        return teacher.run_blocks(prepared, "block" if self.cfg.end_of_block_targets else "ffn")

    def _diagnostics(self, pred: torch.Tensor, target: torch.Tensor, sample_size: int,
                     mask: torch.Tensor) -> dict[str, Any]:
        """target_var / pred_var: per-dimension std over masked tokens, averaged over D (fairseq's
        ``compute_var``). Values stay on the device: the engine reads them at logging intervals, where
        :meth:`check_health` looks at them."""
        return {"target_var": feature_std(target), "pred_var": feature_std(pred),
                "masked_pct": sample_size / mask.numel()}

    @torch.no_grad()
    def log_snapshot(self) -> dict[str, Any]:
        """Read at logging intervals: student and teacher weight norms (fairseq's model_norm / ema_norm) and
        ``ema_decay``, the tau of the teacher's last EMA step (a host value the forward does not read, so a
        compiled forward does not depend on it)."""
        norm = lambda module: torch.stack(torch._foreach_norm([p.detach() for p in module.parameters()])).norm()
        return {"model_norm": norm(self.student), "ema_norm": norm(self.teacher.model), "ema_decay": self.current_decay}

    # ---- entry points for exact comparisons with the official implementation ----------------------
    @torch.no_grad()
    def extract_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                         teacher: bool = False) -> EncoderOutput:
        """Unmasked forward of the student (or teacher) returning the final output and every block's
        FFN output (``layer_results``, extra tokens removed). Call ``eval()`` first for determinism."""
        if not teacher:
            return self.student(source, padding_mask)
        x, pm = self.student.local_features(source, padding_mask)
        return self._teacher_output(source, padding_mask, x, pm)


# The settings per preset (the paper's Base, tiny, smoke, gpu) are in d2v2/presets/<preset>.yaml.
for _modality in MODALITIES:
    register_method(_modality, "data2vec2", Data2Vec2Config)(Data2Vec2)
