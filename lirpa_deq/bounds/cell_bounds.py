"""How a family of DEQ cells is bounded: the protocol BoundDEQ delegates to, and its registry.

A :class:`CellBounds` owns everything one DEQ node needs to bound its cell family, with its caches:

* ``box(u_lo, u_hi, params)``: a PROVED box (lo, hi) of z*(u) for every u in the box (no
  gradients), cached while the input box, the parameters and the cell's attributes are unchanged;
  ``info`` says how it was proved;
* ``interval_step(box, u_lo, u_hi, params)``: z* ∈ F(B) ∩ B, differentiable (IBP training);
* ``linear_relaxation(state, u_box, params, grad)``: the cell's relaxation for the adjoint theorem
  (lirpa_deq.bounds.adjoint) over a :class:`~lirpa_deq.bounds.refine.RelaxationState` (the proved
  box, possibly tightened, and family-specific pre-activation bounds), from which
  ``linear_backward`` (shared) builds CROWN bounds;
* ``refined(box, u_box, params)``: that state tightened by CROWN bounds of the family's
  refinement rows (lirpa_deq.bounds.refine), cached per proved box like the box itself;
* ``differentiable_box(state, u_box, params)``: the state's box with the implicit gradient of the
  interval fixed point (its value unchanged), for exact gradients of CROWN bounds;
* optimizable slopes: ``slope_shape`` / ``initial_slopes`` (None: the family has none).

A family implements ``handles(deq)``, ``_refresh``, ``_prove``, ``interval_step``,
``linear_relaxation`` and, for the refinement, ``initial_state`` / ``refinement_rows`` /
``tighten``; :func:`register_cell_bounds` adds it. BoundDEQ picks the first registered
family that handles its layer when the node is built. The ReLU-affine family
(lirpa_deq.bounds.relu_affine) and the generic family (lirpa_deq.bounds.generic) are built in.
"""
from __future__ import annotations

import torch

from .generic.fingerprint import fingerprint, same_fingerprint
from .interval import IntervalProofError
from .refine import RelaxationState, refine

_FAMILIES: list = []


def register_cell_bounds(family, first=False):
    """Register a :class:`CellBounds` subclass (``first``: ahead of the built-in ones)."""
    if not (isinstance(family, type) and issubclass(family, CellBounds)):
        raise TypeError(f"register_cell_bounds needs a CellBounds subclass, got {family!r}")
    if family not in _FAMILIES:
        _FAMILIES.insert(0, family) if first else _FAMILIES.append(family)
    return family


def cell_bounds_for(deq, interval_options, adjoint_options):
    """The bounds strategy of the first registered family that handles ``deq``."""
    for family in _FAMILIES:
        if family.handles(deq):
            return family(deq, interval_options, adjoint_options)
    raise TypeError(f"no registered bounds for the cell {type(deq.cell).__name__}")


def _same(key_a, key_b):
    """Equal cache keys: same shapes, dtypes, devices and values of every tensor."""
    return key_a is not None and len(key_a) == len(key_b) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(key_a, key_b))


