#!/usr/bin/env python
"""Benchmark: how tight and how fast CROWN through the DEQ node is, against auto_LiRPA on the SAME
weights unrolled as an explicit network, and what it certifies on trained models. One run.

Part 1 (tightness, l_inf eps in --eps, the 9 margins f_y - f_j of --batch embedded MNIST test
digits): mean margin width (upper - lower bound) and median wall-clock per call of
  * IBP                                   (the DEQ node's proved interval box)
  * DEQ-CROWN                             (default options: the box's relaxation)
  * DEQ-CROWN refined                     (bound_opts['deq']['crown_refine'] = 2)
  * DEQ-alpha-CROWN                       (CROWN-Optimized, crown_refine = 2, the DEQ's slopes optimized)
  * unrolled CROWN / unrolled alpha-CROWN (auto_LiRPA on z_{k+1} = relu(W z_k + u), z_0 = 0, K
    steps, K the first count with max |z_K - z*| <= 1e-6 on the clean batch)
for fc (Linear(784, 64) -> DEQ(IBPMonLinear(64)) -> Linear) and conv (Conv(1, 4, 3, stride 2) ->
DEQ(IBPMonConv2d(4)) on 14x14 -> Linear) IBP-MonDEQs, random (seed 0) and trained.

Part 2 (certified accuracy on --cert-n test digits, clipped to [0, 1]): fc models trained
naturally, with PGD (own loop below) and with CROWN-IBP (lirpa_deq.training.Trainer); IBP,
DEQ-CROWN refined (intersected with IBP) and DEQ-alpha-CROWN (intersected with IBP) at --cert-eps.

    python benchmarks/bench_tightness.py [--batch 4] [--eps 0.005 0.01 0.02 0.05] [--quick]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lirpa_deq  # noqa: F401
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.data import load_mnist5k
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear
from lirpa_deq.training import TrainConfig, Trainer
from lirpa_deq.training.losses import margin_spec, perturbation

REFINED = {"crown_refine": 2}
MATRIX = {"conv_mode": "matrix"}  # auto_LiRPA 0.3's patches mode cannot multiply by the unrolled conv scalings


def fc_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), DEQ(IBPMonLinear(64), tol=1e-6, max_iter=100),
                         nn.Linear(64, 10))


def conv_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), DEQ(IBPMonConv2d(4), tol=1e-6, max_iter=100),
                         nn.Flatten(), nn.Linear(4 * 14 * 14, 10))


class Unrolled(nn.Module):
    """The DEQ of ``model`` (index 1 conv, 2 fc) as K explicit steps z <- relu(W z + u) from z = 0,
    W the cell's operator frozen at its current weights."""

    def __init__(self, model, steps):
        super().__init__()
        at = next(i for i, m in enumerate(model) if isinstance(m, DEQ))
        self.pre, self.post, self.steps = model[:at], model[at + 1:], steps
        op = model[at].cell.operator()
        with torch.no_grad():
            if isinstance(model[at].cell, IBPMonLinear):
                n = model[at].cell.n
                self.conv = None
                self.register_buffer("W", op.W(torch.eye(n, dtype=op.matrix.dtype)).T.clone())
            else:
                self.conv = True
                r, c = op.scales(14, 14)  # (computed in the cell's dtype)
                self.register_buffer("K", op.K.detach().clone())
                self.register_buffer("r", r.detach().clone().expand(1, *r.shape[1:]).contiguous())
                self.register_buffer("c", c.detach().clone().expand(1, *c.shape[1:]).contiguous())

    def _W(self, z):
        if self.conv is None:
            return F.linear(z, self.W)
        return self.r * F.conv2d(self.c * z, self.K, padding=1)

    def forward(self, x):
        u = self.pre(x)
        z = torch.relu(u)
        for _ in range(self.steps - 1):
            z = torch.relu(self._W(z) + u)
        return self.post(z)


def unroll_steps(model, x, tol=1e-6, limit=400):
    """The first K with max |z_K - z*| <= tol on x, in float64; z* is the limit of the same
    iteration (a contraction for IBP-MonDEQ cells: rho(|W|) <= 1 - m), run until it stalls."""
    import copy
    twin = copy.deepcopy(model).double()
    at = next(i for i, m in enumerate(twin) if isinstance(m, DEQ))
    step = Unrolled(twin, 1).double()
    with torch.no_grad():
        u = twin[:at](x.double())
        z = torch.relu(u)
        path = [z]
        for _ in range(4 * limit):
            z = torch.relu(step._W(z) + u)
            path.append(z)
            if float((path[-1] - path[-2]).abs().max()) <= 1e-14:
                break
        for k, zk in enumerate(path, start=1):
            if float((zk - z).abs().max()) <= tol:
                return k
    return limit


