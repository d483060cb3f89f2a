"""Speech data: 16 kHz waveforms for pretraining and letter transcripts for CTC fine-tuning.

Three sources give the same items, so one pipeline serves the embedded corpus and the paper's data:

* ``synth`` (default): the synthesised corpus of :mod:`d2v2.data.speech_synth` (espeak-ng voices with
  noise; held-out espeak voices, a held-out engine (flite) and real recordings (Asterisk) as test sets;
  DATA.md#speech), written by :func:`d2v2.data.speech_synth.prepare_speech` in fairseq's manifest format;
* ``manifest``: fairseq manifests (``<split>.tsv``: first line the audio root, then
  ``relative_path<TAB>num_samples``; ``<split>.ltr``: letters, ``|`` ends each word; ``<split>.wrd``),
  as used for LibriSpeech / Libri-light by wav2vec 2.0 and data2vec. One extension: a relative root
  (the synthesised corpus writes ``.``) is taken relative to the manifest's folder, so a corpus can be
  copied (e.g. to node-local disk) without rewriting it;
* ``librispeech``: the unpacked LibriSpeech archives (torchaudio's ``LIBRISPEECH`` layout,
  ``<root>/LibriSpeech/<subset>/<spk>/<chapter>/*.flac`` + ``.trans.txt``); join subsets with ``+``
  (``train-clean-100+train-clean-360+train-other-500`` is LS-960). Every file header is read once to
  get its length (minutes for LS-960): at that scale fairseq manifests, which store lengths, load faster.

Input pipeline (METHOD.md#speech-encoder): raw mono waveform, normalised per utterance to zero mean and unit variance
(``normalize``, required by data2vec 2.0 checkpoints, METHOD.md#fine-tuning-speech); pretraining drops utterances shorter than
``min_sample_size`` and randomly crops to ``max_sample_size``; the pretraining batch is cropped to its
shortest utterance (no padding, METHOD.md#equal-mask-counts). Fine-tuning keeps whole utterances and pads.

CTC letters (METHOD.md#fine-tuning-speech): blank=0, ``|``=1 (word boundary), ``A``..``Z`` = 2..27, ``'`` = 28.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Container, Literal, Sequence

import numpy as np
import soundfile as sf
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from d2v2.config import Config
from d2v2.data.common import CorruptDataError, MissingDataError, read_manifest, \
    require_path, stable_seed

__all__ = [
    "LETTERS", "BLANK", "WORD_SEP", "words_to_letters", "letters_to_words", "letters_to_ids",
    "ids_to_letters", "SynthConfig", "SpeechDataConfig", "SPLITS", "source_path", "Utterances",
    "read_fairseq_manifest", "read_librispeech", "read_split", "load_audio", "normalise_waveform", "LabelFile",
    "SpeechPretrainDataset",
    "SpeechFinetuneDataset",
    "collate_pretrain", "collate_finetune",
]

# ----------------------------------------------------------------------------------------------------
# Letter vocabulary (METHOD.md#fine-tuning-speech: 26 letters + apostrophe + word boundary, plus the CTC blank)
# ----------------------------------------------------------------------------------------------------
BLANK, WORD_SEP = "<blank>", "|"
LETTERS: tuple[str, ...] = (BLANK, WORD_SEP, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "'")
_LETTER_ID = {c: i for i, c in enumerate(LETTERS)}


def words_to_letters(words: str) -> str:
    """``"hello world"`` -> ``"H E L L O | W O R L D |"`` (fairseq ``.ltr`` format)."""
    out = []
    for word in words.upper().split():
        bad = [c for c in word if c not in _LETTER_ID or c == WORD_SEP]
        if bad:
            raise ValueError(f"transcript {words!r}: characters {''.join(sorted(set(bad)))!r} are not letters "
                             "(normalise to A-Z and apostrophe first)")
        out.extend(word)
        out.append(WORD_SEP)
    return " ".join(out)


def letters_to_words(letters: str) -> str:
    """``"H E L L O | W O R L D |"`` -> ``"HELLO WORLD"`` (for word error rates)."""
    return " ".join(letters.replace(" ", "").split(WORD_SEP)).strip()


def letters_to_ids(letters: str) -> list[int]:
    """Space-separated letters (``.ltr`` line) -> ids; an unknown symbol is an error naming it."""
    try:
        return [_LETTER_ID[c] for c in letters.split()]
    except KeyError as err:
        raise ValueError(f"letters {letters!r}: unknown symbol {err.args[0]!r} (vocabulary: {LETTERS})") from None


def ids_to_letters(ids: Sequence[int]) -> str:
    """Ids -> ``.ltr`` string; blanks and padding (negative ids) are skipped."""
    return " ".join(LETTERS[i] for i in (int(i) for i in ids) if i > 0)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
# espeak-ng 1.51 voices: 7 English accents x variants (`espeak-ng --voices=variant`); klatt6 is left out
# because it renders identically to klatt. Held out by default: 2 classic variants, 1 Klatt, 1 whisper and
# 2 named voices, each in every accent.
_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"]
_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m8", "f1", "f2", "f3", "f5", "klatt", "klatt2", "klatt4",
             "klatt5", "croak", "whisper", "adam", "Andy", "Annie", "belinda", "benjamin", "ed",
             "edward", "john", "linda", "max", "paul", "quincy", "rob", "steph"]
_HELDOUT_VARIANTS = ["m7", "f4", "klatt3", "whisperf", "Alicia", "david"]
SPLITS = ("pretrain", "train", "valid", "test", "test_flite", "test_asterisk")


class SynthConfig(Config):
    """The synthesised corpus (DATA.md#speech); every field here is part of the cache key.

    Sentences are WordNet 3.0 example sentences, read by espeak-ng in ``accents`` x ``variants`` with random
    speed and pitch, then time-shifted, mixed with coloured noise and scaled. ``test`` uses the held-out
    variants/accents, ``test_flite`` a different engine, ``test_asterisk`` real recordings of one speaker.
    """

    seed: int = 0
    num_pretrain: int = Field(3000, ge=0)      # unlabelled
    num_train: int = Field(300, ge=0)          # labelled fine-tuning set
    num_valid: int = Field(100, ge=0)          # training voices, unseen sentences
    num_test: int = Field(200, ge=0)           # held-out espeak voices, unseen sentences
    num_test_flite: int = Field(200, ge=0)     # held-out engine, unseen sentences
    asterisk: bool = True                      # real recordings (8 kHz -> 16 kHz), out-of-domain test
    min_seconds: float = Field(2.0, gt=0)      # utterance length (speech + shifts); 2 s = paper's min crop
    max_seconds: float = Field(4.0, gt=0)
    snr_db: tuple[float, float] = (0.0, 20.0)          # speech-to-noise ratio, uniform
    noise_exponent: tuple[float, float] = (0.0, 2.0)   # noise power ~ 1/f^e: 0 white, 1 pink, 2 brown
    gain_db: tuple[float, float] = (-20.0, -1.0)       # peak level in dB full scale
    max_shift_seconds: float = Field(0.4, ge=0)        # random leading and trailing noise-only time
    speed_wpm: tuple[int, int] = (120, 220)            # espeak-ng -s
    pitch: tuple[int, int] = (10, 90)                  # espeak-ng -p (0-99)
    flite_stretch: tuple[float, float] = (0.85, 1.2)   # flite duration_stretch (speed)
    accents: list[str] = _ACCENTS
    variants: list[str] = _VARIANTS
    heldout_variants: list[str] = _HELDOUT_VARIANTS
    heldout_accents: list[str] = []
    flite_voices: list[str] = ["kal16", "slt", "rms", "awb"]
    # where the installed Debian packages put their data (wordnet-base, asterisk-core-sounds-en{,-wav})
    wordnet_dir: str = "/usr/share/wordnet"
    asterisk_dir: str = "/usr/share/asterisk/sounds/en"
    asterisk_transcripts: str = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"

    @model_validator(mode="after")
    def _check(self):
        for name in ("snr_db", "noise_exponent", "gain_db", "speed_wpm", "pitch", "flite_stretch"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: need min <= max (got {(lo, hi)})")
        if self.min_seconds >= self.max_seconds:
            raise ValueError(f"min_seconds/max_seconds: need min < max (got {self.min_seconds}, {self.max_seconds})")
        if not set(self.variants).isdisjoint(self.heldout_variants):
            raise ValueError(f"heldout_variants: overlap with variants: "
                             f"{sorted(set(self.variants) & set(self.heldout_variants))}")
        if not set(self.heldout_accents) <= set(self.accents):
            raise ValueError(f"heldout_accents: not in accents: {sorted(set(self.heldout_accents) - set(self.accents))}")
        if set(self.heldout_accents) == set(self.accents):
            raise ValueError("heldout_accents: every accent is held out; nothing is left for training")
        if not self.variants:
            raise ValueError("variants: need at least one training variant")
        return self


class SpeechDataConfig(Config):
    """Where speech comes from and how it is read (METHOD.md#speech-encoder, METHOD.md#fine-tuning-speech; module docstring)."""

    source: Literal["synth", "manifest", "librispeech"] = "synth"
    manifest_dir: str | None = None        # source=manifest: folder with <split>.tsv/.ltr (fairseq)
    librispeech_root: str | None = None    # source=librispeech: folder containing LibriSpeech/<subset>/
    sample_rate: int = Field(16_000, gt=0)
    normalize: bool = True                 # per-utterance zero mean / unit variance (data2vec 2.0: true)
    max_sample_size: int = Field(320_000, ge=1)   # pretraining random crop (20 s)
    min_sample_size: int = Field(32_000, ge=0)    # pretraining drops shorter utterances (2 s)
    # our split name -> the source's (manifest stem or "+"-joined LibriSpeech subsets), e.g. for LS-960:
    # {pretrain: train-clean-100+train-clean-360+train-other-500, train: train-clean-100, valid: dev-other,
    #  test: test-other}; unmapped names are used as they are
    split_names: dict[str, str] = {}
    # k-means labels of the pretraining split for HuBERT (METHOD.md#baseline-hubert): fairseq's ``.km``
    # format, one line of space-separated cluster ids per utterance of the split's manifest, in its order;
    # the workflow makes and sets them
    pretrain_labels: str | None = None
    synth: SynthConfig = SynthConfig()

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == "manifest" and not self.manifest_dir:
            raise ValueError("manifest_dir: required when source=manifest")
        if self.source == "librispeech" and not self.librispeech_root:
            raise ValueError("librispeech_root: required when source=librispeech")
        return self


# ----------------------------------------------------------------------------------------------------
# Reading: an index of utterances, from either layout
# ----------------------------------------------------------------------------------------------------
@dataclass
class Utterances:
    """A split: absolute audio paths, their lengths in samples and (if labelled) their words."""

    paths: list[Path]
    sizes: np.ndarray              # int64 samples
    words: list[str] | None        # upper-case words, or None for unlabelled data
    letters: list[str] | None      # fairseq .ltr lines, or None


def source_path(cfg: SpeechDataConfig) -> tuple[str, Path]:
    """The config key and the checked path of an external speech source (``manifest`` / ``librispeech``)."""
    key = {"manifest": "manifest_dir", "librispeech": "librispeech_root"}[cfg.source]
    hint = "fairseq manifests <split>.tsv/.ltr" if cfg.source == "manifest" else "folder containing LibriSpeech/"
    return key, require_path(getattr(cfg, key), f"data.speech.{key}", hint)


def read_fairseq_manifest(manifest_dir: Path, split: str) -> Utterances:
    """Read fairseq's ``<split>.tsv`` (+ ``.ltr``/``.wrd`` when present)."""
    tsv = Path(manifest_dir) / f"{split}.tsv"
    if not tsv.is_file():
        have = sorted(p.stem for p in Path(manifest_dir).glob("*.tsv"))
        raise MissingDataError(f"speech split '{split}': no manifest {tsv} (have: {have}; "
                               "map split names with data.speech.split_names)")
    lines = tsv.read_text().splitlines()
    if not lines:
        raise CorruptDataError(f"{tsv}: empty manifest (the first line must be the audio root folder)")
    root = Path(lines[0].strip())
    root = root if root.is_absolute() else tsv.parent / root    # our extension: relative to the manifest
    paths, sizes = [], []
    for n, line in enumerate(lines[1:], start=2):
        try:
            rel, size = line.split("\t")[:2]
            sizes.append(int(size))
        except ValueError:
            raise CorruptDataError(f"{tsv}:{n}: expected 'relative_path<TAB>num_samples', got {line!r}") from None
        paths.append(root / rel)

    def side(ext: str) -> list[str] | None:
        path = tsv.with_suffix(ext)
        if not path.is_file():
            return None
        rows = path.read_text().splitlines()
        if len(rows) != len(paths):
            raise CorruptDataError(f"{path}: {len(rows)} lines but {tsv} lists {len(paths)} utterances")
        return rows

    letters, words = side(".ltr"), side(".wrd")
    if words is None and letters is not None:
        words = [letters_to_words(x) for x in letters]
    return Utterances(paths, np.asarray(sizes, dtype=np.int64), words, letters)


def read_librispeech(root: Path, split: str) -> Utterances:
    """Read LibriSpeech subsets (``+``-joined) in torchaudio's layout; lengths come from the file headers."""
    from torchaudio.datasets import LIBRISPEECH

    paths, sizes, words = [], [], []
    for subset in split.split("+"):
        if not (Path(root) / "LibriSpeech" / subset).is_dir():
            raise MissingDataError(f"data.speech.librispeech_root: no LibriSpeech/{subset} under {root}")
        ds = LIBRISPEECH(root, url=subset, download=False)
        for n in range(len(ds)):
            rel, _, transcript, *_ = ds.get_metadata(n)
            path = Path(root) / "LibriSpeech" / rel      # get_metadata is relative to the archive folder
            try:
                sizes.append(sf.info(str(path)).frames)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise CorruptDataError(f"corrupt or unreadable audio file {path}: {err}") from None
            paths.append(path)
            words.append(transcript.upper())
    return Utterances(paths, np.asarray(sizes, dtype=np.int64), words, [words_to_letters(w) for w in words])


def read_split(root: Path, cfg: SpeechDataConfig, split: str) -> Utterances:
    """The utterances of ``split`` (mapped through ``split_names``) from the configured source."""
    name = cfg.split_names.get(split, split)
    if cfg.source == "synth":
        if read_manifest(root) is None:
            raise MissingDataError(f"speech corpus not prepared at {root}: run "
                                   "`python -m d2v2 prepare-data --modalities speech` first")
        return read_fairseq_manifest(Path(root), name)
    _, path = source_path(cfg)
    return read_fairseq_manifest(path, name) if cfg.source == "manifest" else read_librispeech(path, name)


def load_audio(path: Path, num_samples: int | None, sample_rate: int) -> np.ndarray:
    """Read a mono file as float32; a corrupt, truncated or wrong-rate file is an error naming it."""
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise CorruptDataError(f"corrupt or unreadable audio file {path}: {err}") from None
    if sr != sample_rate:
        raise CorruptDataError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz")
    if wav.ndim != 1:
        raise CorruptDataError(f"{path}: {wav.shape[1]} channels, expected mono")
    if num_samples is not None and len(wav) != num_samples:
        raise CorruptDataError(f"{path}: truncated or changed audio file: {len(wav)} samples, "
                         f"the manifest says {num_samples}")
    return wav


def normalise_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance, as fairseq's ``F.layer_norm(wav, wav.shape)`` (eps 1e-5)."""
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Datasets and collaters
# ----------------------------------------------------------------------------------------------------
class _SpeechDataset(Dataset):
    def __init__(self, root: Path, cfg: SpeechDataConfig, split: str):
        self.cfg, self.split = cfg, split
        self.utts = read_split(root, cfg, split)
        self.index = np.arange(len(self.utts.paths))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sizes(self) -> np.ndarray:
        """Length in samples of every item (for length-bucketed batching)."""
        return self.utts.sizes[self.index]

    def _wave(self, i: int) -> np.ndarray:
        j = self.index[i]
        wav = load_audio(self.utts.paths[j], int(self.utts.sizes[j]), self.cfg.sample_rate)
        return normalise_waveform(wav) if self.cfg.normalize else wav


class LabelFile:
    """A ``.km`` file read a line at a time (fairseq's label offsets): line ``j`` -> int64 cluster ids. The
    line count must match the manifest's utterances; a line that is not integers is an error naming it."""

    def __init__(self, path: Path, num_lines: int):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            lengths = [len(line) for line in f]
        if len(lengths) != num_lines:
            raise CorruptDataError(f"{self.path}: {len(lengths)} lines of labels but the split has {num_lines} "
                                   "utterances (one line per utterance, in the manifest's order)")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __getitem__(self, j: int) -> torch.Tensor:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[j]))
            line = f.read(int(self.offsets[j + 1] - self.offsets[j])).decode()
        try:
            return torch.tensor([int(x) for x in line.split()], dtype=torch.long)
        except ValueError:
            raise CorruptDataError(f"{self.path}:{j + 1}: expected space-separated cluster ids, got "
                                   f"{line.strip()[:60]!r}") from None


