"""Migrating a trained ``relu(W z + U x)`` DEQ to IBP-MonDEQ cells: :func:`convert`.

A DEQ trained with an unconstrained ``W`` is usually not a proved contraction (``ContractionError``)
and its interval map expands (``rho(|W|) > 1``), so neither the generic bounds nor the Picard
containment apply. :func:`convert` moves each such layer into the parameterization closest to its
weights for which bounds are proved by construction:

1. **Fit.** ``IBPMonLinear(n, m, similarity=True)`` has ``W(M, s) = S^-1 D^-1/2 M D^-1/2 S`` with
   ``rho(|W|) <= 1 - m`` for EVERY ``M, s``; ``M, s`` are fitted by Adam to minimise
   ``||W(M, s) - W_old||_F`` from ``M = W_old, s = 0`` (``fit_error`` is the relative error left).
   The injection keeps its weights: ``u = U(x) + b`` (``b`` the bias of the z-layer).
2. **Certified fine-tune** (optional): a few epochs of IBP training (eps ramped from 0, natural
   loss weight from 1 to ``kappa_final``; ``lirpa_deq.training.certified_loss``).
3. **Report**: clean accuracy of the original, converted and fine-tuned model, and the certified
   rate of the result at ``eps`` (``ConversionReport``).

Recognised layers: a :class:`lirpa_deq.nn.DEQ` whose cell computes ``relu(L(z) + R(x))`` with ``L``
an ``nn.Linear(n, n)`` child (or an ``(n, n)`` parameter ``W``: ``z @ W.T``) and ``R`` another child
module (or the identity, when the cell adds x itself); which children play the roles is found by
checking ``cell(z, x)`` at random points, or named with ``z_linear=`` / ``injection=``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn as nn

from .nn import DEQ, IBPMonLinear
from .training.evaluate import certify_bounds
from .training.losses import certified_loss, make_bounded, sync_buffers


class ConversionError(ValueError):
    """A layer that :func:`convert` cannot migrate (the message says which form it expects)."""


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did. Accuracies / certified rates are fractions in [0, 1] (None when no
    test data was given); ``certified`` maps a method ('IBP', 'CROWN') to its certified rate at ``eps``."""

    model: nn.Module
    layers: list
    fit_error: dict
    accuracy_before: float | None
    accuracy_converted: float | None
    accuracy_after: float | None
    certified: dict
    eps: float
    epochs: float
    seconds: float

    def __str__(self):
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        cert = ", ".join(f"{k} {pct(v)}" for k, v in self.certified.items()) or "not measured"
        fit = ", ".join(f"{k}: {v:.3f}" for k, v in self.fit_error.items())
        return (f"converted {self.layers} (relative fit error {fit}); clean accuracy {pct(self.accuracy_before)} -> "
                f"{pct(self.accuracy_converted)} after the fit -> {pct(self.accuracy_after)} after {self.epochs:g} "
                f"epoch(s) of certified fine-tuning; certified at eps={self.eps:g}: {cert} ({self.seconds:.0f} s)")


class _Injection(nn.Module):
    """u = R(x) + b: the cell's x-term and the z-layer's bias, as the explicit layer before the DEQ."""

    def __init__(self, term, bias):
        super().__init__()
        self.term = term if term is not None else nn.Identity()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x):
        u = self.term(x)
        return u + self.bias if self.bias is not None else u


def _z_layers(cell):
    """[(name, weight (n, n), bias or None)] candidates for the z-layer of a cell."""
    out = [(name, m.weight, m.bias) for name, m in cell.named_children()
           if isinstance(m, nn.Linear) and m.in_features == m.out_features]
    out += [(name, p, None) for name, p in cell.named_parameters(recurse=False) if p.dim() == 2 and p.shape[0] == p.shape[1]]
    return out


def _matches(cell, weight, bias, term, x, z):
    with torch.no_grad():
        pre = z @ weight.t() + (term(x) if term is not None else x)
        if bias is not None:
            pre = pre + bias
        want, got = torch.relu(pre), cell(z, x)
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))


def _decompose(cell, x, z_linear=None, injection=None):
    """(z-layer name, W, b, injection module or None) of a relu(L(z) + R(x)) cell, checked at random points."""
    candidates = [c for c in _z_layers(cell) if z_linear is None or c[0] == z_linear]
    terms = [(name, m) for name, m in cell.named_children() if injection is None or name == injection]
    if injection is None:
        terms.append(("identity", None))
    gen = torch.Generator(device=x.device).manual_seed(0)
    for name, weight, bias in candidates:
        n = weight.shape[0]
        z = torch.randn((x.shape[0], n), generator=gen, dtype=x.dtype, device=x.device)
        for term_name, term in terms:
            if term is not None and term is getattr(cell, name, None):
                continue  # the z-layer is not the x-term
            try:
                if _matches(cell, weight, bias, term, x, z) and _matches(cell, weight, bias, term, x, 3 * z):
                    return name, weight, bias, term
            except RuntimeError:  # shapes that do not fit this split
                continue
    raise ConversionError(f"{type(cell).__name__} is not recognised as relu(L(z) + R(x)): convert needs an nn.Linear(n, n) "
                          "child L acting on z (or an (n, n) parameter W used as z @ W.T) and a child R applied to x "
                          "(or x added as is), with cell(z, x) == relu(L(z) + R(x)); name them with "
                          "z_linear='...' / injection='...' if the search misses them")


