"""Cross-check our pretraining methods against the official fairseq code, one training step at a time.

    python scripts/crosscheck_fairseq.py --fairseq /path/to/fairseq [--method all] [--modality text] [--preset tiny]

Each method is run next to the fairseq model it reproduces:

- ``data2vec2`` (image, speech, text): fairseq's ``Data2VecMultiModel`` (examples/data2vec/models/data2vec2.py)
  with the configuration of our preset; ITS freshly initialised weights are converted with our converter
  (``d2v2.interop.fairseq``, so the converter is exercised on a state dict that fairseq itself wrote).
- ``data2vec1`` (text, speech): ``baselines/data2vec1.py`` against fairseq's ``Data2VecTextModel``
  (examples/data2vec/models/data2vec_text.py) and ``Data2VecAudioModel`` (data2vec_audio.py; our encoder without
  ALiBi).
- ``mlm`` (text): ``baselines/mlm.py`` against fairseq's ``RobertaModel`` and its ``masked_lm`` criterion.
- ``bert`` (text): ``baselines/bert.py`` against fairseq's BERT (``MaskedLMModel`` at ``bert_base``: segment
  embeddings, NSP pooler and head) and its ``legacy_masked_lm`` criterion (MLM + NSP).
- ``wav2vec2`` (speech): ``baselines/wav2vec2.py`` against fairseq's ``Wav2Vec2Model`` and its ``wav2vec``
  criterion (InfoNCE), our encoder without ALiBi (fairseq's has none).

The two text baselines train fairseq's RoBERTa encoder (``TransformerEncoder``), wav2vec 2.0 its own; their
weights are copied into ours through the explicit name tables below (separate q/k/v projections -> our
fused ``qkv``). Both sides get the same batch and masks (text baselines: the same BERT-corrupted tokens,
original tokens and loss positions, from our masker; wav2vec 2.0: the same distractors and Gumbel noise),
and for two consecutive training steps the script compares:

- data2vec 2.0 and 1.0: the targets, predictions and per-element regression loss at every masked position,
  and the loss (plus the CLS term for images); MLM: the logits at the selected positions and the loss;
  wav2vec 2.0: the quantised targets, the contrastive logits and the loss;
- the gradient of every parameter;
- after one identical SGD step and each side's EMA update, every teacher weight (data2vec 1.0: also the
  embeddings its teacher reads, which fairseq copies from the student and ours shares with it).

Dropout, layer-drop, drop-path and the decoder's mask noise are set to 0 on both sides (they are random);
everything else is the preset's. A mismatch beyond ``--atol`` exits non-zero and names the tensor.
Before the steps it compares our own initialisation with fairseq's (per-tensor mean and std;
``--skip-init`` skips that).

What it needs: a fairseq checkout (``git clone https://github.com/facebookresearch/fairseq``) and
fairseq's import-time dependencies in the running environment: ``pip install omegaconf hydra-core
bitarray timm`` (and ``scikit-learn``, which only fairseq's other tasks and criterions use: without it, its
names import as placeholders that fail if called). fairseq's released code does not import on Python >= 3.11
(its dataclass configs use instances as mutable defaults); the script therefore imports a temporary copy
of ``fairseq/`` and ``examples/data2vec/`` in which only those defaults are rewritten as
``default_factory`` (no line that computes anything is touched), and ``numpy.float``, an alias of
``float`` that numpy 1.24 removed, is restored. The result measured here is in
docs/FAIRSEQ_CROSSCHECK.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import math
import re
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import baselines.data2vec1
import baselines.hubert
import baselines.wav2vec2
from baselines.bert import Bert
from baselines.data2vec1 import Data2Vec1
from baselines.hubert import Hubert
from baselines.masking import NUM_SPECIAL
from baselines.mlm import MLM
from baselines.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from crosscheck_common import NO_DROPOUT, Report, restore_numpy_float
from d2v2.config import merge
from d2v2.interop.fairseq import FAIRSEQ_MODALITY, convert
from d2v2.data2vec2 import Data2Vec2, Data2Vec2Config
from d2v2.model.encoder import EncoderConfig
from d2v2.method import method_config
from d2v2.model.modalities.text import BOS, EOS, MASK, PAD

TEXT_DROPOUT = {"encoder": {"text": {"dropout": 0.0}}}
DETERMINISTIC = merge(NO_DROPOUT, {"decoder": {"input_dropout": 0.0}, "mask_noise_std": 0.0})


def deterministic(modality: str) -> dict:
    """data2vec 2.0's method-config overrides with every dropout and the mask noise off (text's embedding dropout
    too), so that our step and fairseq's can agree."""
    return merge(DETERMINISTIC, TEXT_DROPOUT) if modality == "text" else DETERMINISTIC

# fairseq anneals the teacher over a count of updates; ours does at base over a budget fraction
UPDATES_ANNEAL = {"ema_anneal_end_fraction": None}


# ---- importing fairseq --------------------------------------------------------------------------------
def importable_fairseq(root: Path, into: Path) -> None:
    """Copy ``fairseq/`` and ``examples/data2vec`` from a checkout into ``into`` and rewrite the dataclass
    defaults Python >= 3.11 refuses (``x: C = C()`` -> ``field(default_factory=C)``)."""
    if not (root / "fairseq" / "__init__.py").is_file() or not (root / "examples" / "data2vec").is_dir():
        raise SystemExit(f"{root} is not a fairseq checkout (needs fairseq/ and examples/data2vec/)")
    shutil.copytree(root / "fairseq", into / "fairseq")
    shutil.copytree(root / "examples" / "data2vec", into / "examples" / "data2vec")
    shutil.copy(root / "examples" / "__init__.py", into / "examples" / "__init__.py")
    instance = re.compile(r"^(\s+\w+: [\w\[\]., ]+) = (\w+Config)\(\)\s*$", re.M)
    in_field = re.compile(r"field\(default=(\w+Config)\(\)\)")
    for path in list((into / "fairseq").rglob("*.py")) + list((into / "examples").rglob("*.py")):
        text = path.read_text()
        new = in_field.sub(r"field(default_factory=\1)", instance.sub(r"\1 = field(default_factory=\2)", text))
        if new != text:                             # after a __future__ import, if there is one
            head, sep, rest = new.rpartition("from __future__ import annotations\n")
            path.write_text(head + sep + "from dataclasses import field\n" + rest)
    init = into / "fairseq" / "dataclass" / "initialize.py"         # hydra_init reads field.default
    text = init.read_text()
    init.write_text(text.replace(
        "v = FairseqConfig.__dataclass_fields__[k].default",
        "f = FairseqConfig.__dataclass_fields__[k]; "
        "v = f.default_factory() if callable(f.default_factory) else f.default"))
    restore_numpy_float()
    for package in UNUSED_IMPORTS:
        try:
            importlib.import_module(package)
        except ImportError:
            sys.meta_path.insert(0, _Placeholders(package))
    sys.path.insert(0, str(into))


