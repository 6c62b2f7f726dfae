"""Atomic, validated checkpoints.

A checkpoint is a ``torch.save`` dict::

    {"format": "lirpa_deq.checkpoint", "version": 1,
     "config": TrainConfig.to_dict(), "model": {"name", "kwargs", "input_shape", "num_classes"},
     "model_state": state_dict, "optimizer_state": ..., "step": int (global step done),
     "rng": {"torch": ByteTensor, "cuda": [...] or None, "python": ..., "numpy": ...},
     "metrics": {...}}

Writing: to a temporary file in the target directory, flushed and fsync'ed, then ``os.replace``
(atomic on POSIX and Windows): a crash leaves either the old or the new checkpoint, never a
truncated one (:func:`atomic_write` is the same for any file: the CLI's JSON and PNG outputs).
Reading: every failure (missing, corrupt or truncated, not a checkpoint, wrong version, missing
keys, NaN / inf weights) raises :class:`CheckpointError` with one clear line saying what to do.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

from ..validate import first_non_finite

FORMAT = "lirpa_deq.checkpoint"
VERSION = 1
REQUIRED = ("config", "model", "model_state", "step")


class CheckpointError(RuntimeError):
    """An unreadable, corrupt or mismatched checkpoint."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def atomic_write(path, write, mode="wb") -> str:
    """Create or replace ``path`` atomically: ``write(f)`` fills a temporary file (opened with
    ``mode``) in the same directory, which is flushed, fsync'ed and ``os.replace``'d onto ``path``.
    A failure leaves the old file (if any) untouched and no temporary file. Returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _refuse_non_finite(data: dict, where: str) -> None:
    """CheckpointError if the checkpoint's weights hold NaN / inf (a model that would be "evaluated"
    to chance accuracy, or resumed into NaN losses)."""
    state = data.get("model_state")
    bad = first_non_finite(state) if isinstance(state, dict) else None
    if bad is not None:
        raise CheckpointError(f"{where} has NaN / inf weights ({bad!r}): it cannot be evaluated or resumed; the "
                              "run diverged: retrain (e.g. with a lower --lr) or use another checkpoint")


def save_checkpoint(path, payload: dict) -> str:
    """Write ``payload`` (must hold the REQUIRED keys) atomically to ``path``; returns the path."""
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    return atomic_write(path, lambda f: torch.save(dict(payload, format=FORMAT, version=VERSION), f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and validate a checkpoint; CheckpointError (one line) on any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        # RNG states hold python/numpy objects, so the full unpickler is needed: only load
        # checkpoints you trust (as with any torch.load(weights_only=False)).
        data = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError,
            AttributeError, ModuleNotFoundError, IndexError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt, truncated or not a torch file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); delete it "
                              "and train again, or use another checkpoint (lirpa-deq train: another --out)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a lirpa_deq checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {data.get('version')!r}; this lirpa_deq "
                              f"reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete (missing {missing}); delete it and train "
                              "again, or use another checkpoint (lirpa-deq train: another --out)")
    _refuse_non_finite(data, f"checkpoint {path!r}")
    return data


def model_from_checkpoint(data: dict, device="cpu"):
    """Rebuild the model of a loaded checkpoint and load its weights (eval mode); CheckpointError
    if they do not fit the model or hold NaN / inf (such a model would be "evaluated" to chance)."""
    from ..models import build_model

    spec = data["model"]
    _refuse_non_finite(data, "the checkpoint")
    try:
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec.get("kwargs", {}))
        model.load_state_dict(data["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint model does not match its weights or this lirpa_deq "
                              f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()
