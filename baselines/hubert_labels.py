"""HuBERT's targets (Hsu et al. 2021, Sec. 3; fairseq ``examples/hubert/simple_kmeans``): features of the
pretraining utterances, k-means on a sample of them, and one line of cluster ids per utterance (``.km``).

    iteration 1: MFCC features (13 coefficients + first and second differences, 100 per second) -> 100 clusters
    iteration 2: layer 6 of the iteration-1 model (50 per second)                               -> 500 clusters

    python -m d2v2 hubert-labels --data '{root: data}' --out DIR --clusters 100                  # iteration 1
    python -m d2v2 hubert-labels --data data.yaml --out DIR --clusters 500 --checkpoint CKPT --layer 6

The model's features are computed on ``--device`` (default: a GPU when there is one), one utterance at a
time as fairseq's ``dump_hubert_feature.py`` does (padding would change the frames near an utterance's end
through the positional convolution); k-means and the assignment run on the CPU.

Two passes over the split: features of a sample of the utterances (``--percent``; fairseq's 10% of
LibriSpeech 960 h) fit ``MiniBatchKMeans`` with fairseq's settings; then every utterance's features are
assigned to their nearest centroid. Only the sample's features are held in memory (and reused). The run writes
``pretrain.km`` and ``labels.json`` (what made them, the label rate, and the time each pass took on both
clocks, summed as the input cost of the runs trained on them, PROTOCOL.md#input-costs) atomically into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchaudio
import yaml
from sklearn.cluster import MiniBatchKMeans

from baselines.hubert import MFCC_RATE
from d2v2.atomic import atomic_write, atomic_write_json
from d2v2.config import ConfigError, validate
from d2v2.data import CorruptDataError, DataConfig, MissingDataError, speech_root
from d2v2.data.speech import load_audio, normalise_waveform, read_split
from d2v2.model.encoder import Encoder, EncoderConfig
from d2v2.engine.checkpoint import CheckpointError, encoder_state_dict, load_checkpoint
from d2v2.model.modalities.speech import receptive_field

__all__ = ["mfcc_features", "LayerFeatures", "fit_kmeans", "nearest", "make_labels", "load_data_config", "main"]
COMMAND_HELP = "make HuBERT's k-means labels of the speech pretraining split"   # in `python -m d2v2 --help`


def mfcc_features(wav: np.ndarray, sample_rate: int) -> torch.Tensor:
    """(N,) raw waveform -> (T, 39): kaldi MFCCs without energy, their deltas and delta-deltas (fairseq
    ``dump_mfcc_feature.py``)."""
    x = torch.from_numpy(wav).float().view(1, -1)
    mfcc = torchaudio.compliance.kaldi.mfcc(x, sample_frequency=sample_rate, use_energy=False).T   # (13, T)
    deltas = torchaudio.functional.compute_deltas(mfcc)
    return torch.cat([mfcc, deltas, torchaudio.functional.compute_deltas(deltas)]).T.contiguous()


class LayerFeatures:
    """The output of block ``layer`` (1-based, fairseq ``output_layer``) of a pretraining checkpoint's
    encoder, unmasked, in eval mode, on the normalised waveform: (N,) -> (T, D), 50 per second."""

    def __init__(self, checkpoint: str | Path, layer: int, sample_rate: int, device: str = "cpu"):
        ckpt = load_checkpoint(checkpoint)
        encoder = Encoder(EncoderConfig(**ckpt["encoder_config"]))
        encoder.load_state_dict(encoder_state_dict(ckpt))
        if not 1 <= layer <= len(encoder.blocks):
            raise ValueError(f"--layer {layer}: the encoder of {checkpoint} has blocks 1..{len(encoder.blocks)}")
        if encoder.cfg.modality != "speech":
            raise ValueError(f"{checkpoint} is a {encoder.cfg.modality} checkpoint, not a speech one")
        encoder.blocks = encoder.blocks[:layer]              # the blocks above the layer change nothing
        self.device = torch.device(device)
        self.encoder, self.layer = encoder.to(self.device).eval(), layer
        self.rate = sample_rate / receptive_field(encoder.cfg.speech.conv_layers)[1]

    @torch.inference_mode()
    def __call__(self, wav: np.ndarray) -> torch.Tensor:
        return self.encoder(torch.from_numpy(wav)[None].to(self.device)).x[0].float().cpu()


def fit_kmeans(features: np.ndarray, clusters: int, seed: int) -> MiniBatchKMeans:
    """fairseq ``learn_kmeans.py``'s settings: k-means++ init, 20 inits, batches of 10,000, 100 iterations,
    no tolerance, no reassignment."""
    if len(features) < clusters:
        raise ValueError(f"{len(features)} feature frames cannot make {clusters} clusters (raise --percent)")
    km = MiniBatchKMeans(n_clusters=clusters, init="k-means++", max_iter=100, batch_size=10_000, tol=0.0,
                         max_no_improvement=100, n_init=20, reassignment_ratio=0.0, random_state=seed,
                         compute_labels=False)
    return km.fit(features)


def nearest(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of every row, by squared distance |x|^2 - 2 x.c + |c|^2 (fairseq ``ApplyKmeans``)."""
    dist = features.pow(2).sum(1, keepdim=True) - 2 * features @ centroids.T + centroids.pow(2).sum(1)
    return dist.argmin(1)


