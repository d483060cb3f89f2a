"""Load official fairseq data2vec 2.0 checkpoints (``Data2VecMultiModel``) into :class:`Data2Vec2`.

``python -m d2v2 convert --checkpoint in.pt --out ours.pt [--trust-pickle] [--encoder-only]`` writes a
checkpoint in the pretraining runner's format (:mod:`d2v2.engine.checkpoint`), so
``python -m d2v2 finetune --checkpoint ours.pt`` uses it unchanged. Python API:

- :func:`convert` ``(path or loaded dict) -> (Data2Vec2 | Encoder, ConversionInfo)``;
- :func:`load_fairseq` ``(path) -> dict`` in the runner's checkpoint layout (what
  ``finetune --checkpoint-format fairseq`` calls);
- :func:`read_fairseq_checkpoint` the safe file reader.

What a fairseq checkpoint holds (examples/data2vec/models/data2vec2.py and modalities/*.py):
``model`` = the student's state dict (main ``blocks.{i}``; per modality ``modality_encoders.<MOD>.``
``local_encoder``, ``project_features`` (audio), ``relative_positional_encoder`` (audio),
``fixed_positional_encoder.positions`` (image), ``extra_tokens``, ``alibi_scale``, ``context_encoder``
(LN + prenet blocks) and ``decoder``) plus ``_ema``, the teacher's fp32 state dict (the model without
decoders, without the local encoder when ``ema_local_encoder`` is false; only the main ``blocks`` when
``ema_encoder_only``); ``cfg["model"]`` = the Data2VecMultiConfig fields (a plain dict since fairseq
saves ``OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)``).

Layout differences handled here (documented conversions, everything else is a 1:1 copy):

- fairseq keeps prenet blocks in ``context_encoder.blocks``; ours are ``blocks[:prenet_depth]`` followed
  by the main blocks;
- ``alibi_scale`` of old checkpoints is 4-D (fairseq's ``upgrade_state_dict_named`` unsqueezes it); a
  scale shared by all heads (``learned_alibi_scale_per_head: false``) is expanded to one per head (same
  function);
- ``fixed_positional_encoder.positions`` (image) is a frozen sin-cos table that our model recomputes: it
  is checked against ours and then dropped;
- with ``ema_encoder_only`` (text) the teacher's prenet blocks, if any, are the student's (fairseq runs
  the student's context encoder for the teacher).

Every key must be used: unmapped or missing keys and shape mismatches raise :class:`ConversionError`
naming them. Settings our model cannot express (pre-LN blocks, whose fairseq ``AltBlock`` drops the
attention residual in its MLP branch; per-layer ALiBi scales; a non-affine LayerNorm; the group-norm
CNN; Transformer decoders; ...) are refused rather than approximated.
"""
from __future__ import annotations

import argparse
import ast
import collections
import enum
import pickle
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from d2v2.config import ConfigError, get_dotted, validate
from d2v2.data.common import sha256_file
from d2v2.data2vec2 import Data2Vec2, Data2Vec2Config
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.engine.checkpoint import CheckpointError, pretraining_checkpoint, save_checkpoint

__all__ = ["ConversionError", "ConversionInfo", "MODALITIES", "FAIRSEQ_MODALITY", "read_fairseq_checkpoint", "fairseq_model_config",
           "data2vec2_config", "convert", "to_checkpoint", "load_fairseq", "main"]

MODALITIES = {"IMAGE": "image", "AUDIO": "speech", "TEXT": "text"}    # fairseq's Modality -> ours
FAIRSEQ_MODALITY = {ours: theirs for theirs, ours in MODALITIES.items()}   # config key: its lower case
BLOCK_PARAMS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                for p in ("weight", "bias")]


class ConversionError(ValueError):
    """The fairseq checkpoint cannot be converted faithfully; the message names the keys/settings."""


@dataclass
class ConversionInfo:
    """What the conversion did, for the report and the written checkpoint."""

    modality: str
    config_path: str                                 # where in ``cfg`` the model config was found
    prefix: str                                      # prefix of the encoder's keys in ``model``
    teacher: str                                     # "_ema", "student (no _ema)", or "none"
    dropped: dict[str, str] = field(default_factory=dict)      # fairseq key -> why it was not loaded
    notes: list[str] = field(default_factory=list)
    num_updates: int | None = None
    seed: int | None = None


