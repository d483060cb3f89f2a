"""The synthesised speech corpus: WordNet sentences read by many espeak-ng voices, in noise.

No multi-speaker labelled speech corpus can be downloaded here, so the embedded speech data is made
(DATA.md#speech). Clean synthetic speech is too easy and transfers badly, so every utterance
gets a random voice, speed and pitch, a random time shift, coloured background noise at a random SNR and
a random gain. The splits and what they measure:

=================  ================================================  ==================================
split              voices                                            sentences
=================  ================================================  ==================================
``pretrain``       espeak-ng: training accents x training variants   train pool (no transcripts written)
``train``          same                                              train pool (labelled, small)
``valid``          same                                              valid pool
``test``           espeak-ng: held-out variants (and/or accents)     test pool
``test_flite``     flite voices (a held-out engine)                  test pool
``test_asterisk``  real recordings of one speaker (Asterisk prompts) their own prompts
=================  ================================================  ==================================

Sentences are WordNet 3.0 example sentences (40,694 usable: 3-14 words, letters only), split 80/10/10
into pools by a hash of the text, so the pools never share a sentence. Everything is drawn from ``numpy``
generators seeded with ``(seed, split, index)``: the corpus does not depend on the number of workers.
Building the default sizes takes about 105 CPU-seconds (user + system, workers and synthesisers
included: about a minute on 2 idle cores) and 370 MB of disk.

Output: fairseq manifests (``<split>.tsv/.ltr/.wrd``, see :mod:`d2v2.data.speech`), 16-bit WAVs under
``wav/<split>/``, a per-utterance record of how each was made (``<split>.meta.tsv``) and ``manifest.json``
(config, package versions, counts, checksums of every file). The corpus is built in a temporary folder
and renamed into place (:func:`~d2v2.atomic.atomic_dir`); a second call with the same config finds a
current ``manifest.json`` whose files still match their checksums, and does nothing.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from d2v2.atomic import atomic_dir, atomic_write_json
from d2v2.data.common import (MANIFEST, MissingDataError, dpkg_version, file_record, manifest_is_current,
                              read_manifest, require_path)
from d2v2.data.speech import SPLITS, SpeechDataConfig, SynthConfig, source_path, words_to_letters

__all__ = ["prepare_speech", "build_corpus", "normalise_text", "wordnet_sentences", "coloured_noise"]

FORMAT_VERSION = 3     # bump when the generator changes what it writes for a given config
_SYNTH_SPLITS = {"pretrain": "train", "train": "train", "valid": "valid", "test": "test", "test_flite": "test"}
_MIN_WORDS, _MAX_WORDS = 3, 14
_MAX_ATTEMPTS = 50     # draws per utterance until one fits [min_seconds, max_seconds]
_DIGITS = "ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE".split()


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------
def normalise_text(text: str) -> str | None:
    """Upper-case words of ``A-Z`` and ``'``, or None when the text cannot be read letter by letter.

    Punctuation becomes a word break, single digits are spelled out; anything else (numbers, symbols,
    acronyms, bracketed notes such as ``[beep]``) rejects the sentence, so audio and transcript agree.
    """
    if re.search(r"[\[\]()<>#*@$=+/&%]|\d\d|\b[A-Z]{2,}\b|\w\.\w", text):
        return None
    text = re.sub(r"\d", lambda m: f" {_DIGITS[int(m.group())]} ", text)
    text = re.sub(r"[-.,;:!?\"…]+", " ", text)
    if re.search(r"[^A-Za-z' ]", text):
        return None
    words = [w.strip("'") for w in text.upper().split()]
    words = [w for w in words if w]
    return " ".join(words) or None


def wordnet_sentences(wordnet_dir: str | Path) -> list[str]:
    """Normalised WordNet 3.0 example sentences (the quoted text in each gloss), sorted and unique."""
    found = set()
    for pos in ("noun", "verb", "adj", "adv"):
        path = require_path(Path(wordnet_dir) / f"data.{pos}", "data.speech.synth.wordnet_dir",
                            "apt-get install -y wordnet-base")
        for line in path.read_text(encoding="latin-1").splitlines():
            _, sep, gloss = line.partition(" | ")
            for example in re.findall(r'"([^"]+)"', gloss) if sep and not line.startswith("  ") else ():
                text = normalise_text(example)
                if text and _MIN_WORDS <= len(text.split()) <= _MAX_WORDS:
                    found.add(text)
    return sorted(found)


def _pools(sentences: list[str]) -> dict[str, list[str]]:
    """Disjoint train / valid / test sentence pools (80/10/10 by a hash of the text, seed-independent)."""
    pools: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for s in sentences:
        bucket = int(hashlib.sha1(s.encode()).hexdigest(), 16) % 10
        pools["valid" if bucket == 8 else "test" if bucket == 9 else "train"].append(s)
    return pools


# ----------------------------------------------------------------------------------------------------
# Voices and engines
# ----------------------------------------------------------------------------------------------------
def _voices(cfg: SynthConfig, split: str) -> list[str]:
    """espeak-ng voices (``accent+variant``) of a split; the flite voices for ``test_flite``."""
    if split == "test_flite":
        return list(cfg.flite_voices)
    if split == "test":
        return [f"{a}+{v}" for a in cfg.accents for v in cfg.variants + cfg.heldout_variants
                if a in cfg.heldout_accents or v in cfg.heldout_variants]
    return [f"{a}+{v}" for a in cfg.accents if a not in cfg.heldout_accents for v in cfg.variants]


def _check_espeak_voices(syn: SynthConfig) -> None:
    """espeak-ng silently falls back to its default voice for an unknown name: check the names first."""
    def listed(arg: str, column: int) -> set[str]:
        out = subprocess.run(["espeak-ng", arg], capture_output=True, text=True, check=True).stdout
        return {line.split()[column] for line in out.splitlines()[1:] if line.split()}

    languages = listed("--voices", 1)
    variants = {name.removeprefix("!v/") for name in listed("--voices=variant", -1)}
    for key, names, have in (("accents", syn.accents, languages),
                             ("variants", syn.variants + syn.heldout_variants, variants)):
        if unknown := sorted(set(names) - have):
            raise MissingDataError(f"data.speech.synth.{key}: espeak-ng has no voice {unknown} "
                                   f"(see `espeak-ng --voices{'=variant' if key == 'variants' else ''}`)")


def _espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text.lower()]
    out = subprocess.run(cmd, capture_output=True, check=True)
    wav, sr = sf.read(io.BytesIO(out.stdout), dtype="float32")
    return wav, sr


def _flite(text: str, voice: str, stretch: float, workdir: Path) -> tuple[np.ndarray, int]:
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=workdir) as f:
        subprocess.run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
                        "-t", text.lower(), "-o", f.name], capture_output=True, check=True)
        wav, sr = sf.read(f.name, dtype="float32")
    return wav, sr


def _resample(wav: np.ndarray, sr: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly     # a second of every prepare-data call's imports: only when synthesising

    g = math.gcd(sr, target)
    return wav if sr == target else resample_poly(wav, target // g, sr // g).astype(np.float32)


def _trim(wav: np.ndarray, sr: int, rel_threshold: float = 0.01, margin_s: float = 0.02) -> np.ndarray:
    """Cut the synthesiser's leading/trailing silence (the random shift then sets the real margins)."""
    loud = np.flatnonzero(np.abs(wav) > rel_threshold * np.abs(wav).max())
    margin = int(margin_s * sr)
    return wav[max(loud[0] - margin, 0):loud[-1] + margin + 1] if len(loud) else wav


