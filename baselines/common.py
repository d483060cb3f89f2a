"""What the baselines share: token counting and small diagnostics. (The one backbone every method trains at
a preset, so that a comparison measures the method, is the preset's ``encoders`` section, d2v2/presets/.)"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from d2v2.model.encoder import EncoderConfig
from d2v2.model.modalities.speech import frame_count

__all__ = ["num_tokens", "eval_mode", "ensure_masked"]


def ensure_masked(batch: dict[str, torch.Tensor], masker, needs: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``batch`` if it carries masks (and the ``needs`` keys a masker adds), else ``batch`` masked by
    ``masker`` with a seed drawn from torch's global RNG (so tests can call ``forward`` directly)."""
    if "mask" not in batch:
        return masker(batch, torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)))))
    missing = [k for k in needs if k not in batch]
    if missing:
        raise ValueError(f"the batch has 'mask' but not {missing}: build text batches with the method's masker()")
    return batch


def num_tokens(cfg: EncoderConfig, source: torch.Tensor) -> int:
    """Tokens per sample the encoder makes of ``source`` (patches, CNN frames or BPE tokens), no CLS."""
    if cfg.modality == "image":
        return cfg.image.grid ** 2
    if cfg.modality == "speech":
        return int(frame_count(source.shape[-1], cfg.speech.conv_layers))
    return source.shape[-1]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode (no dropout) and restore their previous modes afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
