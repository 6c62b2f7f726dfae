"""Fused, compacting Anderson solve for agreement-certified SRS (no proof obligations here).

Profiling the chunked rescue (``fastpath.py`` before this module) showed that wall time was not
proportional to row-iterations: every solver call rebuilt the cell operator (``A^T A``: as costly
as an iteration on 400 rows), spent two extra operator applications (``f(z0)`` and the final cell
step), restarted Anderson's history at every rescue chunk, kept iterating rows that had already
converged or been certified (frozen with ``torch.where`` on the whole batch), and ran a float64
check per chunk.  This module runs ONE Anderson solve per batch of noisy inputs with

* the operator built once per certification;
* a float32 *stopping test* after every iteration that re-uses ``W z`` from the iteration itself
  (:class:`StopTest`, a conservative mirror of :meth:`AgreementCertifier.check`), so a row stops
  at the first iteration where its label looks certifiable;
* stopped rows removed from the batch (history included) once enough of them have stopped.

Nothing computed here is trusted: the states it returns are certified afterwards, per sample, by
the float64 :class:`~lirpa_deq.smoothing.agreement.AgreementCertifier` (the proof), and a state
that fails that check is simply not counted (or solved again with a stricter stopping test).
"""
from __future__ import annotations

import torch



class StopTest:
    """float32 heuristic version of the agreement check, evaluated at an iterate ``z`` (may have
    negative entries) from ``pre = W z + u`` which the iteration computes anyway.

    The certified state is ``relu(z)``; ``W relu(z) = W z - W z_-`` is accounted for by the bound
    ``||S W z_-|| <= s_max |||W||| ||z_-||``.  ``kappa`` inflates the radius (default 1e-3) so that
    float32 rounding practically never makes this test pass where the float64 check fails.
    """

    def __init__(self, cert, dtype, device):
        to = dict(dtype=dtype, device=device)
        self.s = None if bool((cert.s == 1).all()) else cert.s.to(**to)
        self.neg_coef = float(cert.s.max()) * cert.abs_norm
        self.A = cert.A.to(**to)
        self.b = cert.b.to(**to)
        self.D = cert.D.to(**to)
        self.margin = cert.margin
        self.slack = 1e-5 * (float(cert.A.abs().sum(1).max()) + cert.b_max + 1.0)

    def __call__(self, z, pre, kappa):
        """``(labels, ok, relu(z))`` for flat ``z``, ``pre`` of shape ``(B, N)``."""
        zc = z.clamp_min(0)
        r = pre - zc
        eta = torch.maximum(r, zc.sign() * -1e30)           # r where z > 0, max(r, 0) where z = 0
        if self.s is not None:
            eta = eta * self.s
        radius = (eta.norm(dim=1) + self.neg_coef * z.clamp_max(0).norm(dim=1)) * ((1 + kappa) / self.margin)
        logits = torch.nn.functional.linear(zc, self.A, self.b)
        labels = logits.argmax(1)
        gap = logits.gather(1, labels[:, None]) - logits
        need = self.D[labels] * radius[:, None] + self.slack * (1 + zc.amax(1, keepdim=True))
        ok = (gap > need).scatter_(1, labels[:, None], True).all(1) & torch.isfinite(radius)
        return labels, ok, zc

    def labels(self, z):
        return torch.nn.functional.linear(z, self.A, self.b).argmax(1)


