"""Generic DEQ cells cell(z, x) through nested auto_LiRPA: point solve and implicit gradients,
proved contraction, soundness of IBP and CROWN (sampled, vertex, PGD points; non-converged warm
starts; near-critical weights), agreement with the specialized ReLU-affine path, clear errors."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

import lirpa_deq
from lirpa_deq import IntervalProofError
from lirpa_deq.bounds.generic.contraction import _conv_norm, graph_lipschitz, sampled_lipschitz
from lirpa_deq.bounds.generic.cell_bounder import CellBounder
from lirpa_deq.nn import (DEQ, ContractionError, ConvBNCell, DenseReLUCell, IBPMonConv2d,
                          IBPMonLinear, ResidualCell, TanhCell, declare_contraction)
from lirpa_deq.testing import assert_sound

ATOL = 1e-7  # outputs come from float64 solves at tol 1e-11


def solver_kw(**kw):
    return dict(dict(solver="anderson", tol=1e-11, max_iter=300), **kw)


def fc_model(cell_cls, seed, **cell_kw):
    torch.manual_seed(seed)
    cell = cell_cls(8, 5, **cell_kw)
    return nn.Sequential(nn.Linear(6, 5), DEQ(cell, **solver_kw()), nn.Linear(8, 3)).double()


def conv_model(seed):
    torch.manual_seed(seed)
    cell = ConvBNCell(3, in_channels=1)
    cell.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics and spectral-norm vectors
        for _ in range(3):
            cell(torch.randn(4, 3, 4, 4), torch.randn(4, 1, 4, 4))
    model = nn.Sequential(DEQ(cell, **solver_kw()), nn.Flatten(), nn.Linear(48, 3)).double()
    return model.eval()


def bounds(model, x, eps, method, **deq_opts):
    bounded = BoundedModule(model, x, bound_opts={"deq": deq_opts} if deq_opts else None)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),),
                                    method=method)
    (node,) = lirpa_deq.deq_nodes(bounded)
    return lb, ub, node.box_info


# ------------------------------------------------------------------------------- the point solve
def test_generic_solve_is_a_fixed_point_and_implicit_gradients_match_unrolled():
    torch.manual_seed(0)
    cell = TanhCell(6, 4, contraction=0.7).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    implicit = DEQ(cell, **solver_kw())
    z = implicit(x)
    assert z.shape == (3, 6)
    assert torch.allclose(cell(z, x), z, atol=1e-9)
    z.pow(2).sum().backward()
    g_x, g_A = x.grad.clone(), cell.A.weight.grad.clone()
    x.grad, cell.A.weight.grad = None, None
    unrolled = DEQ(cell, solver="fixed_point_iter", tol=1e-13, max_iter=400, implicit=False)
    unrolled(x).pow(2).sum().backward()
    assert torch.allclose(g_x, x.grad, atol=1e-8) and torch.allclose(g_A, cell.A.weight.grad, atol=1e-8)
    assert implicit.last_backward_stats.converged


def test_generic_cell_must_preserve_the_state_shape():
    deq = DEQ(nn.Bilinear(4, 4, 3))
    with pytest.raises(ValueError, match="map z of shape .* to the same shape"):
        deq(torch.randn(2, 4))


# --------------------------------------------------------------------------- proved contraction
def test_computed_lipschitz_is_an_upper_bound_and_exact_for_one_layer():
    torch.manual_seed(1)
    for cell in (TanhCell(6, 4, contraction=0.7), ResidualCell(6, 4, contraction=0.9)):
        z, x = torch.randn(2, 6), torch.randn(2, 4)
        computed = graph_lipschitz(CellBounder(cell, z, x), z, x)
        assert computed >= sampled_lipschitz(cell, z, x) - 1e-6
        assert computed == pytest.approx(0.7 if isinstance(cell, TanhCell) else 0.9, rel=1e-4)


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=1),
                                dict(stride=1, padding=2, dilation=2), dict(stride=1, padding=1, groups=2)])
def test_conv_norm_bound_is_sound(kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, bias=False, **kw).double()
    eye = torch.eye(4 * 5 * 5, dtype=torch.float64).view(-1, 4, 5, 5)
    exact = torch.linalg.matrix_norm(conv(eye).flatten(1), ord=2).item()
    assert _conv_norm(conv.weight, conv.groups) >= exact * (1 - 1e-9)


def test_non_contractive_cell_gets_a_clear_error_not_a_bound():
    model = fc_model(TanhCell, 0, contraction=1.3)
    x = torch.randn(2, 6, dtype=torch.float64)
    for method in ("IBP", "CROWN"):
        with pytest.raises(ContractionError, match=r"not a proved contraction in z: Lipschitz bound 1.3"):
            bounds(model, x, 0.01, method)


class TwoLayerTanh(nn.Module):
    """tanh(A2 tanh(A1 z) + U x) with A2 A1 small but ||A2|| ||A1|| = 4: the computed bound is
    loose (>= 1), the true constant is <= 0.2, so it must be declared."""

    def __init__(self):
        super().__init__()
        self.A1 = nn.Linear(2, 2, bias=False)
        self.A2 = nn.Linear(2, 2, bias=False)
        self.U = nn.Linear(3, 2)
        with torch.no_grad():
            self.A1.weight.copy_(torch.diag(torch.tensor([2.0, 0.1])))
            self.A2.weight.copy_(torch.diag(torch.tensor([0.1, 2.0])))

    def forward(self, z, x):
        return torch.tanh(self.A2(torch.tanh(self.A1(z))) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], 2)


def test_declared_contraction_is_used_checked_and_sound():
    torch.manual_seed(3)
    model = nn.Sequential(DEQ(TwoLayerTanh(), **solver_kw()), nn.Linear(2, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ContractionError, match=r"Lipschitz bound 4 >= 1 \(computed\)"):
        bounds(model, x, 0.05, "IBP")
    declare_contraction(model[0].cell, 0.2)
    for method in ("IBP", "CROWN"):
        lb, ub, info = bounds(model, x, 0.05, method)
        assert info["lipschitz_source"] == "declared" and info["lipschitz"] == 0.2
        assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)
    declare_contraction(model[0].cell, 0.05)  # false: the Jacobian reaches ~0.2
    with pytest.raises(ContractionError, match="declared lipschitz_z=0.05 .* is violated"):
        bounds(model, x, 0.05, "IBP")
    with pytest.raises(ContractionError, match=r"in \[0, 1\)"):
        declare_contraction(model[0].cell, 1.0)


def test_op_without_lipschitz_rule_is_named():
    class ExpCell(nn.Module):
        def forward(self, z, x):
            return 0.1 * torch.exp(-z * z) + x

    model = nn.Sequential(DEQ(ExpCell(), **solver_kw()))
    with pytest.raises(ContractionError, match="Mul node .* both factors depend on z|no Lipschitz rule"):
        bounds(model, torch.randn(2, 3), 0.01, "IBP")


@pytest.mark.parametrize("module,match", [("bn", r"BatchNorm in training mode.*model.eval\(\)"),
                                          ("conv", r"parametrized .* training mode.*model.eval\(\)")])
def test_batch_statistics_or_moving_parametrizations_are_refused(module, match):
    model = conv_model(0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    getattr(model[0].cell, module).train()  # after BoundedModule, which resets modes on tracing
    with pytest.raises(ValueError, match=match):
        bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.01)),), method="IBP")


# ------------------------------------------------------------------------------------ soundness
@pytest.mark.parametrize("cell_cls", [TanhCell, ResidualCell])
@pytest.mark.parametrize("method", ["IBP", "CROWN"])
@pytest.mark.parametrize("seed,eps", [(0, 0.02), (1, 0.3)])
def test_fc_generic_cells_sound(cell_cls, method, seed, eps):
    model = fc_model(cell_cls, seed)
    x = torch.randn(3, 6, dtype=torch.float64)
    lb, ub, _ = bounds(model, x, eps, method)
    assert_sound(model, x, eps, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_conv_bn_spectral_norm_cell_sound(method):
    model = conv_model(0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    lb, ub, info = bounds(model, x, 0.03, method)
    assert info["lipschitz_source"] == "computed" and info["lipschitz"] < 1
    assert_sound(model, x, 0.03, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_sound_from_a_non_converged_warm_start(method):
    model = fc_model(TanhCell, 4, contraction=0.95)
    x = torch.randn(3, 6, dtype=torch.float64)
    deq = model[1]
    deq.max_iter, deq.on_nonconvergence = 1, "ignore"  # the graph's forward value is far from z*
    bounded = BoundedModule(model, x)
    deq.max_iter = 300
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),),
                                    method=method)
    assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)


def test_near_critical_weights_fall_back_to_the_contraction_ball():
    """Adversarial scaling: 0.5 z + relu(A z + U x) with A = 0.49 H / sqrt(8) (H Hadamard) is a
    contraction (L = 0.99) but |A| has spectral radius 0.49 sqrt(8) = 1.39, so the interval map
    expands and no post-fixpoint exists; the contraction-ball box must take over, soundly."""
    from scipy.linalg import hadamard

    torch.manual_seed(5)
    cell = ResidualCell(8, 5, contraction=0.99, skip=0.5)
    with torch.no_grad():
        cell.A.weight.copy_(0.49 * torch.tensor(hadamard(8), dtype=torch.float32) / math.sqrt(8))
    model = nn.Sequential(nn.Linear(6, 5), DEQ(cell, **solver_kw()), nn.Linear(8, 3)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    for method in ("IBP", "CROWN"):
        lb, ub, info = bounds(model, x, 0.5, method)
        assert info["box"] == "contraction-ball"
        assert_sound(model, x, 0.5, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)
    with pytest.raises(IntervalProofError, match="no post-fixpoint"):
        bounds(model, x, 0.5, "IBP", fallback=False)


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_generic_bounds_are_differentiable(method):
    model = fc_model(TanhCell, 0).float()
    model[1].tol = 1e-6  # float32
    x = torch.randn(4, 6)
    bounded = BoundedModule(model, x)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method=method)
    (ub - lb).sum().backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad.abs().sum() > 0
    if method == "IBP":  # CROWN: auto_LiRPA detaches the nested return_A, the cell gets no gradient
        assert model[1].cell.U.weight.grad.abs().sum() > 0 and model[1].cell.A.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------- agreement with the fast path
def twin_models(seed, conv=False):
    torch.manual_seed(seed)
    if conv:
        cell, shape = IBPMonConv2d(2), (2, 3, 3)
        front = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    else:
        cell, shape = IBPMonLinear(10), None
        front = nn.Sequential(nn.Flatten(), nn.Linear(9, 10))
    head = nn.Linear(18 if conv else 10, 4)
    spec = nn.Sequential(front, DEQ(cell, **solver_kw()), nn.Flatten(), head).double()
    twin = DenseReLUCell.from_cell(cell.double(), shape)
    gen = nn.Sequential(front, nn.Flatten(), DEQ(twin, **solver_kw()), head).double()
    return spec, gen


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_generic_path_agrees_with_the_specialized_one(conv, method):
    spec, gen = twin_models(0, conv)
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    assert torch.allclose(spec(x), gen(x), atol=1e-9)
    s_lb, s_ub, s_info = bounds(spec, x, 0.05, method)
    g_lb, g_ub, g_info = bounds(gen, x, 0.05, method)
    assert s_info["box"] == g_info["box"] == "interval-post-fixpoint"
    width = (s_ub - s_lb).abs().max().item()
    # the same bound up to the boxes' rounding margins (1e-3 of the width)
    assert torch.allclose(g_lb, s_lb, atol=1e-3 * width) and torch.allclose(g_ub, s_ub, atol=1e-3 * width)
    assert_sound(gen, x, 0.05, g_lb, g_ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_a_factor_that_varies_with_x_is_not_taken_as_a_constant():
    class GatedCell(nn.Module):  # z * sigmoid(U x): the gain of z depends on x
        def __init__(self):
            super().__init__()
            self.U = nn.Linear(3, 3)

        def forward(self, z, x):
            return 0.5 * torch.tanh(z) * torch.sigmoid(self.U(x)) + x

    model = nn.Sequential(DEQ(GatedCell(), **solver_kw()))
    with pytest.raises(ContractionError, match="factor multiplying z depends on the input x"):
        bounds(model, torch.randn(2, 3), 0.01, "IBP")


def test_changed_batchnorm_statistics_invalidate_the_cached_box():
    model = conv_model(1)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.02)
    lb1, ub1 = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP")
    with torch.no_grad():
        model[0].cell.bn.running_var.mul_(2.0)  # in place, as a training step would
        model[0].cell.bn.running_mean.add_(0.3)
    lb2, ub2 = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP")
    assert not torch.allclose(lb1, lb2)
    assert_sound(model, x, 0.02, lb2, ub2, atol=ATOL, n_samples=100, pgd_steps=10)


class OffsetCell(nn.Module):
    """Constant offsets (``- 0.2``, ``z - 1``) are branches auto_LiRPA 0.3 leaves out of the return_A
    bias it records (a reviewer's counter-example: the raw record made CROWN unsound)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.L = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.L.weight.mul_(0.5 / torch.linalg.matrix_norm(self.L.weight, ord=2))

    def forward(self, z, x):
        if self.kind == "offset":
            return x + torch.relu(z) * 0.5 - 0.2
        return 0.3 * z + self.L(torch.relu(z - 1.0)) + x


@pytest.mark.parametrize("kind", ["offset", "shifted"])
def test_crown_with_constant_offsets_is_sound(kind):
    torch.manual_seed(0)
    model = nn.Sequential(DEQ(OffsetCell(kind), **solver_kw()), nn.Linear(4, 2)).double()
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    lb, ub, _ = bounds(model, x, 0.3, "CROWN")
    assert_sound(model, x, 0.3, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)


class BroadcastCell(nn.Module):
    """tanh(L((z (B, 1, n) op c (1, r, 1)).flatten(1)) + x): broadcasting copies each z entry r
    times, multiplying the l2 gain by sqrt(r) (a reviewer's counter-example to a walk that ignored it)."""

    def __init__(self, op, n=3, r=9):
        super().__init__()
        self.op, self.n = op, n
        self.register_buffer("c", torch.full((1, r, 1), 0.5))
        self.L = nn.Linear(n * r, n, bias=False)
        with torch.no_grad():
            self.L.weight.mul_(0.9 / torch.linalg.matrix_norm(self.L.weight, ord=2))

    def forward(self, z, x):
        zz = z.unsqueeze(1)
        y = {"add": zz + self.c, "sub": zz - self.c, "mul": zz * self.c, "div": zz / self.c}[self.op]
        return torch.tanh(self.L(y.flatten(1)) + x)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_broadcast_copies_are_counted_in_the_lipschitz_bound(op):
    torch.manual_seed(0)
    cell = BroadcastCell(op).double()
    z, x = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    computed = graph_lipschitz(CellBounder(cell, z, x), z, x)
    assert computed >= sampled_lipschitz(cell, z, x, iters=50) * (1 - 1e-6)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_norm_bound_is_sound_in_every_dimension(dims):
    torch.manual_seed(3)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 3, 3, padding=1, bias=False).double()
    size = (3,) + (5,) * dims
    eye = torch.eye(math.prod(size), dtype=torch.float64).view(-1, *size)
    exact = torch.linalg.matrix_norm(conv(eye).flatten(1), ord=2).item()
    assert _conv_norm(conv.weight, 1) >= exact * (1 - 1e-9)


