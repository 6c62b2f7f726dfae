"""Checks at ``BoundedModule.compute_bounds`` for models that contain DEQ layers.

The DEQ node refuses what reaches it (lirpa_deq.bounds.injection), but two bad inputs never do:
a specification ``C`` with NaN / inf under ``method='IBP'`` (auto_LiRPA applies C after the last
layer's interval, so the bounds come back NaN), and an unknown ``method`` (auto_LiRPA raises a bare
``NotImplementedError``). :func:`install` wraps ``compute_bounds`` once so that, on a module with a
DEQ node, C is checked first and a bare NotImplementedError says which method was asked for.

Modules without DEQ nodes are left to auto_LiRPA's own behaviour, except one check: a graph that
repeats the same block (a parameter used by four or more linear / conv operations along one
chain) is an unrolled fixed-point loop (``for _ in range(k): z = relu(W z + U x)``). Its bounds are
those of the k-step unrolled network, which grow with k, and auto_LiRPA 0.3's CROWN fails on it;
:func:`unrolled_loop` finds it, and ``compute_bounds`` then warns once (:class:`UnrolledLoopWarning`)
or re-raises auto_LiRPA's error with the path to take: a ``lirpa_deq.nn.DEQ`` layer.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .._compat import bound_classes
from .bound_deq import BoundDEQ

_WEIGHTED = set(bound_classes("BoundLinear", "BoundMatMul", "BoundConv"))
_PASS_THROUGH = set(bound_classes("BoundTranspose", "BoundReshape", "BoundUnsqueeze", "BoundSqueeze",
                                  "BoundIdentity", "BoundCast"))
_PARAMS = set(bound_classes("BoundParams"))
MIN_REPEATS = 4  # three steps are still a plausible explicit network (e.g. a 3-layer weight-tied net)


class UnrolledLoopWarning(UserWarning):
    """The bounded model unrolls a fixed-point loop (see :func:`unrolled_loop`)."""


class UnrolledLoopError(RuntimeError):
    """auto_LiRPA failed on a model that unrolls a fixed-point loop; the message says what to do."""


def _weight_source(node):
    """The parameter node a weight input comes from, through transposes / reshapes, or None."""
    while type(node) in _PASS_THROUGH and node.inputs:
        node = node.inputs[0]
    return node if type(node) in _PARAMS else None


def _ancestors(node, memo):
    if node.name not in memo:
        memo[node.name] = set()  # (a DAG: no cycles; guards against revisits)
        out = set()
        for i in node.inputs:
            out.add(i.name)
            out |= _ancestors(i, memo)
        memo[node.name] = out
    return memo[node.name]


def unrolled_loop(bounded):
    """(repeats, parameter name) of the longest chain of linear / conv operations that share one weight
    parameter, each computed from the previous one, when it has at least MIN_REPEATS links; else None."""
    users = {}
    for node in bounded.modules():
        if type(node) in _WEIGHTED and len(node.inputs) > 1:
            source = _weight_source(node.inputs[1])
            if source is not None:
                users.setdefault(source.name, (source, []))[1].append(node)
    best, memo = None, {}
    for source, ops in users.values():
        if len(ops) < MIN_REPEATS:
            continue
        # longest chain in the ancestry order: ops sorted by their number of ancestors
        ops = sorted(ops, key=lambda n: len(_ancestors(n, memo)))
        chain = 1
        for prev, nxt in zip(ops, ops[1:]):
            chain = chain + 1 if prev.name in _ancestors(nxt, memo) else chain
        if chain >= MIN_REPEATS and (best is None or chain > best[0]):
            best = (chain, getattr(source, "ori_name", None) or source.name)
    return best


def loop_message(repeats, name):
    return (f"this model's graph repeats the same block {repeats} times (parameter {name!r} is the weight of "
            f"{repeats} chained linear / conv operations): an unrolled fixed-point loop such as "
            f"`for _ in range({repeats}): z = relu(W(z) + U(x))`. auto_LiRPA bounds the {repeats}-step unrolled "
            "network, whose bounds grow with the number of steps, not the equilibrium. Write the loop as a DEQ "
            "layer: lirpa_deq.nn.DEQ(cell, solver='fixed_point_iter', max_iter=...) with cell(z, x) the loop "
            "body (bounds of the Picard limit, or of the unique fixed point when the body is a proved "
            "contraction); for a relu(W z + U x) body, lirpa_deq.convert(...) moves the trained weights into "
            "IBP-MonDEQ cells (docs/existing_deq.md)")


def _loop_of(bounded):
    if not hasattr(bounded, "_lirpa_deq_loop"):
        try:
            bounded._lirpa_deq_loop = unrolled_loop(bounded)
        except Exception:  # the check must never break a model auto_LiRPA handles
            bounded._lirpa_deq_loop = None
    return bounded._lirpa_deq_loop


def _bounds_without_deq(original, bounded, args, kwargs):
    loop = _loop_of(bounded)
    if loop is None:
        return original(bounded, *args, **kwargs)
    try:
        out = original(bounded, *args, **kwargs)
    except Exception as err:
        raise UnrolledLoopError(f"auto_LiRPA failed ({type(err).__name__}: {err}) on a model where {loop_message(*loop)}") \
            from err
    if not getattr(bounded, "_lirpa_deq_loop_warned", False):
        bounded._lirpa_deq_loop_warned = True
        warnings.warn(f"In {type(bounded).__name__}, {loop_message(*loop)}.", UnrolledLoopWarning, stacklevel=3)
    return out

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


def foreign_deq_layers(model):
    """Names of torchdeq DEQ layers (``torchdeq.get_deq``) in ``model``: auto_LiRPA would trace their
    solver loop (and fails on it); lirpa_deq's drop-in replaces them."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [name or type(m).__name__ for name, m in model.named_modules()
            if type(m).__module__.split(".")[0] == "torchdeq" and hasattr(m, "f_solver")]


TORCHDEQ_HINT = ("replace `from torchdeq import get_deq` by `from lirpa_deq.interop.torchdeq import get_deq` (same "
                 "arguments and call, z_out, info = deq(lambda z: f(z, u), z0); docs/existing_deq.md)")


def _install_build_check(bounded_module_class):
    original = bounded_module_class.__init__
    if getattr(original, "lirpa_deq_guard", False):
        return

    @functools.wraps(original)
    def __init__(self, model, *args, **kwargs):
        foreign = foreign_deq_layers(model)
        if foreign:
            raise TypeError(f"the model contains torchdeq DEQ layer(s) {foreign}, whose solver loop auto_LiRPA "
                            f"cannot trace into a bound; {TORCHDEQ_HINT}")
        original(self, model, *args, **kwargs)

    __init__.lirpa_deq_guard = True
    bounded_module_class.__init__ = __init__


def install(bounded_module_class):
    """Wrap ``bounded_module_class.compute_bounds`` and its constructor (idempotent)."""
    _install_build_check(bounded_module_class)
    original = bounded_module_class.compute_bounds
    if getattr(original, "lirpa_deq_guard", False):
        return

    @functools.wraps(original)
    def compute_bounds(self, *args, **kwargs):
        if not _has_deq(self):
            return _bounds_without_deq(original, self, args, kwargs)
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
