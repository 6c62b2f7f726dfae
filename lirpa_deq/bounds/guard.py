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


def check_specification(C, batch=None, outputs=None):
    """ValueError unless the specification matrix C (a tensor, or None) is finite and, where known,
    shaped (batch, specifications, outputs)."""
    if not isinstance(C, torch.Tensor):
        return
    expected = f"(batch, specifications, outputs) = ({batch if batch is not None else 'B'}, S, " \
               f"{outputs if outputs is not None else 'K'})"
    if C.dim() != 3 or (batch is not None and C.shape[0] != batch) or \
            (outputs is not None and C.shape[2] != outputs):
        raise ValueError(f"the specification matrix C must have shape {expected}, got {tuple(C.shape)}")
    if C.is_floating_point() and not bool(torch.isfinite(C).all()):
        raise ValueError("the specification matrix C contains NaN or inf: every bound would be NaN; "
                         "build C from finite values (e.g. one-hot margins of the labels)")


def _shapes(bounded, x):
    """(batch of the given input, outputs per sample of the model) where they can be read off."""
    first = x[0] if isinstance(x, (tuple, list)) and x else x
    batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None
    shape = getattr(bounded.final_node(), "output_shape", None)
    outputs = int(torch.Size(shape[1:]).numel()) if shape is not None and len(shape) > 1 else None
    return batch, outputs


def install(bounded_module_class):
    """Wrap ``bounded_module_class.compute_bounds`` (idempotent)."""
    original = bounded_module_class.compute_bounds
    if getattr(original, "lirpa_deq_guard", False):
        return

    @functools.wraps(original)
    def compute_bounds(self, *args, **kwargs):
        if not _has_deq(self):
            return original(self, *args, **kwargs)
        C = kwargs.get("C", args[2] if len(args) > 2 else None)
        if isinstance(C, torch.Tensor):
            check_specification(C, *_shapes(self, kwargs.get("x", args[0] if args else None)))
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
