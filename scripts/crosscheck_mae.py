"""Cross-check our MAE baseline against the official MAE code, one training step at a time.

    python scripts/crosscheck_mae.py --mae /path/to/mae [--preset tiny] [--batch-size 4] [--atol 1e-5]

This builds the official ``MaskedAutoencoderViT`` (facebookresearch/mae, ``models_mae.py``) with the
architecture of our ``image/mae`` preset (``baselines/mae.py``), copies ITS freshly initialised weights
into our ``MAE`` through the explicit name map :data:`RENAMES` (every tensor on both sides must be used),
lets the official ``random_masking`` draw the mask and gives our model the same mask as ``batch["mask"]``,
and compares, for two consecutive training steps with one identical SGD step in between:

- the encoder output [CLS, visible patches] (the official one put back into patch order: MAE keeps the
  visible patches in its shuffled order, we keep them sorted);
- the patchified pixels, and the pixel targets at the masked patches (norm_pix included). Neither side
  returns its targets, so both are read off the loss: for L = sum_masked mean_pixels (p - t)^2 / n,
  t = p - (P n / 2) dL/dp at every masked patch (P pixels per patch, n masked patches);
- the predictions at the masked and at the visible patches, the number of masked patches, and the loss;
- the gradient of every parameter.

The fixed sin-cos position tables are compared once (the official CLS slot must be zero: ours has none),
and our masker must mask as many patches per image as the official ``random_masking``. MAE has no
dropout or drop-path; ours are set to 0. A mismatch beyond ``--atol`` (relative to max(1, the largest
|official value|)) exits non-zero and names the tensor.

What it needs: a checkout of https://github.com/facebookresearch/mae and a timm whose ``Block`` still
takes ``qk_scale`` (MAE pins timm 0.3.2, which imports ``torch._six`` and fails on torch >= 2; timm 0.4.9
is the last release with ``qk_scale`` and computes ``Block``/``Attention``/``Mlp``/``PatchEmbed`` line
for line as 0.3.2 does). A throwaway venv keeps it out of the project's environment::

    python -m venv --system-site-packages /tmp/maevenv && /tmp/maevenv/bin/pip install timm==0.4.9
    PYTHONPATH=. /tmp/maevenv/bin/python scripts/crosscheck_mae.py --mae /path/to/mae --preset tiny

Compatibility shims, at import time; no line of MAE that computes anything is changed:
- ``numpy.float`` (used by ``util/pos_embed.py``, removed in numpy 1.24) is set back to the builtin
  ``float``, which it always was;
- the official ``patchify`` hard-codes 3 channels. For our 1-channel presets (tiny, smoke: 28 x 28 grey)
  it is called on the image repeated to 3 channels and every third value is kept, which is exactly its
  (row, column, channel) pixel order for one channel.
The result measured here is in docs/FIDELITY_BASELINES.md ("MAE", "Checked against the official code").
"""
from __future__ import annotations

import argparse
import inspect
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

import baselines.mae as ours_mae
from baselines.mae import MAE, MAEConfig
from crosscheck_common import NO_DROPOUT, Report, restore_numpy_float
from d2v2.method import method_config
from d2v2.presets import available_presets

# official parameter name prefix -> ours; names not listed (the decoder's) are the same on both sides
RENAMES = {"patch_embed.proj.": "student.local_encoder.proj.", "cls_token": "student.context_encoder.extra_tokens",
           "blocks.": "student.blocks.", "norm.": "student.norm."}
# the official fixed sin-cos tables (frozen parameters, CLS slot first) -> our buffers (no CLS slot)
POSITIONS = {"pos_embed": "student.local_encoder.pos_embed", "decoder_pos_embed": "decoder_pos_embed"}


def ours_name(official: str) -> str:
    for theirs, mine in RENAMES.items():
        if official.startswith(theirs):
            return mine + official[len(theirs):]
    return official


# ---- the official model ----------------------------------------------------------------------------------
def import_official(root: Path):
    """``models_mae.MaskedAutoencoderViT`` from a checkout, after the numpy shim (see module doc)."""
    if not (root / "models_mae.py").is_file() or not (root / "util" / "pos_embed.py").is_file():
        raise SystemExit(f"{root} is not a checkout of facebookresearch/mae (needs models_mae.py, util/)")
    from timm.models.vision_transformer import Block
    if "qk_scale" not in inspect.signature(Block.__init__).parameters:
        raise SystemExit("MAE needs a timm whose Block takes qk_scale: pip install timm==0.4.9 (in a venv)")
    restore_numpy_float()
    sys.path.insert(0, str(root))
    import models_mae
    return models_mae.MaskedAutoencoderViT