# ----------------------------------------------------------------------------------------------------
# Reading the file safely
# ----------------------------------------------------------------------------------------------------
def _inert_globals() -> list:
    """Classes/functions a fairseq checkpoint may reference that only rebuild plain data: argparse
    namespaces (legacy ``args``), numpy arrays/scalars (meters in ``extra_state``), builtin containers
    (e.g. a defaultdict's factory) and, when omegaconf is installed, its config containers. Nothing here
    runs code chosen by the file."""
    allowed: list = [argparse.Namespace, collections.defaultdict, dict, list, tuple, set, int, float, str, bool]
    core = getattr(np, "_core", None) or np.core
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core.multiarray._reconstruct, f"{module}._reconstruct"),
                    (core.multiarray.scalar, f"{module}.scalar")]
    allowed += [np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        import omegaconf
        from omegaconf import base, nodes
    except ImportError:
        return allowed
    allowed += [omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata,
                nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
                nodes.EnumNode, typing.Any]
    return allowed


def read_fairseq_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` a fairseq checkpoint with ``weights_only=True`` plus :func:`_inert_globals`.

    A file referencing anything else is refused with the names of those globals; ``trust_pickle=True``
    (``--trust-pickle``) does a full unpickle, which can execute arbitrary code: only for files from a
    source you trust (e.g. dl.fbaipublicfiles.com)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"fairseq checkpoint not found: {path}")
    if trust_pickle:
        warnings.warn(f"{path}: full unpickle (trust_pickle=True) can run code stored in the file", stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as err:
            raise CheckpointError(f"{path}: the pickle needs module '{err.name}', which is not installed "
                                  "(install it, e.g. omegaconf, to unpickle this file)") from None
    with torch.serialization.safe_globals(_inert_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            try:
                unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be scanned
                unsafe = ""
            unsafe = unsafe or str(err).splitlines()[-1]
        except Exception as err:  # noqa: BLE001 - truncated / not a torch file
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    raise CheckpointError(
        f"{path}: refusing to unpickle objects that are not plain data: {unsafe}. Unpickling "
        "them can execute arbitrary code. If you trust where the file comes from, pass --trust-pickle "
        "(Python: trust_pickle=True).")


# ----------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """OmegaConf containers / enums / mappings -> plain dicts, lists and strings."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_UNRESOLVED = object()


def _resolve(node: Any, scope: dict) -> Any:
    """Resolve ``${a.b}`` interpolations (left in a config saved without ``resolve=True``) against the
    config they belong to; one that does not resolve stays a string (validation then names the key)."""
    if isinstance(node, dict):
        return {k: _resolve(v, scope) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, scope) for v in node]
    if isinstance(node, str) and node.startswith("${") and node.endswith("}"):
        target = get_dotted(scope, node[2:-1], _UNRESOLVED)
        return node if target is _UNRESOLVED else _resolve(target, scope)
    return node


def fairseq_model_config(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The Data2VecMultiConfig dict of a checkpoint and where it was found: ``cfg.model`` for
    pretraining checkpoints, a nested ``<x>.model`` for fine-tuned ones (e.g. ``w2v_args``,
    ``pretrained_model_args``), or ``cfg`` itself in a state dict saved with the model config alone."""
    if ckpt.get("cfg") is None:
        raise ConversionError("checkpoint has no 'cfg' (pre-2021 fairseq 'args' checkpoints are not data2vec 2.0)")
    root = _plain(ckpt["cfg"])
    found: list[tuple[str, dict, dict]] = []

    def search(node: Any, where: str, scope: dict) -> None:
        if isinstance(node, dict):
            if {"modalities", "embed_dim", "depth"} <= node.keys():
                found.append((where, node, scope))
                return
            for k, v in node.items():             # a nested full config (one with 'model') is a new scope
                search(v, f"{where}.{k}", node if "model" in node else scope)

    search(root.get("model"), "cfg.model", root)
    if not found and {"modalities", "embed_dim", "depth"} <= root.keys():     # the model config is ``cfg`` itself
        found.append(("cfg", root, root))
    if not found:
        raise ConversionError("no data2vec 2.0 model config (a dict with 'modalities', 'embed_dim', 'depth') "
                              "under cfg.model: not a data2vec_multi checkpoint")
    where, cfg, scope = found[0]
    return _resolve(cfg, scope), where


def _conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``feature_encoder_spec`` (list/tuple literals, ``+`` and ``*`` only) without eval."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ConversionError(f"feature_encoder_spec: unsupported expression {ast.dump(node)[:60]}")

    layers = ev(ast.parse(spec, mode="eval"))
    if not (isinstance(layers, list) and all(isinstance(t, tuple) and len(t) == 3 for t in layers)):
        raise ConversionError(f"feature_encoder_spec {spec!r} is not a list of (dim, kernel, stride)")
    return [tuple(int(v) for v in t) for t in layers]


def _modality(cfg: dict, state: Mapping[str, Any]) -> str:
    name = cfg.get("supported_modality")
    if name is None:
        present = {k.split("modality_encoders.")[1].split(".")[0] for k in state if "modality_encoders." in k}
        if len(present) != 1:
            raise ConversionError(f"supported_modality is unset and the weights hold modality encoders "
                                  f"{sorted(present)}: only single-modality models can be converted")
        name = present.pop()
    name = str(name).split(".")[-1].upper()
    if name not in MODALITIES:
        raise ConversionError(f"supported_modality {name!r} is not one of {sorted(MODALITIES)}")
    return MODALITIES[name]


def _require(settings: dict, where: str, **expected: Any) -> None:
    """Refuse settings our model cannot express (fairseq defaults are what we implement)."""
    bad = [f"{where}{k}={settings[k]!r} (supported: {v!r})" for k, v in expected.items()
           if k in settings and settings[k] != v]
    if bad:
        raise ConversionError("unsupported fairseq settings: " + "; ".join(bad))


def data2vec2_config(cfg: dict[str, Any], state: Mapping[str, Any], prefix: str = "",
                     encoder_only: bool = False) -> tuple[Data2Vec2Config | EncoderConfig, list[str]]:
    """Map Data2VecMultiConfig fields onto our config (the Data2Vec2Config, or only the EncoderConfig
    when ``encoder_only``); returns it and notes about approximations."""
    modality = _modality(cfg, state)
    key = FAIRSEQ_MODALITY[modality].lower()
    if not isinstance(cfg["modalities"].get(key), dict):
        raise ConversionError(f"config has no modalities.{key} section")
    mod = dict(cfg["modalities"][key])
    where = f"modalities.{key}."
    notes: list[str] = []
    _require(cfg, "", layer_norm_first=False, norm_affine=True, loss_beta=0, recon_loss=0, d2v_loss=1,
             batch_norm_target_layer=False, shared_decoder=None)
    if modality != "speech":
        _require(mod, where, use_alibi_encoder=False)
    _require(mod, where, learned_alibi=False, learned_alibi_scale_per_layer=False,
             transformer_decoder=False, fixed_positions=True, extractor_mode="layer_norm",
             conv_pos_pre_ln=False, learned_pos=True, no_scale_embedding=True, layernorm_embedding=True,
             no_token_positional_embeddings=False, encoder_zero_mask=True)
    ignored = {k: mod[k] for k, v in {"mask_prob_min": None, "keep_masked_pct": 0, "mask_dropout": 0.0,
                                       "add_masks": False, "mask_channel_prob": 0.0}.items()
               if mod.get(k, v) != v}
    if ignored:
        notes.append(f"training-only masking options not implemented (weights unaffected): {ignored}")
    prenet = int(mod.get("prenet_depth", 4))                 # fairseq's D2vModalityConfig default
    drop_path = max(float(cfg.get("end_drop_path_rate", 0)), float(mod.get("end_drop_path_rate", 0)))
    if cfg.get("dropout_input", 0):
        notes.append(f"dropout_input={cfg['dropout_input']} (dropout after the context encoder) is not implemented")
    ends = {float(cfg.get("end_drop_path_rate", 0))} | ({float(mod.get("end_drop_path_rate", 0))} if prenet else set())
    if cfg.get("start_drop_path_rate", 0) or mod.get("start_drop_path_rate", 0) or len(ends) > 1:
        notes.append(f"drop-path rises linearly 0 -> {drop_path} over all blocks (fairseq: per stage)")
    enc: dict[str, Any] = {
        "modality": modality, "embed_dim": cfg["embed_dim"], "num_heads": cfg.get("num_heads", 12),
        "depth": cfg["depth"], "prenet_depth": prenet, "mlp_ratio": cfg.get("mlp_ratio", 4.0),
        "norm_eps": cfg.get("norm_eps", 1e-6), "layer_norm_first": False,
        "dropout": cfg.get("encoder_dropout", 0.1), "attention_dropout": cfg.get("attention_dropout", 0.1),
        "activation_dropout": cfg.get("activation_dropout", 0.0), "post_mlp_dropout": cfg.get("post_mlp_drop", 0.1),
        "prenet_dropout": mod.get("prenet_dropout", 0.0) if prenet or modality != "text" else 0.0,
        "drop_path": drop_path,
        "layerdrop": cfg.get("layerdrop", 0.0), "prenet_layerdrop": mod.get("prenet_layerdrop", 0.0)}
    P = f"{prefix}modality_encoders.{FAIRSEQ_MODALITY[modality]}."
    if modality == "image":
        if mod.get("embed_dim", cfg["embed_dim"]) != cfg["embed_dim"]:
            raise ConversionError(f"{where}embed_dim {mod['embed_dim']} != embed_dim {cfg['embed_dim']} "
                                  "(patch embedding followed by a Linear) is not supported")
        enc["image"] = {"img_size": mod.get("input_size", 224), "patch_size": mod.get("patch_size", 16),
                        "in_chans": mod.get("in_chans", 3), "num_extra_tokens": mod.get("num_extra_tokens", 0)}
    elif modality == "speech":
        enc["speech"] = {"conv_layers": _conv_spec(mod.get("feature_encoder_spec", "[(512, 10, 5)] + "
                                                           "[(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")),
                        "conv_pos_width": mod.get("conv_pos_width", 95), "conv_pos_depth": mod.get("conv_pos_depth", 5),
                        "conv_pos_groups": mod.get("conv_pos_groups", 16),
                        "use_alibi": bool(mod.get("use_alibi_encoder", False)),
                        "alibi_scale": mod.get("alibi_scale", 1.0)}
        if enc["speech"]["use_alibi"] and not mod.get("learned_alibi_scale", False):
            notes.append("alibi_scale is frozen in fairseq (learned_alibi_scale: false) but a parameter here")
    else:
        emb = state.get(P + "local_encoder.embed_tokens.weight")
        pos = state.get(P + "local_encoder.embed_positions.weight")
        if emb is None or pos is None:
            raise ConversionError(f"missing keys {P}local_encoder.embed_tokens/embed_positions.weight "
                                  "(needed for the vocabulary size)")
        max_pos = int(mod.get("max_source_positions", 512))
        enc["text"] = {"vocab_size": emb.shape[0], "max_positions": max_pos,
                       "pad_idx": pos.shape[0] - max_pos - 1, "dropout": mod.get("dropout", 0.1)}
        if enc["norm_eps"] != 1e-5:
            notes.append(f"embedding LayerNorm uses norm_eps {enc['norm_eps']} (fairseq: 1e-5)")
    if encoder_only:
        return validate(EncoderConfig, enc, where="encoder"), notes

    dec = mod.get("decoder")
    if dec is None:
        raise ConversionError(f"{where}decoder is None (a fine-tuning checkpoint?): use encoder_only / --encoder-only")
    if dec.get("add_positions_masked") or dec.get("add_positions_all"):
        raise ConversionError(f"{where}decoder.add_positions_*: positional decoder inputs are not supported")
    layers, ratio = int(dec.get("projection_layers", 1)), float(dec.get("projection_ratio", 2.0))
    if layers > 2 or (layers == 2 and ratio != 2.0):
        raise ConversionError(f"{where}decoder.projection_layers={layers}, projection_ratio={ratio}: "
                              "supported are 1 layer, or 2 with ratio 2")
    ema_only, ema_local = cfg.get("ema_encoder_only", True), mod.get("ema_local_encoder", False)
    full = {
        "encoder": enc,
        "decoder": {"dim": dec.get("decoder_dim", 384), "kernel": dec.get("decoder_kernel", 5),
                    "groups": dec.get("decoder_groups", 16), "depth": dec.get("decoder_layers", 5),
                    "residual": dec.get("decoder_residual", True), "input_dropout": dec.get("input_dropout", 0.1),
                    "head_layers": layers},
        "num_masks": cfg.get("clone_batch", 1), "mask_ratio": mod.get("mask_prob", 0.7),
        "mask_width": mod.get("mask_length", 5), "mask_adjust": mod.get("mask_prob_adjust", 0.0),
        "inverse_mask": mod.get("inverse_mask", False), "mask_noise_std": mod.get("mask_noise_std", 0.01),
        "average_top_k_layers": cfg.get("average_top_k_layers", 8),
        **{k: cfg.get(k, False) for k in ("instance_norm_target_layer", "layer_norm_target_layer",
                                          "layer_norm_targets", "instance_norm_targets", "end_of_block_targets")},
        "loss_scale": cfg.get("loss_scale"), "cls_loss": cfg.get("cls_loss", 0.0),
        "ema_decay": cfg.get("ema_decay", 0.999), "ema_end_decay": cfg.get("ema_end_decay", 0.9999),
        "ema_anneal_end_step": cfg.get("ema_anneal_end_step", cfg.get("max_update", 0)),
        "teacher_shares": "embeddings" if ema_only else ("nothing" if ema_local else "local_encoder"),
        "local_grad_mult": mod.get("local_grad_mult", 1.0),
        "min_target_var": cfg.get("min_target_var", 0.1), "min_pred_var": cfg.get("min_pred_var", 0.01)}
    return validate(Data2Vec2Config, full, where="converted"), notes


# ----------------------------------------------------------------------------------------------------
# The weights
# ----------------------------------------------------------------------------------------------------
def _encoder_pairs(cfg: EncoderConfig) -> list[tuple[str, str]]:
    """(our Encoder key, fairseq key relative to Data2VecMultiModel) for every encoder tensor."""
    P, pairs = f"modality_encoders.{FAIRSEQ_MODALITY[cfg.modality]}.", []
    for j in range(cfg.prenet_depth):
        pairs += [(f"blocks.{j}.{p}", f"{P}context_encoder.blocks.{j}.{p}") for p in BLOCK_PARAMS]
    for i in range(cfg.depth):
        pairs += [(f"blocks.{cfg.prenet_depth + i}.{p}", f"blocks.{i}.{p}") for p in BLOCK_PARAMS]
    wb = ("weight", "bias")
    if cfg.modality == "image":
        pairs += [(f"local_encoder.proj.{p}", f"{P}local_encoder.proj.{p}") for p in wb]
        if cfg.image.num_extra_tokens:
            pairs.append(("context_encoder.extra_tokens", f"{P}extra_tokens"))
    elif cfg.modality == "speech":
        for i in range(len(cfg.speech.conv_layers)):       # wav2vec 2.0 CNN: (conv, dropout, (T, LN, T), GELU)
            ours, theirs = f"local_encoder.feature_extractor.{i}", f"{P}local_encoder.conv_layers.{i}"
            pairs.append((f"{ours}.conv.weight", f"{theirs}.0.weight"))
            pairs += [(f"{ours}.norm.{p}", f"{theirs}.2.1.{p}") for p in wb]
        pairs += [(f"local_encoder.project_features.{k}.{p}", f"{P}project_features.{k + 1}.{p}")
                  for k in (0, 1) for p in wb]
        pairs += [(f"context_encoder.relative_positional_encoder.{k}.conv.{p}",   # index 0: TransposeLast
                   f"{P}relative_positional_encoder.{k + 1}.0.{p}")
                  for k in range(cfg.speech.conv_pos_depth) for p in wb]
        if cfg.speech.use_alibi:
            pairs.append(("context_encoder.alibi_scale", f"{P}alibi_scale"))
    else:
        pairs += [(f"local_encoder.{n}.weight", f"{P}local_encoder.{n}.weight")
                  for n in ("embed_tokens", "embed_positions")]
        pairs += [(f"local_encoder.layernorm_embedding.{p}", f"{P}local_encoder.layernorm_embedding.{p}") for p in wb]
    ctx_norm = not (cfg.modality == "text" and cfg.prenet_depth == 0)
    if ctx_norm:
        pairs += [(f"context_encoder.norm.{p}", f"{P}context_encoder.norm.{p}") for p in wb]
    return pairs


def _fit(name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Documented layout conversions (alibi_scale); otherwise the tensor itself."""
    if name.endswith("alibi_scale"):
        if value.dim() == 4:                            # pre-upgrade checkpoints (H dims without the layer dim)
            value = value.unsqueeze(0)
        if value.dim() == 5 and value.shape[0] == 1 and value.shape[2] == 1:
            value = value.expand(target.shape)          # one scale shared by every head
    return value


class _Loader:
    """Copies fairseq tensors into a state dict, recording what was used and every problem."""

    def __init__(self, source: Mapping[str, torch.Tensor], label: str):
        self.source, self.label, self.used = source, label, set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def take(self, ours: str, theirs: str, target: torch.Tensor) -> torch.Tensor | None:
        if theirs not in self.source:
            self.missing.append(f"{self.label}{theirs}")
            return None
        self.used.add(theirs)
        value = _fit(theirs, self.source[theirs], target)
        if tuple(value.shape) != tuple(target.shape):
            self.mismatched.append(f"{self.label}{theirs} {tuple(self.source[theirs].shape)} -> {ours} "
                                   f"{tuple(target.shape)}")
            return None
        return value.to(target.dtype)

    def unused(self) -> list[str]:
        return [f"{self.label}{k}" for k in self.source if k not in self.used]


def _find_prefix(state: Mapping[str, Any]) -> str:
    prefixes = {k[: k.index("modality_encoders.")] for k in state if "modality_encoders." in k}
    if len(prefixes) != 1:
        raise ConversionError(f"cannot locate the data2vec 2.0 encoder in the weights (prefixes of "
                              f"'modality_encoders.': {sorted(prefixes) or 'none'})")
    return prefixes.pop()


def convert(source: str | Path | Mapping[str, Any], *, trust_pickle: bool = False,
            encoder_only: bool = False) -> tuple[Data2Vec2 | Encoder, ConversionInfo]:
    """A fairseq data2vec 2.0 checkpoint (path or loaded dict) -> our model with its weights.

    Full mode: :class:`Data2Vec2` with student, decoder and teacher (``_ema``; without it the teacher is
    the student, with a warning). ``encoder_only``: the student :class:`Encoder` alone (fine-tuned
    checkpoints, or to drop the decoder/teacher); the keys it leaves out are listed in ``info.dropped``.
    """
    ckpt = read_fairseq_checkpoint(source, trust_pickle) if isinstance(source, (str, Path)) else source
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ConversionError("not a fairseq checkpoint: expected a dict with a 'model' state dict")
    state = dict(ckpt["model"])
    ema = state.pop("_ema", None)
    mcfg, where = fairseq_model_config(ckpt)
    prefix = _find_prefix(state)
    cfg, notes = data2vec2_config(mcfg, state, prefix, encoder_only)
    enc_cfg = cfg if encoder_only else cfg.encoder
    modality = enc_cfg.modality
    P = f"{prefix}modality_encoders.{FAIRSEQ_MODALITY[modality]}."
    info = ConversionInfo(modality, where, prefix, "none", notes=notes, seed=_seed(ckpt),
                          num_updates=_num_updates(ckpt))

    model: Data2Vec2 | Encoder = Encoder(enc_cfg) if encoder_only else Data2Vec2(cfg)
    ours = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    student = _Loader(state, "model.")
    enc_pairs = _encoder_pairs(enc_cfg)
    student_prefix = "" if encoder_only else "student."
    for o, t in enc_pairs:
        new[student_prefix + o] = student.take(student_prefix + o, prefix + t, ours[student_prefix + o])

    _check_positions(state, P, model if encoder_only else model.student, student, info)
    if encoder_only:
        encoder_keys = (P, prefix + "blocks.", prefix + "norm.")
        leftover = []
        for k in student.unused():
            raw = k[len(student.label):]
            if raw.startswith(encoder_keys) and not raw.startswith(P + "decoder."):
                leftover.append(k)                      # an encoder weight we cannot place: refuse
            else:
                info.dropped[k] = "not part of the encoder (pretraining decoder or fine-tuning head)"
        _raise_problems([student], leftover)
        if ema is not None:
            info.dropped["model._ema"] = "teacher not needed for the encoder"
    else:
        for k in range(cfg.decoder.depth):
            for p in ("weight", "bias"):
                o = f"decoder.blocks.{k}.conv.{p}"
                new[o] = student.take(o, f"{P}decoder.blocks.{k}.0.{p}", ours[o])
        for o in ours:
            if o.startswith("decoder.proj."):
                new[o] = student.take(o, f"{P}decoder.proj.{o[len('decoder.proj.'):]}", ours[o])
        _raise_problems([student], student.unused())
        teacher = _teacher(model, cfg, enc_pairs, ema, new, ours, info)
        _raise_problems(teacher, [k for ld in teacher for k in ld.unused()])
    model.load_state_dict(new, strict=True)
    return model, info


def _teacher(model: Data2Vec2, cfg: Data2Vec2Config, enc_pairs, ema, new, ours,
             info: ConversionInfo) -> list[_Loader]:
    """Fill ``teacher.model.*`` from ``_ema`` (fairseq names relative to the EMA copy)."""
    names = dict(enc_pairs)
    teacher_keys = [k for k in ours if k.startswith("teacher.model.")]
    if ema is None:
        warnings.warn("fairseq checkpoint has no '_ema' teacher: the teacher starts as a copy of the student",
                      stacklevel=3)
        info.teacher = "student (no _ema)"
        for k in teacher_keys:
            new[k] = new["student." + k[len("teacher.model."):]]
        return []
    info.teacher = "_ema"
    loader = _Loader(ema, "model._ema.")
    encoder_only = model.teacher_shares == "embeddings"
    for k in teacher_keys:
        rel = k[len("teacher.model."):]
        theirs = names[rel]
        if encoder_only:
            if not theirs.startswith("blocks."):    # prenet blocks: fairseq runs the student's
                new[k] = new["student." + rel]
                info.notes.append(f"teacher {rel} = student's (ema_encoder_only)")
                continue
            theirs = theirs[len("blocks."):]
        new[k] = loader.take(k, theirs, ours[k])
    pos = f"modality_encoders.{FAIRSEQ_MODALITY[cfg.encoder.modality]}.fixed_positional_encoder.positions"
    if pos in ema:
        _check_positions(ema, pos[: -len("fixed_positional_encoder.positions")], model.teacher.model, loader, info)
    return [loader]


def _check_positions(state, P: str, encoder: Encoder, loader: _Loader, info: ConversionInfo) -> None:
    """Image: fairseq stores its frozen sin-cos table; ours recomputes it. Check equality, then drop."""
    key = f"{P}fixed_positional_encoder.positions"
    if key not in state:
        return
    loader.used.add(key)
    ours = encoder.local_encoder.pos_embed
    theirs = state[key].float()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
        raise ConversionError(f"{loader.label}{key}: the fixed positional table {tuple(theirs.shape)} differs "
                              f"from our 2-D sin-cos table {tuple(ours.shape)}")
    info.dropped[loader.label + key] = "frozen 2-D sin-cos table, equal to the one our model recomputes"


def _raise_problems(loaders: list[_Loader], unused: list[str]) -> None:
    missing = [k for ld in loaders for k in ld.missing]
    mismatched = [k for ld in loaders for k in ld.mismatched]
    parts = []
    if missing:
        hint = (" (no decoder: a fine-tuned checkpoint? use encoder_only / --encoder-only)"
                if any(".decoder." in k for k in missing) else "")
        parts.append(f"missing keys{hint}: {', '.join(missing)}")
    if mismatched:
        parts.append(f"shape mismatches: {', '.join(mismatched)}")
    if unused:
        parts.append(f"unmapped keys: {', '.join(unused)}")
    if parts:
        raise ConversionError("fairseq checkpoint does not fit the model its config describes: " + "; ".join(parts))


def _seed(ckpt: Mapping[str, Any]) -> int | None:
    common = _plain(ckpt.get("cfg") or {}).get("common") or {}
    return common.get("seed") if isinstance(common, dict) else None


def _num_updates(ckpt: Mapping[str, Any]) -> int | None:
    history = ckpt.get("optimizer_history") or []
    return history[-1].get("num_updates") if history and isinstance(history[-1], Mapping) else None


# ----------------------------------------------------------------------------------------------------
# Our checkpoint format
# ----------------------------------------------------------------------------------------------------
def to_checkpoint(model: Data2Vec2 | Encoder, info: ConversionInfo, source: str = "") -> dict[str, Any]:
    """The pretraining runner's checkpoint layout (the keys fine-tuning reads, docs/ARCHITECTURE.md).

    A released model has no clocks the harness measured: they are None (``updates`` from fairseq's
    optimizer history when present), so its metrics cannot enter the time-to-target analysis."""
    clocks = {k: None for k in ("train_time_s", "e2e_time_s", "device_hours", "device_count", "samples", "epochs",
                                "train_cpu_s")}
    return pretraining_checkpoint(
        identity={"modality": info.modality, "method": "data2vec2", "preset": None, "seed": info.seed},
        method_config=None if isinstance(model, Encoder) else model.cfg.model_dump(mode="json"),
        encoder=model if isinstance(model, Encoder) else model.student,
        encoder_prefix="" if isinstance(model, Encoder) else "student.", model=model.state_dict(),
        pretrain={**clocks, "updates": info.num_updates, "tokens": None}, budget_fraction=1.0,
        fraction_consumed=1.0, provenance=None,
        converted_from={"format": "fairseq", "source": source, "teacher": info.teacher,
                        "config_path": info.config_path, "prefix": info.prefix, "dropped": info.dropped,
                        "notes": info.notes})


def load_fairseq(path: str | Path, *, trust_pickle: bool = False, encoder_only: bool = True) -> dict[str, Any]:
    """Convert ``path`` in memory and return it in the runner's checkpoint layout: what
    ``finetune --checkpoint-format fairseq`` reads. Encoder only by default (all fine-tuning needs, and
    it also accepts fine-tuned fairseq checkpoints without decoder or teacher)."""
    model, info = convert(path, trust_pickle=trust_pickle, encoder_only=encoder_only)
    return to_checkpoint(model, info, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 convert", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fairseq data2vec 2.0 checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="where to write our checkpoint (atomic)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="fully unpickle the file (can run code in it): only for trusted sources")
    parser.add_argument("--encoder-only", action="store_true",
                        help="keep only the student encoder (fine-tuned checkpoints, or no decoder/teacher)")
    args = parser.parse_args(argv)
    try:
        model, info = convert(args.checkpoint, trust_pickle=args.trust_pickle, encoder_only=args.encoder_only)
    except (ConversionError, CheckpointError, ConfigError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    ckpt = to_checkpoint(model, info, args.checkpoint)
    ckpt["converted_from"]["sha256"] = sha256_file(args.checkpoint)
    save_checkpoint(ckpt, args.out, keep_previous=False)
    params = sum(p.numel() for p in (model if isinstance(model, Encoder) else model.student).parameters())
    print(f"converted {info.modality} data2vec 2.0 ({params / 1e6:.1f}M encoder parameters, teacher: "
          f"{info.teacher}) -> {args.out}")
    for k, why in info.dropped.items():
        print(f"  dropped {k}: {why}")
    for note in info.notes:
        print(f"  note: {note}")
    return 0
