"""fairseq data2vec 2.0 checkpoint conversion (d2v2/interop/fairseq.py).

The fairseq side is described here independently of convert.py: ``fairseq_state`` walks OUR modules and
writes each tensor under the name fairseq's module tree gives it (examples/data2vec/models/data2vec2.py:
main ``blocks``; ``modality_encoders.<MOD>`` with ``local_encoder`` (PatchEmbed ``proj`` / wav2vec2
``ConvFeatureExtractionModel.conv_layers[i] = (conv, dropout, (T, LN, T), GELU)`` / text embeddings),
``project_features = (T, LN, Linear)``, ``relative_positional_encoder = (T, *(conv, pad, T, LN, T,
GELU), T)``, ``extra_tokens``, ``alibi_scale``, ``context_encoder = BlockEncoder(blocks, norm)``,
``decoder = Decoder{1,2}d(blocks[k] = (conv, ...), proj)``; ``_ema`` = the EMA copy's state dict).
Sizes are deliberately NOT the base models'.
"""
from __future__ import annotations

import argparse
import collections
import copy

import numpy as np
import pytest
import torch

from d2v2.interop.fairseq import FAIRSEQ_MODALITY, ConversionError, convert, load_fairseq, main
from d2v2.data2vec2 import Data2Vec2, Data2Vec2Config
from d2v2.engine.checkpoint import CheckpointError, load_checkpoint
from d2v2.engine.finetune import _from_checkpoint
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.model.modalities.image import sincos_2d

CNN = [(16, 10, 5), (16, 3, 2), (24, 3, 2), (24, 2, 2)]
CNN_SPEC = "[(16, 10, 5)] + [(16, 3, 2)] + [(24, 3, 2)] + [(24,2,2)]"

OURS = {
    "image": {"encoder": {"modality": "image", "embed_dim": 96, "num_heads": 4, "depth": 3, "prenet_depth": 1,
                          "norm_eps": 1e-6, "dropout": 0.0, "attention_dropout": 0.0, "post_mlp_dropout": 0.0,
                          "image": {"img_size": 32, "patch_size": 4, "in_chans": 3, "num_extra_tokens": 1}},
              "decoder": {"dim": 48, "kernel": 3, "groups": 8, "depth": 2, "residual": True, "input_dropout": 0.0},
              "num_masks": 3, "mask_ratio": 0.75, "mask_width": 2, "mask_adjust": 0.1, "inverse_mask": True,
              "average_top_k_layers": 2, "instance_norm_target_layer": True, "layer_norm_targets": True,
              "cls_loss": 0.01, "ema_decay": 0.999, "ema_end_decay": 0.9999, "ema_anneal_end_step": 500,
              "teacher_shares": "nothing", "min_target_var": 0.0, "min_pred_var": 0.0},
    "speech": {"encoder": {"modality": "speech", "embed_dim": 64, "num_heads": 4, "depth": 2, "prenet_depth": 1,
                          "norm_eps": 1e-5, "dropout": 0.1, "attention_dropout": 0.1, "post_mlp_dropout": 0.1,
                          "prenet_dropout": 0.1, "layerdrop": 0.05, "prenet_layerdrop": 0.05,
                          "speech": {"conv_layers": CNN, "conv_pos_width": 12, "conv_pos_depth": 2,
                                    "conv_pos_groups": 4}},
              "decoder": {"dim": 32, "kernel": 5, "groups": 4, "depth": 3, "residual": True, "input_dropout": 0.1},
              "num_masks": 2, "mask_ratio": 0.5, "mask_width": 3, "mask_adjust": 0.05, "inverse_mask": False,
              "average_top_k_layers": 2, "instance_norm_target_layer": True, "ema_decay": 0.999,
              "ema_end_decay": 0.99999, "ema_anneal_end_step": 700, "teacher_shares": "local_encoder"},
    "text": {"encoder": {"modality": "text", "embed_dim": 40, "num_heads": 2, "depth": 3, "prenet_depth": 0,
                         "norm_eps": 1e-5, "dropout": 0.1, "attention_dropout": 0.1, "post_mlp_dropout": 0.1,
                         "text": {"vocab_size": 101, "max_positions": 24, "dropout": 0.1}},
             "decoder": {"dim": 20, "kernel": 9, "groups": 1, "depth": 2, "residual": False, "input_dropout": 0.1,
                         "head_layers": 2},
             "num_masks": 2, "mask_ratio": 0.48, "mask_width": 1, "mask_adjust": 0.0, "inverse_mask": False,
             "average_top_k_layers": 3, "instance_norm_target_layer": True, "loss_scale": 1.0,
             "ema_decay": 0.9999, "ema_end_decay": 0.99999, "ema_anneal_end_step": 900, "teacher_shares": "embeddings"},
}


