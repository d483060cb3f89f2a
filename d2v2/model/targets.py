"""Teacher targets (METHOD.md#targets): the average of the top-K layer results, normalised.

data2vec 2.0 default: each of the K FFN outputs is instance-normalised (every channel over time,
within each sample, no affine, eps 1e-5, fp32), the K are averaged, and images add a final
parameter-free LayerNorm over channels ("IN -> AVG -> LN"; speech and text: "IN -> AVG").
Instance norm statistics include every position, so the input must not be padded (pretraining batches
are cropped or fixed-length, METHOD.md#targets-are-ffn-outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["make_targets", "position_share", "feature_std"]


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)          # (B, T, D): over T per (b, d)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def make_targets(layer_results: list[torch.Tensor], top_k: int, *, instance_norm_target_layer: bool = True,
                 layer_norm_target_layer: bool = False, layer_norm_targets: bool = False,
                 instance_norm_targets: bool = False) -> torch.Tensor:
    """(B, T, D) fp32 targets from per-layer (B, T, D) results (extra tokens already removed).

    Per layer: instance norm (``instance_norm_target_layer``) or parameter-free LayerNorm
    (``layer_norm_target_layer``, data2vec 1.0 text / text L); after averaging: LayerNorm
    (``layer_norm_targets``, images) and/or instance norm (``instance_norm_targets``)."""
    if not 1 <= top_k <= len(layer_results):
        raise ValueError(f"average_top_k_layers={top_k} but the teacher produced {len(layer_results)} layers")
    if instance_norm_target_layer and layer_norm_target_layer:
        raise ValueError("choose one per-layer target normalisation (instance or layer norm), not both")
    with torch.autocast(layer_results[0].device.type, enabled=False):
        layers = [y.float() for y in layer_results[-top_k:]]
        if instance_norm_target_layer:
            layers = [_instance_norm(y) for y in layers]
        elif layer_norm_target_layer:
            layers = [_layer_norm(y) for y in layers]
        y = torch.stack(layers).mean(0)
        if layer_norm_targets:
            y = _layer_norm(y)
        if instance_norm_targets:
            y = _instance_norm(y)
    return y


def position_share(y: torch.Tensor) -> torch.Tensor:
    """Share of the targets' variance that their position alone explains: 0 when the (B, T, D) targets
    do not depend on the position, 1 when every sample gets the same target at a position. A collapse
    towards positional targets (METHOD.md#hidden-collapse's kind: invisible in the loss and ``target_var``)
    shows here. Bias-corrected for the batch size B: the mean of B samples is noisy even without
    positional structure."""
    B = y.shape[0]
    y = y - y.mean((0, 1), keepdim=True)
    raw = B * y.mean(0).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12)     # 1/B without structure
    return (raw - 1 / B) / (1 - 1 / B)


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """The collapse signal of fairseq's ``compute_var`` (``target_var``, ``pred_var``): each column's std over
    the rows of (N, D) ``x`` (unbiased, + 1e-6 under the root), averaged over columns; 0 with fewer than 2 rows.
    Stays on the device, so logging it does not wait for the step. Two passes instead of ``x.var(0)``, which
    reduces across a strided axis, slowly on a CPU (docs/BENCHMARKS.md#ours-against-fairseq)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_zeros(())
    centred = x - x.mean(0)
    return torch.sqrt(centred.square_().sum(0) / (x.shape[0] - 1) + 1e-6).mean()     # squared in place: one pass less
