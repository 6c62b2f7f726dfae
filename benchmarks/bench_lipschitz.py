#!/usr/bin/env python
"""Benchmark: tightness and cost of the Lipschitz bounds (global / elementwise / local).

For each model and radius, on the first ``--num-images`` test images, every method bounds the
local Lipschitz constant of each margin ``f_y - f_j`` (j != y) over the ball; the empirical LOWER
bound is the largest true gradient dual norm found by sampling (64 points incl. l_inf vertices)
and by pattern-guided gradient ascent (2 restarts x 20 steps). Reported per (model, eps, norm):
the median and max over margins of bound / lower bound (the tightness ratio, >= 1 when sound),
milliseconds per image, and how many images ``certify_lipschitz`` certifies.

Models (float64 analysis, DEQ solves at tol 1e-10):
  mnist-fc128  Flatten -> Linear(784,128) -> DEQ(IBPMonLinear(128)) -> Linear(128,10), trained here
               for 3 epochs (Adam 1e-3, batch 100, cross-entropy, seed 0) on load_mnist5k('train')
  mnist-fc40   the same with 40 hidden units, random weights (seed 1)
  digits-conv  Conv2d(1,4,3,stride 2) -> DEQ(IBPMonConv2d(4)) -> ReLU -> AvgPool2d(2) -> Flatten
               -> Linear(16,10) on 8x8 digits, random weights (seed 2)

    python benchmarks/bench_lipschitz.py                  # full: 20 images per setting
    python benchmarks/bench_lipschitz.py --num-images 4   # quick
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn as nn


def mnist_fc(hidden, seed, train_epochs):
    from lirpa_deq.data import load_mnist5k
    from lirpa_deq.nn import DEQ, IBPMonLinear

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), DEQ(IBPMonLinear(hidden), tol=1e-6, max_iter=100),
                      nn.Linear(hidden, 10))
    if train_epochs:
        x, y = load_mnist5k("train").tensors
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for ep in range(train_epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), 100):
                idx = perm[i:i + 100]
                loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            print(f"  [train fc{hidden}] epoch {ep + 1}/{train_epochs} loss {float(loss.detach()):.3f}", flush=True)
    m = m.double().eval()
    m[2].tol, m[2].max_iter = 1e-10, 500
    return m, load_mnist5k("test")


def digits_conv(seed):
    from lirpa_deq.data import load_digits8x8
    from lirpa_deq.nn import DEQ, IBPMonConv2d

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), DEQ(IBPMonConv2d(4), tol=1e-10, max_iter=500),
                      nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)).double().eval()
    return m, load_digits8x8("test")


def run_setting(name, model, data, eps, norm, n, seed):
    from lirpa_deq.lipschitz import certify_lipschitz, lipschitz_report, margin_spec
    from lirpa_deq.lipschitz.empirical import empirical_lipschitz

    x, y = data.tensors
    x, y = x[:n].double(), y[:n]
    C = margin_spec(y, 10, x)
    rows = {}
    times = {}
    for method in ("global", "elementwise", "local"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = lipschitz_report(model, x, eps, norm, method, C)
        times[method] = (time.perf_counter() - t0) / n
        rows[method] = rep.bound
        if method == "local":
            info = rep.info
    t0 = time.perf_counter()
    lower = empirical_lipschitz(model, x, eps, C, norm, n_samples=64, steps=20, restarts=2, seed=seed)
    t_low = (time.perf_counter() - t0) / n
    out = []
    for method, b in rows.items():
        ratio = (b / lower).flatten()
        cert = ""
        if method in ("global", "local"):
            c, _ = certify_lipschitz(model, x, y, eps, norm, method)
            cert = f"{int(c.sum())}/{n}"
        out.append((name, eps, "inf" if norm == math.inf else "2", method, float(ratio.median()),
                    float(ratio.max()), float(ratio.min()), times[method], cert))
    unstable = sum(info.get("unstable", [0])) / n
    gl = float((rows["global"] / rows["local"]).median())
    return out, t_low, unstable, gl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of mnist-fc128")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lirpa_deq  # noqa: F401

    print("building models ...", flush=True)
    settings = []
    fc128 = mnist_fc(128, 0, args.epochs)
    settings += [("mnist-fc128 (trained)", *fc128, 0.01, math.inf), ("mnist-fc128 (trained)", *fc128, 0.03, math.inf),
                 ("mnist-fc128 (trained)", *fc128, 0.1, 2)]
    fc40 = mnist_fc(40, 1, 0)
    settings += [("mnist-fc40 (random)", *fc40, 0.01, math.inf)]
    conv = digits_conv(2)
    settings += [("digits-conv (random)", *conv, 0.01, math.inf), ("digits-conv (random)", *conv, 0.05, math.inf)]
    with torch.no_grad():
        x, y = fc128[1].tensors
        acc = float((fc128[0](x[:500].double()).argmax(1) == y[:500]).double().mean())
    print(f"mnist-fc128 clean accuracy on 500 test images: {acc:.3f}\n")
    header = ("| model | eps | norm | method | bound/lower median | max | min | ms/image | certified |\n"
              "|---|---|---|---|---|---|---|---|---|")
    print(header)
    extra = []
    for i, (name, model, data, eps, norm) in enumerate(settings):
        rows, t_low, unstable, gl = run_setting(name, model, data, eps, norm, args.num_images, seed=i)
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | "
                  f"{1000 * r[7]:.1f} | {r[8]} |", flush=True)
        extra.append(f"{name} eps={eps} norm={rows[0][2]}: median global/local {gl:.1f}x; "
                     f"unstable neurons per image (local region) "
                     f"{unstable:.1f}; lower bound {t_low:.2f} s/image")
    print()
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
