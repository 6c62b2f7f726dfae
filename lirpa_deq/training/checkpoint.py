"""Atomic, validated checkpoints.

A checkpoint is a ``torch.save`` dict::

    {"format": "lirpa_deq.checkpoint", "version": 1,
     "config": TrainConfig.to_dict(), "model": {"name", "kwargs", "input_shape", "num_classes"},
     "model_state": state_dict, "optimizer_state": ..., "step": int (global step done),
     "rng": {"torch": ByteTensor, "cuda": [...] or None, "python": ..., "numpy": ...},
     "metrics": {...}}

Writing: to a temporary file in the target directory, flushed and fsync'ed, then ``os.replace``
(atomic on POSIX and Windows): a crash leaves either the old or the new checkpoint, never a
truncated one. Reading: every failure (missing, truncated, not a checkpoint, wrong version,
missing keys) raises :class:`CheckpointError` with one clear line.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

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


def save_checkpoint(path, payload: dict) -> str:
    """Write ``payload`` (must hold the REQUIRED keys) atomically to ``path``; returns the path."""
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload, format=FORMAT, version=VERSION), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a lirpa_deq checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {data.get('version')!r}; this lirpa_deq "
                              f"reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete (missing {missing})")
    return data


def model_from_checkpoint(data: dict, device="cpu"):
    """Rebuild the model of a loaded checkpoint and load its weights (eval mode)."""
    from ..models import build_model

    spec = data["model"]
    try:
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec.get("kwargs", {}))
        model.load_state_dict(data["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint model does not match its weights or this lirpa_deq "
                              f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()
