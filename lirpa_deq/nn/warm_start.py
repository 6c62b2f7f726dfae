"""Serialized warm starts for randomized smoothing (Gao et al. 2024).

Inside ``serial_warm_start(model, max_iter=k)`` each DEQ in ``model`` restarts every forward
from its previous call's output (when shape, dtype and device match; otherwise from zeros
with its normal ``max_iter``), runs at most ``k`` solver iterations, and never warns or
raises on non-convergence (``last_stats`` still records what happened). On exit, every
module returns to its previous configuration (nesting is supported). The state is
context-local (:mod:`lirpa_deq.nn.warm_state`), never an attribute of the modules.
"""
from __future__ import annotations

import contextlib
import numbers

from .deq import DEQ
from .warm_state import activate, restore


def deq_modules(model) -> list:
    """All :class:`DEQ` modules of ``model`` (``model`` itself included), in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


@contextlib.contextmanager
def serial_warm_start(model, max_iter: int = 1):
    """Context manager: inside it every DEQ of ``model`` starts from its previous output (same
    shape, dtype and device) and runs at most ``max_iter`` iterations, without warnings (Serialized
    RS; see the module doc). Yields the DEQ modules; restores their configuration on exit.
    Guarantees nothing about convergence: corrections are the caller's (lirpa_deq.smoothing)."""
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"serial_warm_start max_iter must be an integer >= 1, got {max_iter!r}")
    mods = deq_modules(model)
    token = activate(mods, max_iter)
    try:
        yield mods
    finally:
        restore(token)