def test_a_changed_python_attribute_rebuilds_the_nested_module():
    """Tracing freezes `cell.skip` as a constant; changing it afterwards must not reuse the old
    nested module or a cached box (a reviewer's counter-example)."""
    torch.manual_seed(0)
    cell = ResidualCell(6, 4, contraction=0.9, skip=0.5)
    model = nn.Sequential(nn.Linear(5, 4), DEQ(cell, **solver_kw()), nn.Linear(6, 3)).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.05)
    for method in ("IBP", "CROWN"):
        bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
    cell.skip = -0.5  # still a contraction (L = 0.9)
    for method in ("IBP", "CROWN"):
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
        assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_cells_that_ignore_an_input_or_break_tracing_get_clear_errors():
    class IgnoresX(nn.Module):
        def forward(self, z, x):
            return 0.5 * z

    with pytest.raises(ValueError, match="must use both the state z and the input x"):
        bounds(nn.Sequential(DEQ(IgnoresX())), torch.randn(2, 3), 0.01, "IBP")

    class Conv1dCell(nn.Module):  # auto_LiRPA 0.3 cannot bound Conv1d
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, z, x):
            return torch.relu(0.1 * self.conv(z) + x)

    model, x = nn.Sequential(DEQ(Conv1dCell(), **solver_kw()), nn.Flatten()).double(), torch.randn(2, 2, 5).double()
    try:  # auto_LiRPA 0.3 cannot trace Conv1d (upstream can: then the bound must be sound)
        lb, ub, _ = bounds(model, x, 0.01, "IBP")
    except RuntimeError as err:
        assert "auto_LiRPA could not build a bounded module of Conv1dCell" in str(err)
    else:
        assert_sound(model, x, 0.01, lb, ub, atol=ATOL, n_samples=50, pgd_steps=5)


