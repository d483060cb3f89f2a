"""Opt-in ``torch.compile`` of a pretraining method (run config ``compile`` and ``compile_mode``).

``blocks`` compiles every Transformer :class:`~d2v2.model.blocks.Block`: fused kernels where a step spends
its arithmetic, with the masking and the targets around them left eager. ``model`` compiles the method's
whole forward (teacher, student, decoder, loss) and, through AOTAutograd, its backward: the form in which
``compile_mode="reduce-overhead"`` replays a step on a GPU as CUDA graphs instead of the host issuing its
~2,000 ATen calls one by one (docs/BENCHMARKS.md, "Why the steps are host-bound"). Where a method branches
on a value of its data (text's padding check on a CPU, layer-drop's draw), the graph breaks there and both
sides are compiled. Compilation happens in place, so state-dict names are unchanged; the engine compiles
after the first update, whose FLOPs are counted eagerly (a module first called under the counter would
stay eager).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from d2v2.model.blocks import Block
from d2v2.model.ema import disable_autocast_copies

__all__ = ["CompileScope", "CompileMode", "compile_model", "replays_cuda_graphs", "mark_step"]

CompileScope = Literal["off", "blocks", "model"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_model(model: nn.Module, scope: CompileScope, mode: CompileMode = "default") -> nn.Module:
    """``torch.compile`` ``model`` in place: its :class:`Block` modules (``blocks``) or its forward (``model``).
    Compiled, an EMA teacher runs its fp32 weights (:func:`~d2v2.model.ema.disable_autocast_copies`)."""
    if scope != "off":
        disable_autocast_copies(model)
    if scope == "blocks":
        for module in model.modules():
            if isinstance(module, Block):
                module.compile(mode=mode)
    elif scope == "model":
        model.compile(mode=mode)
    elif scope != "off":
        raise ValueError(f"compile scope {scope!r}: expected one of off, blocks, model")
    return model


def replays_cuda_graphs(scope: CompileScope, mode: CompileMode, device: torch.device) -> bool:
    """Whether a run compiled so replays CUDA graphs (something compiled, in PyTorch's ``reduce-overhead`` or
    ``max-autotune`` mode, on a GPU)."""
    return scope != "off" and device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def mark_step() -> None:
    """Tell PyTorch's CUDA-graph trees that a new forward/backward begins: the previous one's outputs may be
    overwritten (the engine has summed what it keeps of them by then)."""
    torch.compiler.cudagraph_mark_step_begin()