class SpeechPretrainDataset(_SpeechDataset):
    """Unlabelled waveforms: ``{"source": float32 (N,), "id": int, "offset": int, "normalized": bool}``,
    N <= ``max_sample_size``;
    with ``pretrain_labels`` also ``"labels"``, the whole utterance's cluster ids (the method crops them to
    the audio it gets from ``offset``, the first sample's position in the utterance).

    Utterances shorter than ``min_sample_size`` are dropped; longer ones than ``max_sample_size`` are cropped
    at a random offset after normalising the whole utterance, as fairseq does. The offset comes from torch's
    global RNG, which the engine's ``WithEpoch`` seeds from ``(seed, epoch, index)``.
    """

    def __init__(self, root: Path, cfg: SpeechDataConfig, split: str = "pretrain"):
        super().__init__(root, cfg, split)
        self.index = np.flatnonzero(self.utts.sizes >= cfg.min_sample_size)
        if len(self.index) == 0:
            raise MissingDataError(f"speech split '{split}': every utterance is shorter than "
                                   f"data.speech.min_sample_size={cfg.min_sample_size}")
        self.labels = None
        if cfg.pretrain_labels is not None:
            path = require_path(cfg.pretrain_labels, "data.speech.pretrain_labels", "k-means labels (.km)")
            self.labels = LabelFile(path, len(self.utts.paths))

    def __getitem__(self, i: int) -> dict:
        wav = self._wave(i)
        excess, start = len(wav) - self.cfg.max_sample_size, 0
        if excess > 0:
            start = int(torch.randint(excess + 1, (1,)))
            wav = wav[start:start + self.cfg.max_sample_size]
        item = {"source": torch.from_numpy(wav), "id": i, "offset": start, "normalized": self.cfg.normalize}
        if self.labels is not None:
            item["labels"] = self.labels[self.index[i]]
            item["utterance_samples"] = int(self.sizes[i])
        return item


