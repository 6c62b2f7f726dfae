"""The ReLU-affine family: ``z* = relu(W z* + u)`` for the cells of lirpa_deq.nn (a WeightOperator W
with a proved guarantee and ``margin``).

* box: the interval post-fixpoint (lirpa_deq.bounds.interval); where it cannot be proved and
  ``IntervalOptions.fallback`` allows, the monotone-ball box (lirpa_deq.bounds.ball_box);
* interval step: one differentiable interval step with implicit-function gradients
  (lirpa_deq.bounds.implicit) from a post-fixpoint, or an interval step intersected with the ball;
* relaxation: the ReLU relaxation over the pre-activation bounds of s = W z + u, from the box by
  interval arithmetic and tightened by CROWN (lirpa_deq.bounds.refine: every unstable neuron's s_i
  is a specification of the adjoint theorem, G = W^T e_i, G_u = e_i; z* = relu(s) then tightens
  the box); optimizable lower slopes per neuron (alpha-CROWN).

The cell's operator is built once per parameter state (and once more with gradients when training
differentiates a bound), not once per use.
"""
from __future__ import annotations

import torch

from ...nn.cells.base import ReLUAffineCell
from ..adjoint import ReLUAffineRelaxation, relu_relaxation
from ..ball_box import monotone_ball_box
from ..cell_bounds import CellBounds, register_cell_bounds
from ..implicit import differentiable_interval_step
from ..interval import IntervalProofError, interval_step, preactivation_box, prove_interval_fixed_point
from ..refine import RelaxationState, intersect, relative_shrink, scatter_rows


def _version_key(params, shape):
    """Identity and in-place version of every parameter (cheap; bumps on optimizer.step())."""
    return (tuple(shape),) + tuple((id(v), v._version, tuple(v.shape), v.dtype, v.device) for v in params.values())


