"""``BoundDEQ``: auto_LiRPA's Bound for the ``custom::DEQFixedPoint`` node.

Inputs: node 0 is the injection u (B, *state), nodes 1.. are the cell parameters (unperturbed).
Output: z*(u), the DEQ's fixed point.

* ``forward``: the point solve (implicit gradients to u and the parameters).
* ``interval_propagate``: the PROVED interval fixed point (lirpa_deq.bounds.interval) with
  implicit-function gradients (IBP certified training).
* ``bound_backward``: linear (CROWN) bounds through the adjoint DEQ (lirpa_deq.bounds.adjoint).

Options: ``BoundedModule(..., bound_opts={'deq': {...}})`` with keys of
:class:`IntervalOptions` (interval search / proof) and ``adjoint_max_iter``, ``adjoint_tol``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from auto_LiRPA.operators import Bound

from .ball_box import monotone_ball_box
from .generic.fingerprint import fingerprint, same_fingerprint
from .injection import check_dtype, checked_box, injection_box
from .interval import IntervalOptions, IntervalProofError, interval_step, prove_interval_fixed_point
from .implicit import differentiable_interval_step
from .node import lookup_layer, parameter_names

ADJOINT_KEYS = ("adjoint_max_iter", "adjoint_tol", "adjoint_solver")


def deq_options(options):
    """Split ``bound_opts['deq']`` into IntervalOptions and adjoint options; unknown keys raise."""
    raw = dict((options or {}).get("deq", {}) or {})
    interval_keys = {f.name for f in dataclasses.fields(IntervalOptions)}
    unknown = sorted(set(raw) - interval_keys - set(ADJOINT_KEYS))
    if unknown:
        raise ValueError(f"unknown bound_opts['deq'] option(s) {unknown}; valid: "
                         f"{sorted(interval_keys | set(ADJOINT_KEYS))}")
    interval = IntervalOptions(**{k: v for k, v in raw.items() if k in interval_keys})
    adjoint = {k: v for k, v in raw.items() if k in ADJOINT_KEYS}
    max_iter, tol = adjoint.get("adjoint_max_iter", 1), adjoint.get("adjoint_tol", 0.0)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"bound_opts['deq']['adjoint_max_iter'] must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"bound_opts['deq']['adjoint_tol'] must be a finite real number >= 0, got {tol!r}")
    return interval, adjoint


def _same(key_a, key_b):
    """Equal cache keys: same shapes and values of the injection bounds and parameters."""
    flat_a = [key_a[0], key_a[1], *key_a[2]]
    flat_b = [key_b[0], key_b[1], *key_b[2]]
    return len(flat_a) == len(flat_b) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(flat_a, flat_b))


class BoundDEQ(Bound):
    """Bound of a DEQ fixed-point node; see the module docstring."""

    def __init__(self, attr=None, inputs=None, output_index=0, options=None):
        super().__init__(attr, inputs, output_index, options)
        self.deq_key = int(attr["deq"])
        # a strong reference (kept out of nn.Module registration, so the layer's parameters are not
        # registered twice): BoundedModule(make_model(), x) must not lose its layer to the GC
        self._deq_holder = (lookup_layer(self.deq_key),)
        self.requires_input_bounds = [0]  # bounds of u are needed (ReLU relaxation inside)
        self.nonlinear = True
        self.interval_options, self.adjoint_options = deq_options(options)
        self.box = None  # last proved (lo, hi) of z*, reused by bound_backward
        self.box_info = {}
        self._box_key = None

    @property
    def deq(self):
        return self._deq_holder[0]

    def _params(self, values):
        names = parameter_names(self.deq)
        if len(values) != len(names):
            raise RuntimeError(f"DEQ node got {len(values)} parameter inputs, the cell has {len(names)}")
        return dict(zip(names, values))

    def forward(self, u, *params):
        check_dtype(u, params)
        return self.deq.solve(u, params=self._params(params))

    def _input_box(self, u_lo, u_hi, params):
        """The checked box of the injection u over the whole input region (lirpa_deq.bounds.injection)."""
        u_lo, u_hi = injection_box(self.inputs[0], u_lo, u_hi)
        return checked_box(u_lo, u_hi, params)

    # ------------------------------------------------------------------------------------ IBP
    def _check_params_unperturbed(self, intervals):
        for i, (lo, hi) in enumerate(intervals, start=1):
            if self.is_input_perturbed(i) or (lo is not hi and not torch.equal(lo, hi)):
                raise NotImplementedError(
                    "perturbed DEQ cell parameters are not supported (BoundedParameter inside a "
                    "DEQ cell): the fixed-point bounds assume fixed weights. Perturb the input or "
                    "layers outside the DEQ instead.")

    def interval_box(self, u_lo, u_hi, params):
        """The proved box of z* for u in [u_lo, u_hi] (no gradients), cached for repeated calls
        within one compute_bounds. Tries the interval post-fixpoint; if that cannot be proved and
        ``IntervalOptions.fallback`` allows, uses the monotone-ball box (always provable for the
        cells' guarantee, looser). ``self.box_info['box']`` says which one was used."""
        u_lo, u_hi = u_lo.detach(), u_hi.detach()
        detached = {k: v.detach() for k, v in params.items()}
        # a SNAPSHOT (clones): in-place weight updates (optimizer.step) must invalidate the cache
        state = list(detached.values())
        deq = self.deq
        # attributes and buffers shape the operator too (cell.margin = ..., a declared contraction)
        current = fingerprint(deq.cell)
        if deq.generic:
            from .generic.bound import refresh_bounder
            if refresh_bounder(self, u_lo, u_hi):
                self._box_key = None
            declared = getattr(deq.cell, "lipschitz_z", None)
            declared = declared() if callable(declared) else declared  # (a callable's value: not in the fingerprint)
            state.append(torch.tensor(-1.0 if declared is None else float(declared)))
        else:
            state.append(torch.tensor(float(deq.cell.margin), dtype=torch.float64))
        if not same_fingerprint(current, getattr(self, "_cell_fp", None)):
            self._box_key = None
        self._cell_fp = current
        key = (u_lo.clone(), u_hi.clone(), tuple(v.clone() for v in state))
        if self._box_key is not None and _same(self._box_key, key):
            return self.box
        if deq.generic:
            from .generic.bound import generic_box
            with torch.no_grad():
                lo, hi, info = generic_box(self, u_lo, u_hi, self._warm_start(u_lo, u_hi, detached))
            return self._store(lo, hi, info, key)
        with torch.no_grad():
            op = deq.cell.operator(detached)
            op.prepare(tuple(u_lo.shape[1:]))
            z_mid = self._warm_start(u_lo, u_hi, detached)
            try:
                lo, hi, info = prove_interval_fixed_point(op, u_lo, u_hi, z_start=z_mid,
                                                          opts=self.interval_options)
                info["box"] = "interval-post-fixpoint"
            except IntervalProofError as err:
                if not self.interval_options.fallback:
                    raise
                lo, hi = monotone_ball_box(op, deq.cell.margin, u_lo, u_hi, z_mid)
                info = {"box": "monotone-ball", "interval_error": str(err)}
        return self._store(lo, hi, info, key)

    def _store(self, lo, hi, info, key):
        """Cache and return a proved box; a box with NaN / inf (overflow) is no proof and raises."""
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            self._box_key = None
            raise IntervalProofError(
                f"the {info.get('box', 'proved')} box of the DEQ's fixed point is not finite (the cell's "
                "weights or the input region are too large for floating point); use a smaller eps, "
                "float64, or rescale the weights")
        self.box, self.box_info, self._box_key = (lo, hi), info, key
        return lo, hi

    def _warm_start(self, u_lo, u_hi, params):
        """Start of the interval search: the node's own forward value (the fixed point at the clean
        input, which auto_LiRPA computed already) when it fits, else a solve at the box centre.
        Only a starting point: soundness comes from the proof."""
        fv = getattr(self, "forward_value", None)
        if isinstance(fv, torch.Tensor) and tuple(fv.shape) == self.deq.state_shape(u_lo.shape) \
                and fv.dtype == u_lo.dtype \
                and bool(torch.isfinite(fv).all()):
            return fv.detach()
        return self.deq.solve((u_lo + u_hi) / 2, params=params)

    def interval_propagate(self, *v):
        (u_lo, u_hi), param_intervals = v[0], v[1:]
        self._check_params_unperturbed(param_intervals)
        params = self._params([p[0] for p in param_intervals])
        u_lo, u_hi = self._input_box(u_lo, u_hi, params)
        lo, hi = self.interval_box(u_lo, u_hi, params)
        if self.deq.generic:
            from .generic.bound import generic_interval_step
            return generic_interval_step(self, (lo, hi), u_lo, u_hi)
        op = self.deq.cell.operator(params)  # with grad: training differentiates the bound
        op.prepare(tuple(u_lo.shape[1:]))
        if self.box_info["box"] == "interval-post-fixpoint":
            return differentiable_interval_step(op, lo, hi, u_lo, u_hi, slack=self.box_info.get("slack"))
        # monotone-ball box: one interval step intersected with it (sound; plain gradients)
        a, b = interval_step(op, lo, hi, u_lo, u_hi)
        return torch.maximum(a, lo), torch.minimum(b, hi)

    # ---------------------------------------------------------------------------- backward
    def backward_params(self, param_nodes):
        """name -> value of the cell parameters from the node's parameter inputs (backward mode);
        perturbed parameters are refused."""
        for i in range(1, len(param_nodes) + 1):
            if self.is_input_perturbed(i):
                raise NotImplementedError("perturbed DEQ cell parameters are not supported")
        return self._params([p.forward_value if getattr(p, "forward_value", None) is not None else p.value
                             for p in param_nodes])

    def bound_backward(self, last_lA, last_uA, *x, **kwargs):
        from .adjoint import deq_bound_backward  # the adjoint-DEQ (CROWN) bound

        u_node, params = x[0], self.backward_params(x[1:])
        if u_node.lower is None or u_node.upper is None:
            raise RuntimeError("bounds of the DEQ injection are missing (requires_input_bounds)")
        u_box = self._input_box(u_node.lower, u_node.upper, params)
        _check_finite_A(last_lA, last_uA)
        if self.deq.generic:
            from .adjoint import dense_last_A
            from .generic.bound import generic_bound_backward
            out = generic_bound_backward(self, last_lA, last_uA, u_box, params, dense_last_A)
        else:
            out = deq_bound_backward(self, last_lA, last_uA, u_box, params, len(x) - 1)
        for bias in out[1:]:
            if isinstance(bias, torch.Tensor) and not bool(torch.isfinite(bias).all()):
                raise IntervalProofError("the linear bound through the DEQ is not finite (overflow in the "
                                         "adjoint iteration); use method='IBP', a smaller eps or float64")
        return out

    def bound_forward(self, dim_in, *x):
        raise NotImplementedError(
            "forward-mode LiRPA through a DEQ node is not supported; use method='IBP', "
            "'CROWN', 'CROWN-IBP' or 'CROWN-Optimized'.")


def _check_finite_A(*coefficients):
    """NaN / inf in the specification C (or in the layers after the DEQ) make every bound NaN."""
    for A in coefficients:
        value = getattr(A, "patches", A)  # auto_LiRPA Patches keep their tensor in .patches
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            raise ValueError("the linear coefficients reaching the DEQ layer contain NaN or inf: check the "
                             "specification matrix C and the weights of the layers after the DEQ")


def deq_nodes(bounded) -> list:
    """The :class:`BoundDEQ` nodes of an auto_LiRPA ``BoundedModule``, in graph order (one per DEQ
    layer). After ``compute_bounds`` each has ``box`` (the proved box of z*) and ``box_info``
    (which box was proved; for generic cells also ``lipschitz`` and ``lipschitz_source``)."""
    return [node for node in bounded.modules() if isinstance(node, BoundDEQ)]