def test_float64_deq_as_last_layer_without_specification():
    """auto_LiRPA 0.3's default C is float32; both paths must accept it for float64 models."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, dtype=torch.float64)
    for cell in (TanhCell(4, 5), IBPMonLinear(5)):
        model = nn.Sequential(DEQ(cell, **solver_kw())).double()
        lb, ub, _ = bounds(model, x, 0.05, "CROWN")
        assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_a_state_of_the_wrong_shape_is_explained():
    class Wide(nn.Module):  # a (B, 8) state from a (B, 3) input, without state_shape
        def __init__(self):
            super().__init__()
            self.A, self.U = nn.Linear(8, 8), nn.Linear(3, 8)

        def forward(self, z, x):
            return torch.tanh(self.A(z) + self.U(x))

    with pytest.raises(ValueError, match=r"failed on a state z of shape \(2, 3\).*state_shape\(x_shape\)"):
        DEQ(Wide())(torch.randn(2, 3))


def test_rounding_margin_covers_cancellation_in_float32():
    """0.5 z + V x + b with large V and b = -V x0: the nested values are large, the result small;
    the margin must follow the intermediate magnitudes (a reviewer's counter-example at eps = 0)."""
    class Cancel(nn.Module):
        def __init__(self, scale):
            super().__init__()
            torch.manual_seed(1)
            self.V = nn.Linear(4, 4)
            with torch.no_grad():
                self.V.weight.mul_(scale)

        def forward(self, z, x):
            return 0.5 * z + self.V(x)

    for scale in (100.0, 1000.0):
        cell = Cancel(scale)
        x = torch.rand(2, 4)
        with torch.no_grad():
            cell.V.bias.copy_(-(x[0] @ cell.V.weight.t()))
        model = nn.Sequential(DEQ(cell, solver="fixed_point_iter", tol=1e-7, max_iter=200))
        lb, ub, _ = bounds(model, x, 0.0, "IBP")
        exact = nn.Sequential(DEQ(Cancel(scale).double(), **solver_kw()))
        exact[0].cell.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
        z = exact(x.double())
        assert bool((lb.double() <= z).all() and (z <= ub.double()).all())


# ------------------------------------------------- second review: what a trace freezes, broadcasting
class ScaledCell(nn.Module):
    """0.5 * tanh(A z + U x) * scale + 0.3 z with `scale` a plain tensor attribute and `t` a Python
    threshold that only matters for large states."""

    def __init__(self):
        super().__init__()
        self.A, self.U = nn.Linear(3, 3, bias=False), nn.Linear(3, 3)
        with torch.no_grad():
            self.A.weight.mul_(0.9 / torch.linalg.matrix_norm(self.A.weight, ord=2))
        self.scale = torch.ones(3, dtype=torch.float64)
        self.t = 5.0

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.A(z) + self.U(x)) * self.scale + 0.1 * torch.relu(z - self.t) + 0.3 * z


