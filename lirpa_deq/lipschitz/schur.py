"""The local method's exact refinement for one dense DEQ: eliminate the stable neurons exactly.

Applies when the model has exactly one DEQ layer whose state has at most ``refine_max_state``
entries (a dense ``W``: an fc cell in any dtype, or any cell in float64), and the sample's
``rho(Dbar |W|) < 1`` is proved. All algebra is in float64. The rows ``c'`` come from interval
propagation through the layers after the DEQ (their radius enters ``rho`` below). If every ReLU
before the DEQ is stable for the sample, the prefix is one linear map ``U`` and the input
gradient is handled exactly (below); otherwise ``prefix_zonotope`` carries
``centre + phi^T gen + box`` through the prefix, relaxing only its unstable ReLUs.

Let ``D0`` be the stable-active mask, ``S`` the k unstable neurons, ``c'`` a specification row
pulled back through the layers after the DEQ. For every admissible ``D`` (``D0`` off S,
``d in [0,1]^k`` on S) the DEQ adjoint solution ``h = D (c' + W^T h)`` equals

    h = h0 + Q alpha,  h0 = R D0 c',  Q = R E_S,  R = (I - D0 W^T)^-1,
    alpha = h_S = d o (w0 + P alpha),  w0 = (c' + W^T h0)_S,  P = (W^T Q)_SS

(substitute ``h = D0 (c' + W^T h) + E_S alpha``). The input gradient is
``g = U^T h = g0 + alpha^T G`` with ``g0 = U^T h0``, ``G = (U^T Q)^T``; ``leaves.leaf_bound``
bounds ``sup_d ||g||_dual``.

Floating point. ``h0``, ``Q`` are computed (``h0_S = 0`` and ``Q_S = I`` are set exactly). The
true solution differs from ``h^ = h0 + Q alpha`` by ``e`` with ``e = D W^T e + rho``, ``rho`` the
residual of ``h^`` in the TRUE system; ``|rho| <= |res0| + |resQ| |alpha| + rounding terms`` (and
the rounding radius of ``c'``), so ``|e| <= (I - Dbar |W|^T)^-1 |rho|`` (PROVED bound,
``neumann.neumann_bound``) and ``||g_true|| <= ||g^|| + || |U|^T |e| ||``. The k-dimensional
algebra of the leaves (inverses of at most k x k matrices with ``rho(|P|) < 1``) is covered by a
relative margin ``1e3 k^2 u max(v)`` (``u`` = float64 unit roundoff, ``v >= (I-A)^-1 1``).
"""
from __future__ import annotations

import math

import torch

from .backprop import affine_back, relu_mult
from .closed_form import dual_norm
from .layers import gamma
from .leaves import leaf_bound
from .neumann import NonnegOp, neumann_bound
from .propagation import _deq_setup

F64 = torch.float64


def _back(layers, shapes, region, b, i_from, i_to, gc, gr):
    """Interval rows (gc, gr) from the output of layer ``i_from`` back to the input of layer
    ``i_to`` (sample ``b``'s ReLU sets; unstable ReLUs by ``relu_mult``)."""
    for i in range(i_from, i_to - 1, -1):
        if layers[i].kind == "affine":
            gc, gr = affine_back(layers[i], gc, gr, shapes[i])
        else:
            lr = region.per_layer[i]
            gc, gr = relu_mult(gc, gr, lr.active[b:b + 1], lr.inactive[b:b + 1])
    return gc, gr


def _abs_back(layers, shapes, region, b, i_from, i_to, g):
    """``|J|^T g`` bound for ``g >= 0`` (ReLU: ``dbar g``)."""
    for i in range(i_from, i_to - 1, -1):
        if layers[i].kind == "affine":
            g = layers[i].abs_t(g, shapes[i]) * (1 + gamma(g.dtype, layers[i].fan_t))
        else:
            g = g * (~region.per_layer[i].inactive[b:b + 1]).to(g.dtype)
    return g