# Imported by fairseq modules that data2vec 2.0 and the baselines never run (scikit-learn: metrics of fairseq's
# sentence-prediction criterion and audio-classification task), so where they are not installed (an offline GPU
# machine, benchmarks/offline_bundle.sh) their names import as placeholders that raise if called
UNUSED_IMPORTS = ("sklearn",)


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``package`` and its submodules as modules whose every name is a callable that raises."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, name, path=None, target=None):
        if name != self.package and not name.startswith(self.package + "."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise ImportError(f"{spec.name}.{attr}: {self.package} is not installed (fairseq imported it "
                                  "for code this project does not run)")
            return unavailable
        module.__getattr__ = missing
        return module

    def exec_module(self, module):
        pass


# ---- our config -> fairseq's ----------------------------------------------------------------------------
def fairseq_config(cfg: Data2Vec2Config) -> dict:
    """The Data2VecMultiConfig (as a plain dict) that describes ``cfg``; the converter maps it back."""
    enc, dec, m = cfg.encoder, cfg.decoder, cfg.encoder.modality
    theirs = FAIRSEQ_MODALITY[m]          # fairseq's name of the modality (speech: AUDIO)
    mod = {
        "type": theirs, "prenet_depth": enc.prenet_depth, "prenet_layerdrop": enc.prenet_layerdrop,
        "prenet_dropout": enc.prenet_dropout, "end_drop_path_rate": enc.drop_path,
        "mask_noise_std": cfg.mask_noise_std, "mask_prob": cfg.mask_ratio, "mask_length": cfg.mask_width,
        "mask_prob_adjust": cfg.mask_adjust, "inverse_mask": cfg.inverse_mask,
        "ema_local_encoder": cfg.teacher_shares == "nothing" or (cfg.teacher_shares is None and m == "image"),
        "local_grad_mult": cfg.local_grad_mult, "num_alibi_heads": enc.num_heads, "model_depth": enc.depth,
        "decoder": {"decoder_dim": dec.dim, "decoder_kernel": dec.kernel, "decoder_groups": dec.groups,
                    "decoder_layers": dec.depth, "decoder_residual": dec.residual,
                    "input_dropout": dec.input_dropout, "projection_layers": dec.head_layers,
                    "projection_ratio": 2.0}}
    if m == "image":
        mod.update(input_size=enc.image.img_size, patch_size=enc.image.patch_size, in_chans=enc.image.in_chans,
                   embed_dim=enc.embed_dim, num_extra_tokens=enc.image.num_extra_tokens,
                   init_extra_token_zero=False)
    elif m == "speech":
        spec = "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in enc.speech.conv_layers) + "]"
        mod.update(feature_encoder_spec=spec, conv_pos_width=enc.speech.conv_pos_width,
                   conv_pos_depth=enc.speech.conv_pos_depth, conv_pos_groups=enc.speech.conv_pos_groups,
                   use_alibi_encoder=enc.speech.use_alibi, alibi_scale=enc.speech.alibi_scale,
                   learned_alibi_scale=True, learned_alibi_scale_per_head=True)
    else:
        mod.update(max_source_positions=enc.text.max_positions, dropout=enc.text.dropout)
    return {
        "loss_beta": 0.0, "loss_scale": cfg.loss_scale, "depth": enc.depth, "num_heads": enc.num_heads,
        "embed_dim": enc.embed_dim, "mlp_ratio": enc.mlp_ratio, "norm_eps": enc.norm_eps,
        "encoder_dropout": enc.dropout, "post_mlp_drop": enc.post_mlp_dropout,
        "attention_dropout": enc.attention_dropout, "activation_dropout": enc.activation_dropout,
        "layerdrop": enc.layerdrop, "end_drop_path_rate": enc.drop_path,
        "average_top_k_layers": cfg.average_top_k_layers, "end_of_block_targets": cfg.end_of_block_targets,
        "clone_batch": cfg.num_masks, "instance_norm_target_layer": cfg.instance_norm_target_layer,
        "layer_norm_target_layer": cfg.layer_norm_target_layer, "layer_norm_targets": cfg.layer_norm_targets,
        "instance_norm_targets": cfg.instance_norm_targets, "ema_decay": cfg.ema_decay,
        "ema_end_decay": cfg.ema_end_decay, "ema_anneal_end_step": cfg.ema_anneal_end_step,
        "ema_encoder_only": (cfg.teacher_shares or {"text": "embeddings"}.get(m)) == "embeddings",
        "max_update": 100_000, "min_target_var": cfg.min_target_var, "min_pred_var": cfg.min_pred_var,
        "supported_modality": theirs, "seed": 1, "cls_loss": cfg.cls_loss,
        "modalities": {theirs.lower(): mod}}


def fairseq_dictionary(vocab_size: int):
    """A fairseq ``Dictionary`` of ``vocab_size`` symbols in our order: <s> <pad> </s> <unk> <mask>, words."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    dictionary.add_symbol("<mask>")
    for i in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    assert (dictionary.bos(), dictionary.pad(), dictionary.index("<mask>")) == (BOS, PAD, MASK)
    return dictionary


def build_fairseq(cfg_dict: dict, vocab_size: int | None):
    from omegaconf import OmegaConf
    from examples.data2vec.data.modality import Modality
    from examples.data2vec.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel

    cfg = OmegaConf.merge(OmegaConf.structured(Data2VecMultiConfig), cfg_dict)
    task = None if vocab_size is None else types.SimpleNamespace(source_dictionary=fairseq_dictionary(vocab_size))
    return Data2VecMultiModel(cfg, [Modality[cfg_dict["supported_modality"]]], task=task)


# ---- one data2vec 2.0 step, both sides -----------------------------------------------------------------
def batch_for(enc: EncoderConfig, batch_size: int, generator: torch.Generator,
              audio_seconds: float = 1.0) -> torch.Tensor:
    if enc.modality == "image":
        return torch.randn(batch_size, enc.image.in_chans, enc.image.img_size, enc.image.img_size,
                           generator=generator)
    if enc.modality == "speech":
        wav = torch.randn(batch_size, round(16_000 * audio_seconds), generator=generator)
        return (wav - wav.mean(1, keepdim=True)) / wav.std(1, keepdim=True)
    return torch.randint(NUM_SPECIAL, enc.text.vocab_size, (batch_size, enc.text.max_positions), generator=generator)


def fairseq_step(model, source: torch.Tensor, mask: torch.Tensor) -> dict:
    """fairseq's forward with our masks; its ``d2v_loss`` inputs are recorded (predictions, targets)."""
    seen = {}
    original = model.d2v_loss

    def d2v_loss(x, y):
        seen.setdefault("pairs", []).append((x.detach().float(), y.detach().float()))
        return original(x, y)

    model.d2v_loss = d2v_loss
    try:
        result = model(source, precomputed_mask=mask)
    finally:
        del model.d2v_loss
    losses = result["losses"]
    total = sum(v.float().sum() for v in losses.values()) / result["sample_size"]
    reg = next(v for k, v in losses.items() if k.endswith("regression"))
    pred, target = seen["pairs"][-1]                 # the regression call comes after the CLS one
    return regression_outputs(target, pred, reg.detach().float(), total)


def ours_step(model: Data2Vec2, source: torch.Tensor, mask: torch.Tensor) -> dict:
    out, details = model.forward_details({"source": source, "mask": mask}, mask_noise_std=0.0)
    elementwise = (details.predictions - details.targets).pow(2) * model.loss_scale
    return regression_outputs(details.targets, details.predictions, elementwise, out.loss)