def fairseq_cfg(modality: str) -> dict:
    """What fairseq's trainer saves (``OmegaConf.to_container(resolve=True, enum_to_str=True)``), written
    from the Data2VecMultiConfig / D2v*Config field names, describing the models of ``OURS``."""
    o = OURS[modality]
    e, d = o["encoder"], o["decoder"]
    mod = {"prenet_depth": e["prenet_depth"], "prenet_dropout": e.get("prenet_dropout", 0.0),
           "prenet_layerdrop": e.get("prenet_layerdrop", 0.0), "mask_prob": o["mask_ratio"],
           "mask_length": o["mask_width"], "mask_prob_adjust": o["mask_adjust"], "inverse_mask": o["inverse_mask"],
           "mask_noise_std": 0.01, "ema_local_encoder": o["teacher_shares"] == "nothing",
           "num_extra_tokens": 0, "use_alibi_encoder": False, "learned_alibi_scale": False,
           "learned_alibi_scale_per_head": False, "learned_alibi_scale_per_layer": False, "alibi_scale": 1.0,
           "decoder": {"decoder_dim": d["dim"], "decoder_groups": d["groups"], "decoder_kernel": d["kernel"],
                       "decoder_layers": d["depth"], "input_dropout": d["input_dropout"],
                       "add_positions_masked": False, "add_positions_all": False,
                       "decoder_residual": d["residual"], "projection_layers": d.get("head_layers", 1),
                       "projection_ratio": 2.0}}
    if modality == "image":
        i = e["image"]
        mod.update(input_size=i["img_size"], patch_size=i["patch_size"], in_chans=i["in_chans"],
                   num_extra_tokens=i["num_extra_tokens"], embed_dim=e["embed_dim"], init_extra_token_zero=False)
    elif modality == "speech":
        a = e["speech"]
        mod.update(feature_encoder_spec=CNN_SPEC, extractor_mode="layer_norm", conv_pos_width=a["conv_pos_width"],
                   conv_pos_depth=a["conv_pos_depth"], conv_pos_groups=a["conv_pos_groups"],
                   use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_head=True,
                   num_alibi_heads=e["num_heads"])
    else:
        mod.update(max_source_positions=e["text"]["max_positions"], dropout=e["text"]["dropout"],
                   learned_pos=True, no_scale_embedding=True, layernorm_embedding=True)
    model = {"_name": "data2vec_multi", "depth": e["depth"], "num_heads": e["num_heads"],
             "embed_dim": e["embed_dim"], "mlp_ratio": 4.0, "norm_eps": e["norm_eps"], "norm_affine": True,
             "layer_norm_first": False, "encoder_dropout": e["dropout"], "attention_dropout": e["attention_dropout"],
             "activation_dropout": 0.0, "post_mlp_drop": e["post_mlp_dropout"], "layerdrop": e.get("layerdrop", 0.0),
             "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "loss_beta": 0.0,
             "loss_scale": o.get("loss_scale"), "average_top_k_layers": o["average_top_k_layers"],
             "clone_batch": o["num_masks"], "instance_norm_target_layer": True, "layer_norm_target_layer": False,
             "batch_norm_target_layer": False, "instance_norm_targets": False,
             "layer_norm_targets": o.get("layer_norm_targets", False), "end_of_block_targets": False,
             "ema_decay": o["ema_decay"], "ema_end_decay": o["ema_end_decay"],
             "ema_anneal_end_step": o["ema_anneal_end_step"], "ema_encoder_only": modality == "text",
             "min_target_var": o.get("min_target_var", 0.1), "min_pred_var": o.get("min_pred_var", 0.01),
             "supported_modality": FAIRSEQ_MODALITY[modality], "cls_loss": o.get("cls_loss", 0.0), "recon_loss": 0.0,
             "d2v_loss": 1.0, "shared_decoder": None,
             "modalities": {FAIRSEQ_MODALITY[m].lower(): (mod if m == modality else {}) for m in ("speech", "image", "text")}}
    return {"common": {"seed": 7}, "model": model, "optimization": {"max_update": 1000}}


