"""Text data: a pretraining corpus cut into fixed-length token blocks, and labelled sentence tasks.

Embedded (tiny) data, all offline (DATA.md#text):
- corpus = King James Bible (``bible-kjv``) + Jane Austen's six novels (``r-cran-janeaustenr``, read from
  its R lazy-load database with ``rdata``) + WordNet 3.0 glosses (``wordnet-base``);
- a byte-level BPE trained on it with HF ``tokenizers`` (``vocab_size``), specials ``<s>``=0,
  ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4 (fairseq order), saved as ``tokenizer.json``;
- every line is encoded and followed by ``</s>``; chunks of 100 consecutive lines go to ``valid``
  with probability ``valid_fraction``; tokens are stored as ``{train,valid}.bin`` (uint16 when the
  vocabulary fits) and read back with ``np.memmap``;
- labelled tasks from the human-rated VADER sets (Hutto & Gilbert 2014): binary sentiment where
  ``|mean| >= 0.5`` for ``movie`` (the SST-2 analogue), ``tweet``, ``product``, ``editorial``, and
  ``movie-intensity``, a regression on the mean rating (the STS-B analogue); fixed seeded splits stored
  as TSV.

Paper scale (METHOD.md#text-encoder, METHOD.md#fine-tuning-text): raw text shards (Books + Wiki) encoded with the user's GPT-2 BPE
(``vocab.json`` + ``merges.txt``; ids shifted by 5 so the five specials keep ids 0-4), and the eight
GLUE tasks read from their ``.tsv`` files. To fine-tune an official checkpoint, ``gpt2_dict`` (fairseq's
``dict.txt``) gives the GLUE tasks the ids those checkpoints were trained with.

Pretraining blocks are ``<s>`` + ``block_len - 1`` stream tokens (fairseq ``sample_break_mode: none``).
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import tarfile
import gzip
import shutil
import struct
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from d2v2.atomic import atomic_dir, atomic_write, atomic_write_json
from d2v2.config import ConfigError
from d2v2.data.common import (
    MANIFEST, CorruptDataError, MissingDataError, dpkg_version, file_record, manifest_is_current,
    read_manifest, require_path, sha256_file,
)
from d2v2.data.config import DataConfig, TextDataConfig
from d2v2.model.modalities.text import BOS, EOS, MASK, PAD, SPECIALS, UNK

__all__ = [
    "SPECIALS", "BOS", "PAD", "EOS", "UNK", "MASK", "TASKS", "GLUE_TASKS", "TextTokenizer", "read_fairseq_dict",
    "load_tokenizer", "prepare_text", "TokenBlocks", "pretrain_dataset", "SentencePairs", "sentence_pairs",
    "finetune_datasets", "collate",
    "finetune_collater", "task_info", "embedded_corpus",
]

FORMAT_VERSION = 1           # bump when the prepared files change for the same inputs
_CHUNK_LINES = 100           # lines per document chunk for the held-out split
_VADER = "vaderSentiment==3.3.2"
_JANEAUSTENR = "r-cran-janeaustenr"


# ----------------------------------------------------------------------------------------- tokenizers
class TextTokenizer:
    """A byte-level BPE behind the specials: ``encode``/``decode`` and ``vocab_size``.

    Ids are the BPE's own (embedded tokenizer: the five specials are its first entries), the BPE's +
    ``offset`` (GPT-2 ids past the five specials), or, with ``fairseq_ids`` (a BPE id -> id table and
    the vocabulary size, :func:`read_fairseq_dict`), those of fairseq's Dictionary."""

    def __init__(self, tokenizer, offset: int = 0, fairseq_ids: tuple[np.ndarray, int] | None = None):
        self.tok, self.offset = tokenizer, offset
        if fairseq_ids is None:
            self.fairseq_ids, self.vocab_size = None, tokenizer.get_vocab_size() + offset
        else:
            self.fairseq_ids, self.vocab_size = fairseq_ids
            self._bpe_ids = {int(i): b for b, i in enumerate(self.fairseq_ids) if i != UNK}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        if self.fairseq_ids is not None:
            return [self.fairseq_ids[enc.ids].tolist() for enc in encoded]
        return [[i + self.offset for i in enc.ids] for enc in encoded]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        if self.fairseq_ids is not None:
            return self.tok.decode([self._bpe_ids[int(i)] for i in ids if int(i) in self._bpe_ids])
        return self.tok.decode([int(i) - self.offset for i in ids if int(i) >= len(SPECIALS)])


