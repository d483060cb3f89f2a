"""Speech data: the synthesised corpus, both manifest layouts, letters, collaters and errors."""
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from d2v2.config import ConfigError, validate
from d2v2.data.speech import (LETTERS, SpeechDataConfig, SpeechFinetuneDataset, SpeechPretrainDataset,
                              collate_finetune, collate_pretrain, ids_to_letters, letters_to_ids,
                              letters_to_words, words_to_letters)
from d2v2.data.speech_synth import _corrupt, coloured_noise, normalise_text, prepare_speech

TINY = {"num_pretrain": 6, "num_train": 4, "num_valid": 2, "num_test": 4, "num_test_flite": 3}


def _cfg(synth=None, **top):
    return validate(SpeechDataConfig, {"synth": {**TINY, **(synth or {})}, **top}, where="data.speech")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech") / "corpus"
    cfg = _cfg(min_sample_size=0)
    return root, cfg, prepare_speech(root, cfg, workers=2)


def _offset(full, crop):
    """Where ``crop`` starts inside ``full`` (asserting it is an exact contiguous window)."""
    starts = (full.unfold(0, 16, 1) == crop[:16]).all(dim=1).nonzero().flatten().tolist()
    found = [s for s in starts if torch.equal(full[s:s + len(crop)], crop)]
    assert found, "not a contiguous window of the utterance"
    return found[0]


def _meta(root, split):
    return pd.read_csv(root / f"{split}.meta.tsv", sep="\t")


# ---------------------------------------------------------------------------------------------- letters
def test_letters_round_trip():
    ltr = words_to_letters("it's a Test")
    assert ltr == "I T ' S | A | T E S T |"
    ids = letters_to_ids(ltr)
    assert ids[:5] == [LETTERS.index("I"), LETTERS.index("T"), 28, LETTERS.index("S"), 1] and min(ids) >= 1 and max(ids) <= 28
    assert LETTERS[0] == "<blank>" and LETTERS[1] == "|" and LETTERS[2] == "A" and LETTERS[27] == "Z"
    assert ids_to_letters(ids) == ltr and ids_to_letters([0, *ids, -1, -1]) == ltr
    assert letters_to_words(ltr) == "IT'S A TEST"
    with pytest.raises(ValueError, match="not letters"):
        words_to_letters("room 101")
    with pytest.raises(ValueError, match="unknown symbol"):
        letters_to_ids("A B 7 |")


def test_normalise_text():
    assert normalise_text("Press 1 for help, or 2...") == "PRESS ONE FOR HELP OR TWO"
    assert normalise_text("Call-Forward on Busy.") == "CALL FORWARD ON BUSY"
    assert normalise_text("the team's 'unit'") == "THE TEAM'S UNIT"
    for bad in ("[beep]", "dial 500", "DNA is old", "H.323", "caf\u00e9 au lait", "(1 second of silence)"):
        assert normalise_text(bad) is None, bad


# ---------------------------------------------------------------------------------------------- corpus
def test_corpus_items_shapes_dtypes_labels(corpus):
    root, cfg, manifest = corpus
    assert {s: v["count"] for s, v in manifest["splits"].items() if s != "test_asterisk"} == {
        "pretrain": 6, "train": 4, "valid": 2, "test": 4, "test_flite": 3}
    ds = SpeechPretrainDataset(root, cfg, "pretrain")
    assert len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        assert item["id"] == i and item["source"].dtype == torch.float32 and item["source"].ndim == 1
        raw = torch.from_numpy(sf.read(str(ds.utts.paths[i]), dtype="float32")[0])
        assert torch.allclose(item["source"], torch.nn.functional.layer_norm(raw, raw.shape), atol=1e-4)
        assert abs(item["source"].mean()) < 1e-3 and 0.8 < item["source"].std() <= 1.0
        assert cfg.synth.min_seconds * 16000 <= len(item["source"]) <= cfg.synth.max_seconds * 16000
    for split in ("train", "valid", "test", "test_flite", "test_asterisk"):
        ft = SpeechFinetuneDataset(root, cfg, split)
        item = ft[len(ft) - 1]
        assert item["target"].dtype == torch.int64 and 1 <= int(item["target"].min())
        assert int(item["target"].max()) < len(LETTERS) and int(item["target"][-1]) == 1
        assert words_to_letters(item["transcript"]) == ids_to_letters(item["target"])
        info = sf.info(str(ft.utts.paths[len(ft) - 1]))
        assert info.samplerate == 16000 and info.channels == 1 and info.frames == len(item["source"])
    # the synthesised audio is not silence and not clipped, and the noise is really there
    wav, _ = sf.read(str(ds.utts.paths[0]))
    assert 0.02 < np.abs(wav).max() < 1.0 and np.abs(wav[:50]).max() > 0


