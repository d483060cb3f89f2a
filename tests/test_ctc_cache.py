"""The frozen-CNN feature cache of CTC fine-tuning (heads.FrozenFeatureCache) is exact: the CNN output of an
utterance does not depend on the batch it is padded into, the cached forward/loss/training equal the uncached
ones, the CNN runs once per utterance, and the frozen-Transformer and linear-probe paths still work."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from d2v2.config import ConfigError
from d2v2.data.speech import collate_finetune
from d2v2.model.encoder import Encoder
from d2v2.engine import finetune as F
from d2v2.engine.ftconfig import finetune_config
from d2v2.engine.heads import CTCRecognizer, FrozenFeatureCache
from d2v2.method import build_method
from d2v2.model.modalities.speech import frame_count

LENGTHS = [8000, 5123, 6400, 3001, 7777, 4500]      # samples; 6400 = 20 frames exactly at stride 320


def _encoder() -> Encoder:
    """A smoke encoder whose CNN LayerNorms are not at their init (weight 1, bias 0), like a pretrained
    one: at init the CNN maps silence to exactly 0, which would hide a wrong padding frame."""
    torch.manual_seed(0)
    encoder = Encoder(build_method("speech", "data2vec2", "smoke").encoder().cfg)
    with torch.no_grad():
        for layer in encoder.local_encoder.feature_extractor:
            layer.norm.weight.normal_(1.0, 0.2)
            layer.norm.bias.normal_(0.0, 0.5)
    return encoder


def _model(**kwargs) -> CTCRecognizer:
    encoder = _encoder()
    return CTCRecognizer(encoder, encoder.cfg.embed_dim, 29, encoder.local_encoder.feature_extractor, **kwargs)


class _Utterances(Dataset):
    """Random waveforms with random letter targets, items shaped like SpeechFinetuneDataset's."""

    def __init__(self, lengths: list[int]):
        g = torch.Generator().manual_seed(1)
        self.waves = [torch.randn(n, generator=g) for n in lengths]
        self.targets = [torch.randint(2, 29, (n // 1000,), generator=g) for n in lengths]

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict:
        return {"source": self.waves[i], "target": self.targets[i], "transcript": "A", "id": i}


def _batch(ids: list[int]) -> dict:
    data = _Utterances(LENGTHS)
    return collate_finetune([data[i] for i in ids])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_padded_batch_cnn_equals_per_utterance_on_valid_frames():
    local = _encoder().local_encoder
    batch = _batch(list(range(len(LENGTHS))))
    with torch.no_grad():
        padded = local.cnn(batch["source"])
        for b, n in enumerate(LENGTHS):
            alone = local.cnn(batch["source"][b:b + 1, :n])[0]
            assert alone.shape[0] == frame_count(n, local.cfg.conv_layers)
            torch.testing.assert_close(padded[b, :alone.shape[0]], alone, rtol=1e-5, atol=1e-5)
        # and the cache rebuilds the whole padded output, padding frames included
        cached = FrozenFeatureCache(local)(batch["source"], batch["padding_mask"], batch["id"])
    torch.testing.assert_close(cached, padded, rtol=1e-5, atol=1e-5)


def test_cached_forward_and_loss_equal_uncached():
    model = _model(mask_prob=0.3, mask_length=2, channel_prob=0.3, channel_length=4).train()
    batch = _batch([3, 0, 5, 2])

    def run():
        torch.manual_seed(123)                            # the same span / channel masks and noise
        out = model(batch)
        loss = model.loss(out, batch["target"], batch["target_lengths"])
        model.zero_grad()
        loss.backward()
        return out[0].detach(), out[1], loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                          if p.grad is not None}

    reference = run()
    model.feature_cache = FrozenFeatureCache(model.encoder.local_encoder)
    first, hit = run(), run()                             # computes the features, then reads them
    assert model.feature_cache.cnn_utterances == 4
    for got in (first, hit):
        torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], reference[1])
        torch.testing.assert_close(got[2], reference[2], rtol=1e-5, atol=1e-4)
        assert got[3].keys() == reference[3].keys() and "encoder.local_encoder.project_features.1.weight" in got[3]
        for k in reference[3]:
            torch.testing.assert_close(got[3][k], reference[3][k], rtol=1e-4, atol=1e-5)
    model.eval()                      # evaluation never reads the training cache (other splits reuse ids)
    other = _batch([1, 4, 0, 3])
    model({**other, "id": batch["id"]})
    assert model.feature_cache.cnn_utterances == 4 and len(model.feature_cache.frames) == 4


def _train(model: CTCRecognizer, batch_size: int = 2, epochs: int = 2, **overrides):
    cfg = finetune_config({"modality": "speech", "preset": "smoke", "freeze_updates": 0, "seed": 0,
                           "budget": {"kind": "epochs", "value": epochs}, **overrides})
    loader = DataLoader(_Utterances(LENGTHS), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator(), collate_fn=collate_finetune)
    torch.manual_seed(0)
    F.train(model, cfg, 1e-3, loader, torch.device("cpu"), log=lambda *_: None)
    return cfg


