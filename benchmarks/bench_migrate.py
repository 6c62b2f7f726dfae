#!/usr/bin/env python
"""Benchmark: migrating a trained relu(W z + U x) DEQ with lirpa_deq.convert vs a native IBP-MonDEQ.

On the embedded MNIST-5k (4,000 train / 1,000 test), 1 CPU thread:

1. an "existing" model is trained naturally the way users write it: a plain loop
   ``for _ in range(K): z = relu(W z + U x)`` (backprop through the loop), Flatten -> loop -> Linear;
2. its weights go into ``DEQ(ReluCell)`` (the loop body as a cell, fixed-point iteration) and
   ``lirpa_deq.convert`` migrates it to IBPMonLinear + a certified (IBP) fine-tune of ``--tune-epochs``;
3. a native model of the same shape (Linear(784, n) -> DEQ(IBPMonLinear(n, similarity=True)) ->
   Linear) is trained with the same certified recipe for the same TOTAL epochs
   (``--natural-epochs + --tune-epochs``).

Prints clean accuracy and IBP / CROWN certified accuracy at ``--eps`` of each. Target: the migrated
model within 5 points of the native one.

    python benchmarks/bench_migrate.py            # the documented run
    python benchmarks/bench_migrate.py --quick    # a smoke run (small subsets)
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lirpa_deq
from lirpa_deq.data import load_mnist5k
from lirpa_deq.migrate import _fine_tune
from lirpa_deq.nn import DEQ, IBPMonLinear
from lirpa_deq.training.evaluate import certify_bounds


class ReluCell(nn.Module):
    """The loop body relu(W z + U x) as a DEQ cell."""

    def __init__(self, n, m):
        super().__init__()
        self.W, self.U, self.n = nn.Linear(n, n), nn.Linear(m, n), n

    def forward(self, z, x):
        return torch.relu(self.W(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.n)


class Loop(nn.Module):
    """The plain-loop model: K unrolled iterations of the body."""

    def __init__(self, n, steps):
        super().__init__()
        self.cell, self.steps, self.head = ReluCell(n, 784), steps, nn.Linear(n, 10)

    def forward(self, x):
        x = x.flatten(1)
        z = x.new_zeros(x.shape[0], self.cell.n)
        for _ in range(self.steps):
            z = self.cell(z, x)
        return self.head(z)


def train_natural(model, x, y, epochs, lr=1e-3, batch=64):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def rates(model, x, y, eps):
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    out = {"clean": clean}
    for method in ("IBP", "CROWN"):
        try:
            out[method] = float(certify_bounds(model, x, y, eps, method=method)[0].float().mean())
        except lirpa_deq.ContractionError as err:
            out[method] = f"refused ({err.reason})"
    return out


def fmt(r):
    return "  ".join(f"{k} {100 * v:5.1f}%" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--natural-epochs", type=int, default=5)
    p.add_argument("--tune-epochs", type=float, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr = load_mnist5k("train").tensors
    xte, yte = load_mnist5k("test").tensors
    if a.quick:
        xtr, ytr, xte, yte = xtr[::8], ytr[::8], xte[::10], yte[::10]
        a.natural_epochs, a.tune_epochs = 1, 1
    t0 = time.time()
    loop = train_natural(Loop(a.width, a.steps), xtr, ytr, a.natural_epochs)
    W = loop.cell.W.weight.detach()
    print(f"plain loop: clean {100 * float((loop(xte).argmax(1) == yte).float().mean()):.1f}%, ||W||_2 = "
          f"{float(torch.linalg.matrix_norm(W, ord=2)):.2f}, rho(|W|) = {float(torch.linalg.eigvals(W.abs()).abs().max()):.2f}"
          f" ({time.time() - t0:.0f} s)")
    deq = nn.Sequential(nn.Flatten(), DEQ(loop.cell, solver="fixed_point_iter", max_iter=a.steps,
                                          on_nonconvergence="ignore"), loop.head).eval()
    print("as DEQ(ReluCell, fixed_point_iter):", fmt(rates(deq, xte, yte, a.eps)))
    t0 = time.time()
    report = lirpa_deq.convert(deq, train=(xtr, ytr), test=(xte, yte), eps=a.eps, epochs=a.tune_epochs,
                               certify=("IBP", "CROWN"), log=None)
    print(f"RESULT migrated: {report}")
    total = a.natural_epochs + a.tune_epochs
    t0 = time.time()
    native = nn.Sequential(nn.Flatten(), nn.Linear(784, a.width), DEQ(IBPMonLinear(a.width, similarity=True)),
                           nn.Linear(a.width, 10))
    _fine_tune(native, (xtr, ytr), a.eps, total, "ibp", 1e-3, 64, 0.5, 10, None)
    print(f"RESULT native IBPMonLinear, {total:g} certified epochs: {fmt(rates(native, xte, yte, a.eps))} "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
