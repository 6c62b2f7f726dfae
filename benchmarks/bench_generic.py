#!/usr/bin/env python
"""Benchmark: the generic-cell path (nested auto_LiRPA) vs the specialized ReLU-affine path, on the
SAME weights, one run.

Each ReLU-affine DEQ (random IBP-MonDEQ weights) is compared with its generic twin
``DenseReLUCell.from_cell(cell)`` -- the same map relu(W z + u) written as an ordinary nn.Module --
under the same front end and head, on embedded MNIST test digits:
    fc:   Flatten -> Linear(784, 64) -> DEQ(IBPMonLinear(64)) -> Linear(64, 10)
    conv: Conv2d(1, 4, 3, stride 2, pad 1) -> DEQ(IBPMonConv2d(4)) on 4x14x14 -> Flatten -> Linear(784, 10)
          (the generic twin acts on the flattened 784-dim state with the dense W)
    convbn: Conv2d(1, 4, 3, stride 2) -> DEQ(ConvBNCell(4)) -> Flatten -> Linear (generic only: its
          time relative to the forward pass and the CROWN / IBP looseness)
Specification: the 9 margins f_y - f_j, lower bounds only. Reported per model and method:
time generic / specialized (median over --repeats different batches) and mean looseness ratio
generic / specialized (looseness = clean margin - lower bound; 1.000 = the same bound).

    python benchmarks/bench_generic.py [--eps 0.01] [--batch 16] [--repeats 3] [--threads 1]
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
from lirpa_deq.nn import DEQ, ConvBNCell, DenseReLUCell, IBPMonConv2d, IBPMonLinear
from lirpa_deq.training.losses import margin_spec


def build_pair(kind):
    torch.manual_seed(0)
    if kind == "fc":
        cell, shape = IBPMonLinear(64), None
        front, head, flat = nn.Sequential(nn.Flatten(), nn.Linear(784, 64)), nn.Linear(64, 10), nn.Identity()
    else:
        cell, shape = IBPMonConv2d(4), (4, 14, 14)
        front, head, flat = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Linear(784, 10), nn.Flatten()
    specialized = nn.Sequential(front, DEQ(cell), nn.Flatten(), head).eval()
    generic = nn.Sequential(front, flat, DEQ(DenseReLUCell.from_cell(cell, shape)), head).eval()
    return specialized, generic


def run(kind, batches, eps, methods):
    specialized, generic = build_pair(kind)
    x0 = batches[0][0]
    with torch.no_grad():
        assert torch.allclose(specialized(x0), generic(x0), atol=1e-4), "twins differ"
    rows = []
    for method in methods:
        result = {}
        for name, model in (("specialized", specialized), ("generic", generic)):
            bounded = BoundedModule(model, x0[:1])
            times, loose = [], []
            with torch.no_grad():
                bounded.compute_bounds(x=(BoundedTensor(x0[:1], PerturbationLpNorm(norm=math.inf, eps=eps)),),
                                       C=margin_spec(batches[0][1][:1], 10), method=method, bound_upper=False)
                for x, y in batches:  # different batches: no timed call hits the box cache
                    C = margin_spec(y, 10)
                    t0 = time.perf_counter()
                    lb = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),),
                                                C=C, method=method, bound_upper=False)[0]
                    times.append(time.perf_counter() - t0)
                    clean = torch.einsum("bkc,bc->bk", C, model(x))
                    loose.append((clean - lb).mean().item())
            result[name] = (statistics.median(times), statistics.mean(loose))
        (t_s, l_s), (t_g, l_g) = result["specialized"], result["generic"]
        rows.append(f"{kind:>5} {method:>6} | specialized {t_s * 1e3:8.1f} ms | generic {t_g * 1e3:8.1f} ms | "
                    f"time generic/specialized {t_g / t_s:6.2f}x | looseness generic/specialized {l_g / l_s:6.3f}")
    return rows


def run_generic_conv(batches, eps):
    """A genuinely convolutional generic cell (no specialized twin exists): ConvBNCell (spectral-
    normalized conv + eval BatchNorm + relu + conv injection) on 4x14x14 states of stride-2 digits.
    Reports IBP and CROWN time per batch relative to the forward pass and the CROWN / IBP looseness."""
    torch.manual_seed(0)
    cell = ConvBNCell(4, in_channels=4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), DEQ(cell), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 10)).eval()
    x0, y0 = batches[0]
    bounded = BoundedModule(model, x0[:1])
    ptb = lambda x: BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))  # noqa: E731
    out = {}
    with torch.no_grad():
        bounded.compute_bounds(x=(ptb(x0[:1]),), C=margin_spec(y0[:1], 10), method="IBP", bound_upper=False)
        for method in ("forward", "IBP", "CROWN"):
            times, loose = [], []
            for x, y in batches:
                C = margin_spec(y, 10)
                t0 = time.perf_counter()
                if method == "forward":
                    model(x)
                else:
                    lb = bounded.compute_bounds(x=(ptb(x),), C=C, method=method, bound_upper=False)[0]
                times.append(time.perf_counter() - t0)
                if method != "forward":
                    loose.append((torch.einsum("bkc,bc->bk", C, model(x)) - lb).mean().item())
            out[method] = (statistics.median(times), statistics.mean(loose) if loose else None)
    t_f = out["forward"][0]
    return [f"convBN generic only | forward {t_f * 1e3:7.1f} ms | IBP/fwd {out['IBP'][0] / t_f:6.1f}x | "
            f"CROWN/fwd {out['CROWN'][0] / t_f:7.1f}x | looseness CROWN/IBP {out['CROWN'][1] / out['IBP'][1]:6.3f}"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="fc,conv,convbn")
    ap.add_argument("--methods", default="IBP,CROWN")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_mnist5k("test")
    xs, ys = data.tensors if hasattr(data, "tensors") else data
    batches = [(xs[i * args.batch:(i + 1) * args.batch], ys[i * args.batch:(i + 1) * args.batch])
               for i in range(args.repeats)]
    print(f"generic vs specialized DEQ bounds, eps={args.eps}, batch {args.batch}, {args.repeats} batches, "
          f"{torch.get_num_threads()} thread(s)")
    for kind in args.models.split(","):
        rows = run_generic_conv(batches, args.eps) if kind == "convbn" else run(kind, batches, args.eps,
                                                                                 args.methods.split(","))
        for row in rows:
            print(row, flush=True)


if __name__ == "__main__":
    main()