class SpeechFinetuneDataset(_SpeechDataset):
    """Labelled waveforms: adds ``"target"`` (int64 letter ids, METHOD.md#fine-tuning-speech) and ``"transcript"`` (words)."""

    def __init__(self, root: Path, cfg: SpeechDataConfig, split: str = "train"):
        super().__init__(root, cfg, split)
        if self.utts.letters is None:
            raise MissingDataError(f"speech split '{split}' has no transcripts (no .ltr / .wrd next to its .tsv)")
        # ids whose frozen CNN features the model being trained holds (engine.finetune.train sets it): such an
        # utterance is needed only for its length, so its source is zeros and its file is not read
        self.cached_ids: Container[int] = ()

    def __getitem__(self, i: int) -> dict:
        j = self.index[i]
        source = torch.zeros(int(self.utts.sizes[j])) if i in self.cached_ids else torch.from_numpy(self._wave(i))
        return {"source": source, "id": i,
                "target": torch.tensor(letters_to_ids(self.utts.letters[j]), dtype=torch.long),
                "transcript": self.utts.words[j]}


def collate_pretrain(items: list[dict], generator: torch.Generator | None = None) -> dict:
    """Crop every utterance to the shortest of the batch (METHOD.md#equal-mask-counts: no padding).

    Crop offsets come from ``generator``, or by default from one seeded with the batch's ``(epoch, ids)``
    (:func:`~d2v2.data.common.stable_seed`), so a batch is the same whichever worker builds it. Items with
    ``labels`` add ``labels`` (B, L_max) padded with -1, ``label_offsets`` (B,): where each crop starts in
    its utterance, in samples, and ``utterance_samples`` (B,): each utterance's length. ``normalized`` says
    whether the utterances were normalised (``data.speech.normalize``; WavLM normalises mixed rows again).
    """
    ids = torch.tensor([it["id"] for it in items], dtype=torch.long)
    size = min(len(it["source"]) for it in items)
    if generator is None:
        generator = torch.Generator().manual_seed(stable_seed(0, int(items[0].get("epoch", 0)), ids))
    crops, offsets = [], []
    for it in items:
        excess = len(it["source"]) - size
        start = int(torch.randint(excess + 1, (1,), generator=generator)) if excess else 0
        crops.append(it["source"][start:start + size])
        offsets.append(it.get("offset", 0) + start)
    batch = {"source": torch.stack(crops), "id": ids}
    if "normalized" in items[0]:
        batch["normalized"] = torch.tensor(bool(items[0]["normalized"]))
    if "labels" in items[0]:
        batch["labels"] = torch.nn.utils.rnn.pad_sequence([it["labels"] for it in items], batch_first=True,
                                                          padding_value=-1)
        batch["label_offsets"] = torch.tensor(offsets, dtype=torch.long)
        batch["utterance_samples"] = torch.tensor([it["utterance_samples"] for it in items], dtype=torch.long)
    return batch


def collate_finetune(items: list[dict]) -> dict:
    """Pad to the longest utterance: ``padding_mask`` True = pad; ``target`` padded with -1."""
    size = max(len(it["source"]) for it in items)
    source = torch.zeros(len(items), size)
    padding_mask = torch.ones(len(items), size, dtype=torch.bool)
    target_lengths = torch.tensor([len(it["target"]) for it in items], dtype=torch.long)
    target = torch.full((len(items), int(target_lengths.max())), -1, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["source"])
        source[b, :n], padding_mask[b, :n] = it["source"], False
        target[b, :len(it["target"])] = it["target"]
    return {"source": source, "padding_mask": padding_mask, "target": target, "target_lengths": target_lengths,
            "transcript": [it["transcript"] for it in items],
            "id": torch.tensor([it["id"] for it in items], dtype=torch.long)}