def _block(prefix: str, blk) -> dict:
    """AltBlock: norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2} (timm Mlp)."""
    mods = {"norm1": blk.norm1, "attn.qkv": blk.attn.qkv, "attn.proj": blk.attn.proj, "norm2": blk.norm2,
            "mlp.fc1": blk.mlp.fc1, "mlp.fc2": blk.mlp.fc2}
    return {f"{prefix}{n}.{p}": getattr(m, p) for n, m in mods.items() for p in ("weight", "bias")}


def fairseq_encoder_state(enc: Encoder, shared: tuple[str, ...] = ()) -> dict:
    """One Data2VecMultiModel's encoder tensors under fairseq names (``shared``: parts an EMA copy lacks)."""
    cfg, M = enc.cfg, f"modality_encoders.{FAIRSEQ_MODALITY[enc.cfg.modality]}."
    out = {}
    for i, blk in enumerate(enc.blocks[cfg.prenet_depth:]):
        out.update(_block(f"blocks.{i}.", blk))
    ctx = enc.context_encoder
    if "context_encoder" not in shared:
        for j, blk in enumerate(enc.blocks[:cfg.prenet_depth]):
            out.update(_block(f"{M}context_encoder.blocks.{j}.", blk))
        if ctx.norm is not None:
            out.update({f"{M}context_encoder.norm.{p}": getattr(ctx.norm, p) for p in ("weight", "bias")})
    loc = enc.local_encoder
    if cfg.modality == "image":
        out[f"{M}fixed_positional_encoder.positions"] = sincos_2d(cfg.embed_dim, loc.grid)[None].clone()
        out[f"{M}extra_tokens"] = ctx.extra_tokens
        out.update({f"{M}local_encoder.proj.weight": loc.proj.weight, f"{M}local_encoder.proj.bias": loc.proj.bias})
    elif cfg.modality == "speech":
        out[f"{M}alibi_scale"] = ctx.alibi_scale
        for k, layer in enumerate(ctx.relative_positional_encoder):      # index 0 is TransposeLast
            out[f"{M}relative_positional_encoder.{k + 1}.0.weight"] = layer.conv.weight
            out[f"{M}relative_positional_encoder.{k + 1}.0.bias"] = layer.conv.bias
        if "local_encoder" not in shared:
            for i, layer in enumerate(loc.feature_extractor):
                out[f"{M}local_encoder.conv_layers.{i}.0.weight"] = layer.conv.weight
                out[f"{M}local_encoder.conv_layers.{i}.2.1.weight"] = layer.norm.weight
                out[f"{M}local_encoder.conv_layers.{i}.2.1.bias"] = layer.norm.bias
            ln, lin = loc.project_features
            out.update({f"{M}project_features.1.weight": ln.weight, f"{M}project_features.1.bias": ln.bias,
                        f"{M}project_features.2.weight": lin.weight, f"{M}project_features.2.bias": lin.bias})
    elif "local_encoder" not in shared:
        out[f"{M}local_encoder.embed_tokens.weight"] = loc.embed_tokens.weight
        out[f"{M}local_encoder.embed_positions.weight"] = loc.embed_positions.weight
        out[f"{M}local_encoder.layernorm_embedding.weight"] = loc.layernorm_embedding.weight
        out[f"{M}local_encoder.layernorm_embedding.bias"] = loc.layernorm_embedding.bias
    return out


