"""Text data: the embedded corpus (real, prepared once), its BPE, VADER tasks; GLUE and raw shards (fixtures)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v2.data import (DataConfig, finetune_collater, finetune_datasets, pretrain_collater, pretrain_dataset,
                       prepare, task_info)
from d2v2.data.common import CorruptDataError, MissingDataError
from d2v2.config import ConfigError
from d2v2.data.text import BOS, EOS, PAD, SPECIALS, TASKS, UNK, load_tokenizer

ROOT = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def cfg():
    cfg = DataConfig(root=str(ROOT), text={"block_len": 64, "max_len": 64})
    prepare(["text"], cfg)
    return cfg


def test_blocks(cfg):
    train, valid = pretrain_dataset("text", cfg), pretrain_dataset("text", cfg, "valid")
    manifest_tokens = train.tokens.shape[0]
    assert len(train) == manifest_tokens // 63 and len(valid) > 100
    item = train[5]
    assert item["source"].shape == (64,) and item["source"].dtype == torch.int64 and item["id"] == 5
    assert item["source"][0] == BOS and int(item["source"].max()) < 8192 and train.tokens.dtype == np.uint16
    assert torch.equal(item["source"][1:], torch.from_numpy(train.tokens[5 * 63:6 * 63].astype(np.int64)))
    assert (train.tokens[:10000] == EOS).sum() > 50                 # lines end with </s>


def test_bpe_round_trip_and_specials(cfg):
    tok = load_tokenizer(cfg)
    assert [tok.tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4] and tok.vocab_size == 8192
    for text in ["In the beginning God created the heaven and the earth.",
                 "Emma Woodhouse, handsome, clever, and rich — naïve café 3.14 ✓  two  spaces"]:
        ids = tok.encode(text)
        assert min(ids) >= len(SPECIALS) and tok.decode(ids) == text
    assert len(tok.encode("the heaven and the earth")) <= 6              # real merges, not bytes


def test_truncated_memmap_gives_clear_error(cfg, tmp_path):
    folder = tmp_path / "text" / "embedded"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "text" / "embedded" / "manifest.json", folder)
    data = (ROOT / "text" / "embedded" / "valid.bin").read_bytes()
    (folder / "valid.bin").write_bytes(data[:-3])
    with pytest.raises(CorruptDataError, match=r"valid.bin: \d+ bytes, the manifest says \d+ uint16 tokens"):
        pretrain_dataset("text", DataConfig(root=str(tmp_path)), "valid")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CorruptDataError, match="tokenizer.json: not a valid tokenizer file"):
        load_tokenizer(DataConfig(root=str(tmp_path)))
    with pytest.raises(MissingDataError, match="data.root: no prepared text"):
        pretrain_dataset("text", DataConfig(root=str(tmp_path / "none")))


def test_vader_tasks(cfg):
    movie = finetune_datasets("text", cfg, "movie")
    sizes = {k: len(v) for k, v in movie.items()}
    assert sum(sizes.values()) == 10072 and sizes["train"] == round(0.8 * 10072)   # |mean| >= 0.5
    labels = np.array(movie["train"].labels)
    assert set(labels) == {0, 1} and 0.45 < labels.mean() < 0.55                    # balanced
    item = movie["test"][0]
    assert item["source"][0] == BOS and item["source"][-1] == EOS and len(item["source"]) <= 64
    batch = finetune_collater("text", cfg, "movie")([movie["train"][i] for i in range(5)])
    lengths = (~batch["padding_mask"]).sum(1)
    assert batch["label"].dtype == torch.int64 and batch["source"].shape[1] == lengths.max()
    assert torch.all(batch["source"][batch["padding_mask"]] == PAD)
    reg = finetune_datasets("text", cfg, "movie-intensity")
    assert sum(map(len, reg.values())) == 10605
    values = np.array(reg["train"].labels)
    assert values.min() >= -4 and values.max() <= 4 and values.std() > 1
    assert finetune_collater("text", cfg, "movie-intensity")([reg["train"][0]])["label"].dtype == torch.float32
    assert task_info("text", "movie-intensity")["metrics"] == ["pearson", "spearman"]
    assert {t: task_info("text", t)["primary_metric"] for t in TASKS}["tweet"] == "accuracy"
    counts = json.loads((ROOT / "text" / "embedded" / "manifest.json").read_text())["counts"]["tasks"]
    assert {t: sum(c.values()) for t, c in counts.items() if t in ("tweet", "product", "editorial")} == \
        {"tweet": 3432, "product": 2985, "editorial": 2970}                         # docs/DATA.md


def test_masking_collater_on_text(cfg):
    from baselines.masking import BertMasker

    ds = pretrain_dataset("text", cfg)
    collater = pretrain_collater("text", cfg, BertMasker(vocab_size=8192), seed=0)
    a, b = collater([ds[i] for i in range(4)]), collater([ds[i] for i in range(4)])
    assert a["source"].shape == (4, 64) and torch.equal(a["mask"], b["mask"]) and torch.equal(a["source"], b["source"])
    assert torch.equal(a["mlm_target"], torch.stack([ds[i]["source"] for i in range(4)]))


def _write(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture
def glue(tmp_path, cfg):
    _write(tmp_path / "SST-2" / "train.tsv", [("sentence", "label"), ("a gorgeous film", "1"), ("dull", "0")])
    _write(tmp_path / "SST-2" / "dev.tsv", [("sentence", "label"), ("it 's \"quoted\" fun", "1")])
    cola = [("gj04", "1", "", "The book was read."), ("gj04", "0", "*", "Read book the was.")]
    _write(tmp_path / "CoLA" / "train.tsv", cola)
    _write(tmp_path / "CoLA" / "dev.tsv", cola)
    head = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score")
    sts = [head, ("0", "g", "f", "y", "0", "s", "s", "A man plays.", "A man is playing.", "4.750")]
    _write(tmp_path / "STS-B" / "train.tsv", sts)
    _write(tmp_path / "STS-B" / "dev.tsv", sts)
    mnli = [("index", "sentence1", "sentence2", "gold_label"), ("0", "He ran.", "He moved.", "entailment"),
            ("1", "He ran.", "He sat still.", "contradiction")]
    for name in ("train", "dev_matched", "dev_mismatched"):
        _write(tmp_path / "MNLI" / f"{name}.tsv", mnli)
    return cfg.model_copy(update={"text": cfg.text.model_copy(update={"glue_dir": str(tmp_path)})})


def test_glue_tasks(glue, tmp_path):
    sst = finetune_datasets("text", glue, "sst2")
    assert [len(sst[s]) for s in ("train", "valid", "test")] == [2, 1, 1] and sst["train"].labels == [1, 0]
    tok = load_tokenizer(glue)
    assert tok.decode(sst["valid"][0]["source"].tolist()) == "it 's \"quoted\" fun"    # no TSV quoting
    assert finetune_datasets("text", glue, "cola")["train"].labels == [1, 0]
    assert task_info("text", "cola")["primary_metric"] == "mcc"
    sts = finetune_datasets("text", glue, "stsb")["train"]
    assert sts.labels == [4.75] and task_info("text", "stsb")["regression"]
    mnli = finetune_datasets("text", glue, "mnli")
    assert set(mnli) == {"train", "valid", "test", "test_mismatched"} and mnli["train"].labels == [1, 0]
    src = mnli["train"][0]["source"].tolist()
    first, second = tok.encode("He ran."), tok.encode("He moved.")
    assert src == [BOS, *first, EOS, EOS, *second, EOS]                    # RoBERTa pair encoding
    _write(tmp_path / "MNLI" / "dev_matched.tsv", [("index", "sentence1", "sentence2", "gold_label"),
                                                   ("0", "a", "b", "maybe")])
    with pytest.raises(CorruptDataError, match=r"dev_matched.tsv: unexpected labels \['maybe'\]"):
        finetune_datasets("text", glue, "mnli")
    with pytest.raises(MissingDataError, match=r"data\.text\.glue_dir: not found: .*QNLI/train.tsv"):
        finetune_datasets("text", glue, "qnli")
    with pytest.raises(MissingDataError, match=r"data\.text\.glue_dir: not set"):
        finetune_datasets("text", DataConfig(root=str(ROOT)), "rte")


def test_raw_shards_with_gpt2_bpe(tmp_path, capsys):
    from tokenizers import ByteLevelBPETokenizer

    lines = [f"line {i} of a small raw text shard about the {w}" for i, w in enumerate(["sea", "sky", "land"] * 40)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:100]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[100:]) + "\n")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))                                      # GPT-2 format: vocab.json + merges.txt
    text = {"corpus": "raw", "gpt2_vocab": str(tmp_path / "vocab.json"), "gpt2_merges": str(tmp_path / "merges.txt"),
            "train_shards": [str(tmp_path / "a.txt")], "valid_shards": [str(tmp_path / "b.txt")], "block_len": 16}
    cfg = DataConfig(root=str(tmp_path / "data"), text=text)
    manifest = prepare(["text"], cfg)["text"]
    assert not manifest["skipped"] and prepare(["text"], cfg)["text"]["skipped"]
    train = pretrain_dataset("text", cfg)
    tok = load_tokenizer(cfg)
    assert tok.vocab_size == bpe.get_vocab_size() + 5
    ids = train.tokens[: len(tok.encode(lines[0])) + 1].tolist()
    assert ids[-1] == EOS and min(ids[:-1]) >= 5 and tok.decode(ids) == lines[0]
    assert train[0]["source"].shape == (16,) and len(pretrain_dataset("text", cfg, "valid")) > 0
    bad = DataConfig(root=str(tmp_path / "data"), text={**text, "train_shards": [str(tmp_path / "missing.txt")]})
    with pytest.raises(MissingDataError, match=r"data\.text\.train_shards: not found: .*missing.txt"):
        prepare(["text"], bad)
    assert manifest["counts"]["undecodable_lines"] == {}
    with open(tmp_path / "a.txt", "ab") as f:                          # one line that is not UTF-8
        f.write(b"caf\xe9 au lait\n")
    capsys.readouterr()
    manifest = prepare(["text"], cfg)["text"]
    assert manifest["counts"]["undecodable_lines"] == {str(tmp_path / "a.txt"): 1}
    assert f"{tmp_path / 'a.txt'}: 1 line(s) are not valid UTF-8" in capsys.readouterr().err


def test_fairseq_dictionary_ids_for_official_checkpoints(glue, tmp_path):
    """With fairseq's dict.txt the GLUE tasks get the ids of the official text checkpoints: specials 0-3,
    the file's lines from 4 (in its order, not the BPE's), <unk> for BPE tokens it lacks, <mask> last."""
    from tokenizers import ByteLevelBPETokenizer

    lines = ["a gorgeous film", "dull", "it 's \"quoted\" fun"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    order = list(range(bpe.get_vocab_size() - 1, 0, -1))            # reversed, BPE id 0 left out
    (tmp_path / "dict.txt").write_text("".join(f"{i} {1000 - n}\n" for n, i in enumerate(order)))
    text = {"corpus": "raw", "gpt2_vocab": str(tmp_path / "vocab.json"), "gpt2_merges": str(tmp_path / "merges.txt"),
            "gpt2_dict": str(tmp_path / "dict.txt"), "glue_dir": glue.text.glue_dir}
    cfg = DataConfig(root=str(tmp_path / "data"), text=text)
    tok = load_tokenizer(cfg)
    assert tok.vocab_size == 4 + len(order) + 1
    sentence = "a gorgeous film"
    bpe_ids = bpe.encode(sentence).ids
    assert tok.encode(sentence) == [UNK if b == 0 else 4 + order.index(b) for b in bpe_ids]
    sst = finetune_datasets("text", cfg, "sst2")
    assert sst["train"][0]["source"].tolist() == [BOS, *tok.encode(sentence), EOS]
    assert tok.decode(tok.encode("dull")) == "dull"
    with pytest.raises(ConfigError, match=r"data\.text\.gpt2_dict: for fine-tuning official checkpoints only"):
        prepare(["text"], cfg)
    (tmp_path / "dict.txt").write_text("5 10\nmadeupword0000 0\n7 3\n")    # padding symbols keep their index
    assert load_tokenizer(cfg).fairseq_ids[[5, 7, 6]].tolist() == [4, 6, UNK]
    (tmp_path / "dict.txt").write_text("5 10\n900 3\n")
    with pytest.raises(CorruptDataError, match=r"dict.txt:2: expected '<symbol> <count>' with GPT-2 ids below 280"):
        load_tokenizer(cfg)
    with pytest.raises(ValueError, match="gpt2_dict: needs corpus=raw"):
        DataConfig(text={"gpt2_dict": str(tmp_path / "dict.txt")})


def test_missing_tools_name_the_package(tmp_path, monkeypatch):
    from d2v2.data.text import _fetch_janeaustenr, kjv_verses

    monkeypatch.setenv("PATH", str(tmp_path))          # no bible, apt-get or dpkg-deb on the PATH
    with pytest.raises(MissingDataError, match=r"command 'bible' not found \(apt-get install -y bible-kjv\)"):
        kjv_verses()
    with pytest.raises(MissingDataError, match=r"command 'apt-get' not found .*apt-get download r-cran-janeaustenr"):
        _fetch_janeaustenr(tmp_path / "cache")