# ----------------------------------------------------------------------------------------------------
# Corruption: time shift, coloured noise at an SNR, gain
# ----------------------------------------------------------------------------------------------------
def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-power Gaussian noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    noise = np.fft.irfft(spectrum * freqs ** (-exponent / 2), n)
    return noise / np.sqrt(np.mean(noise ** 2) + 1e-12)


def _corrupt(speech: np.ndarray, lead: int, trail: int, snr_db: float, exponent: float, gain_db: float,
             rng: np.random.Generator) -> np.ndarray:
    clean = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    noise = coloured_noise(len(clean), exponent, rng) * np.sqrt(np.mean(speech ** 2) / 10 ** (snr_db / 10))
    mixed = clean + noise
    return (mixed * (10 ** (gain_db / 20) / np.abs(mixed).max())).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# One utterance (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
_STATE: dict = {}
# espeak-ng 1.51 reads about 0.105 * wpm characters per second (+-10%, measured on 600 utterances); used
# to draw sentences that will probably fit the length range, so few syntheses are thrown away.
_ESPEAK_CHARS_PER_SECOND_PER_WPM = 0.105


def _init_worker(cfg: SpeechDataConfig, pools: dict[str, list[str]], workdir: Path) -> None:
    lengths = {name: np.array([len(s) for s in pool]) for name, pool in pools.items()}
    by_length = {name: np.argsort(n, kind="stable") for name, n in lengths.items()}
    _STATE.update(cfg=cfg, pools=pools, workdir=workdir, by_length=by_length,
                  sorted_lengths={name: lengths[name][order] for name, order in by_length.items()})