def fairseq_checkpoint(model: Data2Vec2, with_ema: bool = True) -> dict:
    m = model.cfg.encoder.modality
    M = f"modality_encoders.{FAIRSEQ_MODALITY[m]}."
    state = fairseq_encoder_state(model.student)
    for k, layer in enumerate(model.decoder.blocks):
        state[f"{M}decoder.blocks.{k}.0.weight"] = layer.conv.weight
        state[f"{M}decoder.blocks.{k}.0.bias"] = layer.conv.bias
    for name, p in model.decoder.proj.named_parameters():
        state[f"{M}decoder.proj.{name}"] = p
    if with_ema:
        teacher = model.teacher.model
        if m == "text":                 # ema_encoder_only: the EMA copy is the ModuleList of main blocks
            ema = {}
            for i, blk in enumerate(teacher.blocks[model.cfg.encoder.prenet_depth:]):
                ema.update(_block(f"{i}.", blk))
        else:
            ema = fairseq_encoder_state(teacher, shared=("local_encoder",) if m == "speech" else ())
        state["_ema"] = {k: v.detach().clone().float() for k, v in ema.items()}
    state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    return {"cfg": fairseq_cfg(m), "model": state, "optimizer_history": [{"num_updates": 1234}]}


def make_model(modality: str, seed: int = 0) -> Data2Vec2:
    """Our model with every tensor random (also LN affine, alibi scales) and a teacher != student."""
    torch.manual_seed(seed)
    model = Data2Vec2(Data2Vec2Config.model_validate(OURS[modality]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if modality == "speech":
            model.student.context_encoder.alibi_scale.uniform_(0.5, 1.5)
            model.teacher.model.context_encoder.alibi_scale.uniform_(0.5, 1.5)
    return model.eval()


def inputs(modality: str):
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return torch.randn(2, 3, 32, 32, generator=g), None
    if modality == "speech":
        return torch.randn(2, 1200, generator=g), None
    src = torch.randint(5, 101, (2, 12), generator=g)
    src[1, -3:] = 1                                                  # padding
    return src, None


@pytest.mark.parametrize("modality", ["image", "speech", "text"])
def test_round_trip_is_exact(modality):
    ours = make_model(modality)
    converted, info = convert(fairseq_checkpoint(ours))
    assert info.teacher == "_ema" and info.num_updates == 1234 and info.seed == 7
    assert converted.cfg.model_dump() == ours.cfg.model_dump()
    a, b = ours.state_dict(), converted.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    converted.eval()
    source, pm = inputs(modality)
    for teacher in (False, True):
        x = ours.extract_features(source, pm, teacher=teacher)
        y = converted.extract_features(source, pm, teacher=teacher)
        assert torch.equal(x.x, y.x)
        assert all(torch.equal(p, q) for p, q in zip(x.layer_results, y.layer_results))
    batch = ours.masker()({"source": source}, torch.Generator().manual_seed(3))
    (la, _), (lb, _) = ours.forward_details(batch, 0.0), converted.forward_details(batch, 0.0)
    assert torch.equal(la.loss, lb.loss)
    if modality == "image":
        assert any("sin-cos" in why for why in info.dropped.values())


def test_model_config_directly_under_cfg_is_found():
    ours = make_model("text")
    ckpt = fairseq_checkpoint(ours)
    ckpt["cfg"] = ckpt["cfg"]["model"]                  # a state dict saved with the model config alone
    converted, info = convert(ckpt)
    assert info.config_path == "cfg" and converted.cfg.model_dump() == ours.cfg.model_dump()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), converted.state_dict().values()))


