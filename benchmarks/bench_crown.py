#!/usr/bin/env python
"""Benchmark: adjoint-DEQ CROWN bounds vs IBP and vs the plain forward pass, same weights, one run.

Models (as benchmarks/bench_ibp.py; random weights, embedded MNIST test digits, batch --batch):
    fc:   Flatten -> Linear(784, 128) -> DEQ(IBPMonLinear(128)) -> Linear(128, 10)
    conv: Conv2d(1, 32, 3, pad 1) -> DEQ(IBPMonConv2d(32)) -> AvgPool2d(4) -> Flatten -> Linear(1568, 10)
Specification: the 9 margins f_y - f_j. Reported per model:
  * time ratios CROWN / forward and IBP / forward (median wall-clock over --repeats different
    batches, no_grad);
  * mean width ratio CROWN / IBP of the margin bounds;
  * gap to exact: mean of (min margin found by PGD) - (CROWN lower bound), and the same for IBP
    (PGD gives an upper bound on the true minimum, so the gap over-estimates the looseness).

    python benchmarks/bench_crown.py [--eps 0.01] [--batch 128] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn

import lirpa_deq  # noqa: F401
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.data import load_mnist5k
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear
from lirpa_deq.testing import pgd_extremes
from lirpa_deq.training.losses import margin_spec


def build(kind):
    if kind == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), DEQ(IBPMonLinear(128)), nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), DEQ(IBPMonConv2d(32)), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def timed(fn, batches):
    """Median wall-clock of fn(x, y) over DIFFERENT batches (BoundDEQ caches the proved box for
    identical input bounds, so repeating one batch would time a cache hit)."""
    times, outs = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        outs.append(fn(x, y))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), outs[0]


def run(kind, batches, eps):
    torch.manual_seed(0)
    model = build(kind).eval()
    x, y = batches[0]
    bounded = BoundedModule(model, x[:1])

    def bounds(xb, yb, method):
        bx = BoundedTensor(xb, PerturbationLpNorm(norm=math.inf, eps=eps))
        return bounded.compute_bounds(x=(bx,), C=margin_spec(yb, 10), method=method, bound_upper=False)[0]

    with torch.no_grad():
        model(x)  # warm-up
        bounds(x[:1], y[:1], "IBP")  # warm-up on another input: the timed calls must not hit the box cache
        t_fwd, _ = timed(lambda xb, yb: model(xb), batches)
        t_ibp, lb_ibp = timed(lambda xb, yb: bounds(xb, yb, "IBP"), batches)
        t_crown, lb_crown = timed(lambda xb, yb: bounds(xb, yb, "CROWN"), batches)
    C = margin_spec(y, 10)
    f = lambda z: torch.einsum("bkc,bc->bk", C.repeat(z.shape[0] // x.shape[0], 1, 1), model(z))  # noqa: E731
    lo_pts, _ = pgd_extremes(f, x, eps, steps=20)
    with torch.no_grad():
        pgd_min = f(lo_pts[0].reshape(-1, *x.shape[1:])).reshape(lo_pts.shape[1], x.shape[0], -1)
        pgd_min = torch.stack([pgd_min[k, :, k] for k in range(pgd_min.shape[0])], 1)
        clean = f(x)
    width = lambda lb: (clean - lb).mean().item()  # noqa: E731  (how far the bound sits below the clean margin)
    print(f"{kind:>5} | fwd {t_fwd * 1e3:7.1f} ms | IBP/fwd {t_ibp / t_fwd:6.2f}x | CROWN/fwd {t_crown / t_fwd:6.2f}x"
          f" | width CROWN/IBP {width(lb_crown) / width(lb_ibp):5.3f}"
          f" | gap to PGD: IBP {(pgd_min - lb_ibp).mean():.4f}, CROWN {(pgd_min - lb_crown).mean():.4f}"
          f" | sound: {bool((lb_crown <= pgd_min + 1e-4).all() and (lb_ibp <= pgd_min + 1e-4).all())}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["fc", "conv"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_mnist5k("test")
    X, Y = data.tensors
    batches = [(X[i * args.batch:(i + 1) * args.batch], Y[i * args.batch:(i + 1) * args.batch])
               for i in range(args.repeats)]
    print(f"eps={args.eps} batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} "
          "(random weights, embedded MNIST test digits)")
    for kind in args.models:
        run(kind, batches, args.eps)


if __name__ == "__main__":
    main()
