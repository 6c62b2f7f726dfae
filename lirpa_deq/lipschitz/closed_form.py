"""``global``: closed-form operator-norm bounds, valid for EVERY input (no region analysis).

For a gradient row ``g^T = c^T J_L ... J_1`` the dual norm satisfies
``||g||_q <= ||J_{i}^T ... J_L^T c||_q * prod_{j < i} ||J_j||_{p->p}`` (``q`` the dual of ``p``;
``||J^T||_{q->q} = ||J||_{p->p}``), where layers ``i..L`` are the affine layers after the last
nonlinearity (propagated exactly). Per layer (``p = inf``: max absolute row sum; ``p = 2``):

* Linear: ``||W||_inf``; ``||W||_2`` (largest singular value, float64 SVD, inflated for rounding).
* Conv2d / AvgPool2d / BatchNorm: ``||A||_inf = max(|A| 1)``; ``||A||_2 <= sqrt(||A||_1 ||A||_inf)``
  (Schur's test), ``||A||_1 = max(|A|^T 1)``. Flatten / Identity: 1. ReLU: 1 (``relu' in [0, 1]``).
* DEQ ``u -> z*(u)``, every guarantee: ``I - W0 >= m I`` with ``m`` the cell's margin (monotone:
  by construction; interval-monotone: ``sym(|W0|) <= (1-m) I`` implies it; contraction:
  ``||W||_2 <= 1 - m`` implies it) and ``W = S^-1 W0 S`` (``S`` = the operator's ``similarity``,
  identity if None). relu is firmly nonexpansive, so for two injections
  ``(dz)^T (ds - dz) >= 0`` in the coordinates ``y = S z`` (``y* = relu(W0 y* + S u)``); with
  ``ds = W0 dy + S du`` this gives ``m ||dy||^2 <= ||dy|| ||S du||``, i.e.
  ``L_2 = cond(S) / m`` (Pabbaraju et al. 2021 for ``S = I``). If the operator proves
  ``||W||_2 <= w < 1`` (``norm_bound``), ``1 / (1 - w)`` is used when smaller.
  l_inf: ``1 / (1 - ||W||_inf)`` when ``||W||_inf < 1`` (``||D W||_inf <= ||W||_inf`` for every
  ``0 <= D <= I``, Neumann series), else the fallback ``sqrt(n) L_2`` (``n`` = state size;
  ``||J||_inf <= sqrt(n) ||J||_2``); the smaller of the available two is used.
"""
from __future__ import annotations

import math

import torch

from ..nn.cells.base import GUARANTEES
from .backprop import affine_back
from .layers import gamma


def dual_norm(g, norm):
    """Row-wise dual norm (l1 for l_inf balls, l2 for l2 balls), rounded up."""
    flat = g.flatten(1)
    up = 1 + gamma(g.dtype, flat.shape[1])
    return (flat.abs().sum(1) if norm == math.inf else flat.norm(dim=1)) * up


def _ones(shape, like):
    return torch.ones((1,) + tuple(shape), dtype=like.dtype, device=like.device)


@torch.no_grad()
def affine_opnorm(layer, in_shape, out_shape, norm, like):
    name = type(layer).__name__
    if name == "_Reshape":
        return 1.0
    if name == "_BatchNorm":
        return float(layer.scale.abs().max()) * (1 + gamma(like.dtype, 4))
    up = 1 + gamma(like.dtype, max(layer.fan_in, layer.fan_t))
    n_inf = float(layer.abs_lin(_ones(in_shape, like)).max())
    if norm == math.inf:
        return n_inf * up
    if name == "_Linear":
        W = layer.W.double()
        s = float(torch.linalg.svdvals(W).max())
        return s * (1 + 64 * max(W.shape) * torch.finfo(torch.float64).eps) * up
    n_one = float(layer.abs_t(_ones(out_shape, like), in_shape).max())
    return math.sqrt(n_inf * n_one) * up


@torch.no_grad()
def deq_opnorm(layer, state_shape, norm, like):
    """(bound, description) for ``||J||_{p->p}`` of ``u -> z*(u)``; see the module docstring."""
    cell = layer.cell
    if getattr(cell, "guarantee", None) not in GUARANTEES:
        raise ValueError(f"{layer.name}: cell guarantee {getattr(cell, 'guarantee', None)!r} is not "
                         f"one of {GUARANTEES}; no closed-form Lipschitz bound is known for it")
    op = cell.operator()
    op.prepare(tuple(state_shape))
    n = math.prod(state_shape)
    up = 1 + gamma(like.dtype, n if len(state_shape) == 1 else 25 * state_shape[0] + 8)
    S = op.similarity
    cond = 1.0 if S is None else float(S.max() / S.min())
    l2, what = cond / cell.margin, f"cond(S)/m = {cond:.4g}/{cell.margin:g}"
    nb = op.norm_bound(tuple(state_shape))
    if nb is not None and nb < 1 and 1 / (1 - nb) < l2:
        l2, what = 1 / (1 - nb), f"1/(1-||W||_2), ||W||_2 <= {nb:.4g}"
    l2 *= up
    if norm == 2:
        return l2, what
    w_inf = float(op.absW(_ones(state_shape, like)).max()) * up
    best, desc = math.sqrt(n) * l2, f"sqrt(n) * L2, n={n}, L2: {what}"
    if w_inf < 1 and 1 / (1 - w_inf) * up < best:
        best, desc = 1 / (1 - w_inf) * up, f"1/(1-||W||_inf), ||W||_inf = {w_inf:.4g}"
    return best, desc


def exact_tail(layers, shapes, g):
    """Propagate rows ``g`` through the trailing affine layers (no nonlinearity: exact up to the
    rounding margin). Returns (gc, gr, index of the last layer NOT yet propagated, or -1)."""
    i, gr = len(layers) - 1, torch.zeros_like(g)
    while i >= 0 and layers[i].kind == "affine":
        g, gr = affine_back(layers[i], g, gr, shapes[i])
        i -= 1
    return g, gr, i


@torch.no_grad()
def global_bound(layers, shapes, out_shape, C_rows, norm, info=None):
    """(N,) global bounds for the rows ``C_rows`` (N, *out_shape)."""
    g, gr, i = exact_tail(layers, shapes, C_rows)
    factor, parts = 1.0, []
    for j in range(i, -1, -1):
        layer = layers[j]
        nxt = shapes[j + 1] if j + 1 < len(layers) else out_shape
        if layer.kind == "affine":
            f = affine_opnorm(layer, shapes[j], nxt, norm, g)
            parts.append((layer.name, f, "operator norm"))
        elif layer.kind == "relu":
            f = 1.0
        else:
            f, what = deq_opnorm(layer, shapes[j], norm, g)
            parts.append((layer.name, f, what))
        factor *= f
    if info is not None:
        info["global_factors"] = parts
    return dual_norm(g.abs() + gr, norm) * factor