def read_fairseq_dict(path: Path, bpe_vocab_size: int) -> tuple[np.ndarray, int]:
    """The GPT-2 BPE id -> fairseq id table of fairseq's ``dict.txt`` (lines ``<symbol> <count>``, the
    symbols GPT-2 ids) and the vocabulary size: the Dictionary puts ``<s> <pad> </s> <unk>`` at 0-3 and the
    file's lines from 4, then RoBERTa and data2vec text append ``<mask>``. Other symbols
    (``madeupword0000``) keep their index; BPE ids the file lacks map to ``<unk>``."""
    table = np.full(bpe_vocab_size, UNK, dtype=np.int64)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise CorruptDataError(f"{path}: empty (fairseq's dict.txt)")
    for n, line in enumerate(lines):
        fields = line.split()
        if len(fields) < 2 or (fields[0].isdigit() and int(fields[0]) >= bpe_vocab_size):
            raise CorruptDataError(f"{path}:{n + 1}: expected '<symbol> <count>' with GPT-2 ids below "
                                   f"{bpe_vocab_size} (fairseq's dict.txt), got {line[:60]!r}")
        if fields[0].isdigit():
            table[int(fields[0])] = 4 + n
    return table, 4 + len(lines) + 1


def load_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The embedded corpus's ``tokenizer.json``, or the GPT-2 BPE from ``gpt2_vocab``/``gpt2_merges``
    (with fairseq's ids if ``gpt2_dict`` is set)."""
    from tokenizers import ByteLevelBPETokenizer

    if cfg.text.corpus == "raw":
        vocab = require_path(cfg.text.gpt2_vocab, "data.text.gpt2_vocab", "GPT-2 encoder vocab.json")
        merges = require_path(cfg.text.gpt2_merges, "data.text.gpt2_merges", "GPT-2 merges.txt")
        bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
        if cfg.text.gpt2_dict is not None:
            path = require_path(cfg.text.gpt2_dict, "data.text.gpt2_dict", "fairseq's dict.txt")
            return TextTokenizer(bpe, fairseq_ids=read_fairseq_dict(path, bpe.get_vocab_size()))
        return TextTokenizer(bpe, offset=len(SPECIALS))
    path = require_path(_folder(cfg) / "tokenizer.json", "data.root",
                        "run `python -m d2v2 prepare-data --modalities text`")
    return _tokenizer_file(path)


def _tokenizer_file(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        return TextTokenizer(Tokenizer.from_file(str(path)))
    except Exception as err:   # tokenizers raises a bare Exception on a malformed file
        raise CorruptDataError(f"{path}: not a valid tokenizer file ({err}); prepare the text data again") from None


def _train_bpe(lines: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                            show_progress=False)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


# ------------------------------------------------------------------------------------ embedded sources
def _run(cmd: list[str], what: str, hint: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise MissingDataError(f"{what}: command '{cmd[0]}' not found ({hint})")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise MissingDataError(f"{what}: `{' '.join(cmd)}` failed: {out.stderr.strip()[-500:]} ({hint})")
    return out.stdout


def kjv_verses() -> list[str]:
    """The 31,102 KJV verses (reference prefix removed)."""
    out = _run(["bible", "-f", "Gen1:1-Rev22:21"], "KJV text", "apt-get install -y bible-kjv")
    return [line.split(" ", 1)[1].strip() for line in out.splitlines() if " " in line]


def _fetch_janeaustenr(cache: Path) -> tuple[Path, Path]:
    """``apt-get download`` + ``dpkg-deb -x`` the R package once into ``cache``: (the .deb, its data folder)."""
    hint = f"needs Debian's apt-get and dpkg-deb with network: `apt-get download {_JANEAUSTENR}`"
    debs = sorted(cache.glob(f"{_JANEAUSTENR}_*.deb"))
    if not debs:
        cache.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", _JANEAUSTENR], "Jane Austen text", hint, cwd=cache)
        debs = sorted(cache.glob(f"{_JANEAUSTENR}_*.deb"))
    data = cache / "janeaustenr" / "usr/lib/R/site-library/janeaustenr/data"
    if not (data / "Rdata.rdx").is_file():
        with atomic_dir(cache / "janeaustenr") as tmp:
            _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], "Jane Austen text", hint)
    return debs[-1], data


def austen_paragraphs(data: Path) -> list[str]:
    """Paragraphs of the six novels from the package's lazy-load database (``Rdata.rdx``/``.rdb``).

    The index is a gzip-compressed R object mapping each novel to ``(offset, length)`` in ``Rdata.rdb``,
    whose entries are a 4-byte big-endian length followed by a zlib stream of a serialised character vector.
    """
    import warnings

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # rdata warns that a bare serialisation "assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    try:
        index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))["variables"]
        rdb = (data / "Rdata.rdb").read_bytes()
        paragraphs = []
        for name in sorted(index):
            offset, length = (int(v) for v in index[name])
            blob = rdb[offset:offset + length]
            (size,) = struct.unpack(">I", blob[:4])
            text = zlib.decompress(blob[4:])
            if len(text) != size:
                raise ValueError(f"{name}: {len(text)} bytes, header says {size}")
            current: list[str] = []
            for line in list(parse(text)) + [""]:
                if line.strip():
                    current.append(line.strip())
                elif current:
                    paragraphs.append(" ".join(current))
                    current = []
    except (OSError, ValueError, KeyError, zlib.error, struct.error) as err:
        raise CorruptDataError(f"{data}: cannot read the janeaustenr database ({err}); delete the folder "
                               f"and prepare again") from None
    return paragraphs


