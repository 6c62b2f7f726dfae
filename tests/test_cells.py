"""Cells: proven guarantees for arbitrary raw parameters, operator algebra, |W|, overrides."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lirpa_deq.nn as L
from lirpa_deq.nn.cells import circular_conv_norm
from test_nn_common import (CELL_IDS, CELL_SPECS, IMG, dense_conv, independent_dense, make_cell,
                            single_shape, state_shape, unscaled)

SPEC = dict(zip(CELL_IDS, CELL_SPECS))


def guarantee_holds(cell, Wd, shape):
    """Independent check of the cell's guarantee on a dense W (float64)."""
    Wd = Wd.detach().double()
    N = Wd.shape[0]
    scale = max(1.0, float(torch.linalg.matrix_norm(Wd, ord=2)))
    slack = 1e-9 * scale
    if cell.guarantee == "monotone":
        lam = torch.linalg.eigvalsh((2 * torch.eye(N, dtype=Wd.dtype) - Wd - Wd.T) / 2).min()
        return float(lam) >= cell.margin - slack
    if cell.guarantee == "interval-monotone":
        W0 = unscaled(cell, Wd, shape).abs()
        lam = torch.linalg.eigvalsh((W0 + W0.T) / 2).max()
        rho = torch.linalg.eigvals(W0).abs().max()
        return float(lam) <= 1 - cell.margin + 1e-9 and float(rho) <= 1 - cell.margin + 1e-9
    if cell.guarantee == "contraction":
        return float(torch.linalg.svdvals(Wd).max()) <= 1 - cell.margin + slack
    raise AssertionError(cell.guarantee)


@pytest.mark.parametrize("cid", CELL_IDS)
@settings(max_examples=12, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), log10_scale=st.floats(-2, 3))
@example(seed=1, log10_scale=3.0)   # large-norm raw weights
@example(seed=2, log10_scale=-2.0)  # tiny raw weights
def test_guarantee_for_random_raw_parameters(cid, seed, log10_scale):
    cell = make_cell(SPEC[cid], seed=seed, scale=10.0 ** log10_scale)
    shape = single_shape(cell)
    chk = cell.check(shape=None if hasattr(cell, "n") else shape)
    assert chk.ok, chk
    Wd = independent_dense(cell, shape)
    assert guarantee_holds(cell, Wd, shape)


