"""Which DEQ modules are warm-started, and from what: context-local state, not module attributes.

:func:`lirpa_deq.nn.serial_warm_start` activates a :class:`WarmStart` for each DEQ of a model in
the current context (a ``contextvars.ContextVar``, so nesting restores the outer state and other
threads are unaffected); :meth:`lirpa_deq.nn.DEQ.solve` reads it with :func:`warm_start_state`.
Nothing is stored on the modules, so copying, pickling or ``state_dict`` never sees it.
"""
from __future__ import annotations

import contextvars
import dataclasses
import types

import torch

_ACTIVE = contextvars.ContextVar("lirpa_deq_warm_starts", default=types.MappingProxyType({}))


@dataclasses.dataclass
class WarmStart:
    """One DEQ's serialized warm start: at most ``max_iter`` iterations per solve, starting from
    ``prev`` (the previous solve's output) when its shape, dtype and device match."""

    max_iter: int
    prev: torch.Tensor | None = None


def warm_start_state(module) -> WarmStart | None:
    """The active :class:`WarmStart` of ``module`` in this context, or None (normal solves)."""
    return _ACTIVE.get().get(module)


def activate(modules, max_iter: int) -> contextvars.Token:
    """Give each of ``modules`` a fresh :class:`WarmStart`; returns the token for :func:`restore`."""
    state = dict(_ACTIVE.get())
    state.update({m: WarmStart(int(max_iter)) for m in modules})
    return _ACTIVE.set(types.MappingProxyType(state))


def restore(token: contextvars.Token) -> None:
    """Undo the :func:`activate` that returned ``token``."""
    _ACTIVE.reset(token)