def test_file_with_plain_cfg_round_trips_through_the_cli_into_finetuning(tmp_path):
    ours = make_model("image")
    torch.save(fairseq_checkpoint(ours), tmp_path / "fs.pt")
    assert main(["--checkpoint", str(tmp_path / "fs.pt"), "--out", str(tmp_path / "ours.pt")]) == 0
    ckpt = load_checkpoint(tmp_path / "ours.pt")                  # the runner's verified format
    pre = _from_checkpoint(ckpt, tmp_path / "ours.pt")            # what `finetune` reads
    assert (pre.modality, pre.method, pre.seed, pre.budget_fraction) == ("image", "data2vec2", 7, 1.0)
    assert ckpt["converted_from"]["sha256"] and ckpt["pretrain"]["updates"] == 1234
    encoder = Encoder(EncoderConfig.model_validate(pre.encoder_config))
    encoder.load_state_dict(pre.encoder_state, strict=True)
    source, _ = inputs("image")
    assert torch.equal(encoder.eval()(source).x, ours.student(source).x)
    direct = _from_checkpoint(load_fairseq(tmp_path / "fs.pt"), tmp_path / "fs.pt")   # --checkpoint-format fairseq
    assert direct.encoder_config == pre.encoder_config
    assert all(torch.equal(direct.encoder_state[k], v) for k, v in pre.encoder_state.items())


class NotPlainData:
    """Stands for any pickled object (fairseq checkpoints hold argparse/OmegaConf objects)."""

    def __init__(self):
        self.value = 3


