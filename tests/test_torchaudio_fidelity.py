"""The speech backbone against torchaudio's wav2vec 2.0 (``torchaudio.models.wav2vec2_model``, the architecture of
fairseq's ``Wav2Vec2Model``), on every CI: a randomly initialised torchaudio model's weights, loaded into ours
through an explicit name table that must use every tensor, give the same CNN features, feature projection and
Transformer outputs. What differs by design is left out on both sides: wav2vec 2.0's single weight-normed
positional convolution (ours: data2vec 2.0's 5-layer one) is zeroed in torchaudio and absent in ours, and
ALiBi is off (docs/FIDELITY_BASELINES.md#wav2vec-20)."""
import pytest
import torch
from torchaudio.models import wav2vec2_model, wavlm_model

from d2v2.model.blocks import relative_position_bucket
from d2v2.model.encoder import Encoder, EncoderConfig

CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
D, HEADS, DEPTH = 48, 3, 2


BUCKETS, MAX_DISTANCE = 320, 800                      # WavLM Base


def pair(wavlm: bool = False):
    """torchaudio's wav2vec 2.0 (or WavLM: with gated relative position bias) and our encoder of the same
    shape, ours with that bias switched on for WavLM."""
    torch.manual_seed(0)
    common = dict(
        extractor_mode="layer_norm", extractor_conv_layer_config=CONV, extractor_conv_bias=False,
        encoder_embed_dim=D, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4,
        encoder_num_layers=DEPTH, encoder_num_heads=HEADS, encoder_attention_dropout=0.0,
        encoder_ff_interm_features=4 * D, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)
    theirs = (wavlm_model(**common, encoder_num_buckets=BUCKETS, encoder_max_distance=MAX_DISTANCE) if wavlm
              else wav2vec2_model(**common)).eval()
    pos = theirs.encoder.transformer.pos_conv_embed.conv
    with torch.no_grad():          # positional convolutions differ by design: theirs outputs 0 (its weight
        pos.parametrizations.weight.original0.zero_()          # norm's gain; the direction must stay non-zero)
        pos.bias.zero_()
        if wavlm:                  # torchaudio starts the gate scales at 1 and the table at N(0, 1): vary them
            for layer in theirs.encoder.transformer.layers:
                layer.attention.gru_rel_pos_const.uniform_(0.5, 1.5)
    relative = {"relative_position": {"num_buckets": BUCKETS, "max_distance": MAX_DISTANCE}} if wavlm else {}
    ours = Encoder(EncoderConfig(modality="speech", embed_dim=D, num_heads=HEADS, depth=DEPTH, **relative,
                                 speech={"conv_layers": CONV, "conv_pos_depth": 0, "use_alibi": False})).eval()
    return theirs, ours


def name_table(depth: int, wavlm: bool = False) -> dict[str, tuple[str, ...]]:
    """Our parameter -> the torchaudio parameters it is made of (concatenated along dim 0)."""
    if wavlm:
        table = {k: v for k, v in name_table(depth).items() if ".attn.qkv." not in k}
        for i in range(depth):
            t, o = f"encoder.transformer.layers.{i}.attention", f"blocks.{i}.attn"
            table.update({f"{o}.qkv.weight": (f"{t}.attention.in_proj_weight",),
                          f"{o}.qkv.bias": (f"{t}.attention.in_proj_bias",),
                          f"{o}.proj.weight": (f"{t}.attention.out_proj.weight",),
                          f"{o}.proj.bias": (f"{t}.attention.out_proj.bias",),
                          f"{o}.gate.weight": (f"{t}.gru_rel_pos_linear.weight",),
                          f"{o}.gate.bias": (f"{t}.gru_rel_pos_linear.bias",),
                          f"{o}.gate_scale": (f"{t}.gru_rel_pos_const",)})
        table["relative_position.embed.weight"] = ("encoder.transformer.layers.0.attention.rel_attn_embed.weight",)
        return table
    table = {}
    for i in range(len(CONV)):
        table[f"local_encoder.feature_extractor.{i}.conv.weight"] = (f"feature_extractor.conv_layers.{i}.conv.weight",)
        for p in ("weight", "bias"):
            table[f"local_encoder.feature_extractor.{i}.norm.{p}"] = (f"feature_extractor.conv_layers.{i}.layer_norm.{p}",)
    for p in ("weight", "bias"):
        table[f"local_encoder.project_features.0.{p}"] = (f"encoder.feature_projection.layer_norm.{p}",)
        table[f"local_encoder.project_features.1.{p}"] = (f"encoder.feature_projection.projection.{p}",)
        table[f"context_encoder.norm.{p}"] = (f"encoder.transformer.layer_norm.{p}",)
        for i in range(depth):
            t, o = f"encoder.transformer.layers.{i}", f"blocks.{i}"
            table[f"{o}.attn.qkv.{p}"] = tuple(f"{t}.attention.{x}_proj.{p}" for x in "qkv")
            table[f"{o}.attn.proj.{p}"] = (f"{t}.attention.out_proj.{p}",)
            table[f"{o}.norm1.{p}"] = (f"{t}.layer_norm.{p}",)
            table[f"{o}.mlp.fc1.{p}"] = (f"{t}.feed_forward.intermediate_dense.{p}",)
            table[f"{o}.mlp.fc2.{p}"] = (f"{t}.feed_forward.output_dense.{p}",)
            table[f"{o}.norm2.{p}"] = (f"{t}.final_layer_norm.{p}",)
    return table


