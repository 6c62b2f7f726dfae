"""Exact / partial enumeration of the unstable DEQ neurons' relu' values (the k-dim reduced problem).

Reduced problem (``schur.py`` derives it): for ``d`` in ``[0, 1]^k`` (relu' of the k unstable
neurons) the gradient row is ``g(d) = g0 + alpha(d)^T G`` where ``alpha(d)`` is the unique solution
of ``alpha = d o (w0 + P alpha)``. We bound ``sup_d ||g(d)||_dual``.

Leaves: some neurons are fixed to 0 or 1 (``t``: fixed to 1, ``f``: free), starting from all
``2^m`` patterns of the most influential ones and refined by branch and bound (``leaf_bound``).
In a leaf, ``alpha = a + Minv F phi`` with ``Minv = (I - T P)^-1``,
``a = Minv (t o w0)`` and ``phi`` (the free neurons' values) solving
``phi = d_F o (b + Pf phi)``, ``b = f o (w0 + P a)``, ``Pf = F P Minv F``. A box of ``phi`` is
found by interval iteration and PROVED by a post-fixpoint check (``Phi(box) within box`` for every
``d_F`` in ``[0,1]``: Brouwer + uniqueness). Then ``g = g0 + a^T G + phi^T (Minv F)^T G`` and the
dual norm over the box is bounded coordinatewise (exact when no neuron is free).

Why leaves suffice: fixing all but one ``d_i``, ``t -> g(d)`` moves along a line segment
monotonically (a rank-one update: ``alpha(t) = alpha(0) + psi(t) q`` with a scalar monotone
``psi``), so a convex norm is maximal at ``d_i`` in {0, 1}; by induction the supremum over the cube
is the maximum over its vertices, and every vertex lies in exactly one leaf.
"""
from __future__ import annotations

import math

import torch


def _dual_rows(a, norm):
    return a.sum(-1) if norm == math.inf else a.pow(2).sum(-1).sqrt()


def _phi_box(b, Pf, f, iters=300, retries=3):
    """Proved box (c, r) of phi, shapes (L, K, k); rows whose proof fails get r = inf."""
    absPf = Pf.abs()
    c = torch.zeros_like(b)
    r = torch.zeros_like(b)
    u = torch.finfo(b.dtype).eps
    k = b.shape[-1]

    def step(c, r):
        wc = b + c @ Pf.transpose(1, 2)
        wr = r @ absPf.transpose(1, 2)
        slack = (k + 4) * u * (b.abs() + (c.abs() + r) @ absPf.transpose(1, 2))
        lo, hi = (wc - wr - slack).clamp_max(0), (wc + wr + slack).clamp_min(0)
        return (lo + hi) / 2 * f.unsqueeze(1), (hi - lo) / 2 * f.unsqueeze(1), lo, hi

    for _ in range(iters):
        c2, r2, _, _ = step(c, r)
        done = bool(((c2 - c).abs() + (r2 - r).abs()).max() <= 1e-15 * (1 + float((c2.abs() + r2).max())))
        c, r = c2, r2
        if done:
            break
    ok = torch.zeros(b.shape[:2], dtype=torch.bool, device=b.device)
    out_r = torch.full_like(r, math.inf)
    pad = 1e-12 * (1 + (c.abs() + r).amax(-1, keepdim=True))
    for _ in range(retries):
        bc, br = c, r * (1 + 1e-9) + pad * f.unsqueeze(1)
        _, _, lo, hi = step(bc, br)
        inside = ((lo >= (bc - br) * f.unsqueeze(1)) & (hi <= (bc + br) * f.unsqueeze(1)) | (f.unsqueeze(1) == 0))
        good = inside.all(-1) & ~ok
        out_r = torch.where(good.unsqueeze(-1), br, out_r)
        ok |= good
        pad = pad * 1e3
    return c, out_r


def _eval(t, f, w0, P, g0, G, prefix_norm):
    """Bounds of the leaves ``(t, f)`` (each (n, k)): (val (n, K), |alpha| enclosure (n, K, k))."""
    k = P.shape[0]
    eye = torch.eye(k, dtype=P.dtype, device=P.device)
    Minv = torch.linalg.inv(eye - t.unsqueeze(2) * P.unsqueeze(0))       # (n, k, k)
    a = (t.unsqueeze(1) * w0.unsqueeze(0)) @ Minv.transpose(1, 2)        # (n, K, k)
    b = (w0.unsqueeze(0) + a @ P.T) * f.unsqueeze(1)
    MF = Minv * f.unsqueeze(1)                                           # Minv diag(f)
    Pf = f.unsqueeze(2) * (P.unsqueeze(0) @ MF)
    if bool((f == 0).all()):
        pc, pr = torch.zeros_like(b), torch.zeros_like(b)
    else:
        pc, pr = _phi_box(b, Pf, f)
    bad = ~torch.isfinite(pr).all(-1)                                    # (n, K): no proof
    pr = torch.where(bad.unsqueeze(-1), torch.zeros_like(pr), pr)
    Tm = MF.transpose(1, 2) @ G                                          # (n, k, dx)
    gc = g0.unsqueeze(0) + a @ G + pc @ Tm
    val = torch.where(bad, torch.full_like(bad, math.inf, dtype=P.dtype), prefix_norm(gc, Tm, pr))
    al = (a + pc @ MF.transpose(1, 2)).abs() + pr @ MF.abs().transpose(1, 2)
    al = torch.where(bad.unsqueeze(-1), torch.full_like(al, math.inf), al)
    return val, al


