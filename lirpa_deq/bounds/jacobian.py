"""The DEQ node in auto_LiRPA's Jacobian graph (upstream's ``JacobianOP`` / ``compute_jacobian_bounds``).

Upstream bounds a Jacobian by building, for every node ``y = f(x)``, a gradient node that maps the
row ``g = d out / d y`` to ``g . d y / d x``, and bounding that backward graph with CROWN. For the
DEQ node ``z* = DEQ(u)`` of a ReLU-affine cell (``z* = relu(W z* + u)``) the Jacobian is
``J = (I - D W)^-1 D`` with ``D = diag(relu'(W z* + u))``, so the gradient node outputs

    h = J^T g,  the solution of the DEQ's adjoint system  h = D (g + W^T h),

one row per output of the Jacobian (``g`` is (B, K, *state), ``h`` (B, K, *state)). Its bounds
come from ``lirpa_deq.lipschitz`` (the proofs are in ``lirpa_deq/lipschitz/propagation.py``):
``D`` ranges over the diagonals allowed by the pre-activation box of ``W z* + u`` (proved box of
z* for the injection's interval), ``rho(Dbar |W|^T) < 1`` is proved, and the unrolled adjoint
iteration with a proved Neumann tail encloses ``h`` for every admissible ``(D, g)``.

* ``interval_propagate``: that enclosure for ``g`` in its interval (joint in D and g). Where
  ``rho(Dbar |W|^T) < 1`` cannot be proved (e.g. monotone cells, whose W is not small entrywise),
  the cell's global bound ``||J||_2 <= L2`` (``lirpa_deq.lipschitz.closed_form``) gives
  ``|h_i| <= L2 ||g||_2`` instead.
* ``bound_backward``: linear in ``g``. The enclosure of ``J^T`` itself (the rows ``g = e_j``)
  gives ``J^T[i, j]`` in ``[a, c]``; ``J^T[i, j] g_j`` for ``g_j`` in ``[gl, gu]`` lies between the
  chords of ``min(a g_j, c g_j)`` (concave: the chord is below) and ``max(a g_j, c g_j)`` (convex:
  the chord is above), widened for rounding. No coefficient reaches ``u``: its influence is in
  the set of ``D``.

Only ReLU-affine cells (those ``lirpa_deq.lipschitz`` supports); generic cells raise
NotImplementedError. The cell parameters are taken as fixed (no weight perturbation).
"""
from __future__ import annotations

import torch
from auto_LiRPA import register_custom_op
from auto_LiRPA.operators import Bound

from .node import _suspend_tracing, lookup_layer, register_layer

OP_NAME = "custom::DEQJacobianVJP"


def deq_vjp(deq, g, u):
    """``h[b, k] = J(u_b)^T g[b, k]`` by the DEQ's own implicit backward pass; g (B, K, *state),
    u (B, *state) -> (B, K, *state)."""
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        z = deq.solve(u_)
        rows = [torch.autograd.grad(z, u_, grad_outputs=g[:, k].detach(), retain_graph=k + 1 < g.shape[1])[0]
                for k in range(g.shape[1])]
    return torch.stack(rows, 1) if rows else torch.zeros_like(g)


class _DEQVJPOp(torch.autograd.Function):
    """The gradient node as ONE op of the traced gradient graph (the value is computed outside the
    trace, as for the fixed point itself: lirpa_deq.bounds.node)."""

    @staticmethod
    def forward(ctx, g, u, h, key):
        return h.clone()

    @staticmethod
    def symbolic(graph, g, u, h, key):
        return graph.op(OP_NAME, g, u, deq_i=int(key)).setType(g.type())


class DEQJacobianGrad(torch.nn.Module):
    """``(g, u) -> J(u)^T g`` for one DEQ layer (the module upstream traces into the Jacobian graph)."""

    def __init__(self, key: int):
        super().__init__()
        self.key = int(key)

    def forward(self, g, u):
        deq = lookup_layer(self.key)
        with _suspend_tracing():
            h = deq_vjp(deq, g, u)
        return _DEQVJPOp.apply(g, u, h, self.key)


def gradient_node(bound_deq, grad_upstream):
    """What upstream's Jacobian expansion asks of a node (``Bound.build_gradient_node``): the
    gradient module, example inputs (only their shapes matter) and the extra graph nodes it reads
    (the injection u; the parameter inputs get no gradient)."""
    u_node = bound_deq.inputs[0]
    key = register_layer(bound_deq.deq)
    return [(DEQJacobianGrad(key), (grad_upstream, u_node.forward_value), [u_node])]


