"""BERT (baselines/bert.py, d2v2.data.text.SentencePairs): presets, segment embeddings, the instances
(pairs, next-sentence labels, truncation, static duplicates), static masking, the NSP head; its loss falls
on one batch in tests/test_baselines.py."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.bert import StaticBertMasker
from d2v2.config import ConfigError
from d2v2.data.text import SentencePairs, _truncate_pair, collate
from d2v2.engine.sampler import WithEpoch
from d2v2.method import available_methods, build_method, method_config
from d2v2.model.modalities.text import BOS, EOS, PAD, TextConfig, TextLocalEncoder

FIRST = 10                  # line j of the synthetic stream is made of token FIRST + j


@pytest.mark.parametrize("preset", ["base", "tiny", "smoke"])
def test_builds_at_every_preset(preset):
    assert ("text", "bert") in available_methods()
    cfg = method_config("text", "bert", preset)
    ours, theirs = cfg.encoder.model_dump(), method_config("text", "data2vec2", preset).encoder.model_dump()
    assert ours["text"].pop("num_segments") == 2 and theirs["text"].pop("num_segments") == 0
    assert ours == theirs                                          # data2vec 2.0's text encoder + segments
    assert (cfg.mask.prob, cfg.mask.mask_token_prob, cfg.mask.random_token_prob) == (0.15, 0.8, 0.1)
    assert (cfg.nsp_weight, cfg.short_seq_prob, cfg.duplicates) == (1.0, 0.1, 10)
    with pytest.raises(ConfigError, match="num_segments"):
        method_config("text", "bert", preset, {"encoder": {"text": {"num_segments": 0}}})


def test_segments_are_bert_token_types():
    """<s> A </s> B </s> gets segment 0 up to the first </s>, 1 after it; without the option nothing changes."""
    torch.manual_seed(0)
    enc = TextLocalEncoder(TextConfig(vocab_size=50, max_positions=16, num_segments=2, dropout=0.0), 8, 1e-5).eval()
    source = torch.tensor([[BOS, 7, 8, EOS, 9, 9, 9, EOS, PAD]])
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    real = (source != PAD).long()
    positions = torch.cumsum(real, 1) * real + PAD
    x = enc.embed_tokens(source) + enc.embed_positions(positions) + enc.embed_segments(expected)
    torch.testing.assert_close(enc(source)[0], enc.layernorm_embedding(x))
    plain = TextLocalEncoder(TextConfig(vocab_size=50, max_positions=16), 8, 1e-5)
    assert not any("segment" in n for n, _ in plain.named_parameters())


def stream(tmp_path, lines=300, seed=0):
    """A token file of ``lines`` lines (line j: 2 to 12 copies of FIRST + j, then </s>)."""
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.r_[np.full(rng.integers(2, 13), FIRST + j), EOS] for j in range(lines)])
    path = tmp_path / "train.bin"
    path.write_bytes(tokens.astype(np.uint16).tobytes())
    return path, len(tokens)


def split_pair(source: torch.Tensor) -> tuple[list[int], list[int]]:
    tokens = source.tolist()
    assert tokens[0] == BOS and tokens[-1] == EOS and tokens.count(EOS) == 2
    sep = tokens.index(EOS)
    return tokens[1:sep], tokens[sep + 1:-1]


def test_instances_are_bert_pairs(tmp_path):
    path, n = stream(tmp_path)
    pairs = SentencePairs(path, n, "uint16", block_len=24, short_seq_prob=0.1, duplicates=3, doc_lines=100)
    items = WithEpoch(pairs, seed=0)
    nexts, lengths = [], []
    for epoch in range(4):
        for i in range(len(pairs)):
            item = items[(epoch, i)]
            a, b = split_pair(item["source"])
            assert a and b and len(item["source"]) <= 24
            lines_a, lines_b = sorted({t - FIRST for t in a}), sorted({t - FIRST for t in b})
            assert lines_a == list(range(lines_a[0], lines_a[-1] + 1))          # consecutive sentences
            assert lines_b == list(range(lines_b[0], lines_b[-1] + 1))
            doc_a, docs_b = lines_a[0] // 100, {line // 100 for line in lines_b}
            assert lines_a[-1] // 100 == doc_a
            if item["next_sentence"]:                       # B follows A (its front may be truncated) in A's document
                assert lines_b[0] > lines_a[-1] and docs_b == {doc_a}
            else:                                           # B from another document
                assert doc_a not in docs_b and len(docs_b) == 1
            nexts.append(item["next_sentence"])
            lengths.append(len(item["source"]))
    assert 0.35 < np.mean(nexts) < 0.55                  # half, less the single-sentence chunks (always random)
    short = [np.mean([len(WithEpoch(SentencePairs(path, n, "uint16", block_len=24, short_seq_prob=p), 0)[(0, i)]
                          ["source"]) < 20 for i in range(len(pairs))]) for p in (0.0, 0.5)]
    assert short[1] > short[0] + 0.15                    # short_seq_prob draws shorter target lengths
    # static: the same instance every `duplicates` epochs, another one in between
    same = [torch.equal(items[(0, i)]["source"], items[(3, i)]["source"]) for i in range(len(pairs))]
    other = [torch.equal(items[(0, i)]["source"], items[(1, i)]["source"]) for i in range(len(pairs))]
    assert all(same) and not all(other)
    assert items[(0, 5)]["mask_seed"] == items[(3, 5)]["mask_seed"] != items[(1, 5)]["mask_seed"]


def test_too_few_documents_is_an_error(tmp_path):
    path, n = stream(tmp_path, lines=80)
    with pytest.raises(ValueError, match="two documents"):
        SentencePairs(path, n, "uint16", block_len=24, doc_lines=100)


def test_truncation_cuts_the_longer_side():
    torch.manual_seed(0)
    a, b = _truncate_pair(np.arange(30), np.arange(100, 110), 20)
    assert len(a) + len(b) == 20 and len(b) == 10                     # only A was longer until it fit
    assert set(a) <= set(range(30)) and list(a) == list(range(a[0], a[0] + len(a)))   # a contiguous middle
    a, b = _truncate_pair(np.arange(20), np.arange(100, 120), 30)
    assert (len(a), len(b)) == (15, 15)
    fronts = [_truncate_pair(np.arange(40), np.arange(5), 25)[0][0] for _ in range(200)]
    assert 0 < np.mean(fronts) < 20                                   # both ends lose tokens


def test_static_masks_follow_each_instance_and_spare_the_separators():
    masker = StaticBertMasker(vocab_size=8192)
    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([BOS]), torch.randint(5, 8192, (40,), generator=g), torch.tensor([EOS]),
                       torch.randint(5, 8192, (30,), generator=g), torch.tensor([EOS])]) for _ in range(3)]
    items = [{"source": r, "id": i, "next_sentence": i % 2, "mask_seed": 1000 + i} for i, r in enumerate(rows)]
    batch = masker(collate(items), torch.Generator().manual_seed(1))
    again = masker(collate(items[::-1]), torch.Generator().manual_seed(2))           # another batch, other order
    assert torch.equal(again["mask"], batch["mask"].flip(0)) and torch.equal(again["source"], batch["source"].flip(0))
    special = (batch["mlm_target"] == BOS) | (batch["mlm_target"] == EOS) | (batch["mlm_target"] == PAD)
    assert not (batch["mask"] & special).any()
    assert torch.equal(batch["source"][special], batch["mlm_target"][special])
    share = batch["mask"].sum(1).float() / (~special).sum(1)
    assert ((share > 0.1) & (share < 0.2)).all()
    with pytest.raises(ValueError, match="sentence-pair batches"):
        masker({"source": rows[0][None]}, g)


def test_step_trains_both_heads_and_the_segments():
    torch.manual_seed(0)
    bert = build_method("text", "bert", "smoke")
    g = torch.Generator().manual_seed(0)
    batch = bert.stand_in_inputs({"source": torch.randint(5, 8192, (4, 64), generator=g), "id": torch.arange(4)}, g)
    masked = pickle.loads(pickle.dumps(bert.masker()))(batch, torch.Generator().manual_seed(0))
    bert.eval()                                                          # no dropout: two forwards agree
    out = bert(masked)
    out.loss.backward()
    assert out.sample_size == int(masked["mask"].sum()) > 0 and {"loss_mlm", "loss_nsp"} <= set(out.logs)
    nsp = F.cross_entropy(bert.nsp_head(torch.tanh(bert.pooler(bert.student(masked["source"]).x[:, 0]))),
                          masked["next_sentence"])
    torch.testing.assert_close(out.loss, out.logs["loss_mlm"] + nsp, rtol=1e-5, atol=1e-6)
    assert bert.lm_head.weight is bert.student.local_encoder.embed_tokens.weight
    assert bert.nsp_head.bias is None and bert.pooler.weight.grad.abs().sum() > 0
    assert bert.student.local_encoder.embed_segments.weight.grad[1].abs().sum() > 0
