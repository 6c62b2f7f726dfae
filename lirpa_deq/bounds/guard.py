"""Checks at ``BoundedModule.compute_bounds`` for models that contain DEQ layers.

The DEQ node refuses what reaches it (lirpa_deq.bounds.injection), but two bad inputs never do:
a specification ``C`` with NaN / inf under ``method='IBP'`` (auto_LiRPA applies C after the last
layer's interval, so the bounds come back NaN), and an unknown ``method`` (auto_LiRPA raises a bare
``NotImplementedError``). :func:`install` wraps ``compute_bounds`` once so that, on a module with a
DEQ node, C is checked first and a bare NotImplementedError says which method was asked for.
Modules without DEQ nodes are left to auto_LiRPA's own behaviour.
"""
from __future__ import annotations

import functools

import torch

from .bound_deq import BoundDEQ

METHODS_HINT = ("'IBP', 'CROWN' (= 'backward'), 'CROWN-IBP', 'CROWN-Optimized' (= 'alpha-CROWN'); "
                "'forward' modes are not supported through a DEQ node")


def _has_deq(bounded):
    cached = getattr(bounded, "_lirpa_deq_has_deq", None)
    if cached is None:
        cached = any(isinstance(node, BoundDEQ) for node in bounded.modules())
        bounded._lirpa_deq_has_deq = cached
    return cached


def check_specification(C):
    """ValueError unless the specification matrix C (a tensor, or None) is finite."""
    if isinstance(C, torch.Tensor) and C.is_floating_point() and not bool(torch.isfinite(C).all()):
        raise ValueError("the specification matrix C contains NaN or inf: every bound would be NaN; "
                         "build C from finite values (e.g. one-hot margins of the labels)")


def install(bounded_module_class):
    """Wrap ``bounded_module_class.compute_bounds`` (idempotent)."""
    original = bounded_module_class.compute_bounds
    if getattr(original, "lirpa_deq_guard", False):
        return

    @functools.wraps(original)
    def compute_bounds(self, *args, **kwargs):
        if not _has_deq(self):
            return original(self, *args, **kwargs)
        check_specification(kwargs.get("C", args[2] if len(args) > 2 else None))
        try:
            return original(self, *args, **kwargs)
        except NotImplementedError as err:
            if str(err):
                raise
            method = kwargs.get("method", args[3] if len(args) > 3 else None)
            raise NotImplementedError(f"compute_bounds(method={method!r}) is not a bound method auto_LiRPA "
                                      f"provides for this model; use one of {METHODS_HINT}") from err

    compute_bounds.lirpa_deq_guard = True
    bounded_module_class.compute_bounds = compute_bounds
