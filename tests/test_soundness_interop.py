"""Soundness of the bounds for DEQs people already have: torchdeq models (drop-in get_deq), plain loops
rewritten as DEQ layers (Picard containment), migrated models (lirpa_deq.convert), against independent
float64 ground truth: torchdeq's OWN fixed-point solver for torchdeq models, lirpa_deq.testing's
re-solves (Picard iteration from zeros / exact ReLU-affine solves) for the others, at sampled, vertex
and PGD points of the eps-ball."""
import math

import pytest
import torch
import torch.nn as nn

import lirpa_deq
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.interop import get_deq
from lirpa_deq.nn import DEQ
from lirpa_deq.testing import ball_samples, judge_bounds, pgd_extremes, truth_outputs

torchdeq = pytest.importorskip("torchdeq")
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402

N, M, K = 10, 4, 3
RTOL = 1e-6  # float64 models


def scaled_weight(n, rho, spread, gen):
    """D A D^-1 with rho(|A|) = rho: ||W||_2 grows with the spread of D (no l2 contraction), rho(|W|) does not."""
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A * rho / torch.linalg.eigvals(A.abs()).abs().max()
    d = torch.exp(torch.linspace(-spread, spread, n, dtype=torch.float64))
    return d[:, None] * A / d[None, :]


class Layer(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.W, self.act = nn.Linear(N, N), act

    def forward(self, z, u):
        return self.act(self.W(z) + u)


class TorchDEQModel(nn.Module):
    """torchdeq's README pattern (apply_norm, reset_norm, get_deq, a closure); ``deq`` is swapped for the truth."""

    def __init__(self, deq, act=torch.tanh, norm=None):
        super().__init__()
        self.inj, self.f, self.head = nn.Linear(M, N), Layer(act), nn.Linear(N, K)
        self.norm = norm
        self.deq = deq

    def forward(self, x):
        if self.norm:
            reset_norm(self.f)
        u = self.inj(x)
        z_out, info = self.deq(lambda z: self.f(z, u), torch.zeros(x.shape[0], N, dtype=x.dtype))
        self.last_info = info
        return self.head(z_out[-1])


def torchdeq_case(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = []
    for deq in (get_deq(f_solver="fixed_point_iter", f_max_iter=300, f_tol=1e-10),
                torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=4000, f_tol=1e-13)):
        torch.manual_seed(seed)
        m = TorchDEQModel(deq, norm=None if kind == "picard" else kind)
        if m.norm:
            apply_norm(m.f, m.norm)  # as users do: in __init__, before model.double()
        models.append(m.double())
    weight = scaled_weight(N, 0.7, 1.2, gen) if kind == "picard" else 0.8 * scaled_weight(N, 0.6, 0.0, gen)
    for m in models:
        with torch.no_grad():
            if m.norm:
                m.train()
                for _ in range(30):
                    reset_norm(m.f)
                name = "weight_v" if m.norm == "weight_norm" else "weight_orig"
                getattr(m.f.W, name).copy_(weight)
                if m.norm == "weight_norm":
                    m.f.W.weight_g.copy_(weight.norm(dim=1, keepdim=True))
                reset_norm(m.f)
            else:
                m.f.W.weight.copy_(weight)
        m.eval()
    return models


def torchdeq_truth(truth_model, ours, x, eps, gen):
    """Outputs of torchdeq's own solver at sampled points and at PGD points found on our model."""
    pts = [ball_samples(x, eps, 24, generator=gen), x.unsqueeze(0)]
    for p in pgd_extremes(ours, x, eps, steps=8, generator=gen):
        pts.append(p.reshape(-1, *x.shape))
    pts = torch.cat(pts)
    with torch.no_grad():
        y = truth_model(pts.reshape(-1, *x.shape[1:]))
    rel = truth_model.last_info["rel_lowest"].reshape(-1).double()
    valid = (rel <= 1e-10) & torch.isfinite(y).all(1)
    return y.view(pts.shape[0], x.shape[0], -1), valid.view(pts.shape[0], x.shape[0])


# torchdeq's spectral norm rescales W to norm 1 (its default g = 1): L = 1 is no proved contraction, and
# the Picard containment bounds the limit of torchdeq's default solver (fixed-point iteration)
@pytest.mark.parametrize("kind,guarantee,seed", [("weight_norm", "unique-fixed-point", 0),
                                                 ("spectral_norm", "picard-limit", 0),
                                                 ("picard", "picard-limit", 0), ("picard", "picard-limit", 1)])
def test_torchdeq_models_are_sound(kind, guarantee, seed):
    ours, truth_model = torchdeq_case(seed, kind)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, M, dtype=torch.float64, generator=gen)
    eps = 0.1
    y, valid = torchdeq_truth(truth_model, ours, x, eps, gen)
    assert int(valid.sum()) > 0.9 * valid.numel()
    bounded = BoundedModule(ours, x)
    for method in ("IBP", "CROWN"):
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method=method)
        verdict = judge_bounds(lb, ub, y, valid, RTOL)
        assert verdict.status == "sound", (method, verdict)
        assert float((ub - lb).detach().mean()) < 10  # useful, not just finite
    assert lirpa_deq.deq_nodes(bounded)[0].box_info["guarantee"] == guarantee


