"""Deterministic per-sample agreement certificate for truncated (warm-started) DEQ solves.

Model form: ``nn.Sequential(*pre, DEQ, *post)`` with ``post`` affine (Flatten, Identity,
Linear, AvgPool2d, Dropout / BatchNorm in eval mode).  The *exact* classifier is

    f*(x) = argmax_c (A z*(u) + b)_c,   u = pre(x),   z*(u) = relu(W z*(u) + u),

with ``W`` the cell's operator built in exact arithmetic from its parameters (``W = S^-1 W0 S``,
``I - W0 >= m I``, ``m = cell.margin``: every lirpa_deq cell guarantees this, see
``lirpa_deq/bounds/ball_box.py``) and ``(A, b)`` the affine map of ``post``.

Lemma (see docs/smoothing.md).  Let ``z >= 0`` be any state, ``r = W z + u - z`` and
``eta_i = r_i`` where ``z_i > 0``, ``eta_i = max(r_i, 0)`` where ``z_i = 0``.  Then
``r - eta`` lies in the normal cone of the nonnegative orthant at ``z``, i.e.
``z = relu(W z + u - eta)`` exactly: ``z`` is the fixed point for the injection ``u - eta`` and,
by strong monotonicity, ``||S (z - z*(u))||_2 <= ||S eta||_2 / m =: R``.  For every pair of classes,
``|(l_c - l_j)(z') - (l_c - l_j)(z*)| <= ||S^-1 (a_c - a_j)||_2 R =: D_cj R``.  Hence if
``l_c(z') - l_j(z') > D_cj R`` for every ``j != c``, then ``f*(x) = c``.

All certificate arithmetic is done in float64 with a relative slack ``TAU`` that dominates the
float64 rounding of these operations (Higham's gamma_N is below 2.3e-11 for states of up to 1e5
entries; ``TAU = 1e-9``).  ``z`` may be arbitrary (non-converged, adversarial): only ``eta``
is used, never the solver's claims.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..nn import DEQ, ReLUAffineCell

TAU = 1e-9
AFFINE = (nn.Flatten, nn.Identity, nn.Linear, nn.AvgPool2d, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)


def split_deq_model(model):
    """``(pre, deq, post)`` for ``nn.Sequential(*pre, DEQ, *post)`` with an affine ``post``, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    mods = list(model)
    idx = [i for i, m in enumerate(mods) if isinstance(m, DEQ)]
    if len(idx) != 1 or any(isinstance(m, DEQ) for m in mods[idx[0]].modules() if m is not mods[idx[0]]):
        return None
    if not isinstance(mods[idx[0]].cell, ReLUAffineCell):
        return None  # the lemma needs relu(W z + u) with I - W0 >= m I (generic cells: use the audit)
    post = mods[idx[0] + 1:]
    if not post or not all(isinstance(m, AFFINE) for m in post):
        return None
    if any(m.training and isinstance(m, (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)) for m in post):
        return None
    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is None for m in post):
        return None  # batch statistics even in eval mode: not a per-sample affine map
    if any(isinstance(m, nn.AvgPool2d) and (m.ceil_mode or not m.count_include_pad) for m in post):
        return None
    return nn.Sequential(*mods[:idx[0]]), mods[idx[0]], nn.Sequential(*post)


def _flat_similarity(op, state_shape, dtype, device):
    s = getattr(op, "similarity", None)
    n = 1
    for d in state_shape:
        n *= int(d)
    if s is None:
        return torch.ones(n, dtype=dtype, device=device)
    s = s.detach().to(dtype=dtype, device=device)
    return s.reshape(-1).clone() if s.numel() == n else s.expand((1, *state_shape)).reshape(-1).clone()


def _absolute_head(post):
    """The head with every layer replaced by its entrywise absolute value (|W| x + |b|): evaluated on
    |z| it bounds the sum of absolute terms that evaluating the head on z adds up."""
    head = copy.deepcopy(post)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Linear):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.abs_()
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(-m.running_mean.abs())  # (|x| + |mean|) |gamma| / sigma + |beta|
                if m.affine:
                    m.weight.abs_()
                    m.bias.abs_()
    return head.eval()


def _head_rounding(post, state_shape, k, dtype, device):
    """(|A| (k, N), |b| (k,), gamma): the absolute head's matrix and offset, and a relative rounding
    factor for evaluating the head in float64: (layers * (largest fan-in + 8)) * eps + TAU."""
    head = _absolute_head(post).to(device=device, dtype=dtype)
    fan_in = 1
    for m in head.modules():
        if isinstance(m, nn.Linear):
            fan_in = max(fan_in, m.in_features)
        elif isinstance(m, nn.AvgPool2d):
            ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            fan_in = max(fan_in, ks[0] * ks[1])
    layers = max(1, len(list(head)))
    with torch.no_grad():
        abs_b = head(torch.zeros((1, *state_shape), dtype=dtype, device=device)).reshape(-1)
    with torch.enable_grad():
        zk = torch.zeros((k, *state_shape), dtype=dtype, device=device, requires_grad=True)
        (rows,) = torch.autograd.grad(head(zk).reshape(k, k), zk, torch.eye(k, dtype=dtype, device=device))
    gamma = layers * (fan_in + 8) * torch.finfo(dtype).eps + TAU
    return rows.reshape(k, -1).detach(), abs_b, gamma


