"""What every modality's data shares: clear errors, atomic files, manifests, the masking collater and
the DataLoader settings.

- Errors name the config key and the path (``data.image.imagenet_dir: not found: /x``) or the corrupt
  file, never a bare traceback from deep inside a reader.
- Files are written atomically (:mod:`d2v2.atomic`), so a crash never leaves a
  half-written file under its final name.
- A manifest per prepared modality records counts, sha256 checksums, source package versions and the
  config that produced the files; preparation is skipped when it still matches.
- Masks are drawn in the data workers (METHOD.md#where-time-goes) from a generator seeded by a stable hash of
  ``(seed, epoch, sample ids)``, so a batch gets the same masks whichever worker builds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "MissingDataError", "CorruptDataError", "require_path", "sha256_file", "dpkg_version", "file_record",
    "read_manifest", "manifest_is_current", "stable_seed", "MaskingCollater", "loader_kwargs", "MANIFEST",
]

MANIFEST = "manifest.json"


class MissingDataError(FileNotFoundError):
    """A data path or external tool is missing; the message says which key/path and how to get it."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be read as expected; the message names the file."""


def require_path(path: str | Path | None, key: str, hint: str = "") -> Path:
    """``path`` as a Path if it exists, else a :class:`MissingDataError` naming ``key`` and the path."""
    if path is None or str(path) == "":
        raise MissingDataError(f"{key}: not set" + (f" ({hint})" if hint else ""))
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"{key}: not found: {path}" + (f" ({hint})" if hint else ""))
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dpkg_version(package: str) -> str | None:
    """Installed version of a Debian package (``None`` if not installed or no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package],
                         capture_output=True, text=True)
    parts = out.stdout.split()
    return parts[-1] if out.returncode == 0 and "installed" in parts else None


def file_record(path: Path, base: Path) -> dict[str, Any]:
    """Manifest entry of one file: relative path, size, sha256."""
    return {"path": str(path.relative_to(base)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptDataError(f"{path}: not valid JSON ({err}); delete it and prepare again") from None


def manifest_is_current(folder: str | Path, inputs: Mapping[str, Any], verify: bool = True) -> bool:
    """True if ``folder`` holds a manifest made from the same ``inputs`` whose files are intact.

    ``inputs`` is what determines the output (config, source versions/checksums); ``verify`` re-hashes
    every listed file (a few seconds for the embedded data) instead of trusting sizes.
    """
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("inputs") != json.loads(json.dumps(inputs)):
        return False
    for rec in manifest.get("files", []):
        path = Path(folder) / rec["path"]
        if not path.is_file() or path.stat().st_size != rec["bytes"]:
            return False
        if verify and sha256_file(path) != rec["sha256"]:
            return False
    return True


def stable_seed(seed: int, epoch: int, ids: Sequence[int] | torch.Tensor) -> int:
    """A 63-bit seed from ``(seed, epoch, ids)`` (BLAKE2b; Python's ``hash`` is salted per process)."""
    ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    digest = hashlib.blake2b(np.array([seed, epoch], dtype=np.int64).tobytes() + ids.tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class MaskingCollater:
    """``collate(items)`` then ``masker(batch, generator)`` with a generator from :func:`stable_seed`.

    Items are dicts with an ``"id"`` and optionally an ``"epoch"`` (set by the engine's sampler; 0 if
    absent). Picklable as long as ``collate`` and ``masker`` are (module-level functions / objects).
    """

    def __init__(self, collate: Callable[[list[dict]], dict], masker: Callable | None, seed: int):
        self.collate, self.masker, self.seed = collate, masker, int(seed)

    def __call__(self, items: list[dict]) -> dict:
        epochs = {int(item.get("epoch", 0)) for item in items}
        if len(epochs) != 1:
            raise ValueError(f"items of one batch come from different epochs: {sorted(epochs)}")
        batch = self.collate(items)
        if self.masker is None:
            return batch
        generator = torch.Generator().manual_seed(stable_seed(self.seed, epochs.pop(), batch["id"]))
        return self.masker(batch, generator)


def one_storage(batch: dict) -> dict:
    """``batch`` with its tensors copied into one byte storage, each a view of its own aligned slice.

    A loader worker hands each tensor storage to the training process through its own shared-memory
    segment, whose handle exchange and mapping the training process pays on every batch (about 0.2 ms per
    tensor on a CPU, counted by a CPU-seconds budget): one storage makes it one segment
    (docs/BENCHMARKS.md#loader-hand-over). The other values are kept as they are."""
    layout, size = {}, 0
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            layout[key] = size
            size += -(-value.numel() * value.element_size() // 64) * 64
    buffer = torch.empty(size, dtype=torch.uint8)
    packed = dict(batch)
    for key, start in layout.items():
        value = batch[key]
        view = buffer[start:start + value.numel() * value.element_size()].view(value.dtype).view(value.shape)
        packed[key] = view.copy_(value)
    return packed


class OneStorageCollater:
    """``collate`` whose batches are :func:`one_storage`'d: the collater of a loader with workers."""

    def __init__(self, collate: Callable[[list], dict]):
        self.collate = collate

    def __call__(self, items: list) -> dict:
        return one_storage(self.collate(items))


def _single_thread_worker(_: int) -> None:
    """Data workers do per-sample work; one intra-op thread each avoids oversubscribing the CPU."""
    torch.set_num_threads(1)


def _cpus_per_process() -> int:
    """CPUs this process may use, shared among the training processes of the node (torchrun sets
    ``LOCAL_WORLD_SIZE``; SLURM ``SLURM_NTASKS_PER_NODE``, e.g. ``4`` or ``4(x2)``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    match = re.match(r"\d+", local)
    return max(1, cpus // max(1, int(match.group()) if match else 1))


def loader_kwargs(cfg, device: str | torch.device = "cpu", collate_fn: Callable | None = None) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for ``cfg`` (a ``DataConfig``) on ``device`` (and ``collate_fn``).

    Workers: ``cfg.num_workers`` or, if unset, the CPUs of this process minus one for the training
    loop (at least 1 when there are 2+ CPUs, so masks and augmentation overlap the step; at most 10,
    fairseq/MAE's usual per-GPU count). Pinned memory on CUDA. Persistent workers and a prefetch depth
    only when there are workers (PyTorch rejects them otherwise); workers' batches come in one storage
    (:class:`OneStorageCollater`).
    """
    device = torch.device(device)
    cpus = _cpus_per_process()
    workers = cfg.num_workers if cfg.num_workers is not None else min(10, max(0, cpus - 1))
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda",
    }
    if workers > 0:
        kwargs.update(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor,
                      worker_init_fn=_single_thread_worker)
    if collate_fn is not None:
        kwargs["collate_fn"] = OneStorageCollater(collate_fn) if workers > 0 else collate_fn
    return kwargs
