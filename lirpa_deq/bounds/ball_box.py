"""A proved box for z*(u) from the monotonicity of the DEQ -- the fallback when the interval
post-fixpoint cannot be proved (plain MonDEQ and orthogonal cells, where rho(|W|) >= 1).

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

That box (clipped at 0) is refined by interval steps intersected with it: if z* is in B then
z* = T(z*) is in F(B), so every F(B) ∩ B is again a proved box.
"""
from __future__ import annotations

import torch

from .interval import interval_step, rounding_slack


def _similarity(op, like):
    s = getattr(op, "similarity", None)
    if s is None:
        return torch.ones_like(like[:1])
    return s.to(like.dtype).expand_as(like[:1]) if s.dim() == like.dim() else s.reshape(1, *like.shape[1:])


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
    eps = torch.finfo(u_c.dtype).eps
    # rounding of the few operations above, relative to the magnitudes involved
    rho = rho * (1 + 64 * eps) + 64 * eps * (1 + norm(z_next) + norm(u_c))
    view = (-1,) + (1,) * (u_c.dim() - 1)
    radius = rho.view(view) / s
    lo, hi = (z_next - radius).clamp_min(0), z_next + radius
    for _ in range(refine_steps):
        a, b = interval_step(op, lo, hi, u_lo, u_hi)
        slack = rounding_slack(op, lo, hi, u_lo, u_hi)
        new_lo, new_hi = torch.maximum(lo, (a - slack).clamp_min(0)), torch.minimum(hi, b + slack)
        if bool(((new_lo - lo).abs().max() <= 0) and ((new_hi - hi).abs().max() <= 0)):
            break
        lo, hi = new_lo, new_hi
    return lo, hi
