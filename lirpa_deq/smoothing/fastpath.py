"""The serialized pass of SRS with per-sample agreement certificates (no statistical correction).

For a model ``nn.Sequential(*pre, DEQ, *post)`` (affine ``post``), every batch of noisy inputs is
embedded (``u = pre(x + d)``), its DEQ is solved by the DEQ's own solver for at most ``steps``
iterations from the previous batch's states (row by row; the first batch is a full solve), and
:class:`~lirpa_deq.smoothing.agreement.AgreementCertifier` decides, per sample, whether the
truncated state's prediction provably equals the exact DEQ's ``f*(x + d)``.  Samples it cannot
certify are solved further after the pass (warm-started, in growing chunks of iterations, dropped
once certified, up to ``deq.max_iter`` iterations); samples still uncertain count as "not the
candidate class".  The resulting count ``N_low`` satisfies
``N_low <= #{i : f*(x + d_i) = cA}`` deterministically, so Clopper-Pearson at the full ``alpha``
applies (theorem in ``docs/smoothing.md``).
"""
from __future__ import annotations

import math

import torch

from .agreement import AgreementCertifier
from .core import _progress, gaussian_noise


class AgreementPass:
    """Runs the serialized pass for one certification.  Holds the per-call statistics."""

    def __init__(self, pre, deq, post, num_classes, steps):
        from lirpa_deq.solvers import ReLUAffineProblem, get_solver, solver_options

        self.pre, self.deq, self.post, self.steps = pre, deq, post, int(steps)
        self.num_classes = num_classes
        self._problem = ReLUAffineProblem
        self.solver = get_solver(deq.solver)
        names = solver_options(self.solver)
        self.opts = {k: v for k, v in deq.solver_opts.items() if k in names}
        self.certifier = None
        self.iterations = self.row_iterations = self.calls = 0
        self.uncertain = self.rescued = 0
        self.rescue_chunk = 4

    def _solve(self, u, z0, max_iter):
        op = self.deq.cell.operator()
        op.prepare(tuple(u.shape[1:]))
        prob = self._problem(op, u, margin=self.deq.cell.margin)
        z, stats = self.solver(prob, z0, tol=self.deq.tol, max_iter=max_iter, **self.opts)
        self.iterations += stats.iterations
        self.row_iterations += stats.iterations * u.shape[0]
        self.calls += 1
        return torch.relu(op.W(z) + u)  # one cell step: the state that is classified and passed on

    def _ensure_certifier(self, u):
        if self.certifier is None:
            self.deq.cell.state_shape(u.shape)
            self.certifier = AgreementCertifier(self.deq, self.post, u.shape[1:], u.device)
            if self.certifier.b.numel() != self.num_classes:
                raise ValueError(f"the model has {self.certifier.b.numel()} outputs, expected num_classes="
                                 f"{self.num_classes}")

    def _rescue(self, u, z):
        """Solve in growing chunks (4, 8, 16, ... iterations), dropping rows once certified, until
        ``deq.max_iter`` iterations are spent (rows still uncertain stay uncertified)."""
        labels, ok = self.certifier.check(z, u)
        todo, spent = (~ok).nonzero().flatten(), 0
        while todo.numel() and spent < self.deq.max_iter:
            k = min(self.rescue_chunk << min(spent // self.rescue_chunk, 30).bit_length(), self.deq.max_iter - spent)
            z_t = self._solve(u[todo], z[todo], k)
            spent += k
            z[todo] = z_t
            lab_t, ok_t = self.certifier.check(z_t, u[todo])
            labels[todo], ok[todo] = lab_t, ok_t
            todo = todo[~ok_t]
        return labels, ok

    @torch.no_grad()
    def run(self, x, n0, n, batch_size, sigma, gen, progress):
        """Returns ``(selection_counts (K,), labels (n,), certified (n,))`` after the rescue step."""
        prev = None
        counts0 = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        labels = torch.empty(n, dtype=torch.int64, device=x.device)
        certified = torch.empty(n, dtype=torch.bool, device=x.device)
        pending_u, pending_z, pending_pos = [], [], []
        for phase, num in (("select", n0), ("estimate", n)):
            remaining, start = num, 0
            for _ in _progress(range(math.ceil(num / batch_size)), progress, f"SRS {phase}"):
                u = self.pre(gaussian_noise(x, batch_size, sigma, gen))
                self._ensure_certifier(u)
                if prev is None:  # warm-up: a full solve from zero
                    z = self._solve(u, torch.zeros_like(u), self.deq.max_iter)
                else:
                    z = self._solve(u, prev, self.steps)
                lab, ok = self.certifier.check(z, u)
                prev = z
                b = min(batch_size, remaining)
                remaining -= b
                if phase == "select":
                    counts0 += torch.bincount(lab[:b], minlength=self.num_classes)
                    continue
                labels[start:start + b], certified[start:start + b] = lab[:b], ok[:b]
                bad = (~ok[:b]).nonzero().flatten()
                if bad.numel():
                    pending_u.append(u[bad])
                    pending_z.append(prev[bad])
                    pending_pos.append(bad + start)
                start += b
        self.fast_labels = labels.clone()  # truncated-solve predictions, before the rescue
        if pending_pos:  # rescue: continue solving the uncertain samples until certified
            u, z0, pos = torch.cat(pending_u), torch.cat(pending_z), torch.cat(pending_pos)
            self.uncertain = int(pos.numel())
            for i in range(0, pos.numel(), batch_size):
                lab, ok = self._rescue(u[i:i + batch_size], z0[i:i + batch_size])
                labels[pos[i:i + batch_size]] = lab
                certified[pos[i:i + batch_size]] = ok
                self.rescued += int(ok.sum())
        return counts0, labels, certified