def _draw_sentence(rng: np.random.Generator, pool: str, chars: tuple[float, float] | None) -> int:
    """A sentence of ``pool``, uniformly among those of ``chars`` characters (all if None or none fit)."""
    order, lengths = _STATE["by_length"][pool], _STATE["sorted_lengths"][pool]
    lo, hi = (0, len(order)) if chars is None else np.searchsorted(lengths, chars, side="left")
    return int(order[rng.integers(lo, hi)] if hi > lo else rng.integers(len(order)))


def _make_utterance(job: tuple[str, int]) -> dict:
    """Draw, synthesise, corrupt and write utterance ``index`` of ``split``; return its record."""
    split, index = job
    cfg: SpeechDataConfig = _STATE["cfg"]
    syn, sr_out = cfg.synth, cfg.sample_rate
    rng = np.random.default_rng([syn.seed, SPLITS.index(split), index])
    pool, voices = _SYNTH_SPLITS[split], _voices(syn, split)
    for draw in range(1, _MAX_ATTEMPTS + 1):
        voice = voices[int(rng.integers(len(voices)))]
        lead, trail = (int(rng.uniform(0, syn.max_shift_seconds) * sr_out) for _ in range(2))
        speech_s = np.array([syn.min_seconds, syn.max_seconds]) - (lead + trail) / sr_out
        if split == "test_flite":
            rec = {"voice": voice, "engine": "flite", "stretch": round(float(rng.uniform(*syn.flite_stretch)), 3)}
            rec["sentence_id"] = _draw_sentence(rng, pool, None)
            text = _STATE["pools"][pool][rec["sentence_id"]]
            wav, sr = _flite(text, voice, rec["stretch"], _STATE["workdir"])
        else:
            rec = {"voice": voice, "engine": "espeak-ng",
                   "speed": int(rng.integers(syn.speed_wpm[0], syn.speed_wpm[1] + 1)),
                   "pitch": int(rng.integers(syn.pitch[0], syn.pitch[1] + 1))}
            chars = speech_s * _ESPEAK_CHARS_PER_SECOND_PER_WPM * rec["speed"] * np.array([0.9, 1.1])
            rec["sentence_id"] = _draw_sentence(rng, pool, tuple(chars))
            text = _STATE["pools"][pool][rec["sentence_id"]]
            wav, sr = _espeak(text, voice, rec["speed"], rec["pitch"])
        rec["draws"] = draw
        if not np.any(wav):           # the synthesiser said nothing: draw again
            continue
        speech = _resample(_trim(wav, sr), sr, sr_out)
        if speech_s[0] <= len(speech) / sr_out <= speech_s[1]:
            break
    else:
        raise RuntimeError(f"speech synth: no draw of {split}/{index} lasted {syn.min_seconds}-{syn.max_seconds} s "
                           f"in {_MAX_ATTEMPTS} attempts; widen min_seconds/max_seconds or speed_wpm")
    rec.update(snr_db=round(float(rng.uniform(*syn.snr_db)), 2),
               noise_exponent=round(float(rng.uniform(*syn.noise_exponent)), 3),
               gain_db=round(float(rng.uniform(*syn.gain_db)), 2), lead_s=lead / sr_out, trail_s=trail / sr_out)
    audio = _corrupt(speech, lead, trail, rec["snr_db"], rec["noise_exponent"], rec["gain_db"], rng)
    return _write(Path(_STATE["workdir"]), split, index, audio, sr_out, rec, text)