class CellBounds:
    """Base class of a cell family's bounds (see the module docstring). ``deq``: the DEQ layer;
    options: the node's IntervalOptions and adjoint options (dict)."""

    differentiable_relaxation = True  # False: linear_relaxation(grad=True) would equal the detached one

    def __init__(self, deq, interval_options, adjoint_options):
        self.deq = deq
        self.interval_options = interval_options
        self.adjoint_options = adjoint_options
        self.last_box = None  # the last proved (lo, hi)
        self.info = {}
        self.forward_value = None  # the node's point solution, a warm start for the proof
        self._key = None
        self._cell_fp = None
        self._refined = None  # (box-cache key, options, input-region key, RelaxationState)
        self.last_lower_slopes = None  # CROWN's lower slopes of the last relaxation (alpha's start)

    @classmethod
    def handles(cls, deq) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def box(self, u_lo, u_hi, params):
        """The proved box of z* for u in [u_lo, u_hi] (each (B, *u_state)), cached on a SNAPSHOT of
        the input box, the parameters (in-place updates invalidate it) and the cell's fingerprint
        (attributes and buffers: ``cell.margin = ...`` invalidates it). Raises IntervalProofError
        rather than returning a non-finite box."""
        u_lo, u_hi = u_lo.detach(), u_hi.detach()
        detached = {k: v.detach() for k, v in params.items()}
        current = fingerprint(self.deq.cell)
        stale = self._refresh(u_lo, u_hi) or not same_fingerprint(current, self._cell_fp)
        self._cell_fp = current
        key = [u_lo.clone(), u_hi.clone(), *(v.clone() for v in detached.values()), *self._key_extras()]
        if not stale and _same(self._key, key):
            return self.last_box
        with torch.no_grad():
            lo, hi, info = self._prove(u_lo, u_hi, params, self._warm_start(u_lo, u_hi, detached))
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            self._key = None
            raise IntervalProofError(
                f"the {info.get('box', 'proved')} box of the DEQ's fixed point is not finite (the cell's "
                "weights or the input region are too large for floating point); use a smaller eps, "
                "float64, or rescale the weights")
        self.last_box, self.info, self._key = (lo, hi), info, key
        return lo, hi

    def _warm_start(self, u_lo, u_hi, params):
        """Start of the box search: the node's own forward value (the fixed point at the clean input,
        which auto_LiRPA computed already) when it fits, else a solve at the box centre. Only a
        starting point: soundness comes from the proof."""
        fv = self.forward_value
        if isinstance(fv, torch.Tensor) and tuple(fv.shape) == self.deq.state_shape(u_lo.shape) \
                and fv.dtype == u_lo.dtype and bool(torch.isfinite(fv).all()):
            return fv.detach()
        return self.deq.solve((u_lo + u_hi) / 2, params=params)

    def refined(self, box, u_box, params, concretize=None):
        """The CROWN-refined RelaxationState for the proved ``box`` (lirpa_deq.bounds.refine), reused
        while the box cache holds (same input box, parameters and cell) and the input region is the
        same, i.e. by every specification and start node of one ``compute_bounds``. ``concretize``:
        None or (callable, region key: tensors naming the input region it concretizes over)."""
        fn, region = concretize if concretize is not None else (None, [])
        opts = tuple(sorted((k, v) for k, v in self.adjoint_options.items()))
        hit = self._refined
        if hit is not None and hit[0] is self._key and hit[1] == opts and box[0] is self.last_box[0] \
                and _same(hit[2], region):
            return hit[3]
        state = refine(self, box, u_box, params, self.adjoint_options, fn)
        self._refined = (self._key, opts, [t.detach().clone() for t in region], state)
        return state

    def differentiable_box(self, state, u_box, params):
        """``state.box`` with the gradient of the proved box: the value is unchanged (a sound box),
        the gradient is that of one differentiable interval step from the proved box, which for an
        interval post-fixpoint is the implicit-function gradient of the interval fixed point
        (``interval_step``). Entries where a refinement made the box tighter keep that gradient
        (the refinement itself is held constant)."""
        a, b = self.interval_step(self.last_box, *u_box, params)
        lo, hi = state.box
        return lo.detach() + (a - a.detach()), hi.detach() + (b - b.detach())

    # -- implemented by a family ---------------------------------------------------------------
    def initial_state(self, box, u_box, params):
        """The RelaxationState before any refinement: the proved box (and the family's own
        pre-activation bounds from it)."""
        return RelaxationState(box)

    def refinement_rows(self, state, params, max_rows):
        """(G (K, B, N), G_u (K, B, M) or None, index (K,)): the rows whose CROWN bounds tighten the
        state, or None when there is nothing to tighten (the default: no refinement)."""
        return None

    def tighten(self, state, index, lower, upper, u_box, params):  # pragma: no cover - abstract
        """(new RelaxationState, relative shrink) from proved bounds (K, B) of the rows ``index``;
        the new state must be the INTERSECTION of the old one with what the bounds prove."""
        raise NotImplementedError

    def slope_shape(self, state_shape):
        """Shape (per sample) of the optimizable lower slopes of the family's relaxation, or None."""
        return None

    def _refresh(self, u_lo, u_hi) -> bool:
        """Bring nested state up to date for these inputs; True when it was rebuilt (then every cached
        box is stale)."""
        return False

    def _key_extras(self) -> list:
        """Tensors, besides the input box and parameters, that the proved box depends on."""
        return []

    def _prove(self, u_lo, u_hi, params, z_start):  # pragma: no cover - abstract
        """(lo, hi, info): a proved box (run without gradients; ``params`` as given, not detached)."""
        raise NotImplementedError

    def interval_step(self, box, u_lo, u_hi, params):  # pragma: no cover - abstract
        raise NotImplementedError

    def linear_relaxation(self, state, u_box, params, grad):  # pragma: no cover - abstract
        """The relaxation object (lirpa_deq.bounds.adjoint) valid on ``state``; with ``grad``,
        differentiable in ``state.box``, ``u_box`` and ``params``."""
        raise NotImplementedError