def test_cnn_runs_once_per_utterance_across_epochs():
    model = _model(mask_prob=0.3, mask_length=2)
    rows = []
    model.encoder.local_encoder.feature_extractor.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    _train(model, epochs=2)
    assert sum(rows) == len(LENGTHS) + 1                  # each utterance once, plus the all-zero frame
    assert model.feature_cache is None                    # released after training


def test_training_with_cache_equals_training_without():
    cached, plain = _model(mask_prob=0.3, mask_length=2), _model(mask_prob=0.3, mask_length=2)
    _train(cached, epochs=2)
    _train(plain, epochs=2, cache_frozen_features=False)
    a, b = cached.state_dict(), plain.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_frozen_transformer_and_linear_probe_with_cache():
    model = _model(mask_prob=0.3, mask_length=2)
    before = _snapshot(model)
    _train(model, epochs=1, freeze_updates=10)            # the whole epoch with the Transformer frozen
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"proj.weight", "proj.bias"}

    encoder = _encoder()
    probe = CTCRecognizer(encoder, encoder.cfg.embed_dim, 29, encoder.local_encoder.feature_extractor,
                          mask_prob=0.3, mask_length=2, linear_probe=True)
    before = _snapshot(probe)
    _train(probe, epochs=2, mode="linear_probe")
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"proj.weight", "proj.bias"}


def test_cache_rejects_what_it_cannot_serve():
    local = _encoder().local_encoder
    cache = FrozenFeatureCache(local)
    batch = _batch([0, 1])
    cache(batch["source"], batch["padding_mask"], batch["id"])
    with pytest.raises(ValueError, match="one dataset"):             # the same id, another utterance
        short = _batch([3, 1])
        cache(short["source"], short["padding_mask"], torch.tensor([0, 1]))
    noisy = batch["source"].masked_fill(batch["padding_mask"], 0.5)
    with pytest.raises(ValueError, match="zero-padded"):           # checked on the batches that fill the cache
        FrozenFeatureCache(local)(noisy, batch["padding_mask"], batch["id"])
    with pytest.raises(ConfigError, match="cache_frozen_features"):
        finetune_config({"modality": "image", "cache_frozen_features": True})


def test_finetuning_reads_each_cached_utterance_once(tmp_path, monkeypatch):
    """Loading in the training process, an utterance whose frozen features are cached is not read again:
    its source is zeros of its length (SpeechFinetuneDataset.cached_ids), each file is read once, the dataset
    forgets the cache after training, and the trained weights equal training without the cache."""
    import numpy as np
    import soundfile as sf

    import d2v2.data.speech as speech
    from d2v2.data.speech import SpeechDataConfig, SpeechFinetuneDataset, words_to_letters

    rng = np.random.default_rng(0)
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n" + "".join(f"{i}.wav\t{n}\n" for i, n in enumerate(LENGTHS)))
    for i, n in enumerate(LENGTHS):
        sf.write(tmp_path / f"{i}.wav", 0.1 * rng.standard_normal(n), 16000, subtype="FLOAT")
    words = ["A BC", "DE F", "G H", "IJ K", "L MN", "O P"]
    (tmp_path / "train.ltr").write_text("".join(words_to_letters(w) + "\n" for w in words))
    reads, load_audio = [], speech.load_audio
    monkeypatch.setattr(speech, "load_audio", lambda path, *args: reads.append(path) or load_audio(path, *args))

    def train(cache: bool):
        data = SpeechFinetuneDataset(None, SpeechDataConfig(source="manifest", manifest_dir=str(tmp_path)), "train")
        loader = DataLoader(data, batch_size=2, shuffle=True, drop_last=True, generator=torch.Generator(),
                            collate_fn=collate_finetune)
        cfg = finetune_config({"modality": "speech", "preset": "smoke", "freeze_updates": 0, "seed": 0,
                               "budget": {"kind": "epochs", "value": 3}, "cache_frozen_features": cache})
        model = _model(mask_prob=0.3, mask_length=2)
        torch.manual_seed(0)
        F.train(model, cfg, 1e-3, loader, torch.device("cpu"), log=lambda *_: None)
        return model, data

    cached, data = train(cache=True)
    assert sorted(map(str, reads)) == sorted(str(tmp_path / f"{i}.wav") for i in range(len(LENGTHS)))   # once each
    assert data.cached_ids == () and torch.equal(data[0]["source"], data[0]["source"]) and data[0]["source"].any()
    reads.clear()
    plain, _ = train(cache=False)
    assert len(reads) == 3 * len(LENGTHS)
    a, b = cached.state_dict(), plain.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
