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


def adjoint_lower(g, op, relax, box, u_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """Sound lower bound of g^T z* in the form (A_u, bias): g^T z* >= <A_u, u> + bias.

    g: (spec, B, *state). relax: (aL, aU, t), box: (lo, hi), u_box: (u_lo, u_hi), each (B, *state)
    (broadcast over the spec dimension, never copied). Iterates the adjoint fixed point from
    nu = g; every iterate gives a sound bound (r = nu - nu_next is the residual of the theorem),
    and per specification row the iterate with the best concrete value over the u box is kept, so a
    diverging iteration (e.g. MonDEQ cells with rho(|W|) > 1) cannot end worse than its best
    iterate. Returns A_u (spec, B, *state), bias (spec, B), the number of iterations."""
    spec, batch, state = g.shape[0], g.shape[1], g.shape[2:]
    n = g[0, 0].numel()
    flat = lambda x: x.reshape(batch, n)  # noqa: E731  (B, *state) -> (B, N)
    aL, aU, t = relax
    c, rad = flat((box[1] + box[0]) / 2), flat((box[1] - box[0]) / 2)
    u_c, u_r, t_f = flat((u_box[1] + u_box[0]) / 2), flat((u_box[1] - u_box[0]) / 2), flat(t)

    def dot(a, b):  # sum over the state of a (spec, B, N) times b (B, N): a batched matmul, no temporaries
        return torch.einsum("sbn,bn->sb", a, b)

    def coeff(nu):  # A = D_nu nu
        return _d_nu(nu, aL, aU) * nu

    def step(A):
        return g + op.WT(A.reshape(spec * batch, *state)).view(g.shape)

    def terms(nu, A, nu_next):
        r = (nu - nu_next).reshape(spec, batch, n)
        A_f = A.reshape(spec, batch, n)
        bias = dot(nu.clamp(max=0).reshape(spec, batch, n), t_f) - dot(r, c) - dot(r.abs(), rad)
        value = bias + dot(A_f, u_c) - dot(A_f.abs(), u_r)
        return bias, value

    nu = g
    A = coeff(nu)
    nu_next = step(A)
    best_A, best_nu = A, nu
    best_bias, best_value = terms(nu, A, nu_next)
    iterations = 1
    while iterations <= max_iter:
        change = float((nu_next - nu).abs().max()) if nu.numel() else 0.0
        if change <= tol * (1 + float(nu_next.abs().max())) or not torch.isfinite(nu_next).all():
            break
        nu = nu_next
        A = coeff(nu)
        nu_next = step(A)
        iterations += 1
        bias, value = terms(nu, A, nu_next)
        better = value > best_value
        row = better.view(spec, batch, *[1] * len(state))
        best_A, best_nu = torch.where(row, A, best_A), torch.where(row, nu, best_nu)
        best_bias = torch.where(better, bias, best_bias)
        best_value = torch.where(better, value, best_value)
    return best_A, best_bias, iterations, best_nu


def adjoint_bound_at(nu, g, op, relax, box):
    """The theorem's bound for ONE fixed adjoint vector nu (spec, B, *state), differentiably in
    g, the cell weights (through ``op``), the relaxation and the box: (A_u, bias). Same formula as
    adjoint_lower, so the value is the same sound bound; used to give CROWN-IBP training gradients
    (nu itself is treated as a constant: it was chosen without gradients)."""
    spec, batch, state = g.shape[0], g.shape[1], g.shape[2:]
    aL, aU, t = relax
    c, rad = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    A_u = _d_nu(nu, aL, aU) * nu
    nu_next = g + op.WT(A_u.reshape(spec * batch, *state)).view(g.shape)
    r = nu - nu_next
    dims = tuple(range(2, g.dim()))
    bias = (nu.clamp(max=0) * t - r * c - r.abs() * rad).sum(dims)
    return A_u, bias


def deq_bound_backward(node, last_lA, last_uA, u_box, params, num_params):
    """BoundDEQ.bound_backward: coefficients on the injection u and a bias (see module doc).

    u_box: the checked box (u_lo, u_hi) of u over the input region; params: name -> cell parameter;
    num_params: how many parameter inputs the node has (they get no coefficients)."""
    from auto_LiRPA.patches import Patches

    u_lo, u_hi = u_box
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
            last_A = _patches_to_dense(last_A, u_lo.shape)
        last_A = last_A.to(u_lo.dtype)  # auto_LiRPA 0.3's default specification C is float32
        with torch.no_grad():
            A_u, bias, _, nu = adjoint_lower(sign * last_A, op, relax, (lo, hi), (u_lo.detach(), u_hi.detach()),
                                             max_iter=max_iter, tol=tol)
        if needs_grad(last_A):
            # same bound, recomputed with gradients to last_A, the cell weights and the u bounds
            A_u, bias = adjoint_bound_at(nu, sign * last_A, grad_op(), grad_relax(), (lo, hi))
        return sign * A_u, sign * bias

    def needs_grad(last_A):
        tensors = [last_A, u_lo, u_hi, *params.values()]
        return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in tensors)

    cache = {}

    def grad_op():
        if "op" not in cache:
            cache["op"] = node.deq.cell.operator(params)
            cache["op"].prepare(tuple(u_lo.shape[1:]))
        return cache["op"]

    def grad_relax():
        if "relax" not in cache:
            cache["relax"] = relu_relaxation(*preactivation_box(grad_op(), lo, hi, u_lo, u_hi))
        return cache["relax"]

    lA, lbias = one_side(last_lA, 1.0)
    uA, ubias = one_side(last_uA, -1.0)
    return [(lA, uA)] + [(None, None)] * num_params, lbias, ubias


def dense_last_A(last_A, state_shape):
    """A coefficient tensor or auto_LiRPA Patches -> dense (spec, batch, *state)."""
    from auto_LiRPA.patches import Patches

    return _patches_to_dense(last_A, state_shape) if isinstance(last_A, Patches) else last_A


def _patches_to_dense(patches, state_shape):
    """auto_LiRPA Patches (conv-mode coefficients) -> dense (spec, batch, *state), as
    auto_LiRPA's own BoundReshape does: patches_to_matrix gives (batch, spec, *state)."""
    from auto_LiRPA.patches import patches_to_matrix

    dense = patches_to_matrix(patches.patches, state_shape[1:], patches.stride, patches.padding,
                              patches.output_shape, patches.unstable_idx)
    return dense.transpose(0, 1)
