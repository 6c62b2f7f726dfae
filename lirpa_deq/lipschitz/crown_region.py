"""Tighter DEQ pre-activation bounds by the adjoint-DEQ linear (CROWN) bound.

For a DEQ neuron i, ``s_i = W_i z* + u_i`` with ``W_i z* = (W^T e_i)^T z*``. The adjoint theorem
(``lirpa_deq.bounds.adjoint``, docs/crown.md) gives, for the specification row ``g = W^T e_i``,
``g^T z* >= <A_u, u> + bias`` for every u of the injection box, hence
``s_i >= <A_u + e_i, u> + bias``; upper bounds use ``g = -W^T e_i``. The linear function of u is
minimised

* exactly over the input ball when every layer before the DEQ is affine (``u = P x + q``):
  ``<a, u(x')> >= <a, u(x)> - eps ||P^T a||_dual``;
* over the injection box otherwise: ``<a, u> >= <a, u_c> - <|a|, u_r>``.

The result is intersected with the interval pre-activation box (both are sound) and widened by a
rounding margin; then ``z* = relu(s*)`` also tightens the box of z*.
"""
from __future__ import annotations

import math

import torch

from ..bounds.adjoint import adjoint_lower, relu_relaxation
from .closed_form import dual_norm
from .layers import gamma
from .neumann import state_fan

MAX_STATE = 4096  # larger states skip the tightening (2 n rows per sample)


@torch.no_grad()
def tighten_deq(lr, s_box, prefix, x, eps, norm, max_iter=100):
    """Tightened (s_lo, s_hi) for the DEQ recorded in ``lr`` (a ``region.LayerRegion``).

    prefix: None (injection box used) or the list of (affine layer, in_shape) before the DEQ,
    possibly empty (the DEQ is the first layer: its injection is the input itself)."""
    op, (lo, hi) = lr.op, lr.z_box
    state, B = lr.in_shape, lr.c.shape[0]
    n = math.prod(state)
    if n > MAX_STATE:
        return s_box
    u_c, u_r = lr.c, lr.r
    eye = torch.eye(n, dtype=u_c.dtype, device=u_c.device).view((n,) + state)
    G = op.WT(eye)  # row i: W^T e_i
    g = torch.cat([G, -G]).unsqueeze(1).expand(2 * n, B, *state)
    relax = relu_relaxation(*s_box)
    A_u, bias, *_ = adjoint_lower(g, op, relax, (lo, hi), (u_c - u_r, u_c + u_r), max_iter=max_iter)
    sign_eye = torch.cat([eye, -eye]).unsqueeze(1)
    coef = A_u + sign_eye  # (2n, B, *state): coefficient on u
    flat = coef.reshape(2 * n * B, *state)
    uc_rows = u_c.repeat(2 * n, *[1] * len(state))
    ur_rows = u_r.repeat(2 * n, *[1] * len(state))
    value = (flat * uc_rows).flatten(1).sum(1)
    mag = (flat.abs() * (uc_rows.abs() + ur_rows)).flatten(1).sum(1)
    if prefix is not None:  # u = P x + q; an empty prefix (DEQ first) is u = x, P = I
        a = flat
        for layer, in_shape in reversed(prefix):
            a = layer.lin_t(a, in_shape)
        fan = 4 * max(1, len(prefix)) * max((l.fan_t for l, _ in prefix), default=1)
        spread = float(eps) * dual_norm(a, norm)
        spread = spread + gamma(a.dtype, fan) * (float(eps) * dual_norm(a.abs(), norm) + mag)
    else:
        spread = (flat.abs() * ur_rows).flatten(1).sum(1)
    value = value - spread + bias.reshape(-1)
    # rounding of the adjoint quantities: terms of the size of |W| |z| and |coef| |u|
    zmag = torch.maximum(lo.abs(), hi.abs()).repeat(2 * n, *[1] * len(state))
    gmag = (g.reshape(2 * n * B, *state).abs() * zmag).flatten(1).sum(1)
    slack = 8 * gamma(u_c.dtype, state_fan(state)) * (mag + gmag + bias.abs().reshape(-1))
    value = (value - slack).view(2, n, B).permute(0, 2, 1).reshape(2, B, *state)
    s_lo = torch.maximum(s_box[0], value[0])
    s_hi = torch.minimum(s_box[1], -value[1])
    s_hi = torch.maximum(s_hi, s_lo)  # both sound: an empty intersection cannot happen exactly
    return s_lo, s_hi