def wordnet_glosses(folder: Path = Path("/usr/share/wordnet")) -> list[str]:
    """The gloss (definition; examples) of every WordNet 3.0 synset."""
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = require_path(folder / f"data.{pos}", "WordNet", "apt-get install -y wordnet-base")
        with open(path, encoding="utf-8") as f:
            glosses += [line.split(" | ", 1)[1].strip() for line in f
                        if not line.startswith("  ") and " | " in line]
    return glosses


def embedded_corpus(cache: Path) -> dict[str, list[str]]:
    """Source name -> lines (one verse / paragraph / gloss each)."""
    return {"kjv": kjv_verses(), "austen": austen_paragraphs(_fetch_janeaustenr(cache)[1]),
            "wordnet": wordnet_glosses()}


def _fetch_vader(cache: Path) -> Path:
    """The vaderSentiment sdist (it alone carries the human-rated sets), downloaded once into ``cache``."""
    sdist = cache / "vaderSentiment-3.3.2.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", _VADER, "-d",
              str(cache)], "VADER sentiment sets", f"needs PyPI: `pip download --no-deps --no-binary :all: {_VADER}`")
    return sdist


def vader_ratings(sdist: Path) -> dict[str, list[tuple[float, str]]]:
    """``{file stem: [(mean rating -4..4, text)]}`` from the sdist's nested ``hutto_ICWSM_2014.tar.gz``."""
    try:
        with tarfile.open(sdist) as outer:
            nested = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
            inner_bytes = outer.extractfile(nested).read()
        out = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            for member in inner.getmembers():
                name = Path(member.name).name
                if name.endswith("_GroundTruth.txt"):
                    text = inner.extractfile(member).read().decode("utf-8")
                    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
                    out[name.removesuffix("_GroundTruth.txt")] = [(float(r[1]), " ".join(r[2:]).strip()) for r in rows]
    except (OSError, tarfile.TarError, KeyError, ValueError, IndexError, AttributeError) as err:
        raise CorruptDataError(f"{sdist}: cannot read the VADER ground truth ({err}); "
                               f"delete it and prepare again") from None
    return out


# task name -> (VADER file, kind)
TASKS = {
    "movie": ("movieReviewSnippets", "binary"),
    "tweet": ("tweets", "binary"),
    "product": ("amazonReviewSnippets", "binary"),
    "editorial": ("nytEditorialSnippets", "binary"),
    "movie-intensity": ("movieReviewSnippets", "regression"),
}


def _vader_task_rows(ratings: list[tuple[float, str]], kind: str) -> list[tuple[str, str]]:
    if kind == "regression":
        return [(text, f"{mean:.6g}") for mean, text in ratings]
    return [(text, str(int(mean > 0))) for mean, text in ratings if abs(mean) >= 0.5]


def _write_tsv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    """GLUE-style TSV: no quoting or escaping (tabs and line breaks inside a field become spaces)."""
    clean = str.maketrans({"\t": " ", "\n": " ", "\r": " "})
    with atomic_write(path, "w") as f:
        for row in [header, *rows]:
            f.write("\t".join(c.translate(clean) for c in row) + "\n")