def test_pickled_objects_need_the_trust_flag(tmp_path):
    ckpt = fairseq_checkpoint(make_model("text"))
    ckpt["extra_state"] = {"meter": NotPlainData()}
    torch.save(ckpt, tmp_path / "fs.pt")
    with pytest.raises(CheckpointError, match=r"NotPlainData.*--trust-pickle"):
        convert(tmp_path / "fs.pt")
    assert main(["--checkpoint", str(tmp_path / "fs.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    with pytest.warns(UserWarning, match="full unpickle"):
        model, _ = convert(tmp_path / "fs.pt", trust_pickle=True)
    assert isinstance(model, Data2Vec2)


def test_plain_data_objects_of_fairseq_checkpoints_load_without_the_flag(tmp_path):
    """argparse namespaces (legacy ``args``), numpy arrays/scalars (meters) and defaultdicts are inert."""
    ckpt = fairseq_checkpoint(make_model("text"))
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi")
    ckpt["extra_state"] = {"meters": collections.defaultdict(list, a=[np.float64(1.5)]), "arr": np.arange(3)}
    torch.save(ckpt, tmp_path / "fs.pt")
    model, info = convert(tmp_path / "fs.pt")
    assert info.modality == "text"


def test_omegaconf_config_loads_without_the_flag(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    ckpt = fairseq_checkpoint(make_model("image"))
    cfg = ckpt["cfg"]
    cfg["model"]["ema_anneal_end_step"] = "${optimization.max_update}"
    ckpt["cfg"] = omegaconf.OmegaConf.create(cfg)
    torch.save(ckpt, tmp_path / "fs.pt")
    model, _ = convert(tmp_path / "fs.pt")
    assert model.cfg.ema_anneal_end_step == 1000


def test_missing_wrong_shape_and_unmapped_keys_are_named():
    good = fairseq_checkpoint(make_model("speech"))
    bad = copy.deepcopy(good)
    del bad["model"]["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: model\.blocks\.1\.mlp\.fc2\.bias"):
        convert(bad)
    bad = copy.deepcopy(good)
    bad["model"]["_ema"]["modality_encoders.AUDIO.context_encoder.norm.weight"] = torch.ones(5)
    with pytest.raises(ConversionError, match=r"shape mismatches: model\._ema\.modality_encoders\.AUDIO\."
                                              r"context_encoder\.norm\.weight \(5,\)"):
        convert(bad)
    bad = copy.deepcopy(good)
    bad["model"]["modality_encoders.AUDIO.mystery.weight"] = torch.ones(2)
    with pytest.raises(ConversionError, match=r"unmapped keys: model\.modality_encoders\.AUDIO\.mystery\.weight"):
        convert(bad)


def test_legacy_and_shared_alibi_scales_are_reshaped():
    ours = make_model("speech")
    ckpt = fairseq_checkpoint(ours)
    key = "modality_encoders.AUDIO.alibi_scale"
    scale = ckpt["model"][key]
    ckpt["model"][key] = scale[0]                                 # 4-D, as before fairseq's upgrade
    ckpt["model"]["_ema"][key] = torch.full((1, 1, 1, 1, 1), 0.7)  # one scale for every head
    model, _ = convert(ckpt)
    assert torch.equal(model.student.context_encoder.alibi_scale, scale)
    assert torch.equal(model.teacher.model.context_encoder.alibi_scale, torch.full((1, 1, 4, 1, 1), 0.7))


def test_without_ema_the_teacher_is_the_student():
    ours = make_model("image")
    with pytest.warns(UserWarning, match="no '_ema'"):
        model, info = convert(fairseq_checkpoint(ours, with_ema=False))
    assert info.teacher.startswith("student")
    s, t = model.student.state_dict(), model.teacher.model.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in t)


def test_finetuned_checkpoint_loads_encoder_only():
    """wav2vec_ctc-style: encoder under ``w2v_encoder.w2v_model.``, config in ``w2v_args``, no decoder/_ema."""
    ours = make_model("speech")
    fs = fairseq_checkpoint(ours, with_ema=False)
    inner = fs["cfg"]["model"]
    inner["modalities"]["audio"]["decoder"] = None
    state = {f"w2v_encoder.w2v_model.{k}": v for k, v in fs["model"].items() if ".decoder." not in k}
    state["w2v_encoder.proj.weight"] = torch.zeros(30, 64)
    inner["modalities"]["audio"]["conv_pos_groups"] = "${model.num_heads}"      # 4, relative to w2v_args
    ckpt = {"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": {"model": inner}}}, "model": state}
    with pytest.raises(ConversionError, match="encoder_only"):
        convert(ckpt)                                             # decoder config is None
    inner["modalities"]["audio"]["decoder"] = fairseq_cfg("speech")["model"]["modalities"]["audio"]["decoder"]
    with pytest.raises(ConversionError, match=r"missing keys \(no decoder.*--encoder-only"):
        convert(ckpt)                                             # decoder config kept, weights removed
    inner["modalities"]["audio"]["decoder"] = None
    encoder, info = convert(ckpt, encoder_only=True)
    assert info.prefix == "w2v_encoder.w2v_model." and info.config_path == "cfg.model.w2v_args.model"
    assert "model.w2v_encoder.proj.weight" in info.dropped
    source, _ = inputs("speech")
    assert torch.equal(encoder.eval()(source).x, ours.student(source).x)


def test_unsupported_architecture_is_refused():
    ckpt = fairseq_checkpoint(make_model("text"))
    ckpt["cfg"]["model"]["layer_norm_first"] = True             # fairseq's pre-LN AltBlock differs from ours
    with pytest.raises(ConversionError, match="layer_norm_first=True"):
        convert(ckpt)
    ckpt["cfg"]["model"]["layer_norm_first"] = False
    ckpt["cfg"]["model"]["modalities"]["text"]["decoder"]["projection_ratio"] = 4.0
    with pytest.raises(ConversionError, match="projection_ratio"):
        convert(ckpt)


def test_finetuned_image_checkpoint_loads_encoder_only():
    """mae_image_classification-style: ``model.`` prefix, config in ``pretrained_model_args``, a head."""
    ours = make_model("image")
    fs = fairseq_checkpoint(ours, with_ema=False)
    state = {f"model.{k}": v for k, v in fs["model"].items() if ".decoder." not in k}
    state.update({"head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10),
                  "fc_norm.weight": torch.ones(96), "fc_norm.bias": torch.zeros(96)})
    ckpt = {"cfg": {"model": {"_name": "mae_image_classification", "pretrained_model_args": fs["cfg"]}},
            "model": state}
    encoder, info = convert(ckpt, encoder_only=True)
    assert info.prefix == "model." and info.config_path == "cfg.model.pretrained_model_args.model"
    assert {"model.head.weight", "model.fc_norm.bias"} <= info.dropped.keys()
    source, _ = inputs("image")
    assert torch.equal(encoder.eval()(source).x, ours.student(source).x)
    state["model.blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    with pytest.raises(ConversionError, match=r"model\.model\.blocks\.0\.attn\.qkv\.weight \(5, 5\)"):
        convert(ckpt, encoder_only=True)
