"""Linear (CROWN) bounds through a ReLU-affine DEQ node by an adjoint DEQ (after CerDEQ).

Setting: z* = relu(s), s = W z* + u, with a PROVED box B = [lo, hi] containing z*(u) for every u of
the input region and the pre-activation box [l, h] of s that follows from it. Relax each ReLU:
aL s <= relu(s) <= aU s + t (t >= 0 only on unstable neurons).

Theorem. For a specification row g and ANY vector nu (same shape as z*), with
D_nu = diag(aL where nu >= 0, aU where nu < 0), beta_nu = t where nu < 0 (else 0) and
r = nu - g - W^T D_nu nu:

    g^T z* >= (D_nu nu)^T u + nu^T beta_nu + min_{z in B} (-r^T z).

Proof: g^T z* = nu^T z* - (nu - g)^T z*; coordinatewise nu_i relu(s_i) >= nu_i (D_nu)_ii s_i +
nu_i (beta_nu)_i (lower relaxation where nu_i >= 0, upper where nu_i < 0); substitute
s = W z* + u; what is left is -r^T z*, bounded below over B since z* is in B.

The bound is linear in u, so its coefficient D_nu nu is handed back to auto_LiRPA, which carries
it through the layers before the DEQ. Any nu is sound -- an inexact or early-stopped adjoint solve
only loosens the bound through the residual term; the tightest choice solves the adjoint fixed
point nu = g + W^T D_nu nu (a contraction when rho(|W|) < 1, since nu -> D_nu nu is 1-Lipschitz
coordinatewise). Upper bounds use the same theorem on -g.
"""
from __future__ import annotations

import torch

from .interval import preactivation_box

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


def _d_nu(nu, aL, aU):
    return torch.where(nu >= 0, aL, aU)


def _flat_spec(A, batch):
    """(spec, batch, *state) -> (spec * batch, *state) views of last_A and the relaxation."""
    return A.reshape(-1, *A.shape[2:])


def adjoint_lower(g, op, relax, box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """Sound lower bound of g^T z* in the form (A_u, bias): g^T z* >= <A_u, u> + bias.

    g: (spec, B, *state). relax: (aL, aU, t) each (B, *state). box: (lo, hi) each (B, *state).
    Returns A_u (spec, B, *state), bias (spec, B), and the final adjoint residual (max |r|)."""
    spec, batch = g.shape[:2]
    aL, aU, t = (x.unsqueeze(0).expand(spec, *x.shape).reshape(-1, *x.shape[1:]) for x in relax)
    lo, hi = (x.unsqueeze(0).expand(spec, *x.shape).reshape(-1, *x.shape[1:]) for x in box)
    gf = _flat_spec(g, batch)
    nu = gf
    for _ in range(max_iter):
        nu_next = gf + op.WT(_d_nu(nu, aL, aU) * nu)
        done = float((nu_next - nu).abs().max()) <= tol * (1 + float(nu_next.abs().max()))
        nu = nu_next
        if done:
            break
    d = _d_nu(nu, aL, aU)
    A_u = d * nu
    r = nu - gf - op.WT(A_u)
    c, rad = (hi + lo) / 2, (hi - lo) / 2
    residual_term = -(r * c).flatten(1).sum(1) - (r.abs() * rad).flatten(1).sum(1)
    beta_term = (torch.where(nu < 0, nu * t, torch.zeros_like(nu))).flatten(1).sum(1)
    bias = (beta_term + residual_term).view(spec, batch)
    return A_u.view(g.shape), bias, float(r.abs().max()) if r.numel() else 0.0


def deq_bound_backward(node, last_lA, last_uA, *x, **kwargs):
    """BoundDEQ.bound_backward: coefficients on the injection u and a bias (see module doc)."""
    from auto_LiRPA.patches import Patches

    u_node, param_nodes = x[0], x[1:]
    for i in range(1, len(x)):
        if node.is_input_perturbed(i):
            raise NotImplementedError("perturbed DEQ cell parameters are not supported")
    params = node._params([p.forward_value if getattr(p, "forward_value", None) is not None else p.value
                           for p in param_nodes])
    u_lo, u_hi = u_node.lower, u_node.upper
    if u_lo is None or u_hi is None:
        raise RuntimeError("bounds of the DEQ injection are missing (requires_input_bounds)")
    lo, hi = node.interval_box(u_lo, u_hi, params)
    with torch.no_grad():
        op = node.deq.cell.operator({k: v.detach() for k, v in params.items()})
        op.prepare(tuple(u_lo.shape[1:]))
        l, h = preactivation_box(op, lo, hi, u_lo.detach(), u_hi.detach())
        relax = relu_relaxation(l, h)
    opts = node.adjoint_options
    max_iter = int(opts.get("adjoint_max_iter", DEFAULT_MAX_ITER))
    tol = float(opts.get("adjoint_tol", DEFAULT_TOL))

    def one_side(last_A, sign):
        if last_A is None:
            return None, 0
        if isinstance(last_A, Patches):
            last_A = last_A.to_matrix(u_lo.shape) if hasattr(last_A, "to_matrix") else _patches_to_matrix(last_A, u_lo.shape)
        with torch.no_grad():
            A_u, bias, _ = adjoint_lower(sign * last_A, op, relax, (lo, hi), max_iter=max_iter, tol=tol)
        return sign * A_u, sign * bias

    lA, lbias = one_side(last_lA, 1.0)
    uA, ubias = one_side(last_uA, -1.0)
    return [(lA, uA)] + [(None, None)] * len(param_nodes), lbias, ubias


def _patches_to_matrix(patches, input_shape):
    from auto_LiRPA.patches import patches_to_matrix

    return patches_to_matrix(patches.patches, input_shape, patches.stride, patches.padding,
                             patches.output_shape, patches.unstable_idx)