# ------------------------------------------------------------------------------------------ preparation
def _folder(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "text" / cfg.text.corpus


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _write_tokens(path: Path, tokenizer: TextTokenizer, lines: Iterator[str], dtype, batch: int = 20000) -> int:
    """Encode ``lines`` (each followed by ``</s>``) into a flat token file; returns the token count."""
    count, pending = 0, []
    with atomic_write(path) as f:
        def flush():
            nonlocal count
            ids = np.fromiter((t for seq in tokenizer.encode_batch(pending) for t in (*seq, EOS)), dtype=np.int64)
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
            pending.clear()
        for line in lines:
            if line.strip():
                pending.append(line.strip())
                if len(pending) >= batch:
                    flush()
        if pending:
            flush()
    return count


def prepare_text(root: str | Path, cfg: TextDataConfig) -> dict:
    """Prepare the text data under ``<root>/text/<corpus>`` (idempotent); returns the manifest."""
    root = Path(root)
    dcfg = DataConfig(root=str(root), text=cfg)
    return _prepare_raw(dcfg) if cfg.corpus == "raw" else _prepare_embedded(dcfg)


def _prepare_embedded(dcfg: DataConfig) -> dict:
    cfg, folder, cache = dcfg.text, _folder(dcfg), Path(dcfg.root) / "cache"
    deb, _ = _fetch_janeaustenr(cache)
    sdist = _fetch_vader(cache)
    inputs = {
        "format": FORMAT_VERSION, "corpus": "embedded", "vocab_size": cfg.vocab_size,
        "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed,
        "task_fractions": list(cfg.task_fractions),
        "packages": {p: dpkg_version(p) for p in ("bible-kjv", "bible-kjv-text", "wordnet-base")}
        | {_JANEAUSTENR: deb.name.split("_")[1], "vaderSentiment": "3.3.2"},
        "sources": {deb.name: sha256_file(deb), sdist.name: sha256_file(sdist)},
    }
    if manifest_is_current(folder, inputs):
        return {**read_manifest(folder), "skipped": True}

    corpus = embedded_corpus(cache)
    rng = np.random.default_rng(cfg.split_seed)
    split_lines: dict[str, list[str]] = {"train": [], "valid": []}
    for name in sorted(corpus):
        lines = corpus[name]
        for start in range(0, len(lines), _CHUNK_LINES):
            split = "valid" if rng.random() < cfg.valid_fraction else "train"
            split_lines[split] += lines[start:start + _CHUNK_LINES]
    counts: dict = {"lines": {k: len(v) for k, v in corpus.items()}}

    with atomic_dir(folder) as tmp:
        # the held-out text never shapes the vocabulary; encode with the saved file the runs will load
        _train_bpe(split_lines["train"], cfg.vocab_size).save(str(tmp / "tokenizer.json"))
        tokenizer = _tokenizer_file(tmp / "tokenizer.json")
        dtype = _token_dtype(tokenizer.vocab_size)
        counts["tokens"] = {s: _write_tokens(tmp / f"{s}.bin", tokenizer, iter(split_lines[s]), dtype)
                            for s in ("train", "valid")}
        counts["vocab_size"] = tokenizer.vocab_size
        ratings = vader_ratings(sdist)
        counts["tasks"] = {}
        for task, (stem, kind) in TASKS.items():
            rows = _vader_task_rows(ratings[stem], kind)
            order = np.random.default_rng([cfg.split_seed, len(rows)]).permutation(len(rows))
            n_train = int(round(cfg.task_fractions[0] * len(rows)))
            n_valid = int(round(cfg.task_fractions[1] * len(rows)))
            parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
                     "test": order[n_train + n_valid:]}
            for split, idx in parts.items():
                _write_tsv(tmp / "tasks" / task / f"{split}.tsv", ["sentence", "label"], [rows[i] for i in idx])
            counts["tasks"][task] = {s: len(i) for s, i in parts.items()}
        manifest = {"modality": "text", "corpus": "embedded", "inputs": inputs, "counts": counts,
                    "dtype": np.dtype(dtype).name,
                    "files": [file_record(p, tmp) for p in sorted(tmp.rglob("*")) if p.is_file()]}
        atomic_write_json(tmp / MANIFEST, manifest)
    return {**manifest, "skipped": False}


def _no_fairseq_dict(cfg: DataConfig) -> None:
    if cfg.text.gpt2_dict is not None:
        raise ConfigError("data.text.gpt2_dict: for fine-tuning official checkpoints only; pretraining data "
                          "here keeps GPT-2 ids + 5 with <mask> = 4 (docs/ARCHITECTURE.md), so unset it")


