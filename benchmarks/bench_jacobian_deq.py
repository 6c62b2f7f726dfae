#!/usr/bin/env python
"""Benchmark: Jacobian bounds through a DEQ with upstream auto_LiRPA's Jacobian API
(``JacobianOP`` + ``compute_jacobian_bounds``, the DEQ's gradient node of lirpa_deq.bounds.jacobian)
against lirpa_deq.lipschitz on the same models. Needs upstream auto_LiRPA (``make env-upstream``).

For every model, radius and input (one input at a time: upstream's Jacobian graph takes batch 1),
both bound the local Lipschitz constant of each logit over the l_inf ball (upstream: the l1 norm
of ``max(|lb|, |ub|)`` of its Jacobian bounds; lirpa_deq: ``local_lipschitz(method='local')``).
The empirical LOWER bound is the largest true gradient norm found by sampling (64 points incl.
l_inf vertices) and gradient ascent (2 x 20 steps). Reported: the median and max over logits and
inputs of bound / lower bound (>= 1 when sound), the mean width of the Jacobian bounds, and the
seconds per input. Models (float64, random weights, DEQ solves at tol 1e-10):

  fc10   Linear(6,10) -> ReLU -> Linear(10,10) -> DEQ(IBPMonLinear(10)) -> Linear(10,3)   (seed 0)
  fc24   the same with 24 hidden units (seed 1)
  mon10  Linear(6,10) -> DEQ(MonLinear(10)) -> Linear(10,3)  (a MonDEQ: global-bound fallback, seed 2)

    .venv-upstream/bin/python benchmarks/bench_jacobian_deq.py                 # 5 inputs per setting
    .venv-upstream/bin/python benchmarks/bench_jacobian_deq.py --num-inputs 2  # quick
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torch.nn as nn

import lirpa_deq  # noqa: F401
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.lipschitz import LipschitzFallbackWarning, local_lipschitz
from lirpa_deq.lipschitz.empirical import empirical_lipschitz
from lirpa_deq.nn import DEQ, IBPMonLinear, MonLinear


class JacobianOf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from auto_LiRPA.bound_ops import JacobianOP

        return JacobianOP.apply(self.model(x), x)


def build(name):
    seed, hidden, cell, front = {"fc10": (0, 10, IBPMonLinear, True), "fc24": (1, 24, IBPMonLinear, True),
                                 "mon10": (2, 10, MonLinear, False)}[name]
    torch.manual_seed(seed)
    pre = [nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, hidden)] if front else [nn.Linear(6, hidden)]
    return nn.Sequential(*pre, DEQ(cell(hidden), tol=1e-10, max_iter=500), nn.Linear(hidden, 3)).double()


def run(name, eps, num_inputs, optimize):
    model = build(name)
    gen = torch.Generator().manual_seed(7)
    ratios_up, ratios_ours, widths, t_up, t_ours = [], [], [], [], []
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    for _ in range(num_inputs):
        x = torch.rand(1, 6, dtype=torch.float64, generator=gen)
        t0 = time.perf_counter()
        bounded = BoundedModule(JacobianOf(model), x)
        lb, ub = bounded.compute_jacobian_bounds(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),
                                                 optimize=optimize)
        t_up.append(time.perf_counter() - t0)
        up = torch.maximum(lb.abs(), ub.abs()).sum(-1).detach()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LipschitzFallbackWarning)
            ours = local_lipschitz(model, x, eps, math.inf, "local", C)
        t_ours.append(time.perf_counter() - t0)
        low = empirical_lipschitz(model, x, eps, C, math.inf, n_samples=64, steps=20, restarts=2).clamp_min(1e-12)
        ratios_up += (up / low).flatten().tolist()
        ratios_ours += (ours / low).flatten().tolist()
        widths.append(float((ub - lb).detach().mean()))
    return dict(up_med=statistics.median(ratios_up), up_max=max(ratios_up), ours_med=statistics.median(ratios_ours),
                ours_max=max(ratios_ours), width=statistics.mean(widths), t_up=statistics.mean(t_up),
                t_ours=statistics.mean(t_ours))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-inputs", type=int, default=5)
    parser.add_argument("--optimize", action="store_true", help="alpha-CROWN first (compute_jacobian_bounds' default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':6} {'eps':>5} | {'upstream+DEQ node: ratio med/max':>32} {'s':>6} | "
          f"{'lirpa_deq local: ratio med/max':>30} {'s':>6} | {'J width':>8}")
    for name in ("fc10", "fc24", "mon10"):
        for eps in (0.02, 0.1):
            r = run(name, eps, args.num_inputs, args.optimize)
            print(f"{name:6} {eps:5.2f} | {r['up_med']:15.3f} / {r['up_max']:14.3f} {r['t_up']:6.2f} | "
                  f"{r['ours_med']:13.3f} / {r['ours_max']:14.3f} {r['t_ours']:6.2f} | {r['width']:8.4f}")


if __name__ == "__main__":
    main()
