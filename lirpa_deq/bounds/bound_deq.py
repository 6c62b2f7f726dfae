"""``BoundDEQ``: auto_LiRPA's Bound for the ``custom::DEQFixedPoint`` node.

Inputs: node 0 is the injection u (B, *state), nodes 1.. are the cell parameters (unperturbed).
Output: z*(u), the DEQ's fixed point.

* ``forward``: the point solve (implicit gradients to u and the parameters).
* ``interval_propagate``: the PROVED interval fixed point (lirpa_deq.bounds.interval) with
  implicit-function gradients (IBP certified training).
* ``bound_backward``: linear (CROWN) bounds through the adjoint DEQ (lirpa_deq.bounds.adjoint),
  over a relaxation refined by CROWN bounds of its own pre-activations (lirpa_deq.bounds.refine)
  whose rows are concretized over the input region through the affine layers before the DEQ
  (lirpa_deq.bounds.prefix); under alpha-CROWN with optimizable lower slopes
  (lirpa_deq.bounds.slopes: the node is one of auto_LiRPA's optimizable activations).

Options: ``BoundedModule(..., bound_opts={'deq': {...}})`` with keys of
:class:`IntervalOptions` (interval search / proof) and ``adjoint_max_iter``, ``adjoint_tol``,
``crown_refine`` (refinement rounds, 0: the interval box's relaxation), ``refine_tol``,
``refine_max_rows``, ``crown_gradient`` ('exact' or 'fixed'), ``adjoint_max_elements`` (memory
cap of one chunk of specification rows, lirpa_deq.bounds.spec_batching); docs/crown.md.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from .._compat import optimizable_node_base

from . import relu_affine as _relu_affine  # noqa: F401  (registers the ReLU-affine family)
from .generic import strategy as _generic  # noqa: F401  (registers the generic family)
from . import jacobian
from .adjoint import linear_backward
from .cell_bounds import cell_bounds_for
from .injection import check_dtype, checked_box, injection_box
from .interval import IntervalOptions, IntervalProofError
from .node import lookup_layer, parameter_names
from .prefix import affine_prefix, concretize_lower
from .slopes import OptimizableSlopes

ADJOINT_KEYS = ("adjoint_max_iter", "adjoint_tol", "crown_refine", "refine_tol", "refine_max_rows", "crown_gradient",
                "optimize_adjoint", "refine_opt_steps", "adjoint_max_elements")


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
    cap = adjoint.get("adjoint_max_elements", 1)
    if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < 1:
        raise ValueError("bound_opts['deq']['adjoint_max_elements'] (entries of specification rows x batch x "
                         f"state per adjoint chunk) must be an integer >= 1, got {cap!r}")
    for name, least in (("crown_refine", 0), ("refine_max_rows", 1), ("refine_opt_steps", 0)):
        value = adjoint.get(name, least)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"bound_opts['deq'][{name!r}] must be an integer >= {least}, got {value!r}")
    if not isinstance(adjoint.get("optimize_adjoint", True), bool):
        raise TypeError(f"bound_opts['deq']['optimize_adjoint'] must be True or False, got {adjoint['optimize_adjoint']!r}")
    rtol = adjoint.get("refine_tol", 0.0)
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 <= rtol <= 1:
        raise ValueError(f"bound_opts['deq']['refine_tol'] must be a real number in [0, 1], got {rtol!r}")
    if adjoint.get("crown_gradient", "exact") not in ("exact", "fixed"):
        raise ValueError("bound_opts['deq']['crown_gradient'] must be 'exact' (gradients through the adjoint "
                         f"solve and the box) or 'fixed' (both held constant), got {adjoint['crown_gradient']!r}")
    return interval, adjoint


class BoundDEQ(OptimizableSlopes, optimizable_node_base()):
    """Bound of a DEQ fixed-point node; see the module docstring."""

    def __init__(self, attr=None, inputs=None, output_index=0, options=None):
        super().__init__(attr, inputs, output_index, options)
        self.deq_key = int(attr["deq"])
        # a strong reference (kept out of nn.Module registration, so the layer's parameters are not
        # registered twice): BoundedModule(make_model(), x) must not lose its layer to the GC
        self._deq_holder = (lookup_layer(self.deq_key),)
        self.requires_input_bounds = [0]  # bounds of u are needed (ReLU relaxation inside)
        self.alpha_batch_dim = 2  # alpha-CROWN: alpha[start] is (2, spec, B, *state)
        self.nonlinear = True
        self.interval_options, self.adjoint_options = deq_options(options)
        # the bounds strategy of the layer's cell family, chosen once (lirpa_deq.bounds.cell_bounds)
        self.cell_bounds = cell_bounds_for(self.deq, self.interval_options, self.adjoint_options)

    @property
    def deq(self):
        return self._deq_holder[0]

    @property
    def box(self):
        """The last proved (lo, hi) of z*, each (B, *state), or None."""
        return self.cell_bounds.last_box

    @property
    def box_info(self):
        """How the last box was proved: ``box`` ('interval-post-fixpoint', 'monotone-ball',
        'contraction-ball'), search statistics, for generic cells ``lipschitz`` and its source."""
        return self.cell_bounds.info

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

    def interval_box(self, u_lo, u_hi, params):
        """The proved box of z* for u in [u_lo, u_hi] (no gradients; cached, see CellBounds.box)."""
        fv = getattr(self, "forward_value", None)
        self.cell_bounds.forward_value = fv if isinstance(fv, torch.Tensor) else None
        return self.cell_bounds.box(u_lo, u_hi, params)

    # ------------------------------------------------------------------------------------ IBP
    def _check_params_unperturbed(self, intervals):
        for i, (lo, hi) in enumerate(intervals, start=1):
            if self.is_input_perturbed(i) or (lo is not hi and not torch.equal(lo, hi)):
                raise NotImplementedError(
                    "perturbed DEQ cell parameters are not supported (BoundedParameter inside a "
                    "DEQ cell): the fixed-point bounds assume fixed weights. Perturb the input or "
                    "layers outside the DEQ instead.")

    def interval_propagate(self, *v):
        (u_lo, u_hi), param_intervals = v[0], v[1:]
        self._check_params_unperturbed(param_intervals)
        params = self._params([p[0] for p in param_intervals])
        u_lo, u_hi = self._input_box(u_lo, u_hi, params)
        box = self.interval_box(u_lo, u_hi, params)
        return self.cell_bounds.interval_step(box, u_lo, u_hi, params)

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
        u_node, params = x[0], self.backward_params(x[1:])
        if u_node.lower is None or u_node.upper is None:
            raise RuntimeError("bounds of the DEQ injection are missing (requires_input_bounds)")
        u_box = self._input_box(u_node.lower, u_node.upper, params)
        _check_finite_A(last_lA, last_uA)
        box = self.interval_box(*u_box, params)
        lA, uA, lbias, ubias = linear_backward(self.cell_bounds, last_lA, last_uA, box, u_box, params,
                                               self.adjoint_options, slopes=self.slopes_for(kwargs.get("start_node")),
                                               concretize=self._input_concretizer(u_box[0].shape[1:]))
        for bias in (lbias, ubias):
            if isinstance(bias, torch.Tensor) and not bool(torch.isfinite(bias).all()):
                raise IntervalProofError("the linear bound through the DEQ is not finite (overflow in the "
                                         "adjoint iteration); use method='IBP', a smaller eps or float64")
        return [(lA, uA)] + [(None, None)] * (len(x) - 1), lbias, ubias

    def build_gradient_node(self, grad_upstream):
        """The DEQ's node in upstream's Jacobian graph (lirpa_deq.bounds.jacobian)."""
        return jacobian.gradient_node(self, grad_upstream)

    def _input_concretizer(self, u_state):
        """(callable, region key) concretizing linear functions of u over the input region through the
        affine layers before the DEQ (lirpa_deq.bounds.prefix), or None (the box of u is used)."""
        prefix = affine_prefix(self.inputs[0])
        if prefix is None:
            return None
        root = prefix[1]
        ptb, center = root.perturbation, getattr(root, "center", None)
        if not isinstance(center, torch.Tensor):
            return None
        region = [center] + [t for t in (getattr(ptb, "x_L", None), getattr(ptb, "x_U", None))
                             if isinstance(t, torch.Tensor)]
        scalars = [v.detach().to(device="cpu", dtype=torch.float64).flatten() if isinstance(v, torch.Tensor)
                   else torch.tensor([-1.0 if v is None else float(v)], dtype=torch.float64)
                   for v in (getattr(ptb, "eps", None), getattr(ptb, "norm", None))]  # upstream: eps a tensor
        region.append(torch.cat(scalars))  # [eps (one or more values), norm]

        def concretize(A):
            return concretize_lower(prefix, A.reshape(A.shape[0], A.shape[1], *u_state))
        return concretize, region

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