def _prepare_raw(dcfg: DataConfig) -> dict:
    """Encode the user's raw text shards with GPT-2 BPE (fingerprinted by path, size and mtime)."""
    cfg, folder = dcfg.text, _folder(dcfg)
    _no_fairseq_dict(dcfg)
    tokenizer = load_tokenizer(dcfg)
    shards = {}
    for split, key in (("train", "train_shards"), ("valid", "valid_shards")):
        paths = getattr(cfg, key)
        if not paths:
            raise MissingDataError(f"data.text.{key}: empty; list the raw text files for '{split}'")
        shards[split] = [require_path(p, f"data.text.{key}", "raw text file") for p in paths]
    inputs = {"format": FORMAT_VERSION, "corpus": "raw",
              "gpt2": {k: sha256_file(getattr(cfg, k)) for k in ("gpt2_vocab", "gpt2_merges")},
              "shards": {s: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in ps]
                         for s, ps in shards.items()}}
    if manifest_is_current(folder, inputs, verify=False):
        return {**read_manifest(folder), "skipped": True}

    undecodable: dict[str, int] = {}

    def lines(paths):
        """Each shard's lines; a line that is not UTF-8 is kept with U+FFFD for its bad bytes, counted
        per file, reported and recorded in the manifest."""
        for p in paths:
            with open(p, "rb") as f:
                for raw in f:
                    try:
                        yield raw.decode("utf-8")
                    except UnicodeDecodeError:
                        undecodable[str(p)] = undecodable.get(str(p), 0) + 1
                        yield raw.decode("utf-8", errors="replace")

    dtype = _token_dtype(tokenizer.vocab_size)
    with atomic_dir(folder) as tmp:
        counts = {"tokens": {s: _write_tokens(tmp / f"{s}.bin", tokenizer, lines(ps), dtype)
                             for s, ps in shards.items()}, "vocab_size": tokenizer.vocab_size,
                  "undecodable_lines": undecodable}
        for path, n in undecodable.items():
            print(f"prepare-data: warning: {path}: {n} line(s) are not valid UTF-8; their bad bytes were "
                  "replaced by U+FFFD", file=sys.stderr)
        manifest = {"modality": "text", "corpus": "raw", "inputs": inputs, "counts": counts,
                    "dtype": np.dtype(dtype).name,
                    "files": [file_record(p, tmp) for p in sorted(tmp.glob("*.bin"))]}
        atomic_write_json(tmp / MANIFEST, manifest)
    return {**manifest, "skipped": False}