def build_official(model_class, cfg: MAEConfig) -> nn.Module:
    """The official model with the architecture of ``cfg`` (our presets' LN eps goes to every LayerNorm)."""
    enc, img = cfg.encoder, cfg.encoder.image
    if img.num_extra_tokens != 1:
        raise SystemExit(f"MAE has exactly one CLS token; the preset has {img.num_extra_tokens}")
    if img.in_chans not in (1, 3):
        raise SystemExit(f"the official patchify handles 3 channels (1 through this script); got {img.in_chans}")
    model = model_class(img_size=img.img_size, patch_size=img.patch_size, in_chans=img.in_chans,
                        embed_dim=enc.embed_dim, depth=enc.num_blocks, num_heads=enc.num_heads,
                        decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                        decoder_num_heads=cfg.decoder_heads, mlp_ratio=enc.mlp_ratio,
                        norm_layer=partial(nn.LayerNorm, eps=enc.norm_eps), norm_pix_loss=cfg.norm_pix_loss)
    if img.in_chans == 1:                           # see module doc: its pixel order for one channel
        three_channels = model.patchify
        model.patchify = lambda imgs: three_channels(imgs.expand(-1, 3, -1, -1))[..., ::3]
    return model


# ---- comparing ---------------------------------------------------------------------------------------------
def load_official_weights(ours: MAE, official: nn.Module, report: Report) -> None:
    """Copy every official tensor into ours by :func:`ours_name`; compare the fixed position tables."""
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    unused = set(params)
    for name, tensor in official.state_dict().items():
        if name in POSITIONS:
            report.compare(f"{name} (without the CLS slot)", buffers[POSITIONS[name]], tensor[:, 1:],
                           summary="fixed sin-cos positions")
            report.compare(f"{name}: CLS slot (ours: no position)", torch.zeros_like(tensor[:, :1]),
                           tensor[:, :1], summary="fixed sin-cos positions")
            continue
        mine = ours_name(name)
        if mine not in params or params[mine].shape != tensor.shape:
            raise SystemExit(f"official {name} {tuple(tensor.shape)} has no counterpart in ours "
                             f"({mine}: {tuple(params[mine].shape) if mine in params else 'missing'})")
        with torch.no_grad():
            params[mine].copy_(tensor)
        unused.discard(mine)
    if unused:
        raise SystemExit(f"our parameters with no official counterpart: {sorted(unused)}")


class Recorder:
    """Wraps ``owner.name`` (a module attribute or a model's method) so that calls record what they return."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.original, self.calls = owner, name, getattr(owner, name), []
        self.own = name in vars(owner)               # else a method of the class: delete the wrapper after

    def __enter__(self):
        def recorded(*args, **kwargs):
            out = self.original(*args, **kwargs)
            self.calls.append(out)
            return out
        setattr(self.owner, self.name, recorded)
        return self

    def __exit__(self, *exc):
        if self.own:
            setattr(self.owner, self.name, self.original)
        else:
            delattr(self.owner, self.name)


def targets_from_grad(pred: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The targets t the loss used, at masked patches: L = sum_masked mean_pixels (p - t)^2 / n gives
    t = p - (P n / 2) dL/dp."""
    n, P = mask.sum(), pred.shape[-1]
    return (pred.detach() - grad * (P * n / 2))[mask]


def official_step(model: nn.Module, images: torch.Tensor, cfg: MAEConfig, seed: int) -> dict:
    """The official forward; its mask is drawn by ``random_masking`` from the global RNG seeded here."""
    with Recorder(model, "forward_encoder") as enc, Recorder(model, "patchify") as patches:
        torch.manual_seed(seed)
        loss, pred, mask = model(images, mask_ratio=cfg.mask_ratio)
    latent, _, ids_restore = enc.calls[0]
    visible_order = ids_restore.argsort(1)[:, :int((mask[0] == 0).sum())].argsort(1)   # shuffled -> sorted
    patch_latent = latent[:, 1:].gather(1, visible_order[..., None].expand(-1, -1, latent.shape[-1]))
    pred.retain_grad()
    return {"loss": loss, "pred": pred, "mask": mask.bool(), "patches": patches.calls[0],
            "encoder": torch.cat([latent[:, :1], patch_latent], 1).detach(), "sample_size": mask.sum()}