class BoundDEQJacobian(Bound):
    """Bound of ``custom::DEQJacobianVJP``: inputs (g, u), output ``J(u)^T g`` (module docstring)."""

    def __init__(self, attr=None, inputs=None, output_index=0, options=None):
        super().__init__(attr, inputs, output_index, options)
        self.deq = lookup_layer(int(attr["deq"]))
        self.requires_input_bounds = [0, 1]
        self.nonlinear = True

    def forward(self, g, u):
        return deq_vjp(self.deq, g, u)

    def _region(self, u_lo, u_hi):
        """The DEQ's admissible-D description for injections in [u_lo, u_hi] (cached per box)."""
        from ..nn.cells.base import ReLUAffineCell

        if not isinstance(self.deq.cell, ReLUAffineCell):
            raise NotImplementedError(
                f"Jacobian bounds through a DEQ need a ReLU-affine cell (lirpa_deq.nn cells); "
                f"{type(self.deq.cell).__name__} is a generic cell")
        cached = getattr(self, "_region_cache", None)
        if cached is not None and cached[0] is u_lo and cached[1] is u_hi:
            return cached[2]
        from ..lipschitz.region import LayerRegion, deq_box

        class _Layer:
            module = self.deq

        with torch.no_grad():
            u_c, u_r = (u_lo + u_hi) / 2, (u_hi - u_lo) / 2 * (1 + 4 * torch.finfo(u_lo.dtype).eps)
            op, z_box, s_box, _ = deq_box(_Layer, u_c, u_r)
        region = LayerRegion(tuple(u_lo.shape[1:]), u_c, u_r, op=op, z_box=z_box, s_box=s_box)
        region.active, region.inactive = s_box[0] >= 0, s_box[1] <= 0
        self._region_cache = (u_lo, u_hi, region)
        return region

    def _enclose(self, region, g_lo, g_hi):
        """Enclosure [lo, hi] of J^T g, each (B, K, *state), for every admissible (D, g)."""
        from ..lipschitz.propagation import deq_local

        B, K = g_lo.shape[:2]
        rows_c = ((g_lo + g_hi) / 2).reshape(B * K, *g_lo.shape[2:])
        rows_r = ((g_hi - g_lo) / 2).reshape(B * K, *g_lo.shape[2:])
        rows_r = rows_r * (1 + 4 * torch.finfo(rows_r.dtype).eps) + torch.finfo(rows_r.dtype).tiny
        with torch.no_grad():
            hc, hr = deq_local(region, rows_c, rows_r)
            unproved = ~torch.isfinite(hr).flatten(1).all(1)
            if bool(unproved.any()):  # the cell's global l2 bound: |h_i| <= ||h||_2 <= L2 ||g||_2
                g_norm = (rows_c.abs() + rows_r).flatten(1).norm(dim=1) * (1 + 4 * torch.finfo(hr.dtype).eps)
                radius = (self._global_l2(region, hr) * g_norm).view(-1, *(1,) * (hr.dim() - 1)).expand_as(hr)
                hc = torch.where(unproved.view(-1, *(1,) * (hr.dim() - 1)), torch.zeros_like(hc), hc)
                hr = torch.where(unproved.view(-1, *(1,) * (hr.dim() - 1)), radius, hr)
        if not bool(torch.isfinite(hr).all()):
            raise _no_proof()
        return (hc - hr).reshape(g_lo.shape), (hc + hr).reshape(g_lo.shape)

    def _global_l2(self, region, like):
        """``||J||_2`` bound valid for every input (the cell's guarantee; lirpa_deq.lipschitz's
        closed form, e.g. cond(S)/m for monotone cells), or inf where none is known."""
        from ..lipschitz.closed_form import deq_opnorm
        from ..lipschitz.layers import _DEQ

        layer = _DEQ(self.deq)
        layer.name = "DEQ"
        try:
            return deq_opnorm(layer, region.in_shape, 2, like)[0]
        except ValueError:
            return float("inf")

    def interval_propagate(self, g, u):
        region = self._region(*u)
        return self._enclose(region, *g)

    def _jacobian_box(self, region, like):
        """[a, c], each (B, n, n): ``J^T[b, i, j]`` for every admissible D (rows g = e_j)."""
        cached = getattr(self, "_jacobian_cache", None)
        if cached is not None and cached[0] is region:
            return cached[1]
        B, n = like.shape[0], region.c[0].numel()
        eye = torch.eye(n, dtype=like.dtype, device=like.device).expand(B, n, n).reshape(B, n, *region.in_shape)
        lo, hi = self._enclose(region, eye, eye)  # (B, n=j, *state=i)
        box = (lo.reshape(B, n, n).transpose(1, 2), hi.reshape(B, n, n).transpose(1, 2))
        self._jacobian_cache = (region, box)
        return box

    def bound_backward(self, last_lA, last_uA, g_node, u_node, **kwargs):
        from .._compat import dense_coefficients
        from ..rounding import dot_error

        region = self._region(u_node.lower, u_node.upper)
        g_lo, g_hi = g_node.lower, g_node.upper
        B, K = g_lo.shape[:2]
        a, c = self._jacobian_box(region, g_lo)                  # (B, i, j)
        gl, gu = g_lo.reshape(B, K, 1, -1), g_hi.reshape(B, K, 1, -1)
        a, c = a.unsqueeze(1), c.unsqueeze(1)                    # (B, 1, i, j)
        eps = torch.finfo(g_lo.dtype).eps
        width = gu - gl
        flat = width <= 0

        def chord(f_at_lo, f_at_hi, upper):
            slope = torch.where(flat, torch.zeros_like(width), (f_at_hi - f_at_lo) / torch.where(flat, 1, width))
            offset = f_at_lo - slope * gl
            slack = 4 * eps * (f_at_lo.abs() + f_at_hi.abs() + (slope * gl).abs())
            return slope, offset + slack if upper else offset - slack

        lo_slope, lo_off = chord(torch.minimum(a * gl, c * gl), torch.minimum(a * gu, c * gu), upper=False)
        hi_slope, hi_off = chord(torch.maximum(a * gl, c * gl), torch.maximum(a * gu, c * gu), upper=True)
        n_out, n_in = a.shape[2], a.shape[3]
        g_mag = torch.maximum(gl.abs(), gu.abs()).squeeze(2)     # (B, K, j)

        def side(last_A, lower):
            if last_A is None:
                return None, 0.0
            A = dense_coefficients(last_A, (B, K) + tuple(region.in_shape)).reshape(-1, B, K, n_out)
            pos, neg = A.clamp_min(0), A.clamp_max(0)
            s_pos, o_pos = (lo_slope, lo_off) if lower else (hi_slope, hi_off)
            s_neg, o_neg = (hi_slope, hi_off) if lower else (lo_slope, lo_off)
            new_A = torch.einsum("sbki,bkij->sbkj", pos, s_pos) + torch.einsum("sbki,bkij->sbkj", neg, s_neg)
            bias = torch.einsum("sbki,bki->sb", pos, o_pos.sum(-1)) + torch.einsum("sbki,bki->sb", neg, o_neg.sum(-1))
            # rounding: of the bias sums, and of new_A (its error times |g| at most)
            abs_A = A.abs()
            mag = torch.einsum("sbki,bki->sb", abs_A, (o_pos.abs() + o_neg.abs()).sum(-1))
            coef_mag = torch.einsum("sbki,bkij->sbkj", abs_A, s_pos.abs() + s_neg.abs())
            slack = dot_error(K * n_out * n_in, mag) + (dot_error(n_out, coef_mag) * g_mag.unsqueeze(0)).sum((2, 3))
            bias = bias - slack if lower else bias + slack
            return new_A.reshape(A.shape[0], *g_lo.shape), bias

        lA, lbias = side(last_lA, lower=True)
        uA, ubias = side(last_uA, lower=False)
        return [(lA, uA), (None, None)], lbias, ubias

    def bound_forward(self, dim_in, g, u):
        raise NotImplementedError("forward-mode LiRPA through the DEQ's Jacobian node is not supported; "
                                  "use compute_jacobian_bounds (backward CROWN) or IBP")


def _no_proof():
    from .interval import IntervalProofError

    return IntervalProofError("no proof that rho(Dbar |W|^T) < 1 over this region (or the enclosure "
                              "overflowed): the DEQ's Jacobian cannot be bounded here; use a smaller eps")


register_custom_op(OP_NAME, BoundDEQJacobian)

__all__ = ["OP_NAME", "BoundDEQJacobian", "DEQJacobianGrad", "deq_vjp", "gradient_node"]
