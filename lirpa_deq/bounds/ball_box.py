"""The fallback box of every cell family: a proved l2 ball around an approximate fixed point, as a box.

Lemma (ball to box). If ||S (z* - c)||_2 <= rho for a positive diagonal S, then
|z*_i - c_i| <= rho / s_i for every coordinate i, so z* lies in the box c -/+ rho / s.
:func:`ball_to_box` turns such a ball (one rho per sample) into that box. Two ways to get rho:

* monotone ReLU-affine cells, :func:`monotone_ball_box` (below): the Lipschitz fixed-point lemma;
* contraction cells (generic cells with a proved L < 1), lirpa_deq.bounds.generic.box: with
  rho0 = max_x ||cell(c, x) - c||_2, ||z*(x) - c|| <= L ||z*(x) - c|| + rho0, so rho = rho0 / (1 - L).

Either box is then refined by interval steps intersected with it: if z* is in B then
z* = T(z*) is in F(B), so every F(B) ∩ B is again a proved box.

The monotone case, in detail. The fallback when the interval post-fixpoint cannot be proved
(plain MonDEQ and orthogonal cells, where rho(|W|) >= 1).

Setting: z*(u) = relu(W z* + u) with W = S^-1 W0 S (S positive diagonal, S = I without a
similarity) and I - W0 >= m I. Every cell of lirpa_deq satisfies this with m = cell.margin
(Mon: by construction; IBP-Mon: sym(|W0|) <= (1-m) I implies it; Ortho: ||W||_2 <= 1 - m).

Lemma (Lipschitz fixed points). ||S (z*(u1) - z*(u2))||_2 <= ||S (u1 - u2)||_2 / m.
Proof: in y = S z the fixed point solves y = relu(W0 y + S u), i.e. 0 in (I - W0) y + N(y) - S u
with N the normal cone of the nonnegative orthant (relu is its projection). N is monotone and
I - W0 is m-strongly monotone, so m ||y1 - y2||^2 <= <S(u1 - u2), y1 - y2>; Cauchy-Schwarz.

Approximate centre: for any z_hat, z' = T(z_hat) = relu(W z_hat + u_c) is EXACTLY the fixed point
for the injection u_c + delta with delta = W (z_hat - z'), because W z' + u_c + delta = W z_hat + u_c.
Hence for every u in the box [u_c - u_r, u_c + u_r]:

    |z*(u) - z'|_i <= (||S u_r||_2 + ||S delta||_2) / (m s_i).

That box is clipped at 0 (z* is a ReLU output).
"""
from __future__ import annotations

import torch

from ..rounding import dot_error
from .interval import interval_step, rounding_slack


def _similarity(op, like):
    s = getattr(op, "similarity", None)
    if s is None:
        return torch.ones_like(like[:1])
    return s.to(like.dtype).expand_as(like[:1]) if s.dim() == like.dim() else s.reshape(1, *like.shape[1:])


def ball_to_box(center, rho, scale=None):
    """(lo, hi) = center -/+ rho / scale: the box of the ball ||scale (z - center)||_2 <= rho.

    center: (B, *state); rho: (B,) per-sample radius; scale: positive, broadcastable to center
    (default 1)."""
    radius = rho.view((-1,) + (1,) * (center.dim() - 1))
    if scale is not None:
        radius = radius / scale
    return center - radius, center + radius


@torch.no_grad()
def monotone_ball_box(op, margin, u_lo, u_hi, z_hat, refine_steps=20):
    """Proved box (lo, hi), each (B, *state), for z*(u) over u in [u_lo, u_hi].

    op: the cell's WeightOperator; margin: m with I - W0 >= m I; z_hat: any approximation of the
    fixed point at the box centre (its error is accounted for exactly, see module doc)."""
    if not margin > 0:
        raise ValueError(f"monotone_ball_box needs a monotonicity margin m > 0, got {margin!r}")
    u_c, u_r = (u_hi + u_lo) / 2, (u_hi - u_lo) / 2
    z_next = torch.relu(op.W(z_hat) + u_c)
    delta = op.W(z_hat - z_next)
    s = _similarity(op, u_c)
    norm = lambda t: (s * t).flatten(1).norm(dim=1)  # noqa: E731  (per-sample ||S t||_2)
    rho = (norm(u_r) + norm(delta)) / margin
    # rounding of the few operations above, relative to the magnitudes involved
    rho = rho + dot_error(56, rho + 1 + norm(z_next) + norm(u_c)) - torch.finfo(u_c.dtype).tiny
    lo, hi = ball_to_box(z_next, rho, s)
    lo = lo.clamp_min(0)
    for _ in range(refine_steps):
        a, b = interval_step(op, lo, hi, u_lo, u_hi)
        slack = rounding_slack(op, lo, hi, u_lo, u_hi)
        new_lo, new_hi = torch.maximum(lo, (a - slack).clamp_min(0)), torch.minimum(hi, b + slack)
        if bool(((new_lo - lo).abs().max() <= 0) and ((new_hi - hi).abs().max() <= 0)):
            break
        lo, hi = new_lo, new_hi
    return lo, hi