def timed_bounds(model, batches, method, bound_opts, eps):
    """(mean width, median seconds, lower bounds of the first batch) over DIFFERENT batches (the
    DEQ node caches its box per input box), one BoundedModule."""
    x0, _ = batches[0]
    bm = BoundedModule(model, x0, bound_opts=bound_opts)
    widths, times = [], []
    for x, y in batches:
        bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
        t0 = time.perf_counter()
        lb, ub = bm.compute_bounds(x=(bx,), C=margin_spec(y, 10), method=method)
        times.append(time.perf_counter() - t0)
        widths.append(float((ub - lb).detach().mean()))
    return statistics.mean(widths), statistics.median(times)


def tightness(name, model, batches, eps_list, iters, unrolled_alpha):
    model.eval()
    K = max(unroll_steps(model, x) for x, _ in batches)
    un = Unrolled(model, K).eval()
    with torch.no_grad():
        err = float((un(batches[0][0]) - model(batches[0][0])).abs().max())
    print(f"\n{name}: unrolled K = {K} steps (max |z_K - z*| <= 1e-6 in float64; |logit difference| to the "
          f"DEQ's own solve {err:.1e})")
    opt = {"optimize_bound_args": {"iteration": iters}}
    rows = [("IBP", model, "IBP", None), ("DEQ-CROWN", model, "CROWN", None),
            ("DEQ-CROWN refined", model, "CROWN", {"deq": REFINED}),
            ("DEQ-alpha-CROWN", model, "CROWN-Optimized", {"deq": REFINED, **opt}),
            ("unrolled CROWN", un, "CROWN", MATRIX)]
    if unrolled_alpha:
        rows.append(("unrolled alpha-CROWN", un, "CROWN-Optimized", {**opt, **MATRIX}))
    print("| eps | " + " | ".join(r[0] for r in rows) + " | refined / unrolled CROWN | alpha / refined"
          " | time unrolled CROWN / refined |")
    print("|---" * (len(rows) + 4) + "|")
    for eps in eps_list:
        res = {}
        for label, net, method, opts in rows:
            try:
                res[label] = timed_bounds(net, batches, method, opts, eps)
            except Exception as exc:  # noqa: BLE001 - reported, e.g. auto_LiRPA 0.3's sparse alpha crash
                res[label] = (math.nan, math.nan)
                print(f"  ({label} at eps {eps}: {type(exc).__name__}: {str(exc)[:80]})")
        cells = [f"{res[r[0]][0]:.4f} ({res[r[0]][1]:.2f} s)" for r in rows]
        ratio = res["DEQ-CROWN refined"][0] / res["unrolled CROWN"][0]
        alpha = res["DEQ-alpha-CROWN"][0] / res["DEQ-CROWN refined"][0]
        speed = res["unrolled CROWN"][1] / res["DEQ-CROWN refined"][1]
        print(f"| {eps:g} | " + " | ".join(cells) + f" | {ratio:.3f} | {alpha:.3f} | {speed:.1f}x |")


# ------------------------------------------------------------------------------- training
def train_natural_or_pgd(model, data, epochs, eps=0.0, pgd_steps=0, lr=1e-3, seed=0):
    """Adam on cross-entropy; with pgd_steps > 0 on PGD points of the eps ball (clipped to [0, 1])."""
    torch.manual_seed(seed)
    X, Y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(Y))
        for i in range(0, len(Y), 64):
            x, y = X[perm[i:i + 64]], Y[perm[i:i + 64]]
            if pgd_steps:
                delta = (torch.rand_like(x) * 2 - 1) * eps
                for _ in range(pgd_steps):
                    delta.requires_grad_(True)
                    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta = (delta.detach() + 2.5 * eps / pgd_steps * grad.sign()).clamp(-eps, eps)
                x = (x + delta).clamp(0, 1).detach()
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def train_crown_ibp(epochs, eps, num_train):
    cfg = TrainConfig(model="fc-deq", model_kwargs={"width": 64}, method="crown-ibp", eps_train=eps, epochs=epochs,
                      warmup_epochs=0.5, ramp_epochs=max(0.5, epochs - 1.5), num_train=num_train, batch_size=64)
    trainer = Trainer(cfg, log=None)
    trainer.train(progress=False)
    return trainer.model.eval()


