"""The baselines (MAE, data2vec 1.0, RoBERTa MLM) through the shared registry and interface."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from baselines.mae import patchify
from baselines.masking import MASK
from d2v2.config import ConfigError
from d2v2.model.encoder import Encoder
from d2v2.method import CollapseError, MethodOutput, available_methods, build_method, method_config

BASELINES = [("image", "mae"), ("image", "data2vec1"), ("speech", "data2vec1"), ("text", "data2vec1"),
             ("text", "mlm")]


def make_batch(modality: str, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        source = torch.randn(batch_size, 1, 28, 28, generator=g)
    elif modality == "speech":
        source = torch.randn(batch_size, 16000, generator=g)                 # 1 s at 16 kHz
    else:
        source = torch.randint(5, 8192, (batch_size, 64), generator=g)
        source[:, 0] = 0
    return {"source": source, "id": torch.arange(batch_size)}


def masked(method, batch, seed=0):
    return method.masker()(batch, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ registry and interface

def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(available_methods())


@pytest.mark.parametrize("modality,name", BASELINES)
def test_interface(modality, name):
    torch.manual_seed(0)
    method = build_method(modality, name, "smoke")
    batch = masked(method, make_batch(modality))
    out = method(batch)
    assert isinstance(out, MethodOutput) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.sample_size == int(batch["mask"].sum()) > 0
    out.loss.backward()
    method.after_step(1, fraction=0.0)
    assert isinstance(method.encoder(), Encoder) and method.encoder() is method.student
    assert isinstance(method.encoder_tokens(batch), int) and method.encoder_tokens(batch) > 0
    assert isinstance(method.no_weight_decay(), set)
    # the masker travels to data-loader workers and gives the same masks for the same seed
    masker = pickle.loads(pickle.dumps(method.masker()))
    again = masker(make_batch(modality), torch.Generator().manual_seed(0))
    assert torch.equal(again["mask"], batch["mask"]) and torch.equal(again["source"], batch["source"])
    # without a mask in the batch, the method draws its own
    assert torch.isfinite(method(make_batch(modality)).loss)


@pytest.mark.parametrize("modality,name", BASELINES)
@pytest.mark.parametrize("preset", ["tiny", "smoke", "base"])
def test_presets_share_data2vec2_encoder(modality, name, preset):
    """Same backbone as data2vec 2.0 at every preset (MAE: the pre-LN version of it)."""
    ours = method_config(modality, name, preset).encoder.model_dump()
    theirs = method_config(modality, "data2vec2", preset).encoder.model_dump()
    if name == "mae":
        assert ours.pop("layer_norm_first") and not theirs.pop("layer_norm_first")
    assert ours == theirs


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="mask.kind 'block' does not fit a text encoder"):
        method_config("text", "data2vec1", "smoke", {"mask": {"kind": "block"}})
    with pytest.raises(ConfigError, match="average_top_k_layers 9 exceeds"):
        method_config("text", "data2vec1", "smoke", {"average_top_k_layers": 9})
    with pytest.raises(ConfigError, match="layer_norm_first"):
        method_config("image", "mae", "smoke", {"encoder": {"layer_norm_first": False}})
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        method_config("image", "mae", "smoke", {"mask_ratio": 1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        method_config("text", "mlm", "smoke", {"mask": {"probability": 0.2}})
    with pytest.raises(ConfigError, match="mask_token_prob"):
        method_config("text", "mlm", "smoke", {"mask": {"mask_token_prob": 0.95}})


@pytest.mark.parametrize("name", ["mlm", "data2vec1"])
def test_text_batch_with_mask_but_no_original_tokens_is_rejected(name):
    method = build_method("text", name, "smoke")
    batch = masked(method, make_batch("text"))
    del batch["mlm_target"]
    with pytest.raises(ValueError, match="mlm_target"):
        method(batch)


# ------------------------------------------------------------------------------------ MAE

def test_patchify_matches_unfold():
    images = torch.randn(2, 3, 8, 8)
    ours = patchify(images, 4)                                            # (row, col, channel) pixel order
    ref = F.unfold(images, 4, stride=4).transpose(1, 2)                  # (channel, row, col)
    assert torch.equal(ours, ref.reshape(2, 4, 3, 16).transpose(2, 3).reshape(2, 4, 48))


def test_mae_encoder_sees_visible_patches_and_loss_is_masked_normalised_mse():
    torch.manual_seed(0)
    mae = build_method("image", "mae", "smoke")
    batch = masked(mae, make_batch("image"))
    mask = batch["mask"]
    assert (mask.sum(1) == int(196 * 0.75)).all()
    seen, pred = {}, {}
    mae.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    mae.decoder_pred.register_forward_hook(lambda m, args, out: pred.update(p=out[:, 1:]))
    loss = mae(batch).loss
    assert seen["x"].shape[1] == 1 + 196 - int(196 * 0.75)              # CLS + visible only
    # direct computation: per-patch normalised pixels, squared error averaged per patch, masked patches only
    target = F.unfold(batch["source"], 2, stride=2).transpose(1, 2)     # (B, 196, 4), C = 1
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred["p"] - target).pow(2).mean(-1)
    assert torch.allclose(loss, per_patch[mask].mean(), rtol=1e-5)
    assert not torch.allclose(loss, per_patch.mean(), rtol=1e-3)


def test_mae_init():
    mae = build_method("image", "mae", "smoke")
    w = mae.decoder_blocks[0].attn.qkv.weight
    bound = (6 / sum(w.shape)) ** 0.5                                     # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(mae.mask_token.std().item() - 0.02) < 0.01


# ------------------------------------------------------------------------------------ data2vec 1.0

def test_data2vec1_head_init_follows_fairseq():
    """fairseq's data2vec_text applies init_bert_params to its regression head (N(0, 0.02), zero bias);
    data2vec_audio's final_proj keeps PyTorch's default Linear init."""
    torch.manual_seed(0)
    text = [m for m in build_method("text", "data2vec1", "tiny").head.modules() if isinstance(m, torch.nn.Linear)]
    assert all(abs(m.weight.std().item() - 0.02) < 0.004 and not m.bias.any() for m in text)
    audio = build_method("speech", "data2vec1", "tiny").head
    assert audio.bias.any() and audio.weight.std().item() > 0.05          # 1/sqrt(3*48) = 0.083


def _block_inputs(method, batch):
    seen = []
    handle = method.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    method(batch)
    handle.remove()
    return seen


def test_data2vec1_image_student_sees_all_patches_with_mask_embedding():
    torch.manual_seed(0)
    method = build_method("image", "data2vec1", "smoke")
    a = masked(method, make_batch("image", seed=1))
    b = {**a, "source": torch.randn_like(a["source"])}                  # other pixels, same mask
    xa, xb = _block_inputs(method, a)[0], _block_inputs(method, b)[0]
    assert xa.shape[1] == 1 + 196                                          # CLS + ALL patches
    mask = a["mask"]
    # masked positions carry the mask embedding (+ position), independent of the pixels; the rest do not
    assert torch.allclose(xa[:, 1:][mask], xb[:, 1:][mask])
    assert not torch.allclose(xa[:, 1:][~mask], xb[:, 1:][~mask])
    # a different masked patch at the same place differs only through its position: same row everywhere
    pos = method.student.local_encoder.pos_embed[0]
    ctx = method.student.context_encoder
    expected = ctx.finish((method.mask_emb + pos)[None])[0]
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.allclose(xa[:, 1:][rows, cols], expected[cols], atol=1e-6)


def test_data2vec1_speech_mask_embedding_replaces_masked_frames():
    torch.manual_seed(0)
    method = build_method("speech", "data2vec1", "smoke")
    batch = masked(method, make_batch("speech"))
    seen = []
    method.student.context_encoder.relative_positional_encoder.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach()))          # frames-last (B, T, D)
    method(batch)
    teacher_in, student_in = seen                     # (B, T, D) before conv positions; targets come first
    mask = batch["mask"]
    assert student_in.shape[1] == mask.shape[1] == 49
    assert torch.equal(student_in[mask], method.mask_emb.detach().expand(int(mask.sum()), -1))
    assert not torch.equal(teacher_in[mask], student_in[mask])            # the teacher sees the real frames
    assert torch.equal(teacher_in[~mask], student_in[~mask])


def test_data2vec1_text_student_sees_corrupted_teacher_original_and_loss_on_mask_tokens():
    torch.manual_seed(0)
    method = build_method("text", "data2vec1", "smoke")
    batch = masked(method, make_batch("text"))
    ids = []
    method.student.local_encoder.embed_tokens.register_forward_pre_hook(lambda m, args: ids.append(args[0]))
    out = method(batch)
    student_ids, teacher_ids = ids
    assert torch.equal(student_ids, batch["source"]) and torch.equal(teacher_ids, batch["mlm_target"])
    assert torch.equal(batch["mask"], batch["source"] == MASK)
    # random / unchanged selected tokens exist but carry no loss (fairseq #4229)
    assert out.sample_size == int((batch["source"] == MASK).sum())


def test_data2vec1_teacher_holds_only_blocks_and_follows_ema():
    method = build_method("speech", "data2vec1", "smoke")
    teacher = method.teacher.model
    assert teacher.local_encoder is None and teacher.context_encoder is None
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = teacher.blocks[0].mlp.fc1.weight.clone()
    student = method.student.blocks[0].mlp.fc1.weight.detach().clone()
    method.after_step(0, fraction=0.0)
    tau = method.cfg.ema_decay
    assert torch.allclose(teacher.blocks[0].mlp.fc1.weight, tau * before + (1 - tau) * student)


def test_data2vec1_speech_teacher_can_average_the_context_norm_as_fairseqs():
    """``ema_context_norm`` (base): the teacher holds the context stage, averages its LayerNorm, copies the
    positional convolution from the student, and its targets read the teacher's LayerNorm, not the student's."""
    assert method_config("speech", "data2vec1", "base").ema_context_norm
    assert not method_config("speech", "data2vec1", "tiny").ema_context_norm
    with pytest.raises(ConfigError, match="ema_context_norm"):
        method_config("image", "data2vec1", "smoke", {"ema_context_norm": True})
    torch.manual_seed(0)
    method = build_method("speech", "data2vec1", "smoke", {"ema_context_norm": True}).train()
    teacher, student = method.teacher.model.context_encoder, method.student.context_encoder
    assert method.teacher.model.local_encoder is None and teacher is not None
    norm = teacher.norm.weight.clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    method.after_step(1, fraction=0.0)
    tau = method.current_decay
    torch.testing.assert_close(teacher.norm.weight, tau * norm + (1 - tau) * student.norm.weight)
    positions = zip(teacher.relative_positional_encoder.parameters(), student.relative_positional_encoder.parameters())
    for ours, theirs in positions:
        torch.testing.assert_close(ours, theirs)
    batch = masked(method, make_batch("speech"))
    x = method.student.local_features(batch["source"])[0]
    targets = method._targets(batch, x, None)
    with torch.no_grad():
        student.norm.weight.mul_(3.0)
    torch.testing.assert_close(method._targets(batch, x, None), targets)      # the student's LayerNorm: unread
    with torch.no_grad():
        teacher.norm.weight.mul_(3.0)
    assert not torch.allclose(method._targets(batch, x, None), targets)


def test_data2vec1_has_fairseqs_collapse_guard_for_speech_only():
    """fairseq's data2vec_audio stops a run whose target std falls below 0.1 (prediction std 0.01) after 5,000
    updates; its vision and text models have no guard (METHOD.md#collapse-guard)."""
    for preset in ("smoke", "tiny", "base"):
        for modality in ("image", "speech", "text"):
            cfg = method_config(modality, "data2vec1", preset)
            on = (cfg.min_target_var, cfg.min_pred_var, cfg.collapse_check_after) == (0.1, 0.01, 5000)
            assert on == (modality == "speech") and (on or cfg.min_target_var == cfg.min_pred_var == 0), preset
    method = build_method("speech", "data2vec1", "smoke", {"min_target_var": 100.0, "collapse_check_after": 1})
    logs = method(masked(method, make_batch("speech"))).logs
    method.after_step(1, fraction=0.0)
    method.check_health(logs)                                    # not past collapse_check_after yet
    method.after_step(2, fraction=0.0)
    with pytest.raises(CollapseError, match="data2vec 1.0 collapse guard: target std .* < min_target_var 100.0"):
        method.check_health(logs)
    healthy = build_method("speech", "data2vec1", "smoke", {"min_target_var": 1e-9, "min_pred_var": 1e-9,
                                                             "collapse_check_after": 0})
    healthy.after_step(1, fraction=0.0)
    healthy.check_health(healthy(masked(healthy, make_batch("speech"))).logs)


def test_data2vec1_targets_are_normalised_top_k_teacher_layers():
    """Per-layer parameter-free LN of the top-K FFN outputs, averaged (text, METHOD.md#baseline-data2vec1)."""
    torch.manual_seed(0)
    method = build_method("text", "data2vec1", "smoke").eval()
    batch = masked(method, make_batch("text"))
    ffn = []
    for block in method.teacher.model.blocks:
        block.register_forward_hook(lambda m, args, out: ffn.append(out[1]))
    targets = method._targets(batch, None, None)
    K = method.cfg.average_top_k_layers
    expected = torch.stack([F.layer_norm(f, f.shape[-1:]) for f in ffn[-K:]]).mean(0)
    assert torch.allclose(targets, expected, atol=1e-6)


# ------------------------------------------------------------------------------------ MLM

def test_mlm_head_is_tied_and_loss_covers_all_selected_positions():
    torch.manual_seed(0)
    mlm = build_method("text", "mlm", "smoke")
    emb = mlm.student.local_encoder.embed_tokens.weight
    assert mlm.lm_head.weight is emb and mlm.lm_head.weight.data_ptr() == emb.data_ptr()
    batch = masked(mlm, make_batch("text"))
    selected = batch["mask"]
    assert ((batch["source"] != MASK) & selected).any()                  # random / unchanged ones included
    out = mlm(batch)
    assert out.sample_size == int(selected.sum())
    out.loss.backward()
    # gradient reaches the embedding through the output projection too: rows of tokens absent from the
    # corrupted input but present as targets
    absent = set(batch["mlm_target"][selected].tolist()) - set(batch["source"].flatten().tolist())
    assert absent and all(emb.grad[t].abs().sum() > 0 for t in absent)


# ------------------------------------------------------------------------------------ learning

# For data2vec 1.0 the targets move while the student learns: the teacher is an EMA of the student and
# its input comes from the student's (trained) local encoder. Image runs the preset (the teacher follows);
# text and audio freeze the teacher (tau = 1) and audio also turns dropout / layer-drop off, since its
# instance-normalised targets keep shifting with the shared CNN. MAE's floor is the unpredictable part of
# random-noise pixels (see the next test for structured images). The EMA update itself is tested above.
FROZEN_TEACHER = {"ema_decay": 1.0, "ema_end_decay": 1.0}
NO_DROPOUT = {"encoder": {"dropout": 0.0, "attention_dropout": 0.0, "post_mlp_dropout": 0.0, "prenet_dropout": 0.0,
                          "layerdrop": 0.0, "prenet_layerdrop": 0.0}}


@pytest.mark.parametrize("modality,name,overrides,steps,factor", [
    ("image", "mae", {}, 40, 2.0), ("image", "data2vec1", {}, 40, 5.0),
    ("speech", "data2vec1", {**FROZEN_TEACHER, **NO_DROPOUT}, 60, 2.5),
    ("text", "data2vec1", FROZEN_TEACHER, 40, 5.0), ("text", "mlm", {}, 40, 5.0),
    ("speech", "hubert", {"num_classes": 20, **NO_DROPOUT}, 40, 2.0),
    ("speech", "wavlm", {"num_classes": 20, **NO_DROPOUT}, 40, 2.0), ("text", "bert", {}, 40, 5.0)])
def test_loss_falls_on_one_batch(modality, name, overrides, steps, factor):
    torch.manual_seed(0)
    method = build_method(modality, name, "smoke", overrides)
    batch = masked(method, method.stand_in_inputs(make_batch(modality, batch_size=2), torch.Generator().manual_seed(0)))
    optimiser = torch.optim.AdamW(method.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = method(batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.after_step(step + 1, fraction=0.0)
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / factor, losses


def test_mae_predicts_masked_patches_of_structured_images():
    """On plane waves the masked patches follow from the visible ones: MAE must beat the trivial
    prediction 0, whose loss on per-patch normalised 2x2 patches is (n - 1) / n = 0.75."""
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images = torch.stack([torch.sin(2 * torch.pi * (2 * x + 3 * y) / 28), torch.sin(2 * torch.pi * (4 * x - y) / 28 + 1)])
    torch.manual_seed(0)
    mae = build_method("image", "mae", "smoke")
    batch = masked(mae, {"source": images[:, None], "id": torch.arange(2)})
    optimiser = torch.optim.AdamW(mae.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        loss = mae(batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.68, loss.item()
