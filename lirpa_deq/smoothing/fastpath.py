"""The serialized pass of SRS with per-sample agreement certificates (no statistical correction).

For a model ``nn.Sequential(*pre, DEQ, *post)`` (affine ``post``), every batch of noisy inputs is
embedded (``u = pre(x + d)``).  Batch 0 is a full solve from zero with the DEQ's solver (the
warm-up); every later batch starts from the previous batch's states (row by row) and runs
``steps`` solver iterations: that truncated state is handed to the next batch (the serialized
chain of SRS).  In the estimation phase the same solve then *continues*, per row, until the row's
label looks certifiable (float32 stopping test, :mod:`~lirpa_deq.smoothing.fused`), its residual
is below ``deq.tol / 10``, or ``deq.max_iter`` iterations.  Then the float64
:class:`~lirpa_deq.smoothing.agreement.AgreementCertifier` checks, per sample, every state whose
label is the candidate class ``cA``; a state that fails is solved again with a stricter stopping
test (twice at most) and otherwise not counted.  States of other labels are never counted, so
they need no proof.  Hence ``N_low = #{i : proved_i and label_i = cA} <= #{i : f*(x + d_i) = cA}``
deterministically, and Clopper-Pearson at the full ``alpha`` applies (``docs/smoothing.md``).

DEQs whose solver is not Anderson / fixed-point iteration use the DEQ's own solver instead: the
truncated solve, then continued solves in growing chunks with a float64 check after each chunk.
"""
from __future__ import annotations

import math

import torch

from .._progress import progress_iter
from ..solvers import get_solver, solver_options
from .agreement import AgreementCertifier
from .core import gaussian_noise
from .fused import FusedAnderson, StopTest

RETRIES = 2


