"""How a DEQ layer becomes ONE node of auto_LiRPA's graph.

auto_LiRPA traces a model with ``torch.jit`` and converts the trace to ONNX ops. When tracing,
``DEQ.forward`` calls :func:`traced_deq`, an autograd Function whose ``symbolic`` emits a single
``custom::DEQFixedPoint`` op with inputs (u, *cell parameters) and an integer attribute naming
the layer in a registry. The solver runs with tracing suspended, so no unrolled loop reaches the
graph. ``import lirpa_deq`` registers :class:`lirpa_deq.bounds.BoundDEQ` for that op (passing
``custom_ops={OP_NAME: BoundDEQ}`` to BoundedModule works too).

The cell parameters are node inputs (BoundParams in auto_LiRPA), so gradients of bounds reach
them and training a BoundedModule trains the DEQ.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from .injection import check_dtype

OP_NAME = "custom::DEQFixedPoint"
_REGISTRY: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def register_layer(deq) -> int:
    """Give ``deq`` a stable integer key (stored on the module) and remember it weakly."""
    key = getattr(deq, "_lirpa_deq_key", None)
    if key is None or _REGISTRY.get(key) is not deq:
        key = next(_IDS)
        deq._lirpa_deq_key = key
        _REGISTRY[key] = deq
    return key


def lookup_layer(key: int):
    deq = _REGISTRY.get(int(key))
    if deq is None:
        raise RuntimeError(f"DEQ layer #{key} of this graph no longer exists (was the model deleted?)")
    return deq


def parameter_names(deq):
    return [name for name, _ in deq.cell.named_parameters()]


class _suspend_tracing:
    """Run code without recording it into an active torch.jit trace."""

    def __enter__(self):
        self.state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)

    def __exit__(self, *exc):
        torch._C._set_tracing_state(self.state)


class DEQFixedPoint(torch.autograd.Function):
    """z* = DEQ(u) as one opaque op (used only while tracing; eager calls go to DEQ.solve).

    The solve happens before ``apply`` with tracing suspended; ``forward`` only hands the
    precomputed z* through, so the traced body is a single copy, replaced by ``symbolic``."""

    @staticmethod
    def forward(ctx, u, z_star, key, *params):
        return z_star.clone()

    @staticmethod
    def symbolic(g, u, z_star, key, *params):
        return g.op(OP_NAME, u, *params, deq_i=int(key)).setType(z_star.type())


def _detach_torchdeq_norms(cell):
    """torchdeq's norms (``torchdeq.norm.apply_norm``) keep the normalized weight as a plain tensor
    attribute that carries a gradient graph, which the nested trace of the cell cannot take as a
    constant: recompute it without gradients (same value; outside the trace)."""
    for m in cell.modules():
        norm = getattr(m, "_deq_norm", None)
        if norm is None:
            continue
        with _suspend_tracing(), torch.no_grad():
            if not m.training:  # (in training mode torchdeq's spectral norm would run a power iteration)
                norm(m)
            for name in getattr(norm, "names", ()):
                value = getattr(m, name, None)
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    setattr(m, name, value.detach())


def traced_deq(deq, u):
    """The DEQ call as it is recorded in a trace (see module docstring)."""
    _detach_torchdeq_norms(deq.cell)
    key = register_layer(deq)
    params = [p for _, p in deq.cell.named_parameters()]
    check_dtype(u, params)
    with _suspend_tracing(), torch.no_grad():
        z_star = deq.solve(u.detach())
    return DEQFixedPoint.apply(u, z_star, key, *params)


def is_tracing() -> bool:
    """True while torch.jit is tracing (auto_LiRPA building its graph)."""
    return torch._C._get_tracing_state() is not None
