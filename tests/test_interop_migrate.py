"""lirpa_deq.convert: recognising relu(W z + U x) DEQs, the IBP-MonDEQ fit, the fine-tune and report."""
import math

import pytest
import torch
import torch.nn as nn

import lirpa_deq
from lirpa_deq.migrate import ConversionError, fit_ibp_monotone
from lirpa_deq.nn import DEQ, IBPMonLinear


class ReluCell(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.W, self.U, self.n = nn.Linear(n, n), nn.Linear(m, n), n

    def forward(self, z, x):
        return torch.relu(self.W(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.n)


class PlainCell(nn.Module):  # x added as is: relu(z @ W.T + x)
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) * 0.5)

    def forward(self, z, x):
        return torch.relu(z @ self.weight.t() + x)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :8].sum(1) > x.flatten(1)[:, 8:].sum(1)).long()
    return x, y


def test_fit_keeps_the_interval_guarantee_and_approaches_the_weights():
    torch.manual_seed(0)
    target = torch.randn(8, 8) * 0.3
    cell, err = fit_ibp_monotone(target, margin=0.5, steps=200)
    assert isinstance(cell, IBPMonLinear) and cell.check().ok
    W = cell.operator().matrix.detach()
    assert float(torch.linalg.eigvals(W.abs()).abs().max()) <= 0.5 + 1e-6  # rho(|W|) <= 1 - m
    assert err == pytest.approx(float((W - target).norm() / target.norm()), rel=1e-3)
    start = IBPMonLinear(8, similarity=True)
    with torch.no_grad():
        start.M.copy_(target)
    assert err < float((start.operator().matrix.detach() - target).norm() / target.norm())  # the fit improved


def _relu_cell_model():
    return nn.Sequential(nn.Flatten(), DEQ(ReluCell(6, 16), solver="fixed_point_iter", on_nonconvergence="ignore"),
                         nn.Linear(6, 2)).eval()


def _plain_cell_model():
    return nn.Sequential(nn.Flatten(), DEQ(PlainCell(16), solver="fixed_point_iter", on_nonconvergence="ignore"),
                         nn.Linear(16, 2)).eval()


@pytest.mark.parametrize("build", [_relu_cell_model, _plain_cell_model])
def test_convert_replaces_the_layer_and_preserves_the_injection(build):
    torch.manual_seed(1)
    model = build()
    x, y = _data()
    report = lirpa_deq.convert(model, test=(x, y), epochs=0, log=None)
    assert report.layers == ["1"]
    injection, layer = report.model[1]
    assert isinstance(layer.cell, IBPMonLinear) and layer.cell.similarity
    assert isinstance(model[1], DEQ) and not isinstance(model[1].cell, IBPMonLinear)  # the original is unchanged
    old, flat = model[1].cell, x.flatten(1)
    expect = old.U(flat) + old.W.bias if isinstance(old, ReluCell) else flat  # u = U(x) + b
    assert torch.allclose(injection(flat), expect)
    assert report.accuracy_before is not None and report.epochs == 0 and report.certified == {}


def test_unrecognised_cells_are_refused():
    class TanhCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.U = nn.Linear(5, 5), nn.Linear(5, 5)

        def forward(self, z, x):
            return torch.tanh(self.W(z) + self.U(x))

    model = nn.Sequential(DEQ(TanhCell()), nn.Linear(5, 2)).eval()
    with pytest.raises(ConversionError, match=r"relu\(L\(z\) \+ R\(x\)\)"):
        lirpa_deq.convert(model, test=(torch.rand(4, 5), torch.zeros(4, dtype=torch.long)), log=None)
    with pytest.raises(ConversionError, match="no lirpa_deq.nn.DEQ layer"):
        lirpa_deq.convert(nn.Linear(5, 2), test=(torch.rand(4, 5), torch.zeros(4, dtype=torch.long)), log=None)


def test_fine_tune_and_report():
    torch.manual_seed(2)
    x, y = _data(128)
    model = nn.Sequential(nn.Flatten(), DEQ(ReluCell(12, 16), solver="fixed_point_iter", on_nonconvergence="ignore"),
                          nn.Linear(12, 2)).eval()
    lines = []
    report = lirpa_deq.convert(model, train=(x, y), test=(x[:32], y[:32]), eps=0.02, epochs=1, batch_size=32,
                               certify=("IBP",), num_classes=2, log=lines.append)
    assert set(report.certified) == {"IBP"} and 0 <= report.certified["IBP"] <= 1
    assert report.epochs == 1 and report.accuracy_after is not None
    assert "certified at eps=0.02" in lines[-1] and str(report) == lines[-1]
    assert math.isfinite(report.fit_error[report.layers[0]])
