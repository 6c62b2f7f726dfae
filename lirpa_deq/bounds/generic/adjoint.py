"""CROWN bounds through a generic-cell DEQ by an adjoint fixed point (CerDEQ's idea, any cell).

Given a PROVED box B of z* and the x box X, CROWN on the cell over B x X gives, coordinatewise,
Lz z + Lx x + bl <= cell(z, x) <= Uz z + Ux x + bu. For a specification row g and ANY nu (z's
shape), with nu = nu+ - nu- (positive and negative parts):

    g^T z* = nu^T cell(z*, x) - (nu - g)^T z*
          >= (Lx^T nu+ - Ux^T nu-)^T x + nu+^T bl - nu-^T bu + min_{z in B} (-r^T z),
    r = nu - g - (Lz^T nu+ - Uz^T nu-),

because nu_i cell_i >= nu+_i (lower)_i - nu-_i (upper)_i and z* ∈ B. Every nu is sound; the
tightest solves the adjoint fixed point nu = g + Lz^T nu+ - Uz^T nu- (iterated from nu = g; per
row the iterate with the best concrete value over X is kept). For a ReLU-affine cell this is
exactly the specialized adjoint bound (lirpa_deq.bounds.adjoint).
"""
from __future__ import annotations

import torch


def _adjoint_map(nu, lin):
    pos, neg = nu.clamp(min=0), (-nu).clamp(min=0)
    mz = torch.einsum("sbi,bij->sbj", pos, lin["Lz"]) - torch.einsum("sbi,bij->sbj", neg, lin["Uz"])
    return pos, neg, mz


def bound_at(nu, g, lin, box):
    """(A_x (spec, B, m), bias (spec, B)) of the bound above for a fixed nu (spec, B, n); g, box
    flattened the same way. Differentiable in g and lin (nu is a constant)."""
    pos, neg, mz = _adjoint_map(nu, lin)
    r = nu - g - mz
    c, rad = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    A_x = torch.einsum("sbi,bij->sbj", pos, lin["Lx"]) - torch.einsum("sbi,bij->sbj", neg, lin["Ux"])
    bias = (pos * lin["bl"] - neg * lin["bu"]).sum(-1) - (r * c).sum(-1) - (r.abs() * rad).sum(-1)
    return A_x, bias


@torch.no_grad()
def generic_adjoint_lower(g, lin, box, x_box, max_iter=100, tol=1e-6):
    """Best sound lower bound of g^T z* found by the adjoint iteration.

    g: (spec, B, n); lin: CellBounder.linear() dict; box, x_box: (lo, hi) flattened (B, n) / (B, m).
    Returns (A_x (spec, B, m), bias (spec, B), iterations, nu (spec, B, n))."""
    x_c, x_r = (x_box[1] + x_box[0]) / 2, (x_box[1] - x_box[0]) / 2

    def value(A_x, bias):
        return bias + (A_x * x_c).sum(-1) - (A_x.abs() * x_r).sum(-1)

    nu = g
    best_A, best_bias = bound_at(nu, g, lin, box)
    best_val, best_nu = value(best_A, best_bias), nu
    iterations = 0
    while iterations < max_iter:
        nu_next = g + _adjoint_map(nu, lin)[2]
        iterations += 1
        change = float((nu_next - nu).abs().max()) if nu.numel() else 0.0
        if not torch.isfinite(nu_next).all():
            break
        nu = nu_next
        A_x, bias = bound_at(nu, g, lin, box)
        val = value(A_x, bias)
        better = val > best_val
        best_A = torch.where(better.unsqueeze(-1), A_x, best_A)
        best_nu = torch.where(better.unsqueeze(-1), nu, best_nu)
        best_bias, best_val = torch.where(better, bias, best_bias), torch.where(better, val, best_val)
        if change <= tol * (1 + float(nu.abs().max())):
            break
    return best_A, best_bias, iterations, best_nu
