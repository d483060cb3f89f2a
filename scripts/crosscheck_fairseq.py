"""Cross-check our data2vec 2.0 against the official fairseq code, one training step at a time.

    python scripts/crosscheck_fairseq.py --fairseq /path/to/fairseq [--modality text] [--preset tiny]

For each modality this builds fairseq's ``Data2VecMultiModel`` (examples/data2vec/models/data2vec2.py)
with the configuration of our preset, converts ITS freshly initialised weights with our converter
(``d2v2.convert``, so the converter is exercised on a state dict that fairseq itself wrote), feeds both
models the same batch and the same masks, and compares, for two consecutive training steps:

- the per-element regression loss at every masked position (fairseq's ``d2v_loss`` output) and the
  total loss (plus the CLS term for images);
- the predictions and targets at the masked positions;
- the gradient of every parameter (fairseq's gradients are mapped to our names by the converter);
- after one identical SGD step and each side's EMA update, every teacher weight.

Dropout, layer-drop, drop-path and the decoder's mask noise are set to 0 on both sides (they are random);
everything else is the preset's. A mismatch beyond ``--atol`` exits non-zero and names the tensor.

What it needs: a fairseq checkout (``git clone https://github.com/facebookresearch/fairseq``) and
fairseq's import-time dependencies in the running environment: ``pip install omegaconf hydra-core
bitarray sacrebleu regex scikit-learn timm``. fairseq's released code does not import on Python >= 3.11
(its dataclass configs use instances as mutable defaults); the script therefore imports a temporary copy
of ``fairseq/`` and ``examples/data2vec/`` in which only those defaults are rewritten as
``default_factory`` (no line that computes anything is touched), and ``numpy.float``, an alias of
``float`` that numpy 1.24 removed, is restored. The result measured here is in
docs/FAIRSEQ_CROSSCHECK.md.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from d2v2.config import merge, validate
from d2v2.convert import convert
from d2v2.data2vec2 import PRESETS, Data2Vec2, Data2Vec2Config

DETERMINISTIC = {"encoder": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                             "post_mlp_dropout": 0.0, "prenet_dropout": 0.0, "drop_path": 0.0,
                             "layerdrop": 0.0, "prenet_layerdrop": 0.0},
                 "decoder": {"input_dropout": 0.0}, "mask_noise_std": 0.0}
TEXT_DROPOUT = {"encoder": {"text": {"dropout": 0.0}}}


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
    if not hasattr(np, "float"):                    # removed in numpy 1.24; it was the builtin float
        np.float = float
    sys.path.insert(0, str(into))


# ---- our config -> fairseq's ----------------------------------------------------------------------------
def fairseq_config(cfg: Data2Vec2Config) -> dict:
    """The Data2VecMultiConfig (as a plain dict) that describes ``cfg``; the converter maps it back."""
    enc, dec, m = cfg.encoder, cfg.decoder, cfg.encoder.modality
    mod = {
        "type": m.upper(), "prenet_depth": enc.prenet_depth, "prenet_layerdrop": enc.prenet_layerdrop,
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
    elif m == "audio":
        spec = "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in enc.audio.conv_layers) + "]"
        mod.update(feature_encoder_spec=spec, conv_pos_width=enc.audio.conv_pos_width,
                   conv_pos_depth=enc.audio.conv_pos_depth, conv_pos_groups=enc.audio.conv_pos_groups,
                   use_alibi_encoder=enc.audio.use_alibi, alibi_scale=enc.audio.alibi_scale,
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
        "supported_modality": m.upper(), "seed": 1, "cls_loss": cfg.cls_loss,
        "modalities": {m: mod}}


def build_fairseq(cfg_dict: dict, vocab_size: int | None):
    from omegaconf import OmegaConf
    from fairseq.data import Dictionary
    from examples.data2vec.data.modality import Modality
    from examples.data2vec.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel

    cfg = OmegaConf.merge(OmegaConf.structured(Data2VecMultiConfig), cfg_dict)
    task = None
    if vocab_size is not None:                       # fairseq's dictionary order: <s> <pad> </s> <unk> <mask>
        dictionary = Dictionary()
        dictionary.add_symbol("<mask>")
        for i in range(vocab_size - len(dictionary)):
            dictionary.add_symbol(f"w{i}")
        task = types.SimpleNamespace(source_dictionary=dictionary)
    return Data2VecMultiModel(cfg, [Modality[cfg_dict["supported_modality"]]], task=task)


# ---- one step, both sides --------------------------------------------------------------------------------
def batch_for(cfg: Data2Vec2Config, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    enc = cfg.encoder
    if enc.modality == "image":
        return torch.randn(batch_size, enc.image.in_chans, enc.image.img_size, enc.image.img_size,
                           generator=generator)
    if enc.modality == "audio":
        wav = torch.randn(batch_size, 16_000, generator=generator)
        return (wav - wav.mean(1, keepdim=True)) / wav.std(1, keepdim=True)
    return torch.randint(5, enc.text.vocab_size, (batch_size, enc.text.max_positions), generator=generator)


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
    return {"loss": total, "elementwise": reg.detach().float(), "pred": pred, "target": target}


def ours_step(model: Data2Vec2, source: torch.Tensor, mask: torch.Tensor) -> dict:
    out, details = model.forward_details({"source": source, "mask": mask}, mask_noise_std=0.0)
    elementwise = (details.predictions - details.targets).pow(2) * model.loss_scale
    return {"loss": out.loss, "elementwise": elementwise.detach(), "pred": details.predictions.detach(),
            "target": details.targets}


class Report:
    """Rows of (what, max |ours - fairseq|, max |fairseq|); ``summary`` folds many tensors into one row
    (the worst difference, and the largest value, over the group)."""

    def __init__(self, atol: float):
        self.atol, self.failures, self.rows = atol, [], {}

    def compare(self, what: str, ours: torch.Tensor, theirs: torch.Tensor, summary: str | None = None) -> None:
        row = summary or what
        if ours.shape != theirs.shape:
            self.failures.append(f"{what}: shape {tuple(ours.shape)} vs fairseq {tuple(theirs.shape)}")
            self.rows[row] = (float("nan"), float("nan"))
            return
        diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
        scale = theirs.double().abs().max().item() if theirs.numel() else 0.0
        old_diff, old_scale = self.rows.get(row, (0.0, 0.0))
        self.rows[row] = (max(diff, old_diff), max(scale, old_scale))
        if not diff <= self.atol * max(1.0, scale):
            self.failures.append(f"{what}: max |ours - fairseq| = {diff:.3g} (max |fairseq| = {scale:.3g})")


def grads_as_ours(fs_model, cfg_dict: dict) -> dict[str, torch.Tensor]:
    """fairseq's gradients under our parameter names (through the converter, like weights)."""
    state = {n: p.grad if p.grad is not None else p.detach() if not p.requires_grad else torch.zeros_like(p)
             for n, p in fs_model.named_parameters()}         # frozen tables (image positions) as they are
    state.update({n: b for n, b in fs_model.named_buffers()})
    state["_ema"] = {k: v if k.endswith("positions") else torch.zeros_like(v)
                     for k, v in fs_model.ema.fp32_params.items()}
    converted, _ = convert({"cfg": {"model": cfg_dict}, "model": state})
    return dict(converted.named_parameters())