class AgreementPass:
    """Runs the serialized pass for one certification.  Holds the per-call statistics."""

    def __init__(self, pre, deq, post, num_classes, steps):
        self.pre, self.deq, self.post, self.steps = pre, deq, post, int(steps)
        self.num_classes = num_classes
        self.solver = get_solver(deq.solver)
        names = solver_options(self.solver)
        self.opts = {k: v for k, v in deq.solver_opts.items() if k in names}
        self.certifier = self.problem = self.fused = None
        self._iters = self._row_iters = self._calls = 0
        self.uncertain = self.rescued = self.retried = 0
        self.rescue_chunk = 4

    # -- statistics (generic solver calls + fused solves) ------------------------------------------
    @property
    def iterations(self):
        return self._iters + (self.fused.iterations if self.fused else 0)

    @property
    def row_iterations(self):
        return self._row_iters + (self.fused.row_iterations if self.fused else 0)

    @property
    def calls(self):
        return self._calls + (self.fused.calls if self.fused else 0)

    # -- set-up ----------------------------------------------------------------------------------
    def _setup(self, u):
        """Certifier, operator and fused solver, built once per certification."""
        if self.certifier is not None:
            return
        self.deq.cell.state_shape(u.shape)
        self.certifier = AgreementCertifier(self.deq, self.post, u.shape[1:], u.device)
        if self.certifier.b.numel() != self.num_classes:
            raise ValueError(f"the model has {self.certifier.b.numel()} outputs, expected num_classes="
                             f"{self.num_classes}")
        self.problem = self.deq.problem()  # the DEQ's own fixed-point problem, operator built once
        self.problem.prepare(u, None)
        self.stop = StopTest(self.certifier, u.dtype, u.device)
        name = self.deq.solver
        if name in ("anderson", "fixed_point_iter"):
            o = self.opts
            m = int(o.get("m", 5)) if name == "anderson" else 1
            lam = float(o.get("lam", 1e-4)) if name == "anderson" else 0.0
            self.fused = FusedAnderson(self.problem.op, u.shape[1:], self.stop, m=m, lam=lam,
                                       damping=float(o.get("damping", 1.0)))

    def _solve(self, u, z0, max_iter):
        """The DEQ's own solver from ``z0``, then one cell step (the state classified / passed on)."""
        z, stats = self.solver(self.problem.solver_map(u), z0, tol=self.deq.tol, max_iter=max_iter,
                               **self.opts)
        self._iters += stats.iterations
        self._row_iters += stats.iterations * u.shape[0]
        self._calls += 1
        return self.problem.step(z, u)

    def _warm_up(self, u):
        """Batch 0: from zero, each row until its label looks certifiable (stopping test) or its
        residual is below ``deq.tol`` (fused path), else a full solve with the DEQ's solver."""
        if self.fused is None:
            z = self._solve(u, torch.zeros_like(u), self.deq.max_iter)
            return z, self.stop.labels(z.reshape(z.shape[0], -1))
        _, z, labels, _, _ = self.fused.solve(u, torch.zeros_like(u), steps=0, max_iter=self.deq.max_iter,
                                              stop_tol=self.deq.tol, chain=False)
        return z, labels

    # -- one batch -------------------------------------------------------------------------------
    def _solve_batch(self, u, z0, c_a):
        """``(chain, fast_labels, states, labels, proved, beyond)`` for one warm-started batch.

        ``chain``: the state after ``steps`` iterations (handed to the next batch), ``fast_labels``
        its head labels; with ``c_a`` None (selection phase) the rest is None.  Otherwise
        ``states`` / ``labels``: where each row's continued solve stopped; ``proved``: None, or the
        rows already certified in float64 (generic path); ``beyond``: rows that needed more than
        ``steps`` iterations.  Nothing returned here is trusted.
        """
        if self.fused is None:
            chain = self._solve(u, z0, self.steps)
            fast = self.stop.labels(chain.reshape(chain.shape[0], -1))
            if c_a is None:
                return chain, fast, None, None, None, None
            states, labels, proved, beyond = self._rescue(u, chain.clone())
            return chain, fast, states, labels, proved, beyond
        if c_a is None:
            chain = self.fused.solve(u, z0, steps=self.steps, max_iter=self.steps, stop_tol=0.0)[0]
            return chain, self.stop.labels(chain.reshape(chain.shape[0], -1)), None, None, None, None
        chain, states, labels, _, it = self.fused.solve(u, z0, steps=self.steps, max_iter=self.deq.max_iter,
                                                        stop_tol=self.deq.tol / 10)
        fast = self.stop.labels(chain.reshape(chain.shape[0], -1))
        return states.clone(), fast, states, labels, None, it > self.steps

    def _rescue(self, u, z):
        """Generic path: solve in growing chunks (4, 8, 16, ... iterations) with the DEQ's solver,
        dropping rows once certified, until ``deq.max_iter`` iterations are spent."""
        labels, ok = self.certifier.check(z, u)
        beyond = ~ok
        todo, spent = beyond.nonzero().flatten(), 0
        while todo.numel() and spent < self.deq.max_iter:
            k = min(self.rescue_chunk << min(spent // self.rescue_chunk, 30).bit_length(), self.deq.max_iter - spent)
            z_t = self._solve(u[todo], z[todo], k)
            spent += k
            z[todo] = z_t
            lab_t, ok_t = self.certifier.check(z_t, u[todo])
            labels[todo], ok[todo] = lab_t, ok_t
            todo = todo[~ok_t]
        return z, labels, ok, beyond

    def _prove(self, u, states, labels, proved, c_a):
        """float64 certificates for the rows labelled ``c_a``; a row whose check fails is solved
        again with a 10x stricter stopping test (``RETRIES`` times at most; fused path).
        Updates ``states`` / ``labels`` in place; returns the certified mask."""
        out = torch.zeros_like(labels, dtype=torch.bool)
        idx, kappa = (labels == c_a).nonzero().flatten(), 1e-3
        # generic path: the rows were checked while solving, but the check is repeated here on the
        # states as returned, so that nothing from the solve is trusted (no retries: no fused solver)
        for attempt in range(RETRIES + 1 if proved is None else 1):
            if idx.numel() == 0:
                break
            if attempt:
                kappa *= 10
                self.retried += idx.numel()
                _, st, lab, _, _ = self.fused.solve(u[idx], states[idx], steps=0, max_iter=self.deq.max_iter,
                                                    stop_tol=self.deq.tol / 10, kappa=kappa, chain=False)
                states[idx], labels[idx] = st, lab
                idx = idx[lab == c_a]
            lab, ok = self.certifier.check(states[idx], u[idx])
            good = ok & (lab == c_a)
            out[idx[good]] = True
            idx = idx[~good]
        return out

    # -- the pass --------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, x, n0, n, batch_size, sigma, gen, progress):
        """Returns ``(selection_counts (K,), cA, labels (n,), proved (n,), fast_labels (n,))``;
        ``proved[i]``: ``f*(x + d_i) = labels[i] = cA`` is certified (float64)."""
        prev, c_a = None, None
        counts0 = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        labels = torch.empty(n, dtype=torch.int64, device=x.device)
        fast_labels = torch.empty(n, dtype=torch.int64, device=x.device)
        proved = torch.zeros(n, dtype=torch.bool, device=x.device)
        for phase, num in (("select", n0), ("estimate", n)):
            remaining, start = num, 0
            if phase == "estimate":
                c_a = int(torch.argmax(counts0))
            for _ in progress_iter(range(math.ceil(num / batch_size)), progress, f"SRS {phase}"):
                u = self.pre(gaussian_noise(x, batch_size, sigma, gen))
                self._setup(u)
                b = min(batch_size, remaining)
                remaining -= b
                if prev is None:  # warm-up (always in the selection phase, n0 >= 1): solve from 0
                    prev, fast = self._warm_up(u)
                    counts0 += torch.bincount(fast[:b], minlength=self.num_classes)
                    continue
                prev, fast, states, lab, pr, beyond = self._solve_batch(u, prev, c_a)
                if phase == "select":
                    counts0 += torch.bincount(fast[:b], minlength=self.num_classes)
                    continue
                states, lab = states[:b], lab[:b].clone()
                ok = self._prove(u[:b], states, lab, None if pr is None else pr[:b], c_a)
                labels[start:start + b], proved[start:start + b] = lab, ok
                fast_labels[start:start + b] = fast[:b]
                self.uncertain += int(beyond[:b].sum())
                self.rescued += int((beyond[:b] & ok).sum())
                start += b
        return counts0, c_a, labels, proved, fast_labels