def _write(workdir: Path, split: str, index: int, audio: np.ndarray, sr: int, rec: dict, words: str) -> dict:
    rel = f"wav/{split}/{index:06d}.wav"
    sf.write(workdir / rel, audio, sr, subtype="PCM_16")
    return {"id": index, "file": rel, "num_samples": len(audio), "words": words, **rec}


def _asterisk(cfg: SpeechDataConfig, workdir: Path) -> list[dict]:
    """The Asterisk prompts with a letter-readable transcript, resampled to ``sample_rate``."""
    syn = cfg.synth
    listing = require_path(syn.asterisk_transcripts, "data.speech.synth.asterisk_transcripts",
                           "apt-get install -y asterisk-core-sounds-en, or set data.speech.synth.asterisk=false")
    require_path(syn.asterisk_dir, "data.speech.synth.asterisk_dir", "apt-get install -y asterisk-core-sounds-en-wav")
    prompts = {}
    for line in gzip.open(listing, "rt", encoding="utf-8", errors="replace"):
        name, sep, text = line.strip().partition(": ")
        words = normalise_text(text) if sep and not name.startswith(";") else None
        if words and (Path(syn.asterisk_dir) / f"{name}.wav").is_file():
            prompts[name] = words
    if not prompts:
        raise MissingDataError(f"data.speech.synth.asterisk_dir: no prompt recordings in {syn.asterisk_dir} "
                               "(apt-get install -y asterisk-core-sounds-en-wav)")
    records = []
    for index, name in enumerate(sorted(prompts)):
        path = Path(syn.asterisk_dir) / f"{name}.wav"
        wav, sr = sf.read(path, dtype="float32")
        rec = {"engine": "human", "voice": "asterisk-allison", "prompt": name}
        records.append(_write(workdir, "test_asterisk", index, _resample(wav, sr, cfg.sample_rate),
                              cfg.sample_rate, rec, prompts[name]))
    return records


# ----------------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------------
def _split_sizes(syn: SynthConfig) -> dict[str, int]:
    return {"pretrain": syn.num_pretrain, "train": syn.num_train, "valid": syn.num_valid,
            "test": syn.num_test, "test_flite": syn.num_test_flite}


def _inputs(cfg: SpeechDataConfig) -> dict:
    """Everything that determines the corpus: the synth config, the sample rate, package versions, format."""
    syn = cfg.synth
    tools = ["espeak-ng"] + (["flite"] if syn.num_test_flite else [])
    for tool in tools:
        if shutil.which(tool) is None:
            raise MissingDataError(f"data.speech.synth: {tool} not found (apt-get install -y {tool}; "
                                   "docs/DATA.md, Speech)")
    _check_espeak_voices(syn)
    packages = tools + ["espeak-ng-data", "wordnet-base"]
    packages += ["asterisk-core-sounds-en-wav", "asterisk-core-sounds-en"] if syn.asterisk else []
    return {"synth": syn.model_dump(), "sample_rate": cfg.sample_rate, "format": FORMAT_VERSION,
            "packages": {p: dpkg_version(p) for p in packages}}