def crosscheck(modality: str, preset: str, batch_size: int, report: Report, seed: int = 0) -> None:
    overrides = merge(DETERMINISTIC, TEXT_DROPOUT) if modality == "text" else DETERMINISTIC
    cfg = validate(Data2Vec2Config, merge(PRESETS[modality][preset], overrides), where=f"{modality}/{preset}")
    cfg_dict = fairseq_config(cfg)
    torch.manual_seed(seed)
    fs = build_fairseq(cfg_dict, cfg.encoder.text.vocab_size if modality == "text" else None)
    fs.train()
    ours, info = convert({"cfg": {"model": cfg_dict}, "model": fs.state_dict()})
    ours.train()
    expected = cfg.model_copy(update={"teacher_shares": ours.teacher_shares}).model_dump()
    differs = {k: (v, expected[k]) for k, v in ours.cfg.model_dump().items() if v != expected[k]}
    if differs:
        report.failures.append(f"{modality}: the converted config differs from the preset's: {differs}")
    g = torch.Generator().manual_seed(seed)
    fs_opt = torch.optim.SGD([p for p in fs.parameters() if p.requires_grad], lr=0.1)
    our_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2):
        source = batch_for(cfg, batch_size, g)
        mask = ours.masker()({"source": source}, g)["mask"]
        theirs, mine = fairseq_step(fs, source, mask), ours_step(ours, source, mask)
        tag = f"{modality} step {step}"
        for key in ("target", "pred", "elementwise"):
            report.compare(f"{tag}: {key} at masked positions", mine[key], theirs[key])
        report.compare(f"{tag}: loss", mine["loss"].detach(), theirs["loss"].detach())
        fs_opt.zero_grad(), our_opt.zero_grad()
        theirs["loss"].backward(), mine["loss"].backward()
        fs_grads = grads_as_ours(fs, cfg_dict)
        for name, p in ours.named_parameters():
            if p.requires_grad:
                report.compare(f"{tag}: gradient of {name}", p.grad, fs_grads[name], summary=f"{tag}: gradients")
        fs_opt.step(), our_opt.step()
        fs.set_num_updates(step), ours.after_step(step)
        teacher_now, _ = convert({"cfg": {"model": cfg_dict}, "model": fs.state_dict()})
        theirs_t = dict(teacher_now.teacher.model.named_parameters())
        for name, p in ours.teacher.model.named_parameters():
            report.compare(f"{tag}: teacher {name}", p.detach(), theirs_t[name],
                           summary=f"{tag}: teacher after the EMA step (decay {ours.current_decay:g})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fairseq", type=Path, required=True, help="a fairseq checkout")
    ap.add_argument("--modality", choices=["image", "audio", "text", "all"], default="all")
    ap.add_argument("--preset", choices=["tiny", "smoke", "base"], default="tiny",
                    help="base: the paper's Base models (slow on a CPU: minutes)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--atol", type=float, default=1e-5, help="relative to max(1, the largest |value|)")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    report = Report(args.atol)
    with tempfile.TemporaryDirectory() as tmp:
        importable_fairseq(args.fairseq.resolve(), Path(tmp))
        for modality in ["image", "audio", "text"] if args.modality == "all" else [args.modality]:
            crosscheck(modality, args.preset, args.batch_size, report)
    width = max(map(len, report.rows))
    print(f"{'what'.ljust(width)}  max |ours - fairseq|  max |fairseq|")
    for what, (diff, scale) in report.rows.items():
        print(f"{what.ljust(width)}  {diff:20.3g}  {scale:13.3g}")
    if report.failures:
        print("\nMISMATCH:\n  " + "\n  ".join(report.failures))
        return 1
    print(f"\nall equal within atol {args.atol:g} (relative to max(1, max |fairseq|))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
