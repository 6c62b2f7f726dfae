"""DEQs in the middle of deep networks: sparse intermediate specifications and the chunked adjoint
(lirpa_deq.bounds.spec_batching) stay sound and give the bounds of the plain computation.

Ground truth: lirpa_deq.testing (every DEQ re-solved independently in float64 at random, vertex and
PGD points). Small shapes, so the file runs in seconds; the paper sizes are benchmarks/bench_scale.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

import lirpa_deq  # noqa: F401
from lirpa_deq.bounds.adjoint import ReLUAffineRelaxation, relu_relaxation
from lirpa_deq.bounds.interval import preactivation_box
from lirpa_deq.bounds.spec_batching import chunked_adjoint_bound
from lirpa_deq.models.architectures import deq7
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, OrthoConv2d
from lirpa_deq.testing import judge_bounds, truth_outputs


def _bn_eval(model, seed):
    """Random BatchNorm statistics (eval mode), so the BN layers are not identities."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


class ResidualAfterDEQ(nn.Module):
    """conv -> DEQ -> relu(conv(z) + z) -> linear: an Add node before a ReLU after the DEQ."""

    def __init__(self, cell):
        super().__init__()
        self.inp, self.deq = nn.Conv2d(2, 4, 3, padding=1), DEQ(cell, tol=1e-6, max_iter=200)
        self.mix, self.out = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        z = self.deq(self.inp(x))
        return self.out(torch.relu(self.mix(z) + z).flatten(1))


class UnrolledAfterDEQ(nn.Module):
    """fc DEQ, then relu(W z + u) unrolled three times: Add nodes sharing u, the pattern on which
    auto_LiRPA 0.3's sparse specifications are unsound (lirpa_deq._compat: dense_specs_on_add_nodes)."""

    def __init__(self):
        super().__init__()
        self.inp, self.deq = nn.Linear(16, 10), DEQ(IBPMonLinear(10), tol=1e-6, max_iter=200)
        self.W, self.V, self.out = nn.Linear(10, 10, bias=False), nn.Linear(10, 10), nn.Linear(10, 5)

    def forward(self, x):
        u = self.V(self.deq(self.inp(x)))
        z = torch.relu(u)
        for _ in range(3):
            z = torch.relu(self.W(z) + u)
        return self.out(z)


def _models():
    torch.manual_seed(0)
    yield "deq7-ibp", _bn_eval(deq7(input_shape=(3, 6, 6), num_classes=4, width=2,
                                    deq_opts=dict(tol=1e-6, max_iter=200)), 1), (3, 6, 6)
    yield "deq7-ortho", _bn_eval(deq7(input_shape=(3, 6, 6), num_classes=4, width=2, cell="ortho",
                                      deq_opts=dict(tol=1e-6, max_iter=300)), 2), (3, 6, 6)
    yield "fc-middle", nn.Sequential(nn.Flatten(), nn.Linear(12, 8), DEQ(IBPMonLinear(8), tol=1e-6, max_iter=200),
                                     nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(),
                                     nn.Linear(6, 3)), (3, 2, 2)
    yield "residual-add", ResidualAfterDEQ(IBPMonConv2d(4)), (2, 6, 6)
    yield "residual-ortho", ResidualAfterDEQ(OrthoConv2d(4, margin=0.2)), (2, 6, 6)
    torch.manual_seed(1)
    yield "unrolled-add", UnrolledAfterDEQ(), (16,)


MODELS = list(_models())


@pytest.mark.parametrize("name,model,shape", MODELS, ids=[m[0] for m in MODELS])
def test_deq_in_the_middle_is_sound(name, model, shape):
    """IBP, CROWN and CROWN-IBP (patches mode, sparse intermediate specifications, a chunk cap of
    a few rows) contain the float64 ground truth."""
    torch.manual_seed(3)
    x, eps = torch.rand(2, *shape), 0.05 if name == "unrolled-add" else 0.03
    bounded = BoundedModule(model, x, bound_opts={"conv_mode": "patches", "deq": {"adjoint_max_elements": 200}})
    y, valid, _ = truth_outputs(model, x, eps, n_samples=16, pgd_steps=5)
    assert int(valid.sum()) > 20
    for method in ("IBP", "CROWN", "CROWN-IBP"):
        bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
        lb, ub = bounded.compute_bounds(x=(bx,), method=method)
        verdict = judge_bounds(lb, ub, y, valid, rtol=1e-4)
        assert verdict.status == "sound", (name, method, verdict)


def _bounds(model, x, eps, method="CROWN", **opts):
    bounded = BoundedModule(model, x, bound_opts={"conv_mode": "patches", **opts})
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    with torch.no_grad():
        return bounded.compute_bounds(x=(bx,), method=method)