def test_heldout_voices_and_engine_never_in_training_splits(corpus):
    root, cfg, manifest = corpus
    heldout = set(cfg.synth.heldout_variants)
    for split in ("pretrain", "train", "valid"):
        meta = _meta(root, split)
        assert set(meta["engine"]) == {"espeak-ng"}
        assert not {v.split("+")[1] for v in meta["voice"]} & heldout
        assert not set(meta["voice"]) & set(cfg.synth.flite_voices)
    test = _meta(root, "test")
    assert {v.split("+")[1] for v in test["voice"]} <= heldout
    assert set(_meta(root, "test_flite")["engine"]) == {"flite"}
    assert set(manifest["splits"]["test_asterisk"]["engines"]) == {"human"}
    # the test sentences come from a pool disjoint from the training sentences
    train_words = set((root / "train.wrd").read_text().splitlines())
    assert not train_words & set((root / "test.wrd").read_text().splitlines())
    assert "words" not in _meta(root, "pretrain") and not (root / "pretrain.ltr").exists()


def test_generation_is_deterministic_and_cached(tmp_path, corpus):
    _, _, first = corpus
    cfg = _cfg(synth={"asterisk": False})
    again = prepare_speech(tmp_path / "a", cfg, workers=1)          # another process count, same corpus
    for split, info in again["splits"].items():
        assert info["audio_sha256"] == first["splits"][split]["audio_sha256"], split
    stamp = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    assert not again["skipped"] and prepare_speech(tmp_path / "a", cfg)["skipped"]     # cached: nothing rewritten
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == stamp
    other = prepare_speech(tmp_path / "a", _cfg(synth={"asterisk": False, "seed": 1, "num_pretrain": 2}))
    assert not other["skipped"] and other["splits"]["pretrain"]["count"] == 2       # another config: rebuilt
    assert other["splits"]["train"]["audio_sha256"] != again["splits"]["train"]["audio_sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]               # no temp folders left


def test_noise_colour_and_snr():
    rng = np.random.default_rng(0)
    for exponent in (0.0, 1.0, 2.0):        # power spectrum slope on a log-log scale is -exponent
        noise = coloured_noise(1 << 16, exponent, rng)
        power = np.abs(np.fft.rfft(noise)) ** 2
        freqs = np.fft.rfftfreq(len(noise))
        band = (freqs > 1e-3) & (freqs < 0.4)
        slope = np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0]
        assert abs(np.mean(noise ** 2) - 1) < 1e-6 and abs(slope + exponent) < 0.1, (exponent, slope)
    speech = np.sin(np.linspace(0, 2000, 16000))
    mixed = _corrupt(speech, 800, 400, snr_db=5.0, exponent=1.0, gain_db=-6.0, rng=rng)
    assert len(mixed) == 17200 and abs(np.abs(mixed).max() - 10 ** (-6 / 20)) < 1e-6
    clean = np.concatenate([np.zeros(800), speech, np.zeros(400)])
    gain = np.dot(mixed, clean) / np.dot(clean, clean)            # least-squares scale of the clean part
    noise = mixed - gain * clean
    snr = 10 * np.log10(np.mean((gain * speech) ** 2) / np.mean(noise ** 2))   # over the speech's own power
    assert abs(snr - 5.0) < 0.3, snr


# ---------------------------------------------------------------------------------------------- layouts
def _librispeech_fixture(root):
    """Two short FLAC utterances in LibriSpeech's layout, plus a fairseq manifest of the same files."""
    chapter = root / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    rng = np.random.default_rng(0)
    texts = ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"]
    for n, words in enumerate(texts):
        sf.write(chapter / f"84-121123-{n:04d}.flac", 0.1 * rng.standard_normal(8000 + 4000 * n), 16000)
    (chapter / "84-121123.trans.txt").write_text("".join(f"84-121123-{n:04d} {t}\n" for n, t in enumerate(texts)))
    manifest = root / "manifest"
    manifest.mkdir()
    base = root / "LibriSpeech"
    (manifest / "dev_clean.tsv").write_text(f"{base}\n" + "".join(
        f"dev-clean/84/121123/84-121123-{n:04d}.flac\t{8000 + 4000 * n}\n" for n in range(2)))
    (manifest / "dev_clean.ltr").write_text("".join(words_to_letters(t) + "\n" for t in texts))
    return texts