def certified(model, x, y, eps, iters):
    """Certified accuracy (%) by IBP, refined DEQ-CROWN and DEQ-alpha-CROWN (each intersected with IBP)."""
    out = {}
    ptb = perturbation(x, eps)
    C = margin_spec(y, 10)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    bm = BoundedModule(model, x[:1], bound_opts={"deq": REFINED, "optimize_bound_args": {"iteration": iters}})
    t0 = time.perf_counter()
    ilb, _ = bm.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="IBP", bound_upper=False)
    times = {"IBP": time.perf_counter() - t0}
    best = ilb.detach()
    out["IBP"] = best
    for label, method in (("CROWN", "CROWN"), ("alpha-CROWN", "CROWN-Optimized")):
        t0 = time.perf_counter()
        lb, _ = bm.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        times[label] = time.perf_counter() - t0
        best = torch.maximum(best, lb.detach())
        out[label] = best
    return {k: 100 * float(((v.min(1).values > 0) & correct).float().mean()) for k, v in out.items()}, \
        100 * float(correct.float().mean()), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="different batches per timing")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--alpha-iters", type=int, default=20)
    ap.add_argument("--cert-n", type=int, default=200)
    ap.add_argument("--cert-eps", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fc only, one eps, short training")
    ap.add_argument("--conv-alpha", action="store_true", help="also unrolled alpha-CROWN on the conv model (slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, Y = load_mnist5k("test").tensors
    Xtr, Ytr = load_mnist5k("train").tensors
    b = args.batch
    batches = [(X[i * 97:i * 97 + b], Y[i * 97:i * 97 + b]) for i in range(args.repeats)]
    eps_list = args.eps[:1] if args.quick else args.eps

    torch.manual_seed(0)
    fc = fc_model()
    tightness("fc random", fc, batches, eps_list, args.alpha_iters, unrolled_alpha=True)
    if not args.quick:
        torch.manual_seed(0)
        tightness("conv random", conv_model(), batches, eps_list, args.alpha_iters, unrolled_alpha=args.conv_alpha)

    # trained models (the same weights serve part 1 and part 2)
    epochs = 1 if args.quick else args.epochs
    keep = torch.linspace(0, len(Ytr) - 1, 2000).round().long()
    data = (Xtr[keep], Ytr[keep])
    t0 = time.process_time()
    torch.manual_seed(0)
    natural = train_natural_or_pgd(fc_model(), data, epochs)
    torch.manual_seed(0)
    pgd = train_natural_or_pgd(fc_model(), data, epochs, eps=0.05, pgd_steps=5)
    crown_ibp = train_crown_ibp(epochs, 0.05, 2000)
    print(f"\ntraining CPU time {time.process_time() - t0:.0f} s ({epochs} epochs on 2,000 digits each)")
    for name, model in (("fc natural", natural), ("fc CROWN-IBP-trained", crown_ibp)):
        for m in model.modules():
            if isinstance(m, DEQ):
                m.tol, m.max_iter = 1e-6, 100
        tightness(name, model, batches, eps_list[:2], args.alpha_iters, unrolled_alpha=False)
    if not args.quick:
        torch.manual_seed(0)
        conv = train_natural_or_pgd(conv_model(), data, 1)
        tightness("conv natural", conv, batches, eps_list[:2], args.alpha_iters, unrolled_alpha=False)

    n = min(args.cert_n, len(Y))
    pick = torch.linspace(0, len(Y) - 1, n).round().long()
    xc, yc = X[pick], Y[pick]
    print(f"\ncertified accuracy (%) on {n} test digits; columns IBP / DEQ-CROWN refined / DEQ-alpha-CROWN")
    print("| model | clean | eps | IBP | CROWN | alpha-CROWN | seconds (IBP / CROWN / alpha) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in (("natural", natural), ("PGD (eps 0.05)", pgd), ("CROWN-IBP (eps 0.05)", crown_ibp)):
        for eps in (args.cert_eps[:1] if args.quick else args.cert_eps):
            acc, clean, times = certified(model, xc, yc, eps, args.alpha_iters)
            t = " / ".join(f"{times[k]:.1f}" for k in ("IBP", "CROWN", "alpha-CROWN"))
            print(f"| {name} | {clean:.1f} | {eps:g} | {acc['IBP']:.1f} | {acc['CROWN']:.1f} | {acc['alpha-CROWN']:.1f} | {t} |")


if __name__ == "__main__":
    main()
