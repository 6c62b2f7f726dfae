"""Small on-disk cache for parsed arrays (``.npz``), written atomically and validated on load.

Cache directory, first match wins: the explicit ``cache_dir`` argument, the environment variable
``$LIRPA_DEQ_CACHE``, then ``~/.cache/lirpa_deq``.

Guarantees:

* A cache file is written to a temporary file in the same directory and moved into place with
  ``os.replace``, so readers never see a half-written file (the replace is atomic on POSIX and
  Windows when source and target share a file system).
* :func:`load_arrays` returns ``None`` (never raises) on a missing, unreadable or invalid file; the
  caller then rebuilds it.  Validation is done by a caller-supplied function.
* Failure to write (read-only home, full disk) only emits a warning: caching is an optimisation.
"""
from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "LIRPA_DEQ_CACHE"


def cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """Resolve the cache directory (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lirpa_deq"


def load_arrays(path: Path, validate: Callable[[Dict[str, np.ndarray]], None]) -> Optional[Dict[str, np.ndarray]]:
    """Load every array of an ``.npz`` file and validate it.

    ``validate(arrays)`` must raise (any exception) when the content is wrong.  Returns the dict of
    arrays, or ``None`` if the file is missing, unreadable (truncated, not a zip, ...) or invalid.
    Pickled objects are refused (``allow_pickle=False``).
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        validate(arrays)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, AssertionError, TypeError) as exc:
        warnings.warn(f"lirpa_deq: ignoring invalid cache file {path} ({type(exc).__name__}: {exc}); rebuilding it")
        return None
    return arrays


def save_arrays(path: Path, arrays: Dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` (uncompressed ``.npz``) atomically. Returns True on success."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        return True
    except OSError as exc:
        warnings.warn(f"lirpa_deq: could not write cache file {path} ({exc}); continuing without cache")
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            try:
                os.remove(tmp_name)
            except OSError:
                pass