class LoopBody(nn.Module):
    """The body of ``for _ in range(k): z = relu(W z + U x)`` as a DEQ cell (docs/existing_deq.md)."""

    def __init__(self, weight):
        super().__init__()
        self.W, self.U = nn.Linear(N, N), nn.Linear(M, N)
        with torch.no_grad():
            self.W.weight.copy_(weight)

    def forward(self, z, x):
        return torch.relu(self.W(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], N)


def _judge_model(model, x, eps, methods=("IBP", "CROWN")):
    y, valid, _ = truth_outputs(model, x, eps, n_samples=24, pgd_steps=8)
    assert int(valid.sum()) > 0.9 * valid.numel()
    bounded = BoundedModule(model, x)
    out = {}
    for method in methods:
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method=method)
        verdict = judge_bounds(lb, ub, y, valid, RTOL)
        assert verdict.status == "sound", (method, verdict)
        out[method] = float((ub - lb).detach().mean())
    return bounded, out


@pytest.mark.parametrize("max_iter", [400, 3])  # 3: the layer's own solve is far from converged
@pytest.mark.parametrize("seed", [0, 1])
def test_plain_loop_as_picard_deq_is_sound(seed, max_iter):
    gen = torch.Generator().manual_seed(10 + seed)
    torch.manual_seed(seed)
    body = LoopBody(scaled_weight(N, 0.7, 1.5, gen))  # ||W||_2 > 1: not a proved contraction
    model = nn.Sequential(DEQ(body, solver="fixed_point_iter", max_iter=max_iter, tol=1e-10,
                              on_nonconvergence="ignore"), nn.Linear(N, K)).double().eval()
    x = torch.randn(3, M, dtype=torch.float64, generator=gen)
    bounded, widths = _judge_model(model, x, 0.1)
    info = lirpa_deq.deq_nodes(bounded)[0].box_info
    assert info["guarantee"] == "picard-limit" and widths["CROWN"] <= widths["IBP"] + 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_migrated_model_is_sound(seed):
    gen = torch.Generator().manual_seed(20 + seed)
    torch.manual_seed(seed)
    body = LoopBody(1.3 * torch.randn(N, N, generator=gen, dtype=torch.float64) / math.sqrt(N))  # rho(|W|) > 1
    model = nn.Sequential(DEQ(body, solver="fixed_point_iter", on_nonconvergence="ignore"), nn.Linear(N, K)).double().eval()
    x = torch.rand(3, M, dtype=torch.float64, generator=gen)
    report = lirpa_deq.convert(model, test=(x, torch.zeros(3, dtype=torch.long)), epochs=0, num_classes=K, log=None)
    _judge_model(report.model.double().eval(), x, 0.05)
