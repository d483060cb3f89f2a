"""The paper's tables under results/paper hold the paper's numbers, and the speedups they imply.

The spot-check values are the paper's as printed (tables) or as read off its plots
(docs/METHOD.md, "Paper results"; results/paper/README.md).
"""
import math

import pytest

from d2v2.analysis import paper


def _row(df, **where):
    for k, v in where.items():
        df = df[df[k] == v]
    assert len(df) == 1, where
    return df.iloc[0]


def test_spot_checks_against_the_papers_tables():
    claims = paper.load("claims").set_index("baseline")["speedup"].to_dict()
    assert claims == {"mae": 16.4, "wav2vec2": 10.6, "mlm": 2.0}
    eff = paper.load("efficiency_points")
    assert _row(eff, modality="image", method="mae")[["hours", "value"]].tolist() == [51, 83.6]
    assert _row(eff, modality="speech", method="wav2vec2")[["hours", "value"]].tolist() == [57, 16.1]
    assert _row(eff, modality="text", method="data2vec2", hours=28)["value"] == 82.6
    assert len(eff[(eff.modality == "image") & (eff.method == "data2vec2")]) == 5
    inet = paper.load("imagenet")
    assert _row(inet, method="data2vec 2.0")[["epochs", "vit_b_top1", "vit_l_top1"]].tolist() == ["200/150", 84.5, 86.8]
    assert _row(inet, method="MAE")["vit_b_top1"] == 83.6 and math.isnan(_row(inet, method="DINO")["vit_l_top1"])
    ls = paper.load("librispeech")
    d2 = _row(ls, size="Base", model="data2vec 2.0")
    assert (d2["wer_10m"], d2["wer_100h"], d2["pretrain_hours"]) == (11.5, 6.4, 43.3)
    assert _row(ls, size="Large", model="wav2vec 2.0")["pretrain_hours"] == 150.0
    glue = paper.load("glue")
    g = _row(glue, model="data2vec 2.0")
    assert (g["mnli_m"], g["cola"], g["avg"], g["pretrain_hours"], g["epochs"]) == (83.7, 59.1, 82.6, 28.2, 4.1)
    assert _row(glue, model="Baseline (RoBERTa, BERT setup)")["pretrain_hours"] == 50.5
    mm = paper.load("ablation_multimask")
    assert _row(mm, batch_size=64, num_masks=16)["top1"] == 82.4
    assert _row(mm, batch_size=1024, num_masks=1)["top1"] == 82.3
    assert mm[(mm.batch_size == 64) & (mm.num_masks == 1)].empty       # no point in the plot
    bw = paper.load("ablation_block_width")
    assert _row(bw, inverse=False, block_width=3)["top1"] == 84.1
    assert _row(bw, inverse=True, block_width=2)["top1"] == 84.4


def test_implied_speedups_reproduce_the_claims_within_plot_error():
    imp = paper.implied_speedups().set_index(["modality", "baseline"])
    # MAE: 83.6 reached between (1.5 h, 81.9) and (3 h, 83.7) -> 1.5 + 1.5 * 1.7/1.8 h
    assert imp.loc[("image", "mae"), "speedup"] == pytest.approx(51 / (1.5 + 1.5 * 1.7 / 1.8))
    # wav2vec 2.0's 16.1 WER is beaten at data2vec 2.0's first point (5.5 h): a lower bound
    assert imp.loc[("speech", "wav2vec2"), "relation"] == ">="
    assert imp.loc[("speech", "wav2vec2"), "speedup"] == pytest.approx(57 / 5.5)
    assert imp.loc[("text", "mlm"), "speedup"] == pytest.approx(50.5 / 25.5)
    # data2vec 1.0's GLUE 82.7 is never reached (best 82.6 at 28 h): an upper bound
    assert imp.loc[("text", "data2vec1"), "relation"] == "<="
    assert imp.loc[("text", "data2vec1"), "speedup"] == pytest.approx(69.4 / 28)
    with pytest.raises(ValueError, match="unknown paper table"):
        paper.load("nope")