def prefix_zonotope(layers, shapes, region, b, j, norm):
    """``prefix_norm`` for ``leaves.leaf_bound`` through layers ``j-1 .. 0`` with unstable ReLUs:
    the row is ``centre + phi^T gen + box`` (``|phi| <= phi_r``). Affine layers map centre and
    generators exactly (rounding into the box); at a ReLU, stable coordinates are kept or zeroed
    and unstable ones are replaced by the hull ``[min(0, lo), max(0, hi)]`` of their range (into
    the box, generators zeroed there)."""
    def genmag(gen, pr, nL, K):
        if gen.shape[0] == 0:  # no generators (no free relu' left): reshape(-1) of 0 elements is ambiguous
            return gen.new_zeros(nL * K, *gen.shape[1:])
        return (pr @ gen.abs().reshape(nL, gen.shape[0] // nL, -1)).reshape(nL * K, *gen.shape[1:])

    def f(gc, Tm, pr):
        nL, K, k = pr.shape
        state = shapes[j]
        c = gc.reshape(nL * K, *state)
        gen = Tm.reshape(nL * k, *state)
        box = torch.zeros_like(c)
        for i in range(j - 1, -1, -1):
            layer = layers[i]
            if layer.kind == "affine":
                mag = c.abs() + box + genmag(gen, pr, nL, K)
                c, gen = layer.lin_t(c, shapes[i]), layer.lin_t(gen, shapes[i])
                box = layer.abs_t(box, shapes[i]) + gamma(c.dtype, layer.fan_t) * layer.abs_t(mag, shapes[i])
            else:
                lr = region.per_layer[i]
                act, inact = lr.active[b:b + 1], lr.inactive[b:b + 1]
                unst = ~(act | inact)
                spread = genmag(gen, pr, nL, K) + box
                lo, hi = (c - spread).clamp_max(0), (c + spread).clamp_min(0)
                hc = (lo + hi) / 2
                hr = (hi - lo) / 2 + 2 * torch.finfo(c.dtype).eps * torch.maximum(lo.abs(), hi.abs())
                zero = torch.zeros_like(c)
                c = torch.where(act, c, torch.where(unst, hc, zero))
                box = torch.where(act, box, torch.where(unst, hr, zero))
                gen = gen * act.to(gen.dtype)
        total = c.abs() + box + genmag(gen, pr, nL, K)
        return dual_norm(total, norm).view(nL, K)

    return f


def _each(n, tick):
    """range(n), calling ``tick(1)`` once each sample is done (also on ``continue``)."""
    for b in range(n):
        yield b
        if tick is not None:
            tick(1)


@torch.no_grad()
def refine_local(region, shapes, C_rows, norm, max_state=1024, max_leaves=1024, info=None,
                 tick=None):
    """(N,) refined bounds (inf for rows where the refinement does not apply). C_rows
    (N = B * K, *out_shape); tick: None or a callable told of each finished sample."""
    layers = region.layers
    N = C_rows.shape[0]
    out = torch.full((N,), math.inf, dtype=C_rows.dtype, device=C_rows.device)
    deqs = [j for j, layer in enumerate(layers) if layer.kind == "deq"]
    if len(deqs) != 1:
        return out
    j = deqs[0]
    lr = region.per_layer[j]
    op, state = lr.op, lr.in_shape
    n = math.prod(state)
    if n > max_state or (op.matrix is None and lr.c.dtype != F64):
        return out
    B = lr.c.shape[0]
    K = N // B
    A_all, v_all, ok_rows = _deq_setup(lr, N)
    L64 = [layer.cast(F64) if layer.kind == "affine" else layer for layer in layers]
    Wd = op.dense(state).to(F64)
    absWd = Wd.abs()
    eye = torch.eye(n, dtype=F64, device=Wd.device)
    u64 = torch.finfo(F64).eps
    leaves_used = []
    relus = [i for i, layer in enumerate(layers) if layer.kind == "relu"]
    for b in _each(B, tick):
        rows = slice(b * K, (b + 1) * K)
        if not bool(ok_rows[b * K]):
            continue
        pre_stable = all(bool((region.per_layer[i].active[b] | region.per_layer[i].inactive[b]).all())
                         for i in relus if i < j)
        # c' (K, n): the rows pulled back to the DEQ output (interval: unstable ReLUs allowed)
        cc, cr = _back(L64, shapes, region, b, len(layers) - 1, j + 1, C_rows[rows].to(F64),
                       torch.zeros(K, *C_rows.shape[1:], dtype=F64, device=Wd.device))
        cp, cr = cc.reshape(K, n), cr.reshape(K, n)
        D0 = lr.active[b].reshape(n).to(F64)
        inact = lr.inactive[b].reshape(n)
        S = (~(lr.active[b] | lr.inactive[b])).reshape(n).nonzero().flatten()
        k = S.numel()
        R = torch.linalg.inv(eye - D0.unsqueeze(1) * Wd.T)
        h0 = (D0 * cp) @ R.T
        h0[:, S] = 0
        h0[:, inact] = 0
        Q = R[:, S].clone()
        Q[S] = torch.eye(k, dtype=F64, device=Wd.device)
        Q[inact] = 0
        WtQ = Wd.T @ Q
        P = WtQ[S]
        w_full = cp + h0 @ Wd
        res0 = D0 * w_full - h0
        resQ = D0.unsqueeze(1) * WtQ - Q
        resQ[S] = 0
        gam = gamma(F64, n)
        rho_rows = res0.abs() + gam * (cp.abs() + h0.abs() @ absWd) + cr
        rho_Q = resQ.abs() + gam * (absWd.T @ Q.abs())
        if pre_stable:  # the prefix is one linear map: g0 = U^T h0, G = (U^T Q)^T, exactly
            hq = torch.cat([h0, Q.T]).reshape(K + k, *state)
            gq, gqr = _back(L64, shapes, region, b, j - 1, 0, hq, torch.zeros_like(hq))
            gq, gqr = gq.flatten(1), gqr.flatten(1)
            V, amax, nleaves = leaf_bound(w_full[:, S], P, gq[:K], gq[K:], norm, max_leaves)
        else:  # unstable ReLUs before the DEQ: zonotope-style propagation per leaf
            V, amax, nleaves = leaf_bound(w_full[:, S], P, h0, Q.T.contiguous(), norm, max_leaves,
                                          prefix_norm=prefix_zonotope(L64, shapes, region, b, j, norm))
            gqr = torch.zeros(K + k, 1, dtype=F64, device=Wd.device)
        leaves_used.append(nleaves)
        if not bool(torch.isfinite(V).all()):
            continue
        # the true-system residual of h^ and the error it causes at the input
        rho = rho_rows + amax @ rho_Q.T
        A = NonnegOp(op, A_all.dbar[b:b + 1], state)
        dt = lr.c.dtype
        rho_m = (rho * (1 + 4 * u64)).to(dt)
        rho_m = torch.nextafter(rho_m, torch.full_like(rho_m, math.inf)) if dt != F64 else rho_m
        M, okM = neumann_bound(A, rho_m.reshape(K, *state), v_all[b:b + 1])
        if not bool(okM.all()):
            continue
        e_x = _abs_back(L64, shapes, region, b, j - 1, 0, M.to(F64)).flatten(1)
        e_x = e_x + gqr[:K] + amax @ gqr[K:]
        kappa = float(v_all[b].max())
        margin = 1e3 * max(k, 1) ** 2 * u64 * kappa
        total = V * (1 + margin) + dual_norm(e_x, norm)
        out[rows] = (total * (1 + 4 * torch.finfo(dt).eps)).to(dt)
    if info is not None:
        info.setdefault("leaves", []).extend(leaves_used)
    return out