class AgreementCertifier:
    """Per-sample certificate that the head's argmax at a given state equals ``f*``'s.

    Built once per certification (``state_shape`` = shape of one DEQ state).  :meth:`check` takes
    float states ``z`` and injections ``u`` and returns ``(labels, certified)``.
    """

    def __init__(self, deq, post, state_shape, device):
        self.state_shape = tuple(state_shape)
        dt = torch.float64
        self.margin = float(deq.cell.margin)
        if not self.margin > 0:
            raise ValueError(f"agreement certificate needs a cell margin m > 0, got {self.margin!r}")
        cell = copy.deepcopy(deq.cell).to(device=device, dtype=dt)
        with torch.no_grad():
            self.op = cell.operator()
            self.op.prepare(self.state_shape)
            self.s = _flat_similarity(self.op, self.state_shape, dt, device)
            ones = torch.ones((1, *self.state_shape), dtype=dt, device=device)
            # || |W| ||_2 <= sqrt(||absW||_1 ||absW||_inf) (Schur test), with absW >= |W| elementwise
            self.abs_norm = float((self.op.absW(ones).max() * self.op.absWT(ones).max()).sqrt()) * (1 + 1e-6)
            head = copy.deepcopy(post).to(device=device, dtype=dt).eval()
            zero = torch.zeros((1, *self.state_shape), dtype=dt, device=device)
            self.b = head(zero).reshape(-1)
            k = self.b.numel()
        with torch.enable_grad():
            zk = torch.zeros((k, *self.state_shape), dtype=dt, device=device, requires_grad=True)
            (rows,) = torch.autograd.grad(head(zk).reshape(k, k), zk, torch.eye(k, dtype=dt, device=device))
        self.A = rows.reshape(k, -1).detach()                          # logits = A z + b
        self.absA, self.abs_b, self.gamma = _head_rounding(post, self.state_shape, k, dt, device)
        with torch.no_grad():
            probe = torch.randn((3, *self.state_shape), dtype=dt, device=device, generator=torch.Generator(
                device=device).manual_seed(0))
            lin = probe.reshape(3, -1) @ self.A.T + self.b
            if not torch.allclose(head(probe).reshape(3, -1), lin, rtol=1e-9, atol=1e-9):
                raise ValueError("the layers after the DEQ are not affine")
            scaled = self.A / self.s                                   # rows S^-1 a_c
            # D_cj = ||S^-1 (a_c - a_j)||_2, computed directly: cdist's default switches to
            # sqrt(|a|^2 + |b|^2 - 2ab) for > 25 rows, which loses everything to cancellation
            self.D = torch.cdist(scaled, scaled, compute_mode="donot_use_mm_for_euclid_dist")
            # the computed A differs from the exact head's by <= gamma * |A| (composition rounding)
            self.D = self.D * (1 + TAU) + TAU + 2 * self.gamma * float((self.absA / self.s).norm(dim=1).max())
            self.A_l1 = float(self.A.abs().sum(1).max())
            self.s_is_one = bool((self.s == 1).all())
            self.b_max = float(self.b.abs().max())

    def _snorm(self, t):
        t = t.reshape(t.shape[0], -1)
        return (t if self.s_is_one else t * self.s).norm(dim=1)

    @torch.no_grad()
    def check(self, z: torch.Tensor, u: torch.Tensor):
        """Certify ``argmax head(z)`` for a state ``z`` (negative entries are clipped to 0 first).

        Returns ``labels`` (B,) int64 and ``certified`` (B,) bool: True only if ``labels == f*``
        provably (Lemma in the module docstring; ``z`` itself is never trusted).
        """
        dt = torch.float64
        z64, u64 = torch.relu(z.to(dt)), u.to(dt)
        wz = self.op.W(z64)
        r = wz + u64 - z64                                   # r - eta must lie in N(z)
        # eta = r where z > 0, max(r, 0) where z = 0 (exact arithmetic form of torch.where: faster on CPU)
        eta = r - r.clamp_max(0) * (1 - z64.sign())
        rounding = TAU * (self._snorm(wz) + self._snorm(u64) + self._snorm(z64)
                          + float(self.s.max()) * self.abs_norm * z64.reshape(z64.shape[0], -1).norm(dim=1))
        radius = (self._snorm(eta) * (1 + TAU) + rounding) / self.margin
        flat = z64.reshape(z64.shape[0], -1)
        logits = torch.nn.functional.linear(flat, self.A, self.b)
        labels = logits.argmax(1)
        gap = logits.gather(1, labels[:, None]) - logits                  # l_c - l_j  (B, K)
        need = self.D[labels] * radius[:, None]
        need = need + 2 * TAU * (self.A_l1 * flat.abs().amax(1) + self.b_max + 1.0)[:, None]
        # rounding of the head itself (its layers composed in float64, cancellation included):
        # |computed - exact logits| <= gamma * (|A| |z| + |b|)_abs-head per class
        magnitude = torch.nn.functional.linear(flat.abs(), self.absA, self.abs_b).amax(1)
        need = need + 2 * self.gamma * magnitude[:, None]
        ok = gap > need
        ok.scatter_(1, labels[:, None], True)
        certified = ok.all(1) & torch.isfinite(radius) & torch.isfinite(logits).all(1)
        return labels, certified