@torch.no_grad()
def leaf_bound(w0, P, g0, G, norm, max_leaves=1024, chunk=64, prefix_norm=None):
    """(V, alpha_max, leaves): ``V`` (K,) >= sup over d of ||g(d)||_dual (before the rounding
    margin added by the caller), ``alpha_max`` (K, k) >= |alpha(d)| for all d, and the number of
    leaves evaluated. w0 (K, k), P (k, k), g0 (K, dx), G (k, dx); float64.

    Branch and bound: ``2^m0`` leaves on the most influential neurons (``m0 = log2(max_leaves/2)``),
    then, while the budget of ``max_leaves`` evaluations lasts, for every row the open leaves
    with the largest bounds are split on their most influential free neuron (a leaf is closed
    when it is exact, or when its bound is below the best exact value of a fully fixed leaf for
    every row). The children's vertices are exactly the parent's, so ``V = max over the current
    leaves`` stays a bound on the maximum over all vertices.

    prefix_norm: None, or ``f(centre (L, K, dx), gen (L, k, dx), phi_r (L, K, k)) -> (L, K)``
    bounding the dual norm of the image of ``{centre + phi^T gen : |phi| <= phi_r}`` (then g0, G
    live in the space that ``f`` maps, e.g. the DEQ injection)."""
    K, k = w0.shape
    if prefix_norm is None:
        def prefix_norm(gc, Tm, pr):
            return _dual_rows(gc.abs() + pr @ Tm.abs(), norm)
    if k == 0:
        Tm = G.new_zeros(1, 0, G.shape[-1])
        return prefix_norm(g0.unsqueeze(0), Tm, w0.new_zeros(1, K, 0))[0], w0.new_zeros(K, 0), 1
    fk = dict(dtype=P.dtype, device=P.device)
    # influence of each neuron = its value range (root box) x its row of G
    root_c, root_r = _phi_box(w0.unsqueeze(0) * 1.0, P.unsqueeze(0), torch.ones(1, k, **fk))
    infl = (root_c.abs() + root_r)[0].amax(0) * G.abs().sum(1)
    infl = torch.where(torch.isfinite(infl), infl, torch.full_like(infl, 1e300))
    order = torch.argsort(infl, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=P.device)
    m = min(k, max(0, int(math.log2(max(1, max_leaves))) - 1))
    L = 1 << m
    bits = ((torch.arange(L, device=P.device).unsqueeze(1) >> torch.arange(m, device=P.device)) & 1).to(P.dtype)
    t = torch.zeros(L, k, **fk)
    t[:, order[:m]] = bits
    f = torch.ones(L, k, **fk)
    f[:, order[:m]] = 0

    def evaluate(t, f):
        vals, als = [], []
        for s in range(0, t.shape[0], chunk):
            v, a = _eval(t[s:s + chunk], f[s:s + chunk], w0, P, g0, G, prefix_norm)
            vals.append(v)
            als.append(a.amax(0))
        return torch.cat(vals), torch.stack(als).amax(0)

    val, amax = evaluate(t, f)
    used = L
    lower = torch.full((K,), -math.inf, **fk)  # best exact vertex values
    while True:
        exact = f.sum(1) == 0
        if exact.any():
            lower = torch.maximum(lower, val[exact].amax(0))
        free = ~exact
        open_ = free & (val > lower * (1 + 1e-9)).any(1)
        budget = max_leaves - used
        if not bool(open_.any()) or budget < 2:
            break
        # split, for every row, the open leaves with the largest bounds (round robin over rows)
        vmask = torch.where(open_.unsqueeze(1), val, torch.full_like(val, -math.inf))
        depth = max(1, min(budget // 2, chunk) // K)
        top = torch.topk(vmask, min(depth, vmask.shape[0]), dim=0).indices.T.reshape(-1)  # (K*depth,)
        pick = torch.unique(top[open_[top]])[: max(1, min(budget // 2, chunk))]
        n_split = pick.numel()
        # split each picked leaf on its most influential free neuron
        cand = torch.where(f[pick] > 0, rank.unsqueeze(0).to(P.dtype), torch.full_like(f[pick], math.inf))
        nxt = cand.argmin(1)
        t0, f0 = t[pick].clone(), f[pick].clone()
        f0[torch.arange(n_split), nxt] = 0
        t1 = t0.clone()
        t1[torch.arange(n_split), nxt] = 1
        ct, cf = torch.cat([t0, t1]), torch.cat([f0, f0])
        cv, ca = evaluate(ct, cf)
        amax = torch.maximum(amax, ca)
        used += 2 * n_split
        keep = torch.ones(t.shape[0], dtype=torch.bool, device=P.device)
        keep[pick] = False
        t, f, val = torch.cat([t[keep], ct]), torch.cat([f[keep], cf]), torch.cat([val[keep], cv])
    return val.amax(0), amax, used
