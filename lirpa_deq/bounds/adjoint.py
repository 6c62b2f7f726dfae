"""Linear (CROWN) bounds through a DEQ node by an adjoint DEQ (after CerDEQ), for every cell family.

Setting: z* = cell(z*, u) with a PROVED box B = [lo, hi] containing z*(u) for every u of the input
region U. A *relaxation* of the cell over B x U gives, for every vector nu (z's shape),

    nu^T cell(z, u) >= <A_in(nu), u> + <M(nu), z> + const(nu)     for all z in B, u in U.

Theorem. For a specification row g and ANY nu, with r = nu - g - M(nu):

    g^T z* >= <A_in(nu), u> + const(nu) + min_{z in B} (-r^T z).

Proof: g^T z* = nu^T cell(z*, u) - (nu - g)^T z* >= <A_in, u> + const + (M(nu) - nu + g)^T z*, and
z* is in B. The bound is linear in u; its coefficient A_in(nu) goes back to auto_LiRPA, which
carries it through the layers before the DEQ (and concretizes it over the input region). Every nu is
sound -- an inexact adjoint solve only loosens the bound through r; the tightest choice solves the
adjoint fixed point nu = g + M(nu). Upper bounds use the theorem on -g.

Relaxations (:class:`ReLUAffineRelaxation`, :class:`MatrixRelaxation`):
* ReLU-affine cells relu(W z + u), with aL s <= relu(s) <= aU s + t on the pre-activation box:
  D_nu = diag(aL where nu >= 0, aU where nu < 0); A_in = D_nu nu, M = W^T D_nu nu,
  const = <min(nu, 0), t>. Matrix-free (the cell's WeightOperator).
* generic cells with CROWN's Lz z + Lx x + bl <= cell <= Uz z + Ux x + bu (nested auto_LiRPA):
  A_in = Lx^T nu+ - Ux^T nu-, M = Lz^T nu+ - Uz^T nu-, const = <nu+, bl> - <nu-, bu>.
For ReLU-affine cells the second is exactly the first with Lz = D W, Lx = D.

Shapes: specifications g are (spec, B, N) with N the state size per sample; boxes (B, N) / (B, M).
"""
from __future__ import annotations

import torch

from .._compat import dense_coefficients
from .spec_batching import DEFAULT_MAX_ELEMENTS, chunked_adjoint_bound

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6


def relu_relaxation(l, h):
    """Slopes and intercept of aL s <= relu(s) <= aU s + t on [l, h] (CROWN's adaptive lower slope).

    Returns (aL, aU, t), each shaped like l."""
    active, inactive = l >= 0, h <= 0
    unstable = ~(active | inactive)
    denom = torch.where(unstable, h - l, torch.ones_like(h))
    aU = torch.where(unstable, h / denom, active.to(l.dtype))
    t = torch.where(unstable, -l * h / denom, torch.zeros_like(l))
    aL = torch.where(unstable, (h >= -l).to(l.dtype), active.to(l.dtype))
    return aL, aU, t


def _dot(a, b):
    """sum over the state of a (spec, B, N) times b (B, N): a batched matmul, no temporaries."""
    return torch.einsum("sbn,bn->sb", a, b)


class ReLUAffineRelaxation:
    """The relaxation of relu(W z + u): ``op`` the cell's WeightOperator, ``relax`` = (aL, aU, t)
    each (B, *state) (from :func:`relu_relaxation`)."""

    def __init__(self, op, relax):
        self.op = op
        self.state = tuple(relax[0].shape[1:])
        batch = relax[0].shape[0]
        self.aL, self.aU, self.t = (r.reshape(batch, -1) for r in relax)

    def apply(self, nu):
        spec, batch = nu.shape[:2]
        A = torch.where(nu >= 0, self.aL, self.aU) * nu
        M = self.op.WT(A.reshape(spec * batch, *self.state)).reshape(nu.shape)
        return A, M, _dot(nu.clamp(max=0), self.t)


class MatrixRelaxation:
    """The relaxation from CROWN's per-sample matrices: ``lin`` with Lz, Uz (B, N, N), Lx, Ux
    (B, N, M), bl, bu (B, N) (lirpa_deq.bounds.generic.CellBounder.linear)."""

    def __init__(self, lin):
        self.lin = lin

    def apply(self, nu):
        lin = self.lin
        pos, neg = nu.clamp(min=0), (-nu).clamp(min=0)
        M = torch.einsum("sbi,bij->sbj", pos, lin["Lz"]) - torch.einsum("sbi,bij->sbj", neg, lin["Uz"])
        A = torch.einsum("sbi,bij->sbj", pos, lin["Lx"]) - torch.einsum("sbi,bij->sbj", neg, lin["Ux"])
        return A, M, _dot(pos, lin["bl"]) - _dot(neg, lin["bu"])


