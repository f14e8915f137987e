"""Checkpoints you can trust: atomic writes, safe loads, clear errors.

Written to a temporary file in the same directory, flushed and fsynced, then
renamed over the old one (``os.replace`` is atomic), so a crash at any moment
leaves the previous good checkpoint in place. Loaded with
``torch.load(weights_only=True)``: no code from the file is ever executed.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "remove_stale", "FORMAT"]

FORMAT = "blendq-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a blendq checkpoint."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk: torch.save's writer says
        Path(tmp).unlink(missing_ok=True)   # "unexpected pos", an OSError says ENOSPC
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_FULL = 1 << 20  # a disk with less free space than this (bytes) counts as full


def _write_error(path: Path, err: Exception) -> CheckpointError:
    """What a failed save tells: a full disk said in words, which file, and whether the
    previous checkpoint at ``path`` is intact (the write goes to a temporary file, so it
    is whenever there was one)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "unexpected pos" in str(err) or (free is not None and free < _FULL)
    kept = (f"the previous checkpoint {path} is intact" if path.exists()
            else f"no earlier checkpoint exists at {path}")
    if full:
        return CheckpointError(
            f"cannot save checkpoint {path}: the disk holding it is full"
            + ("" if free is None else f" ({free:,} bytes free)")
            + f"; {kept}. Free some space and resume")
    return CheckpointError(f"cannot save checkpoint {path}: {type(err).__name__}: {err}; {kept}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; never executes code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # a global that a safe load refuses to run
        if "Weights only load failed" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(f"checkpoint {path} refused as unsafe: it asks to run "
                                  "Python code or import objects when loaded, which blendq "
                                  "never does; load only checkpoints you trust with "
                                  "blendq") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or not a checkpoint "
                              f"at all: it cannot be read ({type(err).__name__})") from None
    except Exception as err:  # truncated zip, bad pickle
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt, or not a checkpoint "
                              f"at all: it cannot be read ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a blendq checkpoint (expected format {FORMAT!r})")
    return state


def remove_stale(path: str | os.PathLike) -> int:
    """Delete the temporary files that a crash during :func:`save_checkpoint` of ``path``
    left behind; returns how many."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)