@pytest.mark.parametrize("change", ["tensor attribute in place", "threshold for large states"])
def test_changes_no_parameter_shows_rebuild_the_nested_module_and_the_box(change):
    torch.manual_seed(0)
    cell = ScaledCell().double()
    model = nn.Sequential(DEQ(cell, **solver_kw()), nn.Linear(3, 2)).double()
    x = 8 * torch.rand(2, 3, dtype=torch.float64) + 4  # large states: z > t somewhere
    bounded = BoundedModule(model, x)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.05)
    for method in ("IBP", "CROWN"):
        bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
    if change == "tensor attribute in place":
        cell.scale.mul_(0.8)  # shares storage with the traced constant: no rebuild would notice
    else:
        cell.t = 1.0
    for method in ("IBP", "CROWN"):
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
        assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_data_dependent_control_flow_is_refused_when_seen():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.U = nn.Linear(2, 2)

        def forward(self, z, x):
            skip = 0.8 if float(x.sum()) > 0 else 0.2
            return skip * torch.tanh(z) + self.U(x)

    x = torch.tensor([[0.01, 0.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="does not reproduce the cell's output"):
        bounds(nn.Sequential(DEQ(Branch().double(), **solver_kw())), x, 0.1, "IBP")


def test_broadcast_along_a_new_leading_dimension_is_counted():
    class LeadBroadcast(nn.Module):  # z (B, n) + c (r, 1, 1) -> (r, B, n): r copies of every entry
        def __init__(self, r=9):
            super().__init__()
            self.register_buffer("c", torch.zeros(r, 1, 1))
            self.L = nn.Linear(3 * r, 3, bias=False)
            with torch.no_grad():
                self.L.weight.mul_(0.9 / torch.linalg.matrix_norm(self.L.weight, ord=2))

        def forward(self, z, x):
            y = (z.unsqueeze(0) + self.c).transpose(0, 1).reshape(z.shape[0], -1)
            return torch.tanh(self.L(y) + x)

    torch.manual_seed(0)
    cell = LeadBroadcast().double()
    z, x = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert graph_lipschitz(CellBounder(cell, z, x), z, x) >= sampled_lipschitz(cell, z, x, iters=50) * (1 - 1e-6)


def test_a_cell_without_parameters_gets_crown_bounds():
    class Plain(nn.Module):
        def forward(self, z, x):
            return 0.5 * torch.tanh(z) + x

    model = nn.Sequential(DEQ(Plain(), **solver_kw()), nn.Linear(3, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    lb, ub, _ = bounds(model, x, 0.1, "CROWN")
    assert_sound(model, x, 0.1, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_bounding_leaves_the_users_modules_as_they_were():
    """auto_LiRPA's BoundParams.forward sets requires_grad from its node's mode and 0.3 may switch
    traced models to training mode: the nested module of an eval-mode cell must not freeze the cell's
    parameters (as the outer module, which keeps them trainable) nor switch its modes."""
    torch.manual_seed(0)
    cell = TanhCell(4, 3)
    model = nn.Sequential(DEQ(cell, **solver_kw()), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    for method in ("IBP", "CROWN"):
        bounds(model, x, 0.05, method)
    assert not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in cell.parameters())


def test_cells_that_mix_the_samples_of_a_batch_are_refused():
    class Mix(nn.Module):  # a contraction of the whole batch, not of each sample
        def __init__(self):
            super().__init__()
            self.P = nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                c = 0.9 / math.sqrt(2)
                self.P.weight.copy_(torch.tensor([[c, -c], [c, c]]))

        def forward(self, z, x):
            return self.P(z.reshape(1, 2)).reshape(2, 1) + x

    model = nn.Sequential(DEQ(Mix().double(), **solver_kw())).double()
    with pytest.raises(ValueError, match="mixes the samples of a batch"):
        bounds(model, torch.tensor([[0.3], [0.5]], dtype=torch.float64), 0.1, "IBP")


def test_post_fixpoint_box_is_intersected_with_the_contraction_ball():
    """At eps = 0 the ball is tiny while a post-fixpoint found after large inflations is not."""
    torch.manual_seed(0)
    model = nn.Sequential(DEQ(TanhCell(8, 8, contraction=0.95), **solver_kw())).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    lb, ub, _ = bounds(model, x, 0.0, "IBP")
    assert float((ub - lb).max()) < 1e-6