def ours_step(model: MAE, images: torch.Tensor, mask: torch.Tensor) -> dict:
    """Our forward on ``{"source", "mask"}``; the encoder output and the decoder's pixels are hooked."""
    seen = {}

    def keep(name: str, retain_grad: bool = False):
        def hook(module, args, out):
            if retain_grad:
                out.retain_grad()
            seen[name] = out
        return hook

    handles = [model.student.norm.register_forward_hook(keep("encoder")),
               model.decoder_pred.register_forward_hook(keep("pixels", retain_grad=True))]
    try:
        with Recorder(ours_mae, "patchify") as patches:
            out = model({"source": images, "mask": mask})
    finally:
        for h in handles:
            h.remove()
    extra = model.student.context_encoder.num_extra_tokens
    return {"loss": out.loss, "pixels": seen["pixels"], "pred": seen["pixels"][:, extra:],
            "encoder": seen["encoder"].detach(), "patches": patches.calls[0],
            "sample_size": torch.tensor(float(out.sample_size))}


def crosscheck(model_class, preset: str, batch_size: int, report: Report, seed: int = 0) -> None:
    cfg = method_config("image", "mae", preset, NO_DROPOUT)
    torch.manual_seed(seed)
    official = build_official(model_class, cfg).train()
    ours = MAE(cfg).train()
    load_official_weights(ours, official, report)
    g = torch.Generator().manual_seed(seed)
    official_opt = torch.optim.SGD([p for p in official.parameters() if p.requires_grad], lr=0.1)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    img = cfg.encoder.image
    for step in (1, 2):
        images = torch.randn(batch_size, img.in_chans, img.img_size, img.img_size, generator=g)
        theirs = official_step(official, images, cfg, seed=1000 * seed + step)
        mask = theirs["mask"]
        mine = ours_step(ours, images, mask)
        tag = f"step {step}"
        ours_masker = ours.masker()({"source": images}, g)["mask"]
        report.compare(f"{tag}: masked patches per image (our masker vs random_masking)",
                       ours_masker.sum(1).double(), mask.sum(1).double())
        report.compare(f"{tag}: masked patches in the loss", mine["sample_size"], theirs["sample_size"])
        report.compare(f"{tag}: encoder output [CLS, visible]", mine["encoder"], theirs["encoder"])
        report.compare(f"{tag}: patchified pixels", mine["patches"], theirs["patches"])
        report.compare(f"{tag}: predictions at masked patches", mine["pred"][mask].detach(),
                       theirs["pred"][mask].detach())
        report.compare(f"{tag}: predictions at visible patches", mine["pred"][~mask].detach(),
                       theirs["pred"][~mask].detach())
        report.compare(f"{tag}: loss", mine["loss"].detach(), theirs["loss"].detach())
        official_opt.zero_grad(), our_opt.zero_grad()
        theirs["loss"].backward(), mine["loss"].backward()
        extra = ours.student.context_encoder.num_extra_tokens
        report.compare(f"{tag}: pixel targets at masked patches (norm_pix: {cfg.norm_pix_loss})",
                       targets_from_grad(mine["pred"], mine["pixels"].grad[:, extra:], mask),
                       targets_from_grad(theirs["pred"], theirs["pred"].grad, mask))
        params = dict(ours.named_parameters())
        for name, p in official.named_parameters():
            if p.requires_grad:
                report.compare(f"{tag}: gradient of {name}", params[ours_name(name)].grad, p.grad,
                               summary=f"{tag}: gradients")
        official_opt.step(), our_opt.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mae", type=Path, required=True, help="a checkout of facebookresearch/mae")
    ap.add_argument("--preset", choices=available_presets(), default="tiny",
                    help="base: ViT-B/16 with MAE's 8 x 512 decoder (about 15 s on 2 CPU cores at batch 2)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--atol", type=float, default=1e-5, help="relative to max(1, the largest |value|)")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    report = Report(args.atol, reference="official")
    crosscheck(import_official(args.mae.resolve()), args.preset, args.batch_size, report)
    print(f"image/mae {args.preset}, batch {args.batch_size}")
    return report.print()


if __name__ == "__main__":
    sys.exit(main())