def test_librispeech_layout_and_fairseq_manifest_give_the_same_items(tmp_path):
    texts = _librispeech_fixture(tmp_path)
    libri = SpeechFinetuneDataset(None, _cfg(source="librispeech", librispeech_root=str(tmp_path)), "dev-clean")
    fair = SpeechFinetuneDataset(None, _cfg(source="manifest", manifest_dir=str(tmp_path / "manifest")), "dev_clean")
    assert len(libri) == len(fair) == 2 and list(libri.sizes) == [8000, 12000]
    for a, b, text in zip(libri, fair, texts):
        assert torch.equal(a["source"], b["source"]) and torch.equal(a["target"], b["target"])
        assert a["transcript"] == b["transcript"] == text
    pre = SpeechPretrainDataset(None, _cfg(source="librispeech", librispeech_root=str(tmp_path), min_sample_size=10000,
                                           split_names={"pretrain": "dev-clean+dev-clean"}), "pretrain")
    assert len(pre) == 2 and len(pre[0]["source"]) == 12000         # the 8000-sample utterances are dropped


def test_pretrain_random_crop_follows_torch_rng(corpus):
    root, cfg, _ = corpus
    full = SpeechPretrainDataset(root, cfg, "pretrain")[0]["source"]     # normalised before cropping
    ds = SpeechPretrainDataset(root, cfg.model_copy(update={"max_sample_size": 16000}), "pretrain")
    torch.manual_seed(0)                        # the engine's WithEpoch seeds it from (seed, epoch, index)
    a = ds[0]["source"]
    torch.manual_seed(0)
    assert len(a) == 16000 and torch.equal(a, ds[0]["source"])
    assert len({_offset(full, ds[0]["source"]) for _ in range(4)}) > 1


# ---------------------------------------------------------------------------------------------- collaters
def test_collate_pretrain_crops_to_shortest(corpus):
    root, cfg, _ = corpus
    ds = SpeechPretrainDataset(root, cfg, "pretrain")
    items = [ds[i] for i in range(4)]
    batch = collate_pretrain(items)
    shortest = min(len(it["source"]) for it in items)
    assert batch["source"].shape == (4, shortest) and batch["source"].dtype == torch.float32
    assert batch["id"].tolist() == [0, 1, 2, 3]
    offsets = [_offset(it["source"], row) for row, it in zip(batch["source"], items)]
    assert len(set(offsets)) > 1                    # random offsets, not all from the start
    assert torch.equal(collate_pretrain(items)["source"], batch["source"])     # deterministic by (epoch, ids)
    later = collate_pretrain([{**it, "epoch": 1} for it in items])["source"]
    assert later.shape == batch["source"].shape and not torch.equal(later, batch["source"])