class ReLUAffineBounds(CellBounds):
    """CellBounds of :class:`lirpa_deq.nn.cells.base.ReLUAffineCell` cells."""

    @classmethod
    def handles(cls, deq):
        return isinstance(deq.cell, ReLUAffineCell)

    def __init__(self, deq, interval_options, adjoint_options):
        super().__init__(deq, interval_options, adjoint_options)
        self._op = None  # (key, detached operator, the tensors it was built from)

    def operator(self, params, state_shape, grad=False):
        """The cell's WeightOperator for these parameters, prepared for ``state_shape``.

        Without ``grad``: detached, built once per parameter state and reused across calls (the key
        holds each tensor's identity and in-place version, so ``optimizer.step()`` rebuilds it).
        With ``grad``: built with autograd from the given tensors, fresh for every use (a graph must
        not outlive the backward pass that frees it); callers build it at most once per call."""
        if grad and torch.is_grad_enabled():
            op = self.deq.cell.operator(params)
            op.prepare(tuple(state_shape))
            return op
        key = _version_key(params, state_shape) + (float(self.deq.cell.margin),)
        if self._op is not None and self._op[0] == key:
            return self._op[1]
        with torch.no_grad():
            op = self.deq.cell.operator({k: v.detach() for k, v in params.items()})
            op.prepare(tuple(state_shape))
        # (the cache holds the tensors themselves, so the ids in its key stay theirs)
        self._op = (key, op, tuple(params.values()))
        return op

    def _key_extras(self):
        return [torch.tensor(float(self.deq.cell.margin), dtype=torch.float64)]

    def _prove(self, u_lo, u_hi, params, z_start):
        op = self.operator(params, u_lo.shape[1:])
        try:
            lo, hi, info = prove_interval_fixed_point(op, u_lo, u_hi, z_start=z_start, opts=self.interval_options)
            info["box"] = "interval-post-fixpoint"
        except IntervalProofError as err:
            if not self.interval_options.fallback:
                raise
            lo, hi = monotone_ball_box(op, self.deq.cell.margin, u_lo, u_hi, z_start)
            info = {"box": "monotone-ball", "interval_error": str(err)}
        return lo, hi, info

    def interval_step(self, box, u_lo, u_hi, params):
        lo, hi = box
        op = self.operator(params, u_lo.shape[1:], grad=True)  # training differentiates the bound
        if self.info["box"] == "interval-post-fixpoint":
            return differentiable_interval_step(op, lo, hi, u_lo, u_hi, slack=self.info.get("slack"))
        # monotone-ball box: one interval step intersected with it (sound; plain gradients)
        a, b = interval_step(op, lo, hi, u_lo, u_hi)
        return torch.maximum(a, lo), torch.minimum(b, hi)

    def linear_relaxation(self, state, u_box, params, grad):
        lo, hi = state.box
        op = self.operator(params, u_box[0].shape[1:], grad=grad)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            l, h = preactivation_box(op, lo, hi, *u_box)
            if state.pre is not None:  # the refined bounds (constants) where STRICTLY tighter (at a tie
                # torch.maximum would split the gradient between the two)
                l = torch.where(state.pre[0] > l, state.pre[0].to(l.dtype), l)
                h = torch.where(state.pre[1] < h, state.pre[1].to(h.dtype), h)
                h = torch.where(h < l, l, h)  # (only rounding could cross them; both are proved)
            relax = relu_relaxation(l, h)
        self.last_lower_slopes = relax[0].detach()
        return ReLUAffineRelaxation(op, relax)

    # -- CROWN refinement (lirpa_deq.bounds.refine) ----------------------------------------------
    def initial_state(self, box, u_box, params):
        op = self.operator(params, u_box[0].shape[1:])
        with torch.no_grad():
            pre = preactivation_box(op, *box, *u_box)
        return RelaxationState(box, pre)

    def refinement_rows(self, state, params, max_rows):
        """s_i = W_i z* + u_i for the neurons unstable in some sample (at most ``max_rows``, the
        widest first): G = W^T e_i (K, B, N), G_u = e_i (K, B, N)."""
        l, h = (t.reshape(t.shape[0], -1) for t in state.pre)
        batch, n = l.shape
        unstable = (l < 0) & (h > 0)
        score = torch.where(unstable, torch.minimum(-l, h), torch.zeros_like(l)).sum(0)
        index = torch.nonzero(score > 0).flatten()
        if index.numel() == 0:
            return None
        if index.numel() > max_rows:
            index = index[score[index].topk(max_rows).indices.sort().values]
        k, state_shape = index.numel(), tuple(state.pre[0].shape[1:])
        E = torch.zeros(k, batch, n, dtype=l.dtype, device=l.device)
        E[torch.arange(k, device=l.device), :, index] = 1
        op = self.operator(params, state_shape)
        G = op.WT(E.reshape(k * batch, *state_shape)).reshape(k, batch, n)
        return G, E, index

    def tighten(self, state, index, lower, upper, u_box, params):
        lo, hi = state.box
        l, h = (t.reshape(t.shape[0], -1) for t in state.pre)
        new_pre = intersect((l, h), scatter_rows(l, index, lower), scatter_rows(h, index, upper))
        shape = lo.shape
        # z* = relu(s): the box of z* from the pre-activation bounds, intersected with the old box
        zl, zh = intersect((lo.reshape(l.shape), hi.reshape(l.shape)), new_pre[0].clamp_min(0),
                           new_pre[1].clamp_min(0))
        box = (zl.view(shape), zh.view(shape))
        op = self.operator(params, u_box[0].shape[1:])
        with torch.no_grad():  # the tighter box tightens the interval bounds of s again
            again = preactivation_box(op, *box, *u_box)
        new_pre = intersect(new_pre, again[0].reshape(l.shape), again[1].reshape(l.shape))
        shrink = relative_shrink((l, h), new_pre)
        return RelaxationState(box, tuple(t.view(state.pre[0].shape) for t in new_pre)), shrink

    def slope_shape(self, state_shape):
        return tuple(state_shape)


register_cell_bounds(ReLUAffineBounds)
