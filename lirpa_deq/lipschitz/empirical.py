"""Empirical LOWER bounds on the local Lipschitz constant (for tests and benchmarks).

A gradient found at a point of the ball is a lower bound on the Lipschitz constant over the ball;
these helpers search for large ones, two ways:

* ``sampled_lipschitz``: true gradients (autograd through the model; a DEQ's gradient is its
  implicit adjoint solve) at random points of the ball (and random l_inf vertices).
* ``ascent_lipschitz``: gradient ascent on the Jacobian norm. For a ReLU network the gradient is
  piecewise constant, so the ascent direction comes from the activation pattern: with the
  relu' values ``d`` relaxed to reals, ``t = d ||J(d)^T c||_dual / d d`` says which neurons should
  switch on (``t > 0``) or off; a projected step on ``x'`` then increases ``sum_i t_i s_i(x')``
  (``s`` = pre-activations, DEQ ones included). The TRUE gradient norm is recorded at every
  iterate. ``J(d)`` uses dense DEQ matrices: meant for small models.

Both return (B, K) tensors: the largest dual norm of ``grad (C_k . f)`` found for each row.
"""
from __future__ import annotations

import math

import torch

from ..testing import ascent_step, ball_samples
from .closed_form import dual_norm
from .layers import flatten_model


def _rows(x, K):
    return x.repeat_interleave(K, 0)


def gradient_norms(model, xs, C, norm):
    """(N, K) dual norms of ``grad (C_k . f)(xs)`` (autograd); ``C`` is (N, K, num_classes)."""
    N, K = C.shape[:2]
    xk = _rows(xs.detach(), K).requires_grad_(True)
    out = model(xk)
    obj = (out * C.reshape(N * K, -1)).sum()
    (g,) = torch.autograd.grad(obj, xk)
    return dual_norm(g, norm).view(N, K).detach()


def sampled_lipschitz(model, x, eps, C, norm=math.inf, n_samples=64, chunk=16, seed=0):
    gen = torch.Generator(device=x.device).manual_seed(seed)
    pts = ball_samples(x, eps, n_samples, norm=norm, generator=gen)
    best = gradient_norms(model, x, C, norm)
    for i in range(0, n_samples, chunk):
        p = pts[i:i + chunk]
        n = p.shape[0]
        v = gradient_norms(model, p.reshape(-1, *x.shape[1:]), C.repeat(n, 1, 1), norm)
        best = torch.maximum(best, v.view(n, *best.shape).max(0).values)
    return best


def _forward_preacts(layers, x):
    """Model output and the pre-activations of every ReLU / DEQ neuron (differentiable in x)."""
    pre, h = [], x
    for layer in layers:
        if layer.kind == "relu":
            pre.append(h)
            h = torch.relu(h)
        elif layer.kind == "deq":
            u = h
            h = layer.module.solve(u)
            pre.append(layer.module.cell.operator().W(h) + u)
        else:
            h = layer.forward(h)
    return h, pre


def _jacobian_rows(layers, shapes, C_rows, ds, dense):
    """Rows ``C J(d)`` for relaxed relu' values ``ds`` (one per nonlinearity), differentiable."""
    g, i = C_rows, len(ds)
    for j in range(len(layers) - 1, -1, -1):
        layer = layers[j]
        if layer.kind == "affine":
            g = layer.lin_t(g, shapes[j])
        elif layer.kind == "relu":
            i -= 1
            g = g * ds[i]
        else:
            i -= 1
            Wd = dense[j]
            d = ds[i].flatten(1)
            n = d.shape[1]
            A = torch.eye(n, dtype=g.dtype, device=g.device) - d.unsqueeze(2) * Wd.T.unsqueeze(0)
            h = torch.linalg.solve(A, (d * g.flatten(1)).unsqueeze(2)).squeeze(2)
            g = h.view_as(ds[i])
    return g


def ascent_lipschitz(model, x, eps, C, norm=math.inf, steps=20, restarts=2, step_size=None,
                     seed=0, start=None):
    """Pattern-guided gradient ascent (module docstring); (B, K) best true dual norms found."""
    layers = flatten_model(model)
    B, K = C.shape[:2]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    shapes, dense, h = [], {}, x[:1]
    with torch.no_grad():
        for j, layer in enumerate(layers):
            shapes.append(tuple(h.shape[1:]))
            if layer.kind == "deq":
                dense[j] = layer.module.cell.operator().dense(tuple(h.shape[1:])).detach()
            h = layer.forward(h)
    xk, Ck = _rows(x, K), C.reshape(B * K, 1, -1)
    best = gradient_norms(model, x, C, norm).reshape(B * K)
    for r in range(restarts):
        if r == 0 and start is not None:
            cur = _rows(start, K).clone()
        else:
            cur = ball_samples(xk, eps, 1, norm=norm, generator=gen, vertices=False)[0]
        for _ in range(steps + 1):
            best = torch.maximum(best, gradient_norms(model, cur, Ck, norm).view(-1))
            # direction in pattern space
            with torch.no_grad():
                _, pre = _forward_preacts(layers, cur)
            ds = [(p > 0).to(x.dtype).requires_grad_(True) for p in pre]
            g = _jacobian_rows(layers, shapes, Ck.squeeze(1), ds, dense)
            ts = torch.autograd.grad(dual_norm(g, norm).sum(), ds)
            # step on x' that moves the pre-activations along t
            xv = cur.detach().requires_grad_(True)
            _, pre = _forward_preacts(layers, xv)
            psi = sum((t.detach() * p).sum() for t, p in zip(ts, pre))
            (gx,) = torch.autograd.grad(psi, xv)
            cur = ascent_step(cur, gx, xk, eps, norm, step_size)
    return best.view(B, K)


def empirical_lipschitz(model, x, eps, C, norm=math.inf, n_samples=64, steps=20, restarts=2, seed=0):
    """max of ``sampled_lipschitz`` and ``ascent_lipschitz``: a (B, K) LOWER bound."""
    a = sampled_lipschitz(model, x, eps, C, norm, n_samples=n_samples, seed=seed)
    b = ascent_lipschitz(model, x, eps, C, norm, steps=steps, restarts=restarts, seed=seed)
    return torch.maximum(a, b)