def regression_outputs(target: torch.Tensor, pred: torch.Tensor, elementwise: torch.Tensor,
                       loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a data2vec step is compared on (the loss keeps its graph for the backward pass)."""
    return {"target at masked positions": target, "pred at masked positions": pred,
            "elementwise at masked positions": elementwise, "loss": loss}


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def grads_as_ours(fs_model, cfg_dict: dict) -> dict[str, torch.Tensor]:
    """fairseq's gradients under our parameter names (through the converter, like weights)."""
    state = {n: grad_of(p) if p.requires_grad else p.detach()            # frozen tables (image positions)
             for n, p in fs_model.named_parameters()}                    # as they are
    state.update({n: b for n, b in fs_model.named_buffers()})
    state["_ema"] = {k: v if k.endswith("positions") else torch.zeros_like(v)
                     for k, v in fs_model.ema.fp32_params.items()}
    converted, _ = convert({"cfg": {"model": cfg_dict}, "model": state})
    return dict(converted.named_parameters())


# ---- the step loop, every method ---------------------------------------------------------------------------
@dataclass
class Pair:
    """One method on both sides: our model, fairseq's, and what the step loop needs from each. Steps return
    the compared tensors by name (``loss`` included, with its graph); ``fairseq_grads`` and
    ``fairseq_teacher`` give fairseq's tensors under our names, ``fairseq_decay`` its current EMA decay.
    ``ours`` starts with fairseq's initial weights; ``fresh_ours`` builds ours with its own."""

    ours: nn.Module
    fs: nn.Module
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    ours_step: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    fairseq_step: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    fairseq_grads: Callable[[], dict[str, torch.Tensor]]
    fresh_ours: Callable[[], nn.Module]
    ours_teacher: Callable[[], dict[str, torch.Tensor]] | None = None       # None: no teacher
    fairseq_teacher: Callable[[], dict[str, torch.Tensor]] | None = None
    fairseq_decay: Callable[[], float] | None = None


def compare_init(pair: Pair, tag: str, report: Report) -> None:
    """Our own initialisation against fairseq's (loaded into ``pair.ours``, so call before any step), tensor
    by tensor: mean and std must agree within 5 standard errors of a sample of that size. The shape of the
    distribution (normal, truncated, uniform) is not compared."""
    fresh = dict(pair.fresh_ours().named_parameters())
    for name, p in pair.ours.named_parameters():
        ours, theirs = fresh[name].detach().double().flatten(), p.detach().double().flatten()
        n = ours.numel()
        std = (ours.std().item(), theirs.std().item()) if n > 1 else (0.0, 0.0)
        scale = max(std)
        report.within(f"{tag} init: mean of {name}", ours.mean().item(), theirs.mean().item(),
                      5 * scale / math.sqrt(n) + 1e-7, summary=f"{tag} init: mean of every tensor")
        report.within(f"{tag} init: std of {name}", std[0], std[1], 5 * scale / math.sqrt(2 * n) + 1e-7,
                      summary=f"{tag} init: std of every tensor")


def compare_steps(pair: Pair, tag: str, report: Report, generator: torch.Generator, steps: int = 2) -> None:
    """``steps`` training steps on both sides: outputs, every gradient, one SGD step (lr 0.1), each side's
    own ``set_num_updates`` / ``after_step`` (the EMA update), then the EMA decay (exactly: a one-step shift
    of the schedule moves the teacher by less than fp32 rounding) and every teacher weight."""
    fs_opt = torch.optim.SGD([p for p in pair.fs.parameters() if p.requires_grad], lr=0.1)
    our_opt = torch.optim.SGD([p for p in pair.ours.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, steps + 1):
        batch = pair.batch(generator)
        theirs, mine = pair.fairseq_step(batch), pair.ours_step(batch)
        at = f"{tag} step {step}"
        for key, value in mine.items():
            report.compare(f"{at}: {key}", value.detach(), theirs[key].detach())
        fs_opt.zero_grad(), our_opt.zero_grad()
        theirs["loss"].backward(), mine["loss"].backward()
        fs_grads = pair.fairseq_grads()
        for name, p in pair.ours.named_parameters():
            if p.requires_grad:
                report.compare(f"{at}: gradient of {name}", p.grad, fs_grads[name], summary=f"{at}: gradients")
        fs_opt.step(), our_opt.step()
        pair.fs.set_num_updates(step), pair.ours.after_step(step, fraction=0.0)   # anneal in updates (UPDATES_ANNEAL)
        if pair.ours_teacher is not None:
            report.exact(f"{at}: EMA decay", pair.ours.current_decay, pair.fairseq_decay())
            theirs_t = pair.fairseq_teacher()
            for name, p in pair.ours_teacher().items():
                report.compare(f"{at}: {name}", p.detach(), theirs_t[name],
                               summary=f"{at}: teacher after the EMA step (decay {pair.ours.current_decay:g})")


# ---- data2vec 2.0 ------------------------------------------------------------------------------------------
def data2vec2_pair(modality: str, preset: str, batch_size: int, report: Report, dropout: bool = False,
                   audio_seconds: float = 1.0, overrides: dict | None = None) -> Pair:
    """``dropout``: keep the preset's dropouts and mask noise (for timing; the sides then draw different masks);
    ``audio_seconds``: the length of each random utterance; ``overrides``: over the preset's method config."""
    overrides = merge(merge({} if dropout else deterministic(modality), overrides or {}), UPDATES_ANNEAL)
    cfg = method_config(modality, "data2vec2", preset, overrides)
    cfg_dict = fairseq_config(cfg)
    fs = build_fairseq(cfg_dict, cfg.encoder.text.vocab_size if modality == "text" else None)
    fs.train()
    ours, _ = convert({"cfg": {"model": cfg_dict}, "model": fs.state_dict()})
    ours.train()
    expected = cfg.model_copy(update={"teacher_shares": ours.teacher_shares}).model_dump()
    differs = {k: (v, expected[k]) for k, v in ours.cfg.model_dump().items() if v != expected[k]}
    if differs:
        report.failures.append(f"{modality}: the converted config differs from the preset's: {differs}")

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        source = batch_for(cfg.encoder, batch_size, generator, audio_seconds)
        return {"source": source, "mask": ours.masker()({"source": source}, generator)["mask"]}

    def teacher_now() -> dict[str, torch.Tensor]:
        converted, _ = convert({"cfg": {"model": cfg_dict}, "model": fs.state_dict()})
        return dict(converted.teacher.named_parameters(prefix="teacher"))

    return Pair(ours, fs, batch,
                ours_step=lambda b: ours_step(ours, b["source"], b["mask"]),
                fairseq_step=lambda b: fairseq_step(fs, b["source"], b["mask"]),
                fairseq_grads=lambda: grads_as_ours(fs, cfg_dict), fresh_ours=lambda: Data2Vec2(ours.cfg),
                ours_teacher=lambda: dict(ours.teacher.named_parameters(prefix="teacher")),
                fairseq_teacher=teacher_now, fairseq_decay=lambda: fs.ema.get_decay())


# ---- the text baselines: fairseq's RoBERTa encoder under our names -----------------------------------------
# Our post-LN Block against fairseq's TransformerEncoderLayer (normalize_before=False). fairseq projects
# q, k and v separately; our fused qkv is their concatenation in that order (d2v2/model/blocks.py splits the
# 3*D outputs as (3, heads, head_dim)).
BLOCK_NAMES = {"norm1": ("self_attn_layer_norm",), "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj"),
               "attn.proj": ("self_attn.out_proj",), "norm2": ("final_layer_norm",),
               "mlp.fc1": ("fc1",), "mlp.fc2": ("fc2",)}
EMBEDDINGS = ("embed_tokens.weight", "embed_positions.weight",        # the same names in our local encoder
              "layernorm_embedding.weight", "layernorm_embedding.bias")


def block_names(depth: int, blocks: str, theirs: str) -> dict[str, tuple[str, ...]]:
    """Our block parameter -> the fairseq encoder-layer names it is made of (concatenated along dim 0):
    our blocks under ``blocks``, fairseq's layers under ``theirs`` (RoBERTa's ``TransformerEncoderLayer`` and
    wav2vec 2.0's ``TransformerSentenceEncoderLayer`` name their parts alike)."""
    return {f"{blocks}{i}.{ours}.{p}": tuple(f"{theirs}{i}.{fs}.{p}" for fs in parts)
            for i in range(depth) for ours, parts in BLOCK_NAMES.items() for p in ("weight", "bias")}


def encoder_names(depth: int, blocks: str, embeddings: str, theirs: str) -> dict[str, tuple[str, ...]]:
    """Our name -> the fairseq ``TransformerEncoder`` names it is made of: our blocks under ``blocks``, our
    local encoder under ``embeddings``, fairseq's encoder under ``theirs``."""
    return {**{f"{embeddings}{n}": (f"{theirs}{n}",) for n in EMBEDDINGS},
            **block_names(depth, blocks, f"{theirs}layers.")}


def as_ours(theirs: Mapping[str, torch.Tensor], names: Mapping[str, tuple[str, ...]],
            like: Mapping[str, torch.Tensor], unused: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """fairseq's tensors ``theirs`` as a dict keyed like ``like`` (through ``names``), shape-checked; every
    tensor of ``theirs`` must be used, except those in ``unused``."""
    out, used = {}, set()
    for name, target in like.items():
        value = torch.cat([theirs[t] for t in names[name]])
        if value.shape != target.shape:
            raise SystemExit(f"{' + '.join(names[name])} {tuple(value.shape)} does not fit our {name} "
                             f"{tuple(target.shape)}")
        out[name] = value
        used.update(names[name])
    if set(theirs) - used - unused:
        raise SystemExit(f"fairseq tensors that map to nothing of ours: {sorted(set(theirs) - used - unused)}")
    return out


def grads_by_table(fs: nn.Module, names: Mapping[str, tuple[str, ...]], ours: nn.Module) -> dict[str, torch.Tensor]:
    """fairseq's gradients under the names of our trained parameters."""
    return as_ours({n: grad_of(p) for n, p in fs.named_parameters()}, names,
                   {n: p for n, p in ours.named_parameters() if p.requires_grad})


def roberta_args(enc: EncoderConfig) -> argparse.Namespace:
    """fairseq's RoBERTa arguments for our text encoder; refuses what fairseq's encoder cannot express."""
    from fairseq.models.roberta.model import base_architecture

    one_dropout = {enc.dropout, enc.post_mlp_dropout, enc.text.dropout}
    if enc.modality != "text" or enc.layer_norm_first or enc.prenet_depth or enc.drop_path or enc.norm_eps != 1e-5 \
            or len(one_dropout) > 1:
        raise SystemExit(f"fairseq's RoBERTa encoder cannot express {enc}")
    args = argparse.Namespace(
        encoder_layers=enc.depth, encoder_embed_dim=enc.embed_dim, encoder_attention_heads=enc.num_heads,
        encoder_ffn_embed_dim=int(enc.embed_dim * enc.mlp_ratio), max_positions=enc.text.max_positions,
        dropout=one_dropout.pop(), attention_dropout=enc.attention_dropout,
        activation_dropout=enc.activation_dropout, encoder_layerdrop=enc.layerdrop, activation_fn="gelu",
        encoder_learned_pos=True, layernorm_embedding=True, no_scale_embedding=True,
        encoder_normalize_before=False, untie_weights_roberta=False)
    base_architecture(args)                                              # fairseq's remaining defaults
    return args


def text_batch(enc: EncoderConfig, batch_size: int, masker, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``<s>`` + random regular tokens, the last sample padded for its final quarter, BERT-corrupted by
    our ``masker`` (``source``, ``mlm_target``, ``mask``)."""
    tokens = batch_for(enc, batch_size, generator)
    tokens[:, 0] = BOS
    tokens[-1, -enc.text.max_positions // 4:] = PAD
    return masker({"source": tokens}, generator)


@contextlib.contextmanager
def outputs_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s forward outputs while the block runs."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _inputs, out: seen.append(out.detach().float()))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def recorded_losses(module: types.ModuleType, names: tuple[str, ...] = ("smooth_l1_loss", "mse_loss")
                    ) -> Iterator[list[tuple]]:
    """Run with ``module.F`` (its torch.nn.functional) replaced by a copy that records every call of the
    loss functions ``names`` as ``(input, target, loss)``."""
    calls = []

    def recording(loss_fn):
        def call(pred, target, **kwargs):
            out = loss_fn(pred, target, **kwargs)
            calls.append((pred.detach().float(), target.detach().float(), out.detach().float()))
            return out
        return call

    proxy = types.ModuleType("F")
    proxy.__dict__.update(vars(F))
    proxy.__dict__.update({name: recording(getattr(F, name)) for name in names})
    original, module.F = module.F, proxy
    try:
        yield calls
    finally:
        module.F = original


def regression_recorded(loss: torch.Tensor, calls: list[tuple]) -> dict[str, torch.Tensor]:
    if len(calls) != 1:
        raise SystemExit(f"expected one regression loss call per step, recorded {len(calls)}")
    pred, target, elementwise = calls[0]
    return regression_outputs(target, pred, elementwise, loss)


# ---- data2vec 1.0 text -----------------------------------------------------------------------------------
def data2vec1_text_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/data2vec1.py`` (text) and fairseq's ``Data2VecTextModel`` with the same settings."""
    from omegaconf import OmegaConf
    import examples.data2vec.models.data2vec_text as data2vec_text
    from fairseq.models.transformer import TransformerConfig

    cfg = method_config("text", "data2vec1", preset, merge(merge(NO_DROPOUT, TEXT_DROPOUT), UPDATES_ANNEAL))
    fs_cfg = OmegaConf.merge(OmegaConf.structured(data2vec_text.Data2VecTextConfig), {
        "max_positions": cfg.encoder.text.max_positions, "head_layers": cfg.head_layers,
        "loss_beta": cfg.loss_beta, "loss_scale": 0.0 if cfg.loss_scale is None else cfg.loss_scale,  # 0: 1/sqrt(D)
        "average_top_k_layers": cfg.average_top_k_layers, "layer_norm_target_layer": cfg.layer_norm_target_layer,
        "instance_norm_target_layer": cfg.instance_norm_target_layer, "layer_norm_targets": cfg.layer_norm_targets,
        "ema_decay": cfg.ema_decay, "ema_end_decay": cfg.ema_end_decay,
        "ema_anneal_end_step": cfg.ema_anneal_end_step, "ema_transformer_layers_only": True,
        "transformer": TransformerConfig.from_namespace(roberta_args(cfg.encoder))})
    dictionary = fairseq_dictionary(cfg.encoder.text.vocab_size)
    fs = data2vec_text.Data2VecTextModel(fs_cfg, data2vec_text.Data2VecTextEncoder(fs_cfg, dictionary, None))
    fs.set_num_updates(0)                                        # fairseq makes its EMA teacher here
    ours = Data2Vec1(cfg)
    fs.train(), ours.train()

    depth, head = cfg.encoder.depth, [n for n, _ in ours.head.named_parameters()]
    student = encoder_names(depth, "student.blocks.", "student.local_encoder.", "encoder.sentence_encoder.")
    student.update({f"head.{n}": (f"encoder.regression_head.{n if '.' in n else '0.' + n}",) for n in head})
    # fairseq's teacher holds copies of the embeddings (overwritten from the student at every EMA step);
    # ours reads the student's own, so those copies are compared with our student's embeddings.
    teacher = encoder_names(depth, "teacher.model.blocks.", "student.local_encoder.", "encoder._ema.")
    versions = {"encoder.sentence_encoder.version", "encoder._ema.version"}

    def ours_teacher() -> dict[str, torch.Tensor]:
        return {**dict(ours.teacher.named_parameters(prefix="teacher")),
                **dict(ours.student.local_encoder.named_parameters(prefix="student.local_encoder"))}

    def fairseq_teacher() -> dict[str, torch.Tensor]:
        ema = {f"encoder._ema.{k}": v for k, v in fs.encoder.ema.model.state_dict().items()}
        return as_ours(ema, teacher, ours_teacher(), versions)

    state = {k: v for k, v in fs.state_dict().items() if k != "encoder._ema"}
    weights = as_ours(state, student, {k: v for k, v in ours.state_dict().items() if not k.startswith("teacher.")},
                      versions)
    weights.update({k: v for k, v in fairseq_teacher().items() if k.startswith("teacher.")})
    ours.load_state_dict(weights, strict=True)

    def ours_data2vec1_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with recorded_losses(baselines.data2vec1) as calls:
            out = ours(batch)
        return regression_recorded(out.loss, calls)

    def fairseq_data2vec1_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with recorded_losses(data2vec_text) as calls:       # it regresses where src_tokens == <mask>
            result = fs(batch["source"], target_tokens=batch["mlm_target"])
        return regression_recorded(result["losses"]["main"] / result["sample_size"], calls)

    return Pair(ours, fs, lambda g: text_batch(cfg.encoder, batch_size, ours.masker(), g),
                ours_data2vec1_step, fairseq_data2vec1_step,
                fairseq_grads=lambda: grads_by_table(fs, student, ours),
                fresh_ours=lambda: Data2Vec1(cfg), ours_teacher=ours_teacher, fairseq_teacher=fairseq_teacher,
                fairseq_decay=lambda: fs.encoder.ema.get_decay())


# ---- RoBERTa MLM -----------------------------------------------------------------------------------------
def mlm_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/mlm.py`` and fairseq's ``RobertaModel`` + ``masked_lm`` criterion, same settings."""
    from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss
    from fairseq.models.roberta.model import RobertaEncoder, RobertaModel

    cfg = method_config("text", "mlm", preset, merge(NO_DROPOUT, TEXT_DROPOUT))
    dictionary = fairseq_dictionary(cfg.encoder.text.vocab_size)
    args = roberta_args(cfg.encoder)
    fs = RobertaModel(args, RobertaEncoder(args, dictionary))
    criterion = MaskedLmLoss(MaskedLmConfig(tpu=False), types.SimpleNamespace(target_dictionary=dictionary))
    ours = MLM(cfg)
    fs.train(), ours.train()

    names = encoder_names(cfg.encoder.depth, "student.blocks.", "student.local_encoder.", "encoder.sentence_encoder.")
    names.update({f"lm_head.{n}": (f"encoder.lm_head.{n}",) for n in ours.lm_head.state_dict()})   # weight: tied
    ours.load_state_dict(as_ours(fs.state_dict(), names, ours.state_dict(), {"encoder.sentence_encoder.version"}),
                         strict=True)
    if ours.lm_head.weight is not ours.student.local_encoder.embed_tokens.weight:
        raise SystemExit("our LM head's weight is no longer the token embedding")

    def ours_mlm_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with outputs_of(ours.lm_head) as logits:
            out = ours(batch)
        return {"logits at selected positions": logits[0], "loss": out.loss}

    def fairseq_mlm_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fairseq's sample: the target is the original token at selected positions, <pad> elsewhere."""
        sample = {"net_input": {"src_tokens": batch["source"]},
                  "target": batch["mlm_target"].masked_fill(~batch["mask"], PAD),
                  "ntokens": int(batch["mask"].sum()), "nsentences": batch["source"].shape[0]}
        with outputs_of(fs.encoder.lm_head) as logits:
            loss, sample_size, _ = criterion(fs, sample)
        return {"logits at selected positions": logits[0], "loss": loss / sample_size}

    return Pair(ours, fs, lambda g: text_batch(cfg.encoder, batch_size, ours.masker(), g),
                ours_mlm_step, fairseq_mlm_step,
                fairseq_grads=lambda: grads_by_table(fs, names, ours),
                fresh_ours=lambda: MLM(cfg))


# ---- BERT --------------------------------------------------------------------------------------------------
def bert_args(enc: EncoderConfig) -> argparse.Namespace:
    """fairseq's ``masked_lm`` arguments at ``bert_base`` for our text encoder (with its segments)."""
    from fairseq.models.masked_lm import bert_base_architecture

    roberta = roberta_args(enc)                          # refuses what fairseq's encoders cannot express
    args = argparse.Namespace(
        encoder_layers=enc.depth, encoder_embed_dim=enc.embed_dim, encoder_attention_heads=enc.num_heads,
        encoder_ffn_embed_dim=roberta.encoder_ffn_embed_dim, max_positions=enc.text.max_positions,
        dropout=roberta.dropout, attention_dropout=enc.attention_dropout, act_dropout=enc.activation_dropout,
        num_segment=enc.text.num_segments)
    bert_base_architecture(args)        # tied output embedding, learned positions, NSP, BERT init, GELU, emb LN
    return args


def pair_batch(enc: EncoderConfig, batch_size: int, masker, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sentence pairs ``<s> A </s> B </s>`` of random regular tokens and lengths (the shortest padded),
    random next-sentence labels and mask seeds, corrupted by our ``masker``; ``segments`` are BERT's token
    types built from the pair's structure (fairseq's ``segment_labels``; ours derives them from the tokens)."""
    L = enc.text.max_positions
    rows, segments = [], []
    for b in range(batch_size):
        n = L if b < batch_size - 1 else 3 * L // 4
        a = int(torch.randint(1, n - 3, (), generator=generator))
        body = torch.randint(NUM_SPECIAL, enc.text.vocab_size, (n,), generator=generator)
        body[0], body[a + 1], body[-1] = BOS, EOS, EOS
        rows.append(torch.nn.functional.pad(body, (0, L - n), value=PAD))
        segments.append(torch.nn.functional.pad((torch.arange(n) > a + 1).long(), (0, L - n), value=PAD))
    batch = {"source": torch.stack(rows), "id": torch.arange(batch_size),
             "next_sentence": torch.randint(0, 2, (batch_size,), generator=generator),
             "mask_seed": torch.randint(0, 2**62, (batch_size,), generator=generator)}
    return {**masker(batch, generator), "segments": torch.stack(segments)}


def bert_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/bert.py`` and fairseq's BERT (``MaskedLMModel`` at ``bert_base``) + ``legacy_masked_lm``.
    fairseq's BERT leaves its heads (pooler, NSP projection, LM transform) at PyTorch's default init while
    Google's BERT, and ours, draw them from N(0, 0.02); fairseq's heads are re-drawn so (init_bert_params)
    before the copy, so the init comparison covers the encoder and the heads' shapes."""
    from fairseq.criterions.legacy_masked_lm import LegacyMaskedLmLoss
    from fairseq.models.masked_lm import MaskedLMEncoder, MaskedLMModel
    from fairseq.modules.transformer_sentence_encoder import init_bert_params

    cfg = method_config("text", "bert", preset, merge(NO_DROPOUT, TEXT_DROPOUT))
    dictionary = fairseq_dictionary(cfg.encoder.text.vocab_size)
    args = bert_args(cfg.encoder)
    fs = MaskedLMModel(args, MaskedLMEncoder(args, dictionary))
    for head in (fs.encoder.masked_lm_pooler, fs.encoder.lm_head_transform_weight, fs.encoder.sentence_projection_layer):
        head.apply(init_bert_params)
    criterion = LegacyMaskedLmLoss(types.SimpleNamespace(target_dictionary=dictionary), masked_lm_only=False,
                                   nsp_loss_weight=cfg.nsp_weight)
    ours = Bert(cfg)
    fs.train(), ours.train()

    se = "encoder.sentence_encoder."
    local = {"embed_tokens.weight": "embed_tokens.weight", "embed_positions.weight": "embed_positions.weight",
             "embed_segments.weight": "segment_embeddings.weight",
             "layernorm_embedding.weight": "emb_layer_norm.weight", "layernorm_embedding.bias": "emb_layer_norm.bias"}
    names = {f"student.local_encoder.{o}": (f"{se}{t}",) for o, t in local.items()}
    names.update(block_names(cfg.encoder.depth, "student.blocks.", f"{se}layers."))
    for p in ("weight", "bias"):
        names.update({f"lm_head.dense.{p}": (f"encoder.lm_head_transform_weight.{p}",),
                      f"lm_head.layer_norm.{p}": (f"encoder.layer_norm.{p}",),
                      f"pooler.{p}": (f"encoder.masked_lm_pooler.{p}",)})
    names.update({"lm_head.weight": (f"{se}embed_tokens.weight",), "lm_head.bias": ("encoder.lm_output_learned_bias",),
                  "nsp_head.weight": ("encoder.sentence_projection_layer.weight",)})
    ours.load_state_dict(as_ours(fs.state_dict(), names, ours.state_dict()), strict=True)

    def ours_bert_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with outputs_of(ours.lm_head) as logits, outputs_of(ours.nsp_head) as nsp:
            out = ours(batch)
        return {"logits at selected positions": logits[0], "next-sentence logits": nsp[0], "loss": out.loss}

    def fairseq_bert_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen = []
        handle = fs.encoder.register_forward_hook(lambda _m, _i, out: seen.append(out))
        sample = {"net_input": {"src_tokens": batch["source"], "segment_labels": batch["segments"]},
                  "lm_target": batch["mlm_target"].masked_fill(~batch["mask"], PAD),
                  "sentence_target": batch["next_sentence"], "nsentences": batch["source"].shape[0]}
        try:
            loss, sample_size, _ = criterion(fs, sample)
        finally:
            handle.remove()
        logits, extra = seen[0]
        return {"logits at selected positions": logits[batch["mask"]].detach().float(),
                "next-sentence logits": extra["sentence_logits"].detach().float(), "loss": loss / sample_size}

    return Pair(ours, fs, lambda g: pair_batch(cfg.encoder, batch_size, ours.masker(), g),
                ours_bert_step, fairseq_bert_step,
                fairseq_grads=lambda: grads_by_table(fs, names, ours),
                fresh_ours=lambda: Bert(cfg))


# ---- wav2vec 2.0 -------------------------------------------------------------------------------------------
def speech_backbone_config(enc: EncoderConfig) -> dict:
    """The fields of fairseq's ``Wav2Vec2Config`` / ``HubertConfig`` that describe our speech encoder, random
    parts off. fairseq's encoder has no ALiBi, so the checks run ours without it; its ``pos_conv_depth`` > 1
    positional encoder is data2vec 2.0's (a depth of 1 is the wav2vec 2.0 paper's single weight-normed
    convolution, which ours does not build)."""
    speech = enc.speech
    if speech.use_alibi or speech.conv_pos_depth < 2 or enc.layer_norm_first or enc.prenet_depth:
        raise SystemExit("fairseq's speech encoder needs conv_pos_depth >= 2, no ALiBi, post-LN blocks and no "
                         f"prenet; got conv_pos_depth={speech.conv_pos_depth}, use_alibi={speech.use_alibi}, "
                         f"layer_norm_first={enc.layer_norm_first}, prenet_depth={enc.prenet_depth}")
    return {
        "extractor_mode": "layer_norm", "conv_feature_layers": str(speech.conv_layers), "conv_bias": False,
        "encoder_layers": enc.depth, "encoder_embed_dim": enc.embed_dim, "encoder_attention_heads": enc.num_heads,
        "encoder_ffn_embed_dim": int(enc.embed_dim * enc.mlp_ratio), "layer_norm_first": False,
        "pos_conv_depth": speech.conv_pos_depth, "conv_pos": speech.conv_pos_width,
        "conv_pos_groups": speech.conv_pos_groups, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0, "dropout_features": 0.0}


def wav2vec2_config(cfg: Wav2Vec2Config) -> dict:
    """fairseq's ``Wav2Vec2Config`` for ours. The Gumbel temperature is held at its start on both sides (ours
    follows the budget fraction, fairseq a count of updates)."""
    q = cfg.quantizer
    return {**speech_backbone_config(cfg.encoder), "feature_grad_mult": cfg.feature_grad_mult,
            "final_dim": cfg.final_dim, "quantize_targets": True, "latent_vars": q.entries,
            "latent_groups": q.groups, "latent_dim": q.dim, "latent_temp": (q.temp_start, q.temp_end, 1.0),
            "num_negatives": cfg.num_negatives, "cross_sample_negatives": 0, "codebook_negatives": 0,
            "logit_temp": cfg.logit_temp}


def wav2vec2_names(cfg: Wav2Vec2Config) -> dict[str, tuple[str, ...]]:
    """Our name -> fairseq's ``Wav2Vec2Model`` name."""
    local, context = "student.local_encoder.", "student.context_encoder."
    names = {n: (n,) for n in ("mask_emb", "final_proj.weight", "final_proj.bias", "project_q.weight",
                               "project_q.bias", "quantizer.vars", "quantizer.weight_proj.weight",
                               "quantizer.weight_proj.bias")}
    for i in range(len(cfg.encoder.speech.conv_layers)):
        names[f"{local}feature_extractor.{i}.conv.weight"] = (f"feature_extractor.conv_layers.{i}.0.weight",)
        names.update({f"{local}feature_extractor.{i}.norm.{p}": (f"feature_extractor.conv_layers.{i}.2.1.{p}",)
                      for p in ("weight", "bias")})
    for p in ("weight", "bias"):
        names[f"{local}project_features.0.{p}"] = (f"layer_norm.{p}",)
        names[f"{local}project_features.1.{p}"] = (f"post_extract_proj.{p}",)
        names[f"{context}norm.{p}"] = (f"encoder.layer_norm.{p}",)
        names.update({f"{context}relative_positional_encoder.{i}.conv.{p}": (f"encoder.pos_conv.{i}.0.{p}",)
                      for i in range(cfg.encoder.speech.conv_pos_depth)})
    return {**names, **block_names(cfg.encoder.depth, "student.blocks.", "encoder.layers.")}


def contrastive_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The finite logits, and where a distractor equal to the target got none (-inf), compared apart."""
    excluded = torch.isneginf(logits)
    return {"logits": logits.masked_fill(excluded, 0.0), "distractors equal to the target": excluded.float()}


def wav2vec2_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/wav2vec2.py`` and fairseq's ``Wav2Vec2Model`` + ``wav2vec`` criterion (InfoNCE, extra-loss
    weights 0.1 and 10) with the same masks, the same K distractors per masked frame (ours, passed to
    fairseq's ``sample_negatives``) and the same Gumbel noise (the global RNG seeded alike before each side's
    step: the Gumbel draw is its only random draw, dropout being off)."""
    from omegaconf import OmegaConf
    import fairseq.criterions.wav2vec_criterion as wav2vec_criterion
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config as FairseqWav2Vec2Config, Wav2Vec2Model

    cfg = method_config("speech", "wav2vec2", preset,
                        merge(NO_DROPOUT, {"dropout_features": 0.0, "encoder": {"speech": {"use_alibi": False}}}))
    fs = Wav2Vec2Model(OmegaConf.merge(OmegaConf.structured(FairseqWav2Vec2Config), wav2vec2_config(cfg)))
    criterion = wav2vec_criterion.Wav2vecCriterion(None, infonce=True,
                                                   loss_weights=[cfg.diversity_weight, cfg.feature_penalty_weight])
    ours = Wav2Vec2(cfg)
    fs.train(), ours.train()
    names = wav2vec2_names(cfg)

    def theirs(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fairseq keeps the codebook as (1, G V, dim / G); ours as (G V, dim / G)."""
        return {n: t.squeeze(0) if n == "quantizer.vars" else t for n, t in tensors.items()}

    ours.load_state_dict(as_ours(theirs(fs.state_dict()), names, ours.state_dict()), strict=True)

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = ours.masker()({"source": batch_for(cfg.encoder, batch_size, generator)}, generator)
        return {**out, "gumbel_seed": int(torch.randint(0, 2**62, (1,), generator=generator))}

    def ours_wav2vec2_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        torch.manual_seed(b["gumbel_seed"])
        with recorded_losses(baselines.wav2vec2, ("cross_entropy",)) as calls, outputs_of(ours.project_q) as q:
            out = ours(b)
        return {"quantized targets": q[0].flatten(0, -2), **contrastive_logits(calls[0][0]), "loss": out.loss}

    def fairseq_wav2vec2_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (B, T_m), K = b["masked"].shape, cfg.num_negatives

        def our_negatives(y, num, padding_count=None):           # (B, T_m, F) -> (K, B, T_m, F)
            return y[torch.arange(B)[:, None, None], b["negatives"]].permute(2, 0, 1, 3), None

        fs.sample_negatives = our_negatives
        torch.manual_seed(b["gumbel_seed"])
        sample = {"net_input": {"source": b["source"], "mask_indices": b["mask"]}, "id": torch.arange(B)}
        try:
            with recorded_losses(wav2vec_criterion, ("cross_entropy",)) as calls, outputs_of(fs.project_q) as q:
                loss, sample_size, _ = criterion(fs, sample)
        finally:
            del fs.sample_negatives
        logits = calls[0][0].view(T_m, B, 1 + K).transpose(0, 1).reshape(B * T_m, 1 + K)  # fairseq: time-major
        return {"quantized targets": q[0].flatten(0, -2), **contrastive_logits(logits), "loss": loss / sample_size}

    return Pair(ours, fs, batch, ours_wav2vec2_step, fairseq_wav2vec2_step,
                fairseq_grads=lambda: as_ours(theirs({n: grad_of(p) for n, p in fs.named_parameters()}), names,
                                              dict(ours.named_parameters())),
                fresh_ours=lambda: Wav2Vec2(cfg))


# ---- data2vec 1.0 speech ---------------------------------------------------------------------------------
def data2vec1_speech_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/data2vec1.py`` (speech) and fairseq's ``Data2VecAudioModel`` with the same settings and masks
    (ours, passed as its ``mask_indices``), our encoder without ALiBi (fairseq's has none). fairseq's teacher
    is an EMA of its whole Transformer encoder but the positional convolution, which it copies from the student:
    ours with ``ema_context_norm`` (the ``base`` preset's; tiny's teacher reads the student's LayerNorm)."""
    from omegaconf import OmegaConf
    import examples.data2vec.models.data2vec_audio as data2vec_audio

    overrides = {"encoder": {"speech": {"use_alibi": False}}, "ema_context_norm": True}
    cfg = method_config("speech", "data2vec1", preset, merge(merge(NO_DROPOUT, overrides), UPDATES_ANNEAL))
    fs = data2vec_audio.Data2VecAudioModel(OmegaConf.merge(OmegaConf.structured(data2vec_audio.Data2VecAudioConfig), {
        **speech_backbone_config(cfg.encoder), "feature_grad_mult": 1.0, "loss_beta": cfg.loss_beta,
        "loss_scale": cfg.loss_scale, "average_top_k_layers": cfg.average_top_k_layers,
        "layer_norm_target_layer": cfg.layer_norm_target_layer,
        "instance_norm_target_layer": cfg.instance_norm_target_layer, "layer_norm_targets": cfg.layer_norm_targets,
        "ema_decay": cfg.ema_decay, "ema_end_decay": cfg.ema_end_decay,
        "ema_anneal_end_step": cfg.ema_anneal_end_step, "max_update": 100_000}))
    fs.set_num_updates(0)                                        # fairseq makes its EMA teacher here
    ours = Data2Vec1(cfg)
    fs.train(), ours.train()

    names = {n: t for n, t in wav2vec2_names(cfg).items()
             if not n.startswith(("quantizer.", "project_q.", "final_proj."))}
    names.update({f"head.{p}": (f"final_proj.{p}",) for p in ("weight", "bias")})
    teacher = block_names(cfg.encoder.depth, "teacher.model.blocks.", "layers.")       # fairseq's: its encoder's
    teacher.update({n.replace("student.", "teacher.model.", 1): tuple(t.removeprefix("encoder.") for t in parts)
                    for n, parts in names.items() if n.startswith("student.context_encoder.")})

    def ours_teacher() -> dict[str, torch.Tensor]:
        return dict(ours.teacher.named_parameters(prefix="teacher"))

    def fairseq_teacher() -> dict[str, torch.Tensor]:
        return as_ours(fs.ema.model.state_dict(), teacher, ours_teacher())

    student = {k: v for k, v in ours.state_dict().items() if not k.startswith("teacher.")}
    weights = as_ours(fs.state_dict(), names, student, {"_ema"})
    ours.load_state_dict({**weights, **fairseq_teacher()}, strict=True)

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        return ours.masker()({"source": batch_for(cfg.encoder, batch_size, generator)}, generator)

    def ours_data2vec1_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ours computes the L2 loss without ``mse_loss``: its targets (B, T, D) and predictions are recorded."""
        targets, original = [], ours._targets

        def recorded(*args):
            targets.append(original(*args))
            return targets[-1]

        ours._targets = recorded
        try:
            with outputs_of(ours.head) as pred:
                out = ours(b)
        finally:
            del ours._targets
        y = targets[0][b["mask"]].float()
        return regression_outputs(y, pred[0], (pred[0] - y).pow(2), out.loss)

    def fairseq_data2vec1_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with recorded_losses(data2vec_audio, ("mse_loss",)) as calls:
            result = fs(b["source"], mask_indices=b["mask"])
        return regression_recorded(result["losses"]["regression"] / result["sample_size"], calls)

    return Pair(ours, fs, batch, ours_data2vec1_step, fairseq_data2vec1_step,
                fairseq_grads=lambda: grads_by_table(fs, names, ours), fresh_ours=lambda: Data2Vec1(cfg),
                ours_teacher=ours_teacher, fairseq_teacher=fairseq_teacher,
                fairseq_decay=lambda: fs.ema.get_decay())


# ---- HuBERT ------------------------------------------------------------------------------------------------
def hubert_pair(preset: str, batch_size: int) -> Pair:
    """``baselines/hubert.py`` and fairseq's ``HubertModel`` + ``hubert`` criterion, with the same masks (ours,
    returned by fairseq's ``compute_mask_indices``) and labels. fairseq's label dictionary puts 4 special
    symbols before the clusters, which are never targets but are classes of its softmax, so ours gets C + 4
    classes here and the labels are dictionary indices. The labels are 4 label frames short of the audio, so
    fairseq's trimming of unlabelled frames is exercised too."""
    from omegaconf import OmegaConf
    import fairseq.criterions.hubert_criterion as hubert_criterion
    import fairseq.models.hubert.hubert as fs_hubert
    from fairseq.data import Dictionary
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    dictionary = Dictionary()
    for c in range(method_config("speech", "hubert", preset).num_classes):
        dictionary.add_symbol(str(c))
    cfg = method_config("speech", "hubert", preset, merge(NO_DROPOUT, {
        "num_classes": len(dictionary), "unmasked_weight": 0.5, "encoder": {"speech": {"use_alibi": False}}}))
    backbone = speech_backbone_config(cfg.encoder)
    fs_cfg = OmegaConf.merge(OmegaConf.structured(fs_hubert.HubertConfig), {
        **{k: v for k, v in backbone.items() if k != "pos_conv_depth"}, "label_rate": cfg.label_rate,
        "final_dim": cfg.final_dim, "logit_temp": cfg.logit_temp, "feature_grad_mult": cfg.feature_grad_mult,
        "untie_final_proj": True})
    OmegaConf.set_struct(fs_cfg, False)          # HubertConfig has no pos_conv_depth; its encoder reads one
    fs_cfg.pos_conv_depth = backbone["pos_conv_depth"]
    task_cfg = HubertPretrainingConfig(data="", sample_rate=cfg.sample_rate, label_rate=cfg.label_rate)
    fs = fs_hubert.HubertModel(fs_cfg, task_cfg, [dictionary])
    criterion = hubert_criterion.HubertCriterion(None, cfg.masked_weight, cfg.unmasked_weight,
                                                 loss_weights=[cfg.feature_penalty_weight])
    ours = Hubert(cfg)
    fs.train(), ours.train()
    names = {n: names for n, names in wav2vec2_names(cfg).items() if not n.startswith(("quantizer.", "project_q."))}
    names["label_embs"] = ("label_embs_concat",)
    ours.load_state_dict(as_ours(fs.state_dict(), names, ours.state_dict()), strict=True)

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        source = batch_for(cfg.encoder, batch_size, generator)
        length = int(source.shape[1] * cfg.label_rate / cfg.sample_rate) - 4
        labels = torch.randint(dictionary.nspecial, len(dictionary), (batch_size, length), generator=generator)
        return {"raw source": source, **ours.masker()({"source": source, "labels": labels}, generator)}

    def ours_hubert_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with recorded_losses(baselines.hubert, ("cross_entropy",)) as calls:
            out = ours(b)
        (logits_m, _, _), (logits_u, _, _) = calls
        return {"logits (masked frames)": logits_m, "logits (unmasked frames)": logits_u, "loss": out.loss}

    def fairseq_hubert_step(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        original = fs_hubert.compute_mask_indices
        fs_hubert.compute_mask_indices = lambda shape, *args, **kwargs: b["mask"].numpy()
        source = b["raw source"]
        sample = {"net_input": {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)},
                  "target_list": [b["labels"]], "id": torch.arange(source.shape[0])}
        try:
            with recorded_losses(hubert_criterion, ("cross_entropy",)) as calls:
                loss, sample_size, _ = criterion(fs, sample)
        finally:
            fs_hubert.compute_mask_indices = original
        targets_m, targets_u = b["frame_labels"][b["mask"]], b["frame_labels"][~b["mask"]]
        return {"logits (masked frames)": over_classes(calls[0][0], targets_m),
                "logits (unmasked frames)": over_classes(calls[1][0], targets_u), "loss": loss / sample_size}

    return Pair(ours, fs, batch, ours_hubert_step, fairseq_hubert_step,
                fairseq_grads=lambda: grads_by_table(fs, names, ours), fresh_ours=lambda: Hubert(cfg))


def over_classes(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fairseq's HuBERT logits [positive, every class with the positive's own at -inf] as logits over the
    classes (the positive's value at its class)."""
    rows = torch.arange(len(targets))
    if not torch.isneginf(logits[rows, 1 + targets]).all():
        raise SystemExit("fairseq's HuBERT logits do not exclude the positive's duplicate where expected")
    out = logits[:, 1:].clone()
    out[rows, targets] = logits[:, 0]
    return out


# each baseline in the modalities it is checked in
BASELINES = {("data2vec1", "text"): data2vec1_text_pair, ("data2vec1", "speech"): data2vec1_speech_pair,
             ("mlm", "text"): mlm_pair, ("bert", "text"): bert_pair, ("wav2vec2", "speech"): wav2vec2_pair,
             ("hubert", "speech"): hubert_pair}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fairseq", type=Path, required=True, help="a fairseq checkout")
    baselines = list(dict.fromkeys(method for method, _ in BASELINES))
    ap.add_argument("--method", choices=["data2vec2", *baselines, "all"], default="all")
    ap.add_argument("--modality", choices=["image", "speech", "text", "all"], default="all",
                    help="data2vec2's modalities; each baseline is checked in its own (data2vec1: speech and "
                         "text; mlm, bert: text; wav2vec2, hubert: speech)")
    ap.add_argument("--preset", choices=["tiny", "smoke", "base"], default="tiny",
                    help="base: the paper's Base models (slow on a CPU: minutes)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--atol", type=float, default=1e-5, help="relative to max(1, the largest |value|)")
    ap.add_argument("--skip-init", action="store_true",
                    help="do not compare our own initialisation with fairseq's (per-tensor mean and std)")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    report = Report(args.atol, reference="fairseq")
    methods = ["data2vec2", *baselines] if args.method == "all" else [args.method]
    modalities = ["image", "speech", "text"] if args.modality == "all" else [args.modality]
    with tempfile.TemporaryDirectory() as tmp:
        importable_fairseq(args.fairseq.resolve(), Path(tmp))
        for method in methods:
            for modality in modalities:
                if method != "data2vec2" and (method, modality) not in BASELINES:
                    continue
                torch.manual_seed(0)
                if method == "data2vec2":
                    pair = data2vec2_pair(modality, args.preset, args.batch_size, report)
                else:
                    pair = BASELINES[method, modality](args.preset, args.batch_size)
                if not args.skip_init:
                    compare_init(pair, f"{method} {modality}", report)
                compare_steps(pair, f"{method} {modality}", report, torch.Generator().manual_seed(0))
    if not report.rows:
        raise SystemExit(f"nothing to check: {args.method} has no {args.modality} model here")
    return report.print()

if __name__ == "__main__":
    sys.exit(main())