class FusedAnderson:
    """Anderson acceleration on ``z = relu(W z + u)`` with per-row stopping and compaction.

    op: the cell operator (built once); state_shape: one state's shape; m, lam, damping: Anderson's
    options, same mixing problem as :func:`lirpa_deq.solvers.anderson.anderson` (regularised
    normal equations), but the Gram matrix ``G G^T`` is updated one row per iteration (a batched
    ``bmm`` of ``(k, N) x (N, k)`` blocks cost as much as the operator itself).  Statistics
    accumulate in ``iterations`` (batched iterations), ``row_iterations`` (sum of active rows
    per iteration) and ``calls``.
    """

    def __init__(self, op, state_shape, stop: StopTest, *, m=5, lam=1e-4, damping=1.0):
        self.op, self.shape, self.stop = op, tuple(state_shape), stop
        self.m, self.lam, self.damping = int(m), float(lam), float(damping)
        self.iterations = self.row_iterations = self.calls = 0

    def _pre(self, z, u):
        return self.op.W(z.view((-1, *self.shape))).reshape(z.shape[0], -1) + u

    def _weights(self, H, k, latest):
        """``argmin ||G^T a||`` s.t. ``sum(a) = 1`` from the Gram matrix (as ``_mixing_weights``)."""
        if k == 1:
            return H.new_ones((H.shape[0], 1))
        Hk = H[:, :k, :k]
        scale = Hk.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(H.dtype).tiny)
        Hk = Hk + (self.lam * scale).view(-1, 1, 1) * torch.eye(k, dtype=H.dtype, device=H.device)
        a = torch.linalg.solve(Hk, torch.ones_like(Hk[..., :1]))[..., 0]
        s = a.sum(dim=1, keepdim=True)
        ok = s.abs() > torch.finfo(a.dtype).eps
        fallback = torch.zeros_like(a)
        fallback[:, latest] = 1
        return torch.where(ok, a / torch.where(ok, s, torch.ones_like(s)), fallback)

    def solve(self, u, z0, *, steps, max_iter, stop_tol, kappa=1e-3, chain=True):
        """Solve for ``u`` (``(B, *state)``) from ``z0``.

        Every row runs at least ``steps`` iterations.  After that a row stops at the first iterate
        that passes the stopping test, whose relative residual is ``<= stop_tol``, or at
        ``max_iter`` iterations.  Returns ``(chain_state, states, labels, passed, stop_iter)``:
        ``chain_state`` = ``relu(W z_steps + u)`` for every row (None unless ``chain``),
        ``states`` = ``relu`` of each row's stopping iterate (``(B, *state)``), ``labels`` = the
        head's argmax there, ``passed`` = the stopping test's verdict (a heuristic: the float64
        certificate decides), ``stop_iter`` = the iteration at which each row stopped.
        """
        B = u.shape[0]
        uf = u.reshape(B, -1)
        z = z0.reshape(B, -1).to(uf.dtype)
        states = torch.empty_like(uf)
        labels = torch.empty(B, dtype=torch.int64, device=u.device)
        passed = torch.zeros(B, dtype=torch.bool, device=u.device)
        stop_iter = torch.zeros(B, dtype=torch.int64, device=u.device)
        rows = torch.arange(B, device=u.device)              # active row -> original row
        live = torch.ones(B, dtype=torch.bool, device=u.device)
        F = G = H = X = None
        count, it, chain_state, n_done = 0, 0, None, 0
        self.calls += 1
        pre = self._pre(z, uf)
        fz = pre.clamp_min(0)
        while True:
            g = fz - z
            if it == steps and chain:
                chain_state = fz.clone()
            if it >= steps:
                lab, ok, zc = self.stop(z, pre, kappa)
                if it >= max_iter:
                    done = live
                else:
                    res = g.norm(dim=1) / (z.norm(dim=1) + 1e-8)
                    done = live & (ok | (res <= stop_tol))
                sel = done.nonzero().flatten()  # (integer indices: boolean masks are slow on CPU)
                if sel.numel():
                    tgt = rows.index_select(0, sel)
                    states.index_copy_(0, tgt, zc.index_select(0, sel))
                    labels.index_copy_(0, tgt, lab.index_select(0, sel))
                    passed.index_copy_(0, tgt, ok.index_select(0, sel))
                    stop_iter[tgt] = it
                    live = live & ~done
                    n_live = live.numel() - n_done - sel.numel()
                    n_done += sel.numel()
                    if n_live == 0:
                        break
                    if 4 * n_live <= 3 * live.numel():           # compact: drop stopped rows
                        keep = live.nonzero().flatten()
                        rows, z, fz, g, uf = (t.index_select(0, keep) for t in (rows, z, fz, g, uf))
                        if F is not None:
                            F, G, H = (t.index_select(0, keep) for t in (F, G, H))
                            X = None if X is None else X.index_select(0, keep)
                        live = torch.ones(keep.numel(), dtype=torch.bool, device=u.device)
                        n_done = 0
            if F is None:
                F, G = (uf.new_empty((uf.shape[0], self.m, uf.shape[1])) for _ in range(2))
                H = uf.new_zeros((uf.shape[0], self.m, self.m))
                X = None if self.damping == 1 else torch.empty_like(F)
            slot = count % self.m
            F[:, slot], G[:, slot] = fz, g
            if X is not None:
                X[:, slot] = z
            count += 1
            k = min(count, self.m)
            h = (G[:, :k] * g[:, None, :]).sum(-1)            # new row / column of G G^T
            H[:, slot, :k] = h
            H[:, :k, slot] = h
            alpha = self._weights(H, k, slot).unsqueeze(1)
            z = torch.bmm(alpha, F[:, :k]).squeeze(1)
            if X is not None:
                z = self.damping * z + (1 - self.damping) * torch.bmm(alpha, X[:, :k]).squeeze(1)
            pre = self._pre(z, uf)
            fz = pre.clamp_min(0)
            it += 1
            self.iterations += 1
            self.row_iterations += z.shape[0]
        if chain and chain_state is None:  # only when every row stopped before `steps`
            chain_state = states.clone()
        out = states.view(u.shape)
        return (None if chain_state is None else chain_state.view(u.shape)), out, labels, passed, stop_iter