def _write_split(folder: Path, split: str, records: list[dict], labelled: bool) -> None:
    """fairseq ``.tsv`` (+ ``.ltr``/``.wrd`` when labelled) and the per-utterance ``.meta.tsv``.

    The audio root (first ``.tsv`` line) is ``.``, i.e. the corpus folder, so the corpus can be moved.
    """
    (folder / f"{split}.tsv").write_text(
        "".join([".\n"] + [f"{r['file']}\t{r['num_samples']}\n" for r in records]))
    if labelled:
        (folder / f"{split}.wrd").write_text("".join(f"{r['words']}\n" for r in records))
        (folder / f"{split}.ltr").write_text("".join(f"{words_to_letters(r['words'])}\n" for r in records))
    meta = pd.DataFrame([{k: v for k, v in r.items() if labelled or k != "words"} for r in records])
    meta.to_csv(folder / f"{split}.meta.tsv", sep="\t", index=False)


def _summary(records: list[dict], files: dict[str, str], labelled: bool, sample_rate: int) -> dict:
    """Count, duration, a checksum over the split's audio, and who spoke it."""
    audio = hashlib.sha256("".join(files[r["file"]] for r in records).encode()).hexdigest()
    return {"count": len(records), "seconds": round(sum(r["num_samples"] for r in records) / sample_rate, 2),
            "labelled": labelled, "audio_sha256": audio, "voices": sorted({r["voice"] for r in records}),
            "engines": sorted({r["engine"] for r in records})}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (workers, espeak-ng, flite)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_corpus(root: Path, cfg: SpeechDataConfig, workers: int | None = None) -> dict:
    """Build the corpus at ``root`` unless the same one is there; return its manifest.

    ``workers`` processes synthesise in parallel (default: the CPU count); the result does not depend on
    it. A corpus made from another config is replaced. ``"skipped"`` says whether the files were reused.
    """
    root = Path(root).absolute()
    syn = cfg.synth
    inputs = _inputs(cfg)
    if manifest_is_current(root, inputs):
        return {**read_manifest(root), "skipped": True}

    start, cpu_start = time.perf_counter(), _cpu_seconds()   # CPU-only work: no device to synchronise
    pools = _pools(wordnet_sentences(syn.wordnet_dir))
    workers = workers or os.cpu_count() or 1
    with atomic_dir(root) as tmp:
        for split in SPLITS:
            (tmp / "wav" / split).mkdir(parents=True)
        jobs = [(split, i) for split, n in _split_sizes(syn).items() for i in range(n)]
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg, pools, tmp)) as pool:
            results = list(pool.map(_make_utterance, jobs, chunksize=8))
        records = {split: [r for (s, _), r in zip(jobs, results) if s == split] for split in _split_sizes(syn)}
        if syn.asterisk:
            records["test_asterisk"] = _asterisk(cfg, tmp)
        for split, recs in records.items():
            _write_split(tmp, split, recs, labelled=split != "pretrain")
        files = [file_record(p, tmp) for p in sorted(tmp.rglob("*")) if p.is_file()]
        digests = {f["path"]: f["sha256"] for f in files}
        manifest = {"modality": "speech", "source": "synth", "inputs": inputs,
                    "sentence_pools": {k: len(v) for k, v in pools.items()},
                    "splits": {split: _summary(recs, digests, split != "pretrain", cfg.sample_rate)
                               for split, recs in records.items()},
                    "build_seconds": round(time.perf_counter() - start, 1),          # wall clock (perf_counter)
                    "build_cpu_seconds": round(_cpu_seconds() - cpu_start, 1),      # user+sys, with workers
                    "workers": workers, "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)
    return {**manifest, "skipped": False}


def prepare_speech(root: Path, cfg: SpeechDataConfig, workers: int | None = None) -> dict:
    """Make the synthesised corpus under ``root`` if needed and return its manifest (a no-op when cached).

    For the ``manifest`` / ``librispeech`` sources nothing is generated: the paths are checked and a small
    manifest describing them is returned. ``"skipped"`` says whether existing files were reused.
    """
    if cfg.source == "synth":
        return build_corpus(Path(root), cfg, workers=workers)
    key, path = source_path(cfg)
    return {"modality": "speech", "source": cfg.source, key: str(path), "skipped": True}
