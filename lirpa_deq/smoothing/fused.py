"""The fused, compacting solve of agreement-certified SRS (no proof obligations here).

One Anderson solve (:func:`lirpa_deq.solvers.compacting.compacting_anderson`) per batch of noisy
inputs, with

* the cell operator built once per certification and re-used by every solve;
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

from lirpa_deq.solvers.compacting import compacting_anderson


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

    op: the cell operator (built once); state_shape: one state's shape; stop: the stopping test;
    m, lam, damping: Anderson's options (as :func:`lirpa_deq.solvers.anderson.anderson`). The
    solver is :func:`~lirpa_deq.solvers.compacting.compacting_anderson`. Statistics accumulate
    over solves in ``iterations`` (batched iterations), ``row_iterations`` (sum of running rows
    per iteration) and ``calls``.
    """

    def __init__(self, op, state_shape, stop: StopTest, *, m=5, lam=1e-4, damping=1.0):
        self.op, self.shape, self.stop = op, tuple(state_shape), stop
        self.m, self.lam, self.damping = int(m), float(lam), float(damping)
        self.iterations = self.row_iterations = self.calls = 0

    def _step(self, z, u):
        """``(relu(pre), pre)`` with ``pre = W z + u`` for flat ``z``, ``u`` of shape ``(R, N)``."""
        pre = self.op.W(z.view((-1, *self.shape))).reshape(z.shape[0], -1) + u
        return pre.clamp_min(0), pre

    def solve(self, u, z0, *, steps, max_iter, stop_tol, kappa=1e-3, chain=True):
        """Solve for ``u`` (``(B, *state)``) from ``z0`` (same shape).

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

        def stop_rows(it, z, pre):
            labels, ok, zc = self.stop(z, pre, kappa)
            return ok, (zc, labels, ok)

        self.calls += 1
        res = compacting_anderson(self._step, z0.reshape(B, -1).to(uf.dtype), stop_rows, row_args=(uf,),
                                  min_iter=steps, max_iter=max_iter, tol=stop_tol, m=self.m, lam=self.lam,
                                  damping=self.damping, keep_map_at_min_iter=chain)
        self.iterations += res.iterations
        self.row_iterations += res.row_iterations
        states, labels, passed = res.outputs
        chain_state = res.map_at_min_iter
        if chain and chain_state is None:  # only when every row stopped before `steps`
            chain_state = states.clone()
        return (None if chain_state is None else chain_state.view(u.shape)), states.view(u.shape), labels, \
            passed, res.stop_iter