@pytest.mark.parametrize("index", [0, 3, 5])
def test_sparse_specifications_keep_the_bounds(index):
    """Only unstable neurons get intermediate specifications (the default), through the DEQ and an
    Add node: the bounds are those of one specification per neuron, to float tolerance, or tighter."""
    name, model, shape = MODELS[index]
    torch.manual_seed(4)
    x = torch.rand(2, *shape)
    dense = _bounds(model, x, 0.03, sparse_intermediate_bounds=False)
    sparse = _bounds(model, x, 0.03, deq={"adjoint_max_elements": 100})
    assert torch.all(sparse[0] >= dense[0] - 1e-5) and torch.all(sparse[1] <= dense[1] + 1e-5), name
    assert torch.all(sparse[0] <= sparse[1])


def _relaxation(seed, channels=3, hw=5, batch=2):
    """A random conv ReLU-affine relaxation over a proved box, and the box of its input."""
    torch.manual_seed(seed)
    cell = IBPMonConv2d(channels).double()
    u = torch.randn(batch, channels, hw, hw, dtype=torch.float64)
    u_lo, u_hi = u - 0.3, u + 0.3
    deq = DEQ(cell, tol=1e-10, max_iter=500)
    from lirpa_deq.bounds.interval import IntervalOptions, prove_interval_fixed_point
    op = cell.operator(dict(cell.named_parameters()))
    op.prepare((channels, hw, hw))
    with torch.no_grad():
        lo, hi, _ = prove_interval_fixed_point(op, u_lo, u_hi, z_start=deq.solve(u), opts=IntervalOptions())
        relax = ReLUAffineRelaxation(op, relu_relaxation(*preactivation_box(op, lo, hi, u_lo, u_hi)))
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    return relax, (flat(lo), flat(hi)), (flat(u_lo), flat(u_hi))


class _Counting:
    """A relaxation that counts the specification rows it is applied to."""

    def __init__(self, relaxation):
        self.relaxation, self.count = relaxation, 0

    def apply(self, nu):
        self.count += nu.shape[0]
        return self.relaxation.apply(nu)


@torch.no_grad()
def _reference(g, relaxation, box, in_box, max_iter, tol):
    """All rows iterated together until the largest change is small (the unbatched computation)."""
    u_c, u_r = (in_box[1] + in_box[0]) / 2, (in_box[1] - in_box[0]) / 2
    c, r = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    dot = lambda a, b: torch.einsum("sbn,bn->sb", a, b)  # noqa: E731

    def evaluate(nu):
        A, M, const = relaxation.apply(nu)
        res = nu - g - M
        bias = const - dot(res, c) - dot(res.abs(), r)
        return bias, bias + dot(A, u_c) - dot(A.abs(), u_r), g + M

    nu = g
    _, best, nu_next = evaluate(nu)
    for _ in range(max_iter):
        if float((nu_next - nu).abs().max()) <= tol * (1 + float(nu_next.abs().max())):
            break
        nu = nu_next
        _, value, nu_next = evaluate(nu)
        best = torch.maximum(best, value)
    return best


def test_chunks_and_row_stops_give_the_same_bound():
    relax, box, in_box = _relaxation(0)
    g = torch.randn(11, 2, box[0].shape[1], dtype=torch.float64)
    g[3] = 0.0  # a row that has converged at its first iterate
    g[5] *= 1e-3  # a small row
    u_c, u_r = (in_box[1] + in_box[0]) / 2, (in_box[1] - in_box[0]) / 2

    def concrete(out):
        A, bias = out[0], out[1]
        return bias + torch.einsum("sbn,bn->sb", A, u_c) - torch.einsum("sbn,bn->sb", A.abs(), u_r)

    whole = chunked_adjoint_bound(g, relax, box, in_box, 100, 1e-9)
    chunked = chunked_adjoint_bound(g, relax, box, in_box, 100, 1e-9, max_elements=3 * 2 * g.shape[2])
    for a, b in zip(whole[:2] + whole[3:], chunked[:2] + chunked[3:]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    reference = _reference(g, relax, box, in_box, 100, 1e-9)
    assert torch.allclose(concrete(whole), reference, atol=1e-7, rtol=0)
    # the bias really is the theorem's at the returned nu (A_in = D_nu nu, r = nu - g - M(nu))
    A, M, const = relax.apply(whole[3])
    res = whole[3] - g - M
    bias = const - torch.einsum("sbn,bn->sb", res, (box[0] + box[1]) / 2) \
        - torch.einsum("sbn,bn->sb", res.abs(), (box[1] - box[0]) / 2)
    assert torch.allclose(A, whole[0]) and torch.allclose(bias, whole[1])


def test_converged_rows_leave_the_working_set():
    relax, box, in_box = _relaxation(1)
    g = torch.zeros(8, 2, box[0].shape[1], dtype=torch.float64)
    g[0] = torch.randn_like(g[0])  # one live row, seven rows that converge at once
    counting = _Counting(relax)
    _, _, iterations, _ = chunked_adjoint_bound(g, counting, box, in_box, 100, 1e-9)
    assert iterations > 3
    assert counting.count == 8 + (iterations - 1)  # the first iterate of every row, then row 0 alone


def test_max_elements_option_is_checked():
    model = nn.Sequential(nn.Linear(4, 4), DEQ(IBPMonLinear(4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="adjoint_max_elements"):
        BoundedModule(model, torch.rand(1, 4), bound_opts={"deq": {"adjoint_max_elements": 0}})