def load(theirs, ours, wavlm: bool = False) -> None:
    source = dict(theirs.named_parameters())
    table = name_table(DEPTH, wavlm)
    used = {name for names in table.values() for name in names}
    unused = set(source) - used - {n for n in source if n.startswith("encoder.transformer.pos_conv_embed.")}
    assert not unused, f"torchaudio tensors without a place in ours: {sorted(unused)}"
    state = {ours_name: torch.cat([source[n].detach() for n in names]) for ours_name, names in table.items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("num_batches_tracked")], missing


def test_the_name_table_uses_every_tensor_and_fills_every_parameter():
    theirs, ours = pair()
    load(theirs, ours)
    assert set(name_table(DEPTH)) == {n for n, _ in ours.named_parameters()}


def test_cnn_projection_and_blocks_match_torchaudio():
    theirs, ours = pair()
    load(theirs, ours)
    wave = torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cnn_theirs, _ = theirs.feature_extractor(wave, None)
        cnn_ours = ours.local_encoder.cnn(wave)
        torch.testing.assert_close(cnn_ours, cnn_theirs, rtol=1e-5, atol=1e-5)
        proj_theirs = theirs.encoder.feature_projection(cnn_theirs)
        proj_ours, _ = ours.local_encoder.project(cnn_ours)
        torch.testing.assert_close(proj_ours, proj_theirs, rtol=1e-5, atol=1e-5)
        layers_theirs = theirs.encoder.extract_features(cnn_theirs)          # every layer's output
        out = ours(wave)
        torch.testing.assert_close(out.x, layers_theirs[-1], rtol=1e-4, atol=1e-4)
        final_theirs, _ = theirs(wave)
        torch.testing.assert_close(out.x, final_theirs, rtol=1e-4, atol=1e-4)


def test_an_injected_difference_is_caught():
    """The comparison can fail: swapping q and k in one block's fused projection changes the output."""
    theirs, ours = pair()
    load(theirs, ours)
    with torch.no_grad():
        qkv = ours.blocks[1].attn.qkv.weight
        qkv.copy_(torch.cat([qkv[D:2 * D], qkv[:D], qkv[2 * D:]]))
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pytest.raises(AssertionError):
        torch.testing.assert_close(ours(wave).x, theirs(wave)[0], rtol=1e-4, atol=1e-4)


def test_wavlm_gated_relative_position_bias_matches_torchaudio():
    """WavLM (docs/FIDELITY_BASELINES.md#wavlm): our encoder with relative_position on, loaded from
    torchaudio's wavlm_model, gives the same outputs; the buckets are torchaudio's."""
    theirs, ours = pair(wavlm=True)
    load(theirs, ours, wavlm=True)
    assert set(name_table(DEPTH, wavlm=True)) == {n for n, _ in ours.named_parameters()}
    offsets = torch.arange(-1000, 1001)[None]
    attention = theirs.encoder.transformer.layers[0].attention
    assert torch.equal(relative_position_bucket(offsets, BUCKETS, MAX_DISTANCE),
                       attention._relative_positions_bucket(offsets, bidirectional=True))
    wave = torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final_theirs, _ = theirs(wave)
        torch.testing.assert_close(ours(wave).x, final_theirs, rtol=1e-4, atol=1e-4)
        for block in ours.blocks:               # without the gates the outputs differ: they are in use
            block.attn.gate_scale.fill_(3.0)
        assert not torch.allclose(ours(wave).x, final_theirs, rtol=1e-4, atol=1e-4)