@pytest.mark.parametrize("cid", CELL_IDS)
def test_operator_matches_independent_dense_matrix(cid):
    cell = make_cell(SPEC[cid], seed=3)
    shape = single_shape(cell)
    op = cell.operator()
    Wd = op.dense(None if hasattr(cell, "n") else shape)
    torch.testing.assert_close(Wd, independent_dense(cell, shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cid", CELL_IDS)
def test_adjoint_and_abs_operators(cid):
    cell = make_cell(SPEC[cid], seed=4)
    op, shape = cell.operator(), state_shape(cell, 7)
    z, g = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
    torch.testing.assert_close(dot(op.W(z), g), dot(z, op.WT(g)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dot(op.absW(z), g), dot(z, op.absWT(g)), rtol=1e-10, atol=1e-10)
    single = single_shape(cell)
    absd = op.dense_abs(None if hasattr(cell, "n") else single)
    true_abs = independent_dense(cell, single).abs()
    if op.abs_exact:
        torch.testing.assert_close(absd, true_abs, rtol=1e-10, atol=1e-12)
    else:  # documented elementwise upper bound (MonConv2d)
        assert cid == "MonConv2d"
        assert bool((absd >= true_abs - 1e-12).all())
        assert float((absd - true_abs).detach().max()) > 0  # it really is only a bound


def test_exactness_flags_are_as_documented():
    flags = {cid: make_cell(SPEC[cid]).operator().abs_exact for cid in CELL_IDS}
    assert flags == {cid: cid != "MonConv2d" for cid in CELL_IDS}


@pytest.mark.parametrize("cid", CELL_IDS)
def test_norm_bounds_are_upper_bounds(cid):
    cell = make_cell(SPEC[cid], seed=5, scale=0.7)
    shape = single_shape(cell)
    op = cell.operator()
    Wd = independent_dense(cell, shape)
    nb = op.norm_bound(shape)
    assert nb >= float(torch.linalg.svdvals(Wd).max()) - 1e-10
    if hasattr(op, "i_minus_w_norm_bound"):
        I = torch.eye(Wd.shape[0], dtype=Wd.dtype)
        assert op.i_minus_w_norm_bound(shape) >= float(torch.linalg.svdvals(I - Wd).max()) - 1e-10


def test_circular_norm_bounds_zero_padded_conv():
    torch.manual_seed(0)
    for H, W in [(1, 1), (3, 5), (6, 4)]:
        K = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        bound = float(circular_conv_norm(K, H, W))
        torus = float(torch.linalg.svdvals(dense_conv(K, H + 2, W + 2, circular=True)).max())
        zero_pad = float(torch.linalg.svdvals(dense_conv(K, H, W)).max())
        assert bound == pytest.approx(torus, rel=1e-10)  # FFT blocks == dense torus matrix
        assert zero_pad <= bound + 1e-12                  # the proven compression bound


@pytest.mark.parametrize("cid", ["IBPMonConv2d", "OrthoConv2d"])
def test_size_dependent_conv_cells_keep_guarantee_on_other_sizes(cid):
    cell = make_cell(SPEC[cid], seed=6, scale=2.0)
    for hw in [(1, 1), (2, 7), (6, 6)]:
        shape = (cell.channels,) + hw
        assert cell.check(shape).ok
        assert guarantee_holds(cell, cell.operator().dense(shape), shape)


@pytest.mark.parametrize("cid", CELL_IDS)
def test_params_override_is_used_and_differentiable(cid):
    cell = make_cell(SPEC[cid], seed=7)
    other = make_cell(SPEC[cid], seed=8)
    params = {k: v.detach().clone().requires_grad_() for k, v in other.named_parameters()}
    z = torch.randn(state_shape(cell, 2), dtype=torch.float64)
    out = cell.operator(params).W(z)
    torch.testing.assert_close(out, other.operator().W(z))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in cell.parameters())  # own parameters untouched


def test_params_override_errors():
    cell = L.MonLinear(4)
    with pytest.raises(ValueError, match=r"unknown parameter name.*'C'.*valid names: \['A', 'B'\]"):
        cell.operator({"C": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="shape"):
        cell.operator({"A": torch.zeros(3, 4)})


def test_step_forward_and_state_shape():
    cell = make_cell(SPEC["IBPMonConv2d"])
    z, u = torch.randn(2, 3, *IMG, dtype=torch.float64), torch.randn(2, 3, *IMG, dtype=torch.float64)
    op = cell.operator()
    torch.testing.assert_close(cell(z, u), torch.relu(op.W(z) + u))
    torch.testing.assert_close(cell.step(z, u, op), cell(z, u))
    assert cell.state_shape(u.shape) == tuple(u.shape)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cell.state_shape((2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        make_cell(SPEC["MonLinear"]).state_shape((2, 11))


@pytest.mark.parametrize("bad", [
    lambda: L.MonLinear(4, m=0), lambda: L.IBPMonLinear(4, m=1.0), lambda: L.IBPMonConv2d(2, m=-0.1),
    lambda: L.OrthoLinear(4, margin=0), lambda: L.OrthoConv2d(2, margin=1.5)])
def test_bad_margins_raise(bad):
    with pytest.raises(ValueError, match="must be"):
        bad()


@pytest.mark.parametrize("cid", CELL_IDS)
def test_float32_and_dtype_conversion(cid):
    cell = make_cell(SPEC[cid], dtype=torch.float32)
    z = torch.randn(state_shape(cell, 3))
    assert cell.operator().W(z).dtype == torch.float32
    shape = None if hasattr(cell, "n") else single_shape(cell)
    assert cell.check(shape, tol=1e-5).ok
    cell64 = cell.to(torch.float64)
    assert cell64.operator().W(z.double()).dtype == torch.float64


def test_ortho_linear_is_orthogonal_times_gain():
    cell = make_cell(SPEC["OrthoLinear"], scale=30.0)
    Wd = cell.operator().dense()
    sv = torch.linalg.svdvals(Wd)
    torch.testing.assert_close(sv, torch.full_like(sv, 1 - cell.margin), rtol=1e-10, atol=1e-12)


def test_cell_repr_and_guarantee_names():
    for cid in CELL_IDS:
        cell = make_cell(SPEC[cid])
        assert cell.guarantee in ("monotone", "interval-monotone", "contraction")
        assert math.isfinite(cell.margin) and cell.margin > 0
        assert type(cell).__name__ in repr(cell)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cid", CELL_IDS)
def test_cuda_operators(cid):
    cell = make_cell(SPEC[cid]).cuda()
    z = torch.randn(state_shape(cell, 2), dtype=torch.float64, device="cuda")
    op = cell.operator()
    for fn in (op.W, op.WT, op.absW, op.absWT):
        assert fn(z).device.type == "cuda"
    shape = None if hasattr(cell, "n") else single_shape(cell)
    assert cell.check(shape).ok
