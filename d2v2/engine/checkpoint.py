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

import contextlib
import errno
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from d2v2.config import upgrade_modality_names

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest",
           "previous_path", "remove_stale_temporaries", "pretraining_checkpoint", "encoder_state_dict"]

FORMAT = "d2v2-checkpoint"
VERSION = 2


def _speech_was_audio(obj: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the speech modality was called ``audio`` in the identity and the configs (the
    provenance keeps what was recorded, e.g. a converted fairseq config)."""
    return {k: (v if k == "provenance" else upgrade_modality_names(v)) for k, v in obj.items()}


_UPGRADES = {1: _speech_was_audio}     # version -> what makes a checkpoint of that version the next one


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


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed saves left in ``folder``; return what was removed."""
    removed = []
    for leftover in Path(folder).glob(".*.pt.*.tmp*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def _write_error(err: BaseException, path: Path) -> CheckpointError:
    """A write failure as a message that names the file and the cause (torch reports a full disk as
    ``unexpected pos``), with the free space measured while the partial file still occupies it."""
    free = shutil.disk_usage(path.parent).free
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 1 << 20
    cause = "no space left on device" if full else (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return CheckpointError(f"could not write checkpoint {path}: {cause} ({free / 2**20:.1f} MiB free in "
                           f"{path.parent}); the previous checkpoint is unchanged")


def save_checkpoint(obj: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Write ``obj`` to ``path`` atomically; keep the replaced file as :func:`previous_path` (if asked).

    A failed write (disk full, file too large, I/O error) raises :class:`CheckpointError` naming the file
    and the cause, and leaves ``path`` and its previous copy as they were."""
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
    except BaseException as err:
        error = _write_error(err, path) if isinstance(err, (OSError, RuntimeError)) else None
        for leftover in (tmp, tmp + ".prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if error is not None:
            raise error from err
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
    while obj.get("version") in _UPGRADES:       # an older checkpoint, read with today's names
        obj = {**_UPGRADES[obj["version"]](obj), "version": obj["version"] + 1}
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


def pretraining_checkpoint(*, identity: dict[str, Any], method_config: dict[str, Any] | None, encoder: torch.nn.Module,
                           encoder_prefix: str, model: dict[str, torch.Tensor], pretrain: dict[str, Any],
                           budget_fraction: float | None, fraction_consumed: float, provenance: dict[str, Any] | None,
                           run_config: dict[str, Any] | None = None, **resume: Any) -> dict[str, Any]:
    """The layout of a pretraining checkpoint, defined once (ARCHITECTURE.md, "Pretraining runner"):
    the keys fine-tuning reads (``identity {modality, method, preset, seed}``, the method, encoder and run configs,
    ``model`` with the encoder's weights under ``encoder_prefix``, the clocks in ``pretrain``, the budget
    fraction) and ``resume``, what the runner continues from (optimiser, RNGs, data position, ...). The
    pretraining runner writes both parts, the fairseq converter the first."""
    return {"kind": "pretrain", "identity": identity, "method_config": method_config, "run_config": run_config,
            "encoder_config": encoder.cfg.model_dump(mode="json"), "encoder_prefix": encoder_prefix,
            "model": model, "pretrain": pretrain, "budget_fraction": budget_fraction,
            "fraction_consumed": fraction_consumed, "provenance": provenance, **resume}


def encoder_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student encoder's weights from a pretraining checkpoint (``model`` under ``encoder_prefix``)."""
    if "model" not in ckpt or "encoder_prefix" not in ckpt:
        raise CheckpointError("not a pretraining checkpoint: needs 'model' and 'encoder_prefix'")
    prefix = ckpt["encoder_prefix"]
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