class _Clock:
    """Wall and process-CPU seconds of one pass."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3)}


def make_labels(data: DataConfig, out: Path, clusters: int, percent: float = -1.0,
                checkpoint: str | Path | None = None, layer: int = 6, seed: int = 0, split: str = "pretrain",
                device: str = "cpu") -> dict:
    """Write ``out/<split>.km`` and ``out/labels.json`` for every utterance of ``split``, in manifest order:
    MFCC clusters, or (with ``checkpoint``) clusters of its encoder's block ``layer`` computed on ``device``."""
    speech = data.speech
    utts = read_split(speech_root(data), speech, split)
    if checkpoint is None:      # MFCCs of the raw waveform, as fairseq's reader
        features, rate, source = (lambda wav: mfcc_features(wav, speech.sample_rate)), MFCC_RATE, {"kind": "mfcc"}
    else:                       # the model sees what it was trained on
        features = LayerFeatures(checkpoint, layer, speech.sample_rate, device)
        rate, source = features.rate, {"kind": "layer", "checkpoint": str(checkpoint), "layer": layer,
                                       "device": str(features.device)}

    def read(j: int) -> np.ndarray:
        wav = load_audio(utts.paths[j], int(utts.sizes[j]), speech.sample_rate)
        return normalise_waveform(wav) if checkpoint is not None and speech.normalize else wav
    n = len(utts.paths)
    rng = np.random.default_rng(seed)
    sample = np.arange(n) if percent < 0 else np.sort(rng.choice(n, max(1, int(n * percent)), replace=False))
    with _Clock() as fit_clock:
        seen = {int(j): features(read(j)) for j in sample}
        km = fit_kmeans(torch.cat(list(seen.values())).numpy(), clusters, seed)
    frames, centroids = 0, torch.from_numpy(km.cluster_centers_).float()
    with _Clock() as label_clock, atomic_write(out / f"{split}.km", "w") as f:
        for j in range(n):
            ids = nearest(seen.pop(j) if j in seen else features(read(j)), centroids)
            frames += len(ids)
            f.write(" ".join(map(str, ids.tolist())) + "\n")
    wall, cpu = fit_clock.wall + label_clock.wall, fit_clock.cpu + label_clock.cpu
    info = {"split": split, "utterances": n, "frames": frames, "label_rate": rate, "clusters": clusters,
            "features": source, "kmeans_sample_utterances": len(sample), "seed": seed,
            "inertia_per_frame": float(km.inertia_) / max(1, frames),
            "seconds": {"fit": fit_clock.seconds(), "label": label_clock.seconds()},
            # the cost of these labels on a run's clocks (PROTOCOL.md#input-costs): one process
            "train_time_s": wall, "e2e_time_s": wall, "train_cpu_s": cpu, "device_hours": wall / 3600}
    atomic_write_json(out / "labels.json", info)
    return info


def load_data_config(text: str) -> DataConfig:
    """``--data``: a YAML file of DataConfig fields, or the fields inline (``'{root: data}'``)."""
    raw = yaml.safe_load(text) if text.lstrip().startswith("{") else yaml.safe_load(Path(text).read_text())
    return validate(DataConfig, raw or {}, where="data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2v2 hubert-labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="{}", help="data config: a YAML file or inline YAML (default: the "
                        "embedded corpus under data/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for pretrain.km and labels.json")
    parser.add_argument("--clusters", required=True, type=int)
    parser.add_argument("--checkpoint", help="cluster this model's features (iteration 2); default: MFCCs")
    parser.add_argument("--layer", type=int, default=6, help="with --checkpoint: the block (1-based)")
    parser.add_argument("--percent", type=float, default=-1.0, help="share of utterances k-means fits on (-1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="with --checkpoint: where the model runs (auto: cuda "
                        "when available, else cpu)")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        data = load_data_config(args.data)
        args.out.mkdir(parents=True, exist_ok=True)
        info = make_labels(data, args.out, args.clusters, args.percent, args.checkpoint, args.layer, args.seed,
                           device=device)
    except (ConfigError, MissingDataError, CorruptDataError, CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"hubert-labels: {info['utterances']} utterances, {info['frames']} frames at {info['label_rate']:g} Hz "
          f"-> {args.clusters} clusters in {args.out}")
    return 0