def _bias(const, r, box):
    c, rad = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    return const - _dot(r, c) - _dot(r.abs(), rad)


def bound_at(nu, g, relaxation, box):
    """The theorem's bound for ONE fixed nu (spec, B, N): (A_in (spec, B, M), bias (spec, B)).
    Differentiable in g, the relaxation and the box (nu is a constant: it was chosen without
    gradients); used to give CROWN-IBP training gradients."""
    A, M, const = relaxation.apply(nu)
    return A, _bias(const, nu - g - M, box)


def best_adjoint_bound(g, relaxation, box, in_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, offset=None,
                       max_elements=DEFAULT_MAX_ELEMENTS):
    """Sound lower bound g^T z* >= <A_in, u> + bias, the best of the adjoint iterates.

    g: (spec, B, N); box: (lo, hi) of z*, (B, N); in_box: (lo, hi) of u, (B, M) (to rank iterates).
    Iterates nu <- g + M(nu) from nu = g; every iterate gives a sound bound (its r is the residual
    nu - nu_next), and per specification row the iterate with the best concrete value over in_box is
    kept, so a diverging iteration (rho(|W|) > 1) cannot end worse than its best iterate. Rows go
    through in chunks of at most ``max_elements`` entries and each row stops at its own tolerance
    (lirpa_deq.bounds.spec_batching); ``offset`` (spec, B, M) is added to A_in for the ranking only.
    Returns A_in (spec, B, M), bias (spec, B), the number of iterations, and the chosen nu."""
    return chunked_adjoint_bound(g, relaxation, box, in_box, max_iter, tol, offset=offset,
                                 max_elements=max_elements)


def adjoint_lower(g, op, relax, box, u_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """:func:`best_adjoint_bound` for a ReLU-affine cell in state shape: g (spec, B, *state);
    relax = (aL, aU, t), box, u_box each (B, *state). Returns A_u (spec, B, *state), bias (spec, B),
    iterations, nu (spec, B, *state)."""
    spec, batch = g.shape[:2]
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    A, bias, iterations, nu = best_adjoint_bound(
        g.reshape(spec, batch, -1), ReLUAffineRelaxation(op, relax), tuple(map(flat, box)),
        tuple(map(flat, u_box)), max_iter=max_iter, tol=tol)
    return A.view(g.shape), bias, iterations, nu.view(g.shape)


def linear_backward(cell_bounds, last_lA, last_uA, box, u_box, params, adjoint_options):
    """CROWN through a DEQ node for any cell family: (lA, uA, lbias, ubias), the coefficients on the
    node's input u (shape (spec, B, *u_state)) and the biases (spec, B).

    cell_bounds: the node's CellBounds (its ``linear_relaxation``); last_lA / last_uA: auto_LiRPA's
    coefficients on z* (Tensor, Patches or None); box: the proved box of z*; u_box: the checked box
    of u; params:
    name -> cell parameter. The relaxation is built once for both sides, and once more with
    gradients when training differentiates the bound."""
    u_lo, u_hi = u_box
    lo, hi = box
    batch, in_state = lo.shape[0], u_lo.shape[1:]
    flat = lambda t: t.detach().reshape(batch, -1)  # noqa: E731
    box, in_box = (flat(lo), flat(hi)), (flat(u_lo), flat(u_hi))
    max_iter = int(adjoint_options.get("adjoint_max_iter", DEFAULT_MAX_ITER))
    tol = float(adjoint_options.get("adjoint_tol", DEFAULT_TOL))
    max_elements = int(adjoint_options.get("adjoint_max_elements", DEFAULT_MAX_ELEMENTS))
    relaxation = cell_bounds.linear_relaxation((lo, hi), (u_lo.detach(), u_hi.detach()), params, grad=False)
    differentiable = []

    def one_side(last_A, sign):
        if last_A is None:
            return None, 0
        g = sign * dense_coefficients(last_A, lo.shape).to(lo.dtype)  # 0.3's default C is float32
        spec = g.shape[0]
        g = g.reshape(spec, batch, -1)
        A, bias, _, nu = best_adjoint_bound(g.detach(), relaxation, box, in_box, max_iter=max_iter, tol=tol,
                                            max_elements=max_elements)
        if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad
                                           for v in (g, u_lo, u_hi, *params.values())):
            # the same bound, recomputed with gradients to g, the cell weights and the u bounds
            if not differentiable:
                differentiable.append(cell_bounds.linear_relaxation((lo, hi), (u_lo, u_hi), params, grad=True)
                                      if cell_bounds.differentiable_relaxation else relaxation)
            A, bias = bound_at(nu, g, differentiable[0], box)
        return sign * A.reshape(spec, batch, *in_state), sign * bias

    lA, lbias = one_side(last_lA, 1.0)
    uA, ubias = one_side(last_uA, -1.0)
    return lA, uA, lbias, ubias
