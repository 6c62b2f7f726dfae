#!/usr/bin/env python
"""Certify a DEQ whose cell YOU wrote: any ``nn.Module`` with ``forward(z, x) -> z``.

``lirpa_deq.nn.DEQ`` accepts any cell built from layers auto_LiRPA supports (conv, linear,
BatchNorm in eval mode, relu / tanh / sigmoid, residual adds, several injections of x). Its
fixed point becomes ONE auto_LiRPA node that is bounded by a nested auto_LiRPA module over (z, x):

* IBP: the interval map of the cell is iterated to a PROVED post-fixpoint (or the contraction
  ball is used); uniqueness of the fixed point comes from a proved contraction of the cell in z,
* CROWN: CROWN of the cell over that box (return_A) plus an adjoint fixed point.

The contraction constant L < 1 is COMPUTED from the weights (an l2 Lipschitz bound composed over
the cell's graph) or DECLARED by you (``lirpa_deq.nn.declare_contraction(cell, L)``, checked
against a sampled Jacobian norm). A cell that is not a proved contraction gets a clear
``ContractionError`` instead of a bound. Details: docs/generic.md.

The cell below: z_next = relu(skip * z + gain * conv(z) + inj(x)), where conv is spectral-
normalized with torch's parametrization (||reshaped kernel||_2 = 1, so ||conv||_2 <= 3 for a 3x3
kernel) and inj downsamples x by 2 -- so the state has its own shape (``state_shape``), and
L <= skip + 3 * gain = 0.9 by construction.

    python examples/custom_cell.py --quick                 # embedded MNIST digits, < 1 min on 1 CPU thread
    python examples/custom_cell.py --eps 0.02 --epochs 5
    python examples/custom_cell.py --data-root ~/data --dataset cifar10
"""
import math
import time

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA; import it first)
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.data import dataset_info, get_dataset
from lirpa_deq.nn import DEQ, ContractionError
from lirpa_deq.testing import pgd_extremes
from lirpa_deq.training import margin_spec
from _common import evenly_spaced, example_parser, parse_common, setup, train_naturally


class MyCell(nn.Module):
    """z_next = relu(skip * z + gain * conv(z) + inj(x)); z: (B, C, H/2, W/2), x: (B, Cx, H, W)."""

    def __init__(self, in_channels, channels=4, skip=0.3, gain=0.2):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.inj = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1)
        self.skip, self.gain, self.channels = skip, gain, channels

    def forward(self, z, x):
        return torch.relu(self.skip * z + self.gain * self.conv(z) + self.inj(x))

    def state_shape(self, x_shape):  # z differs from x in shape: tell the DEQ
        return (x_shape[0], self.channels, (x_shape[2] + 1) // 2, (x_shape[3] + 1) // 2)


def parse_args(argv=None):
    p = example_parser(__doc__)
    p.add_argument("--eps", type=float, default=0.005, help="l_inf radius in [0, 1] pixel units (default 0.005)")
    p.add_argument("--num-images", type=int, default=None, help="test images to certify (default 20 quick / 100)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 2 quick / 5)")
    p.add_argument("--channels", type=int, default=4, help="state channels of the cell (default 4)")
    args = parse_common(p, argv)
    args.num_images = args.num_images or (20 if args.quick else 100)
    args.epochs = args.epochs or (2 if args.quick else 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    info = dataset_info(args.dataset)
    c, h, w = info.input_shape
    cell = MyCell(c, args.channels)
    state = args.channels * ((h + 1) // 2) * ((w + 1) // 2)
    model = nn.Sequential(DEQ(cell, solver="anderson", tol=1e-4, max_iter=100), nn.Flatten(),
                          nn.Linear(state, info.num_classes)).to(device)

    train = get_dataset(args.dataset, "train", args.data_root)
    t0 = time.time()
    print(f"training DEQ(MyCell) naturally for {args.epochs} epoch(s)")
    train_naturally(model, train, args.epochs, device, args.seed, lr=3e-3, batch_size=100,
                    limit=2000 if args.quick else None)
    print(f"  trained in {time.time() - t0:.1f} s")

    x, y = evenly_spaced(get_dataset(args.dataset, "test", args.data_root), args.num_images)
    x, y = x.to(device), y.to(device)

    bounded = BoundedModule(model, torch.zeros_like(x[:1]), device=str(device))
    ptb = PerturbationLpNorm(norm=math.inf, eps=args.eps, x_L=(x - args.eps).clamp(0, 1),
                             x_U=(x + args.eps).clamp(0, 1))
    C = margin_spec(y, info.num_classes)
    with torch.no_grad():
        pred = model(x).argmax(1)
    rows = {}
    for method in ("IBP", "CROWN"):
        t0 = time.time()
        lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        rows[method] = ((lb.min(1).values > 0) & (pred == y), time.time() - t0)
    node = lirpa_deq.deq_nodes(bounded)[0]  # the DEQ's auto_LiRPA node: what was proved, and how
    print(f"\ncontraction of MyCell in z: L = {node.box_info['lipschitz']:.3f} ({node.box_info['lipschitz_source']}); "
          f"box: {node.box_info['box']}")

    # an empirical upper bound on robust accuracy: PGD on the worst margin
    f = lambda v: torch.einsum("bkc,bc->bk", C.repeat(v.shape[0] // x.shape[0], 1, 1), model(v))  # noqa: E731
    lo_pts, _ = pgd_extremes(f, x, args.eps, steps=10)
    with torch.no_grad():
        worst = f(lo_pts.reshape(-1, *x.shape[1:]).clamp(0, 1)).reshape(-1, len(y), len(C[0])).min(-1).values
    pgd_ok = (worst.min(0).values > 0) & (pred == y)

    n = len(y)
    print(f"\nl_inf eps={args.eps}, {n} {args.dataset} test images")
    print(f"{'':<28}{'accuracy':>10}{'s/batch':>10}")
    print(f"{'clean accuracy':<28}{100 * float((pred == y).float().mean()):>9.1f}%")
    print(f"{'PGD accuracy (upper bound)':<28}{100 * float(pgd_ok.float().mean()):>9.1f}%")
    for method, (ok, secs) in rows.items():
        print(f"{'certified ' + method:<28}{100 * float(ok.float().mean()):>9.1f}%{secs:>10.2f}")

    # what a non-contractive cell gets: an error that says why, not a number
    loose = MyCell(c, args.channels, skip=0.5, gain=0.5).to(device)
    probe = nn.Sequential(DEQ(loose, max_iter=5, on_nonconvergence="ignore"), nn.Flatten(),
                          nn.Linear(state, info.num_classes)).to(device).eval()
    try:
        BoundedModule(probe, x[:1]).compute_bounds(x=(BoundedTensor(x[:1], ptb),), method="IBP")
    except ContractionError as err:
        print(f"\na cell with skip=0.5, gain=0.5 is refused:\n  ContractionError: {str(err)[:160]}...")


if __name__ == "__main__":
    main()
