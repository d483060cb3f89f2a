"""Atomic, verified checkpoints.

A checkpoint is a plain dict saved with ``torch.save`` and read back with ``weights_only=True`` (so it
holds tensors, numbers, strings, lists and dicts only: configs are stored as plain dicts, RNG states as
tensors/lists). Writing is atomic: a temporary file in the same folder is written, fsync'ed and
``os.replace``d over the target, and the file it replaces is kept as ``<name>.prev.pt``, so a crash at any
moment leaves a complete checkpoint on disk (fairseq's ``checkpoint_last.pt`` lesson, PROTOCOL.md#checkpoints-and-requeue).

Reading verifies the zip container's CRC-32 of every record (``torch.load`` does not), so a truncated or
bit-flipped file is rejected with a :class:`CheckpointError` naming it instead of loading garbage.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest",
           "previous_path", "encoder_state_dict"]

FORMAT = "d2v2-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unknown format; the message names it."""


def previous_path(path: str | Path) -> Path:
    """Where the file replaced by the last save of ``path`` is kept: ``x.pt`` -> ``x.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Write ``obj`` to ``path`` atomically; keep the replaced file as :func:`previous_path` (if asked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            # a hard link keeps ``path`` in place until the new file replaces it
            prev_tmp = tmp + ".prev"
            os.link(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        for leftover in (tmp, tmp + ".prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint ({err})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: CRC mismatch in record '{bad}'")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {err}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a d2v2 checkpoint (no format '{FORMAT}')")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {obj.get('version')}; "
                              f"this code reads version {VERSION}")
    return obj


def load_latest(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path, list[str]]:
    """Load ``path``, falling back to its previous good version when it is unreadable.

    Returns ``(checkpoint, path_used, problems)``: ``problems`` lists the rejected files' errors so the
    caller can report them. Raises :class:`CheckpointError` when neither file can be used.
    """
    problems = []
    for candidate in (Path(path), previous_path(path)):
        try:
            return load_checkpoint(candidate, map_location), candidate, problems
        except CheckpointError as err:
            problems.append(str(err))
    raise CheckpointError("no usable checkpoint: " + "; ".join(problems))


def encoder_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student encoder's weights from a pretraining checkpoint (``model`` under ``encoder_prefix``)."""
    if "model" not in ckpt or "encoder_prefix" not in ckpt:
        raise CheckpointError("not a pretraining checkpoint: needs 'model' and 'encoder_prefix'")
    prefix = ckpt["encoder_prefix"]
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
