#!/usr/bin/env python
"""A torchdeq model, certified: the one-line change is the import of ``get_deq``.

The model is written the way torchdeq's README writes DEQs: a cell module ``f(z, u)`` with torchdeq's
weight normalization (``torchdeq.norm.apply_norm``, ``reset_norm`` at the start of ``forward``), a
DEQ layer from ``get_deq(...)`` with torchdeq's solver settings, and the call
``z_out, info = self.deq(lambda z: self.f(z, u), z0)``. Only the import changes::

    from torchdeq import get_deq                      # before: BoundedModule fails on the solver loop
    from lirpa_deq.interop.torchdeq import get_deq    # after: one certified DEQ node

The script trains the model briefly, wraps it in auto_LiRPA's ``BoundedModule``, prints which
guarantee the DEQ node proved (``box_info['guarantee']``: 'unique-fixed-point' for a proved
contraction, 'picard-limit' for the limit of torchdeq's default fixed-point iteration from zeros),
IBP / CROWN certified accuracy, and an empirical soundness check of the bounds (sampled and PGD
points; lirpa_deq.testing.check_bounds). Details: docs/existing_deq.md.

    python examples/torchdeq_model.py --quick       # embedded MNIST digits, ~20 s on 1 CPU thread
    python examples/torchdeq_model.py --eps 0.02 --epochs 5
"""
import math

import torch
import torch.nn as nn
from torchdeq.norm import apply_norm, reset_norm

import lirpa_deq
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.data import dataset_info, get_dataset
from lirpa_deq.interop.torchdeq import get_deq  # the one-line change (was: from torchdeq import get_deq)
from lirpa_deq.testing import check_bounds
from lirpa_deq.training import margin_spec
from _common import evenly_spaced, example_parser, parse_common, setup, train_naturally


class Cell(nn.Module):
    """f(z, u) = tanh(W z + u), W weight-normalized by torchdeq."""

    def __init__(self, width):
        super().__init__()
        self.W = nn.Linear(width, width)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z, u):
        return torch.tanh(self.W(z) + u)


class TorchDEQNet(nn.Module):
    def __init__(self, in_features, classes, width, max_iter):
        super().__init__()
        self.inj, self.f, self.head, self.width = nn.Linear(in_features, width), Cell(width), nn.Linear(width, classes), width
        apply_norm(self.f, "weight_norm")
        self.deq = get_deq(f_solver="fixed_point_iter", f_max_iter=max_iter, f_tol=1e-5, b_max_iter=max_iter)

    def forward(self, x):
        reset_norm(self.f)
        u = self.inj(x.flatten(1))
        z0 = torch.zeros(x.shape[0], self.width, dtype=x.dtype, device=x.device)
        z_out, info = self.deq(lambda z: self.f(z, u), z0)
        return self.head(z_out[-1])


def main():
    p = example_parser(__doc__)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 1 quick / 5)")
    p.add_argument("--eps", type=float, default=0.01, help="l_inf radius of the certificate (default 0.01)")
    p.add_argument("--num-test", type=int, default=None, help="evenly spaced test images (default 50 quick / 500)")
    args = parse_common(p)
    device = setup(args)
    info = dataset_info(args.dataset)
    train = get_dataset(args.dataset, "train", args.data_root)
    test = get_dataset(args.dataset, "test", args.data_root)
    epochs = args.epochs or (1 if args.quick else 5)
    num_test = args.num_test or (50 if args.quick else 500)
    in_features = math.prod(info.input_shape)
    model = TorchDEQNet(in_features, info.num_classes, args.width, max_iter=60).to(device)
    model = train_naturally(model, train, epochs, device, args.seed, limit=2000 if args.quick else None)
    x, y = evenly_spaced(test, num_test)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()

    bounded = BoundedModule(model, x[:1], device=str(device))
    C = margin_spec(y, info.num_classes)
    ptb = PerturbationLpNorm(norm=math.inf, eps=args.eps)  # the whole ball (no clipping to [0, 1]): a superset
    print(f"clean accuracy          {100 * clean:.1f}%")
    for method in ("IBP", "CROWN"):
        lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        lb = lb.detach()
        node = lirpa_deq.deq_nodes(bounded)[0]
        print(f"certified {method:<6}        {100 * (lb.min(1).values > 0).float().mean().item():.1f}%   "
              f"(guarantee: {node.box_info['guarantee']}, box: {node.box_info['box']})")
    # empirical soundness of the CROWN margins: sampled and PGD points of the ball, the model's own forward
    sub = slice(0, min(8, len(x)))
    C_sub = C[sub]
    margins = lambda xs: torch.einsum("bsk,bk->bs", C_sub.repeat(xs.shape[0] // len(C_sub), 1, 1), model(xs))  # noqa: E731
    report = check_bounds(margins, x[sub], args.eps, lb[sub], None, n_samples=32, pgd_steps=10)
    print(f"soundness check (CROWN margins, {report.points} points): {report.violations} violations, "
          f"worst excess {report.worst:.2e}")


if __name__ == "__main__":
    main()