def clock_labels(path, sizes):
    """A .km file whose label k of every utterance is k (100 per second, as MFCC frames)."""
    path.write_text("".join(" ".join(str(k) for k in range((n - 400) // 160 + 1)) + "\n" for n in sizes))
    return str(path)


def test_labels_follow_the_audio_through_both_crops(corpus, tmp_path):
    """HuBERT's labels: the dataset's random crop and the collater's crop to the shortest move the labels
    with the audio, and the masker gives frame t the label at 2 t after the crop's start (fairseq)."""
    from d2v2.method import build_method

    root, cfg, _ = corpus
    full = SpeechPretrainDataset(root, cfg, "pretrain")
    km = clock_labels(tmp_path / "pretrain.km", full.utts.sizes)
    ds = SpeechPretrainDataset(root, cfg.model_copy(update={"max_sample_size": 24000, "pretrain_labels": km}),
                               "pretrain")
    torch.manual_seed(0)
    batch = collate_pretrain([ds[i] for i in range(4)])
    out = build_method("speech", "hubert", "smoke").masker()(batch, torch.Generator().manual_seed(0))
    T = out["mask"].shape[1]
    assert out["frame_labels"].shape == (4, T)
    for b in range(4):
        start = _offset(full[b]["source"], batch["source"][b])
        assert start == batch["label_offsets"][b]
        assert out["frame_labels"][b].tolist() == [round(start / 160) + 2 * t for t in range(T)]


def test_bad_label_files_are_named(corpus, tmp_path):
    from d2v2.data.common import CorruptDataError, MissingDataError
    from d2v2.method import build_method

    root, cfg, _ = corpus
    sizes = SpeechPretrainDataset(root, cfg, "pretrain").utts.sizes
    short = tmp_path / "short.km"
    short.write_text("1 2 3\n")
    with pytest.raises(CorruptDataError, match="1 lines of labels but the split has"):
        SpeechPretrainDataset(root, cfg.model_copy(update={"pretrain_labels": str(short)}), "pretrain")
    with pytest.raises(MissingDataError, match="data.speech.pretrain_labels"):
        SpeechPretrainDataset(root, cfg.model_copy(update={"pretrain_labels": str(tmp_path / "none.km")}))
    bad = tmp_path / "bad.km"
    bad.write_text("1 2 x\n" * len(sizes))
    with pytest.raises(CorruptDataError, match="bad.km:1: expected space-separated cluster ids"):
        SpeechPretrainDataset(root, cfg.model_copy(update={"pretrain_labels": str(bad)}), "pretrain")[0]
    km = clock_labels(tmp_path / "pretrain.km", sizes)        # 100 per second, read as 50 per second
    ds = SpeechPretrainDataset(root, cfg.model_copy(update={"pretrain_labels": km}), "pretrain")
    masker = build_method("speech", "hubert", "smoke", {"label_rate": 50}).masker()
    with pytest.raises(ValueError, match="labels made at another rate"):
        masker(collate_pretrain([ds[0], ds[1]]), torch.Generator().manual_seed(0))


def test_collate_finetune_pads(corpus):
    root, cfg, _ = corpus
    ds = SpeechFinetuneDataset(root, cfg, "train")
    items = [ds[i] for i in range(3)]
    batch = collate_finetune(items)
    longest = max(len(it["source"]) for it in items)
    assert batch["source"].shape == batch["padding_mask"].shape == (3, longest)
    for b, it in enumerate(items):
        n, s = len(it["source"]), len(it["target"])
        assert not batch["padding_mask"][b, :n].any() and batch["padding_mask"][b, n:].all()
        assert (batch["source"][b, n:] == 0).all() and torch.equal(batch["source"][b, :n], it["source"])
        assert torch.equal(batch["target"][b, :s], it["target"]) and (batch["target"][b, s:] == -1).all()
        assert batch["target_lengths"][b] == s and batch["transcript"][b] == it["transcript"]


# ---------------------------------------------------------------------------------------------- errors
def test_truncated_or_corrupt_wav_is_named(tmp_path, corpus):
    root, cfg, _ = corpus
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)                                      # a moved corpus still loads
    assert torch.equal(SpeechFinetuneDataset(copy, cfg, "train")[0]["source"],
                       SpeechFinetuneDataset(root, cfg, "train")[0]["source"])
    victim = copy / (copy / "train.tsv").read_text().splitlines()[1].split("\t")[0]
    victim.write_bytes(victim.read_bytes()[:5000])                  # truncated data chunk
    ds = SpeechFinetuneDataset(copy, cfg, "train")
    with pytest.raises(ValueError, match=f"{victim}.*truncated"):
        ds[0]
    victim.write_bytes(b"RIFF\x00\x00")                               # no header at all
    with pytest.raises(ValueError, match=f"corrupt or unreadable audio file {victim}"):
        ds[0]


def test_missing_paths_and_bad_config_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data.speech.manifest_dir.*{tmp_path / 'nope'}"):
        SpeechPretrainDataset(None, _cfg(source="manifest", manifest_dir=str(tmp_path / "nope")), "train")
    with pytest.raises(FileNotFoundError, match="librispeech_root: no LibriSpeech/train-clean-100"):
        SpeechPretrainDataset(None, _cfg(source="librispeech", librispeech_root=str(tmp_path)), "train-clean-100")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        SpeechPretrainDataset(tmp_path, _cfg(), "pretrain")
    with pytest.raises(ConfigError, match="manifest_dir: required when source=manifest"):
        _cfg(source="manifest")
    with pytest.raises(ConfigError, match="data.speech.synth.num_pretrian: unknown key"):
        _cfg(synth={"num_pretrian": 3})
    with pytest.raises(ConfigError, match="heldout_variants: overlap"):
        _cfg(synth={"heldout_variants": ["m1"]})
    with pytest.raises(FileNotFoundError, match=r"data.speech.synth.variants: espeak-ng has no voice \['m99'\]"):
        prepare_speech(tmp_path / "x", _cfg(synth={"variants": ["m1", "m99"]}))
    with pytest.raises(FileNotFoundError, match="data.speech.synth.wordnet_dir: not found"):
        prepare_speech(tmp_path / "x", _cfg(synth={"wordnet_dir": str(tmp_path / "nowordnet")}))
