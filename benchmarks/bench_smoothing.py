#!/usr/bin/env python
"""Benchmark: plain randomized smoothing (converged DEQ solves) vs Serialized RS (1 and 3 steps), with
the agreement certificate (srs-k) and the audit correction (srs-k-aud) in the same run.

On the embedded MNIST-5k test split with a fully connected MonDEQ (MonLinear(256), m = 0.2, Anderson,
tol 1e-4: ~30 iterations per converged solve; trained here for 1 epoch with Gaussian noise
augmentation, one model per sigma, unless --checkpoint is given), for every sigma
and method it reports: seconds per image, DEQ solver iterations (per batch call, summed, and
"row-iterations" = iterations x active batch rows), the SRS statistics, and certified accuracy at
radii 0, 0.25, 0.5, 0.75, 1.0 -- then the speed ratios against plain smoothing.

    python benchmarks/bench_smoothing.py --threads 1 --num-images 100   # the documented run (~20 min)
    python benchmarks/bench_smoothing.py --n 2000 --num-images 10   # quick

Requires ``lirpa_deq.nn`` (DEQ, IBPMonLinear, serial_warm_start).  Not a test.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_model(hidden: int, tol: float, max_iter: int, margin: float, device, cell="mon"):
    from lirpa_deq.nn import DEQ, IBPMonLinear, MonLinear

    c = MonLinear(hidden, m=margin) if cell == "mon" else IBPMonLinear(hidden, m=margin)
    deq = DEQ(c, solver="anderson", tol=tol, max_iter=max_iter)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, hidden), deq,
                               torch.nn.Linear(hidden, 10)).to(device)


def train(model, data, sigma, epochs, device, seed):
    """Gaussian-augmentation training (Cohen et al.): Adam, batch 128, noise N(0, sigma^2)."""
    x, y = data.tensors
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        tot = 0.0
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            xb = x[idx].to(device)
            xb = xb + sigma * torch.randn(xb.shape, generator=g).to(device)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        print(f"  [train sigma={sigma}] epoch {ep + 1}/{epochs} loss {tot / len(y):.3f}", flush=True)
    model.eval()
    return model


class IterCounter:
    """Forward hook on every DEQ: sums solver iterations (per call, and times batch rows)."""

    def __init__(self, model):
        from lirpa_deq.nn import deq_modules

        self.calls = self.iters = self.row_iters = 0
        self.handles = [m.register_forward_hook(self._hook) for m in deq_modules(model)]

    def _hook(self, mod, inp, out):
        k = mod.last_stats.iterations
        self.calls += 1
        self.iters += k
        self.row_iters += k * out.shape[0]


def certified_accuracy(results, labels):
    out = []
    for r in RADII:
        ok = [(c == y) and (rad >= r if r > 0 else c != -1) for (c, rad), y in zip(results, labels)]
        out.append(float(np.mean(ok)))
    return out


def run_methods(methods, model, xs, ys, args):
    """Certify every image with every method, interleaved per image (so that machine-load
    fluctuations hit all methods alike). Returns one summary dict per method."""
    counter = IterCounter(model)
    stats = {name: {"time": [], "iters": 0, "row_iters": 0, "calls": 0, "results": [], "audit": [], "uncert": []}
             for name, _ in methods}
    for i, x in enumerate(xs):
        for name, smoother in methods:
            st = stats[name]
            c0, k0, r0 = counter.calls, counter.iters, counter.row_iters
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = smoother.certify_detailed(x, args.n0, args.n, args.alpha, args.batch_size, seed=args.seed + i)
            if x.is_cuda:
                torch.cuda.synchronize()
            st["time"].append(time.perf_counter() - t0)
            st["calls"] += counter.calls - c0
            st["iters"] += counter.iters - k0
            st["row_iters"] += counter.row_iters - r0
            st["results"].append(res.as_tuple())
            if "solver_iterations" in res.extra:  # agreement SRS calls the solver directly
                st["calls"] += res.extra["solver_calls"]
                st["iters"] += res.extra["solver_iterations"]
                st["row_iters"] += res.extra["row_iterations"]
                st["audit"].append(res.extra["uncertain_fast"] / args.n)
                st["uncert"].append(res.extra["uncertified"] / args.n)
            if "audit_disagree" in res.extra:
                st["audit"].append(res.extra["audit_disagree"] / res.extra["audit_size"])
    for h in counter.handles:
        h.remove()
    return [{"name": name, "sec_per_image": float(np.mean(st["time"])),
             "median_sec": float(np.median(st["time"])), "iters": st["iters"], "row_iters": st["row_iters"],
             "calls": st["calls"], "acc": certified_accuracy(st["results"], ys),
             "audit_disagree": float(np.mean(st["audit"])) if st["audit"] else None,
             "uncertified": float(np.mean(st["uncert"])) if st["uncert"] else None}
            for name, st in stats.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="estimation samples per image")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 3])
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--audit-size", type=int, default=400)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--cell", choices=["mon", "ibp"], default="mon", help="MonLinear or IBPMonLinear cell")
    p.add_argument("--certificates", choices=["agreement", "audit"], nargs="+", default=["agreement", "audit"],
                   help="SRS corrections to run (each with every --steps)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--margin", type=float, default=0.2, help="monotonicity margin m of the cell")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint", default=None,
                   help="state_dict for the --hidden architecture (used for every sigma instead of training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing stability)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    try:
        import lirpa_deq.nn  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench_smoothing needs lirpa_deq.nn ({exc})")
    from lirpa_deq.data import load_mnist5k
    from lirpa_deq.smoothing import SerializedSmooth, Smooth

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_mnist5k("test")
    # every 1000/num_images-th test digit: a class-mixed, deterministic subset
    idx = np.linspace(0, len(test) - 1, args.num_images).round().astype(int)
    xs = [test.tensors[0][i].to(device) for i in idx]
    ys = [int(test.tensors[1][i]) for i in idx]
    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} n={args.n} n0={args.n0} "
          f"images={len(xs)} (test indices {idx[0]}..{idx[-1]}, evenly spaced) alpha={args.alpha} batch={args.batch_size} audit={args.audit_size} "
          f"cell={args.cell} hidden={args.hidden} m={args.margin} epochs={args.epochs} solver=anderson tol={args.tol} max_iter={args.max_iter}", flush=True)

    rows = []
    for sigma in args.sigmas:
        torch.manual_seed(args.seed)
        model = build_model(args.hidden, args.tol, args.max_iter, args.margin, device, args.cell)
        if args.checkpoint:
            model.load_state_dict(torch.load(args.checkpoint, map_location=device))
            model.eval()
        else:
            train(model, load_mnist5k("train"), sigma, args.epochs, device, args.seed)
        methods = [("plain", Smooth(model, 10, sigma))]
        methods += [(f"srs-{k}" + ("" if cert == "agreement" else "-aud"),
                     SerializedSmooth(model, 10, sigma, steps=k, audit_size=args.audit_size, certificate=cert))
                    for cert in args.certificates for k in args.steps]
        for r in run_methods(methods, model, xs, ys, args):
            r["sigma"] = sigma
            rows.append(r)
            print(f"  sigma={sigma} {r['name']}: {r['sec_per_image']:.3f} s/img (median {r['median_sec']:.3f})",
                  flush=True)

    print(f"\n# {len(xs)} test images, n={args.n}; srs-k = agreement certificate, srs-k-aud = audit (K={args.audit_size}); "
          "'fast-unc' = agreement: samples that needed more than k iterations, audit: disagreement rate on the "
          "audited samples; 'uncert' = agreement samples whose label was not settled")
    print("sigma  method      s/img   speedup  solver calls  iters  row-iters   row-it ratio  fast-unc  uncert  "
          + "  ".join(f"acc@{r:g}" for r in RADII))
    for r in rows:
        base = next(b for b in rows if b["sigma"] == r["sigma"] and b["name"] == "plain")
        dis = "-" if r["audit_disagree"] is None else f"{r['audit_disagree']:.4f}"
        unc = "-" if r["uncertified"] is None else f"{r['uncertified']:.4f}"
        print(f"{r['sigma']:<5}  {r['name']:<10}  {r['sec_per_image']:.3f}  {base['sec_per_image'] / r['sec_per_image']:6.2f}x"
              f"  {r['calls']:12d}  {r['iters']:5d}  {r['row_iters']:9d}  {r['row_iters'] / base['row_iters']:12.3f}"
              f"  {dis:>8}  {unc:>6}  " + "  ".join(f"{a:7.2f}" for a in r["acc"]))


if __name__ == "__main__":
    main()
