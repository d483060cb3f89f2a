"""The paper's numbers as data (``results/paper/*.csv``, sources in ``results/paper/README.md``).

Baevski et al. 2022 (arXiv:2212.07525), transcribed in METHOD.md#paper-results. Besides loading the tables, this module
recomputes the speedups the efficiency figure implies with the same time-to-target rule used for our
runs (:mod:`d2v2.analysis.speedup`), so the paper's annotated claims, the figure's points and our
measurements are compared on one definition.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from d2v2.analysis.speedup import REACHED, REFERENCE_METHOD, TimeToTarget, speedup, time_to_target

__all__ = ["PAPER_DIR", "TABLES", "METHOD_NAMES", "PAPER_SCALE", "load", "implied_speedups"]

PAPER_DIR = Path(__file__).resolve().parents[2] / "results" / "paper"
TABLES = ("efficiency_points", "claims", "imagenet", "librispeech", "glue", "ablation_multimask",
          "ablation_block_width")
METHOD_NAMES = {"data2vec2": "data2vec 2.0", "data2vec1": "data2vec 1.0", "mae": "MAE",
                "mlm": "RoBERTa (MLM)", "wav2vec2": "wav2vec 2.0", "hubert": "HuBERT",
                "wavlm": "WavLM", "bert": "BERT"}

# Scale and hardware behind the efficiency figure (METHOD.md#pretraining-recipes; GPU type not stated in the paper).
PAPER_SCALE = {"image": "ViT-B, ImageNet-1k; GPU count and type not stated",
               "speech": "Base, LibriSpeech 960 h; 16 GPUs (type not stated)",
               "text": "Base, Books + Wikipedia; 16 GPUs (type not stated)"}


def load(name: str, paper_dir: str | Path = PAPER_DIR) -> pd.DataFrame:
    """One of :data:`TABLES`; a missing file is an error naming the path."""
    if name not in TABLES:
        raise ValueError(f"unknown paper table '{name}'; known: {', '.join(TABLES)}")
    path = Path(paper_dir) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"paper table not found: {path}")
    return pd.read_csv(path)


def implied_speedups(paper_dir: str | Path = PAPER_DIR) -> pd.DataFrame:
    """Speedup of data2vec 2.0 over every baseline in the efficiency figure, from its points.

    The target is a baseline's last point (its full pre-training run) and its time is that run's
    hours, as in the paper; data2vec 2.0's time is interpolated along its curve, so a row reads
    "data2vec 2.0 reaches MAE's 83.6 in 2.9 h, MAE took 51 h: 17.5x". Plot-reading error (±0.5 h)
    propagates into these ratios.
    """
    points = load("efficiency_points", paper_dir)
    rows = []
    for modality, pts in points.groupby("modality", sort=False):
        ref = pts[pts["method"] == REFERENCE_METHOD]
        for method, base in pts[pts["method"] != REFERENCE_METHOD].groupby("method", sort=False):
            final = base.loc[base["hours"].idxmax()]
            hib = bool(final["higher_is_better"])
            t_base = TimeToTarget(float(final["hours"]), REACHED)
            t_ref = time_to_target(ref["hours"], ref["value"], final["value"], hib)
            s = speedup([t_base], [t_ref])
            rows.append({"modality": modality, "baseline": method, "metric": final["metric"],
                         "target": final["value"], "baseline_hours": t_base.time,
                         "d2v2_hours": t_ref.time, "d2v2_status": t_ref.status,
                         "relation": s.relation, "speedup": s.value, "speedup_text": s.describe()})
    return pd.DataFrame(rows)