# ------------------------------------------------------------------------------------------ pretraining
def _memmap_tokens(path: Path, num_tokens: int, dtype: str) -> np.memmap:
    """The prepared token file, memory-mapped; a size other than the manifest's is an error naming it."""
    size = path.stat().st_size
    if size != num_tokens * np.dtype(dtype).itemsize:
        raise CorruptDataError(f"{path}: {size} bytes, the manifest says {num_tokens} {dtype} tokens "
                               f"({num_tokens * np.dtype(dtype).itemsize} bytes); truncated? prepare again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


class TokenBlocks(Dataset):
    """Fixed-length blocks ``<s> + t[i*(L-1):(i+1)*(L-1)]`` over a memory-mapped token file."""

    def __init__(self, path: Path, num_tokens: int, dtype: str, block_len: int):
        self.path, self.block_len, self.dtype = path, block_len, dtype
        self.tokens = _memmap_tokens(path, num_tokens, dtype)
        self.stride = block_len - 1
        if num_tokens < self.stride:
            raise ValueError(f"{path}: {num_tokens} tokens, fewer than one block of {block_len}")

    def __len__(self) -> int:
        return len(self.tokens) // self.stride

    def __getitem__(self, i: int) -> dict:
        body = torch.from_numpy(self.tokens[i * self.stride:(i + 1) * self.stride].astype(np.int64))
        return {"source": torch.cat([torch.tensor([BOS]), body]), "id": int(i)}


def _manifest(cfg: DataConfig) -> dict:
    folder = _folder(cfg)
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingDataError(f"data.root: no prepared text under {folder} "
                               f"(run `python -m d2v2 prepare-data --modalities text`)")
    return manifest


def _stream(cfg: DataConfig, split: str) -> tuple[Path, int, str]:
    """The prepared ``train`` or ``valid`` token file, its token count and dtype (from the manifest)."""
    if split not in ("train", "valid"):
        raise ValueError(f"text pretraining split must be 'train' or 'valid' (got {split!r})")
    _no_fairseq_dict(cfg)
    manifest = _manifest(cfg)
    path = require_path(_folder(cfg) / f"{split}.bin", "data.root", "prepare the text data again")
    return path, manifest["counts"]["tokens"][split], manifest["dtype"]


def pretrain_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """Token blocks ``{"source": (block_len,) int64, "id"}`` of the ``train`` or ``valid`` stream."""
    return TokenBlocks(*_stream(cfg, split), cfg.text.block_len)


# --------------------------------------------------------------------------------------- BERT's instances
class SentencePairs(Dataset):
    """BERT's pretraining instances over a token stream (METHOD.md#baseline-bert; BERT's
    ``create_instances_from_document``, fairseq's ``BlockPairDataset`` with ``break_mode: doc``).

    A sentence is a line of the prepared stream (its tokens before ``</s>``); a document is a run of
    ``doc_lines`` consecutive lines (the prepared stream keeps no document boundaries; 100 lines is the
    unit the held-out split is drawn in). Instance ``i`` starts at the first sentence at or after token
    ``i * W`` (``W = block_len - 3``, so the dataset has a fixed length) and takes sentences of its document
    until they reach a target length (``W``, or with ``short_seq_prob`` a uniform one in [2, W]); a random
    cut splits them into A and B; half of the time (always when there is one sentence) B is replaced by
    sentences of a random other document from a random start, up to the rest of the target length. The
    longer of A and B loses a token at its front or back (even odds) until both fit in ``W``. Item:
    ``{"source": <s> A </s> B </s>, "id", "next_sentence": 1 if B follows A, "mask_seed"}``.

    Every draw comes from torch's global generator, which the engine's ``WithEpoch`` seeds from
    ``(seed, epoch mod duplicates, index)`` (:attr:`draws_repeat_every`): each instance has ``duplicates``
    versions (BERT's ``dupe_factor``), each with its own pair and masks (``mask_seed``), repeated every
    ``duplicates`` epochs: BERT's static masking."""

    def __init__(self, path: Path, num_tokens: int, dtype: str, block_len: int, short_seq_prob: float = 0.1,
                 duplicates: int = 10, doc_lines: int = _CHUNK_LINES):
        self.tokens = _memmap_tokens(path, num_tokens, dtype)
        ends = np.flatnonzero(self.tokens == EOS)
        self.starts = np.concatenate([[0], ends[:-1] + 1])
        self.lengths = ends - self.starts
        doc = np.arange(len(ends)) // doc_lines
        if len(ends) == 0 or doc[-1] < 1:
            raise ValueError(f"{path}: {len(ends)} lines make fewer than two documents of {doc_lines} lines; "
                             "BERT's next-sentence pairs need two")
        self.doc_of = doc
        self.doc_start = np.searchsorted(doc, np.arange(doc[-1] + 1))          # first sentence of each document
        self.doc_end = np.append(self.doc_start[1:], len(ends))
        self.width = block_len - 3                                              # <s>, </s>, </s>
        if self.width < 2:
            raise ValueError(f"block_len {block_len} leaves no room for a pair (need at least 5)")
        self.short_seq_prob, self.draws_repeat_every = short_seq_prob, duplicates
        self.num_items = max(1, int(self.starts[-1]) // self.width)

    def __len__(self) -> int:
        return self.num_items

    def _run(self, first: int, end: int, target: int) -> tuple[int, int]:
        """Sentences ``[first, j)`` of a document (``j <= end``): the fewest that reach ``target`` tokens."""
        total, j = 0, first
        while j < end and total < target:
            total, j = total + int(self.lengths[j]), j + 1
        return first, j

    def _tokens(self, first: int, last: int) -> np.ndarray:
        """The tokens of sentences ``[first, last)`` without their ``</s>``."""
        return np.concatenate([self.tokens[s:s + n] for s, n in zip(self.starts[first:last], self.lengths[first:last])])

    def __getitem__(self, i: int) -> dict:
        W = self.width
        first = min(int(np.searchsorted(self.starts, i * W)), len(self.starts) - 1)
        doc = int(self.doc_of[first])
        target = W if float(torch.rand(())) >= self.short_seq_prob else int(torch.randint(2, W + 1, ()))
        first, end = self._run(first, int(self.doc_end[doc]), target)
        n = end - first
        cut = first + (int(torch.randint(1, n, ())) if n > 1 else 1)
        a = self._tokens(first, cut)
        is_next = n > 1 and float(torch.rand(())) >= 0.5
        if is_next:
            b = self._tokens(cut, end)
        else:
            other = int(torch.randint(len(self.doc_start) - 1, ()))
            other += other >= doc                                               # any document but this one
            lo, hi = int(self.doc_start[other]), int(self.doc_end[other])
            b = self._tokens(*self._run(lo + int(torch.randint(hi - lo, ())), hi, max(target - len(a), 1)))
        a, b = _truncate_pair(a, b, W)
        source = np.concatenate([[BOS], a, [EOS], b, [EOS]]).astype(np.int64)
        return {"source": torch.from_numpy(source), "id": int(i), "next_sentence": int(is_next),
                "mask_seed": int(torch.randint(0, 2**62, ()))}


def _truncate_pair(a: np.ndarray, b: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT's ``truncate_seq_pair``: while A and B exceed ``width`` tokens, the longer (B on a tie) loses
    its first or its last token, with even odds."""
    excess = len(a) + len(b) - width
    if excess <= 0:
        return a, b
    front = torch.rand(excess) < 0.5
    cut = {"a": [0, 0], "b": [0, 0]}
    la, lb = len(a), len(b)
    for k in range(excess):
        side = "a" if la > lb else "b"
        cut[side][0 if front[k] else 1] += 1
        la, lb = (la - 1, lb) if side == "a" else (la, lb - 1)
    return a[cut["a"][0]:len(a) - cut["a"][1]], b[cut["b"][0]:len(b) - cut["b"][1]]


def sentence_pairs(cfg: DataConfig, split: str = "train", short_seq_prob: float = 0.1,
                   duplicates: int = 10) -> SentencePairs:
    """BERT's instances (:class:`SentencePairs`) of the ``train`` or ``valid`` stream, ``block_len`` tokens at most."""
    return SentencePairs(*_stream(cfg, split), cfg.text.block_len, short_seq_prob, duplicates)


# --------------------------------------------------------------------------------------- labelled tasks
# GLUE task -> (folder, sentence columns, label column, label values or None for regression,
#               metrics, primary metric); files with a header except CoLA (columns by position).
GLUE_TASKS = {
    "cola": ("CoLA", (3,), 1, ["0", "1"], ["mcc", "accuracy"], "mcc"),
    "sst2": ("SST-2", ("sentence",), "label", ["0", "1"], ["accuracy"], "accuracy"),
    "mrpc": ("MRPC", ("#1 String", "#2 String"), "Quality", ["0", "1"], ["f1", "accuracy"], "f1"),
    "stsb": ("STS-B", ("sentence1", "sentence2"), "score", None, ["spearman", "pearson"], "spearman"),
    "qqp": ("QQP", ("question1", "question2"), "is_duplicate", ["0", "1"], ["f1", "accuracy"], "f1"),
    "mnli": ("MNLI", ("sentence1", "sentence2"), "gold_label", ["contradiction", "entailment", "neutral"],
             ["accuracy"], "accuracy"),
    "qnli": ("QNLI", ("question", "sentence"), "label", ["entailment", "not_entailment"], ["accuracy"], "accuracy"),
    "rte": ("RTE", ("sentence1", "sentence2"), "label", ["entailment", "not_entailment"], ["accuracy"], "accuracy"),
}


def task_info(task: str) -> dict:
    if task in TASKS:
        regression = TASKS[task][1] == "regression"
        metrics = ["pearson", "spearman"] if regression else ["accuracy", "f1", "mcc"]
        return {"task": task, "num_classes": 1 if regression else 2, "regression": regression,
                "metrics": metrics, "primary_metric": metrics[0], "higher_is_better": True}
    if task in GLUE_TASKS:
        _, _, _, labels, metrics, primary = GLUE_TASKS[task]
        return {"task": task, "num_classes": 1 if labels is None else len(labels), "regression": labels is None,
                "metrics": metrics, "primary_metric": primary, "higher_is_better": True}
    raise ValueError(f"unknown text task {task!r} (embedded: {sorted(TASKS)}; GLUE: {sorted(GLUE_TASKS)})")


def _read_tsv(path: Path, header: bool = True):
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                           header=0 if header else None)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CorruptDataError(f"{path}: cannot parse as TSV ({err})") from None


class SentenceTask(Dataset):
    """Tokenised sentences (or pairs) with labels: ``{"source": (L,) int64, "label", "id"}``."""

    def __init__(self, sentences: list[tuple[str, ...]], labels: list, tokenizer: TextTokenizer, max_len: int):
        columns = list(zip(*sentences))
        encoded = [tokenizer.encode_batch(list(col)) for col in columns]
        self.sources = [_join(parts, max_len) for parts in zip(*encoded)]
        self.sizes = np.array([len(s) for s in self.sources], dtype=np.int64)   # tokens per item (bucketing)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"source": torch.tensor(self.sources[i], dtype=torch.int64), "label": self.labels[i], "id": i}


def _join(parts: tuple[list[int], ...], max_len: int) -> list[int]:
    """RoBERTa inputs: ``<s> A </s>`` or ``<s> A </s> </s> B </s>``, longest part truncated first."""
    parts = [list(p) for p in parts]
    budget = max_len - (2 if len(parts) == 1 else 4)
    while sum(map(len, parts)) > budget:
        max(parts, key=len).pop()
    out = [BOS] + parts[0] + [EOS]
    if len(parts) == 2:
        out += [EOS] + parts[1] + [EOS]
    return out


def _labels(values, allowed, path: Path) -> list:
    if allowed is None:
        return [float(v) for v in values]
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise CorruptDataError(f"{path}: unexpected labels {bad[:5]} (expected {allowed})")
    return [allowed.index(v) for v in values]


def _glue_split(cfg: DataConfig, task: str, filename: str, tokenizer: TextTokenizer) -> SentenceTask:
    folder, text_cols, label_col, allowed, _, _ = GLUE_TASKS[task]
    base = require_path(cfg.text.glue_dir, "data.text.glue_dir", "folder with the GLUE task folders")
    path = require_path(base / folder / filename, "data.text.glue_dir", f"GLUE {folder}/{filename}")
    table = _read_tsv(path, header=task != "cola")
    missing = [c for c in (*text_cols, label_col) if c not in table.columns]
    if missing:
        raise CorruptDataError(f"{path}: missing columns {missing} (have {list(table.columns)})")
    return SentenceTask(list(zip(*(table[c].tolist() for c in text_cols))),
                        _labels(table[label_col].tolist(), allowed, path), tokenizer, cfg.text.max_len)


def finetune_datasets(cfg: DataConfig, task: str) -> dict[str, Dataset]:
    """``train``/``valid``/``test`` for an embedded task, or GLUE's train/dev (test labels are private,
    so, as in the paper, GLUE reports dev: ``test`` is dev and MNLI adds ``test_mismatched``)."""
    task_info(task)
    if task in GLUE_TASKS:
        tokenizer = load_tokenizer(cfg)
        dev = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
        out = {"train": _glue_split(cfg, task, "train.tsv", tokenizer), "valid": _glue_split(cfg, task, dev, tokenizer)}
        out["test"] = out["valid"]
        if task == "mnli":
            out["test_mismatched"] = _glue_split(cfg, task, "dev_mismatched.tsv", tokenizer)
        return out
    if cfg.text.corpus != "embedded":
        raise ValueError(f"text task {task!r} needs data.text.corpus=embedded (its tokenizer)")
    tokenizer = load_tokenizer(cfg)
    allowed = None if TASKS[task][1] == "regression" else ["0", "1"]
    out = {}
    for split in ("train", "valid", "test"):
        path = require_path(_folder(cfg) / "tasks" / task / f"{split}.tsv", "data.root",
                            "run `python -m d2v2 prepare-data --modalities text`")
        table = _read_tsv(path)
        out[split] = SentenceTask([(s,) for s in table["sentence"]], _labels(table["label"].tolist(), allowed, path),
                                  tokenizer, cfg.text.max_len)
    return out


def collate(items: list[dict]) -> dict:
    """Pad to the longest sequence with ``<pad>``; ``padding_mask`` True at padding."""
    lengths = [len(it["source"]) for it in items]
    source = torch.full((len(items), max(lengths)), PAD, dtype=torch.int64)
    for row, it in enumerate(items):
        source[row, :lengths[row]] = it["source"]
    batch = {"source": source, "id": torch.tensor([it["id"] for it in items], dtype=torch.int64)}
    for key in ("next_sentence", "mask_seed"):                    # BERT's instances (SentencePairs)
        if key in items[0]:
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    if "label" in items[0]:
        batch["padding_mask"] = torch.arange(source.shape[1]) >= torch.tensor(lengths)[:, None]
        is_float = isinstance(items[0]["label"], float)
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.float32 if is_float else torch.int64)
    return batch


def finetune_collater(cfg: DataConfig, task: str):
    return collate