def fit_ibp_monotone(weight, margin=0.5, similarity=True, steps=400, lr=0.05):
    """An IBPMonLinear whose W is close to ``weight`` (n, n) in Frobenius norm; returns (cell, relative error)."""
    target = weight.detach().double()
    n = target.shape[0]
    cell = IBPMonLinear(n, m=margin, similarity=similarity, dtype=torch.float64)
    with torch.no_grad():
        cell.M.copy_(target)
    opt = torch.optim.Adam(cell.parameters(), lr=lr)
    best, best_state = math.inf, copy.deepcopy(cell.state_dict())
    scale = float(target.norm()) + 1e-12
    for _ in range(steps):
        err = (cell.operator().matrix - target).norm() / scale
        if float(err.detach()) < best:
            best, best_state = float(err.detach()), copy.deepcopy(cell.state_dict())
        opt.zero_grad()
        err.backward()
        opt.step()
    cell.load_state_dict(best_state)
    return cell.to(weight.dtype), best


def _as_tensors(data):
    if data is None:
        return None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data
    return data.tensors[0], data.tensors[1]


def _accuracy(model, data):
    if data is None:
        return None
    x, y = data
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _replace(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _fine_tune(model, train, eps, epochs, method, lr, batch_size, kappa_final, num_classes, log):
    x_all, y_all = train
    bounded = make_bounded(model, x_all[:1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, math.ceil(epochs * len(x_all) / batch_size))
    ramp = max(1, int(0.6 * steps))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x_all), generator=gen)
    for step in range(steps):
        start = (step * batch_size) % len(x_all)
        if start < batch_size and step > 0:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[start:start + batch_size]
        t = min(1.0, (step + 1) / ramp)
        bounded.train()
        loss, stats = certified_loss(bounded, x_all[idx], y_all[idx], eps * t, method,
                                     kappa=1 - t * (1 - kappa_final), num_classes=num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sync_buffers(bounded, model)
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"fine-tune step {step + 1}/{steps}: loss {float(loss.detach()):.3f}, clean {stats['clean_acc']:.2f}, "
                f"verified {stats['verified'] if stats['verified'] is not None else 0:.2f}")
    model.eval()


def convert(model, train=None, test=None, eps=0.0, epochs=2.0, method="ibp", margin=0.5, similarity=True,
            lr=1e-3, batch_size=64, kappa_final=0.5, certify=("IBP",), num_classes=10, z_linear=None,
            injection=None, log=print):
    """Migrate every relu(W z + U x) DEQ layer of ``model`` into an IBP-MonDEQ layer (module doc).

    model: a model containing :class:`lirpa_deq.nn.DEQ` layers with such cells (it is copied, not
    changed); train / test: ``(x, y)`` tensors or TensorDatasets (x in [0, 1]); eps: the l_inf radius
    of the certified fine-tune and of the reported certified rates; epochs: fine-tune length (0 or
    ``train=None``: fit only); method: 'ibp' or 'crown-ibp'; certify: methods whose certified rate on
    ``test`` is reported. Returns a :class:`ConversionReport` (``report.model`` is the migrated model)."""
    t0 = time.time()
    train, test = _as_tensors(train), _as_tensors(test)
    example = (train or test or (None,))[0]
    if example is None:
        raise ConversionError("convert needs train or test data (x, y) to trace the DEQ layers' inputs")
    before = _accuracy(model, test)
    new = copy.deepcopy(model).eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=name: inputs.setdefault(key, args[0].detach()))
             for name, m in new.named_modules() if isinstance(m, DEQ) and m.generic]
    with torch.no_grad():
        new(example[:8])
    for h in hooks:
        h.remove()
    if not inputs:
        raise ConversionError("no lirpa_deq.nn.DEQ layer with a generic relu(W z + U x) cell was run by the model: "
                              "write the loop / torchdeq closure as DEQ(cell) first (docs/existing_deq.md)")
    fit_error = {}
    for name, x in inputs.items():
        deq = new.get_submodule(name)
        _, weight, bias, term = _decompose(deq.cell, x, z_linear, injection)
        cell, err = fit_ibp_monotone(weight, margin=margin, similarity=similarity)
        _replace(new, name, nn.Sequential(_Injection(term, bias), DEQ(cell, tol=deq.tol)))
        fit_error[name] = err
    converted = _accuracy(new, test)
    if train is not None and epochs > 0:
        _fine_tune(new, train, eps, epochs, method, lr, batch_size, kappa_final, num_classes, log)
    after = _accuracy(new, test)
    certified = {}
    if test is not None and eps > 0:
        for m in certify:
            ok, _ = certify_bounds(new, test[0], test[1], eps, method=m, num_classes=num_classes)
            certified[m] = float(ok.float().mean())
    report = ConversionReport(new, list(inputs), fit_error, before, converted, after, certified, float(eps),
                              float(epochs if train is not None else 0), time.time() - t0)
    if log is not None:
        log(str(report))
    return report
