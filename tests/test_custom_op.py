"""A trivial custom operator registered by us goes through auto_LiRPA (the mechanism the DEQ node
uses): symbolic -> custom ONNX op -> our Bound class, for IBP and CROWN, and via custom_ops=."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm, register_custom_op
from auto_LiRPA.operators import Bound

from lirpa_deq.testing import assert_sound


class ScaleShiftOp(torch.autograd.Function):
    @staticmethod
    def symbolic(g, x, scale):
        return g.op("custom::ScaleShift", x, scale_f=float(scale))

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return scale * x + 1.0

    @staticmethod
    def backward(ctx, grad):
        return ctx.scale * grad, None


class ScaleShift(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return ScaleShiftOp.apply(x, self.scale)


class BoundScaleShift(Bound):
    def __init__(self, attr=None, inputs=None, output_index=0, options=None):
        super().__init__(attr, inputs, output_index, options)
        self.scale = attr["scale"]

    def forward(self, x):
        return self.scale * x + 1.0

    def interval_propagate(self, *v):
        lo, hi = v[0]
        a, b = self.scale * lo + 1.0, self.scale * hi + 1.0
        return torch.minimum(a, b), torch.maximum(a, b)

    def bound_backward(self, last_lA, last_uA, x, **kwargs):  # upstream passes extra keywords
        def side(A):
            if A is None:
                return None, 0
            return self.scale * A, A.sum(dim=list(range(2, A.dim())))
        lA, lbias = side(last_lA)
        uA, ubias = side(last_uA)
        return [(lA, uA)], lbias, ubias


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), ScaleShift(-2.0), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("register", ["global", "custom_ops"])
@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_custom_op_bounds_sound(register, method):
    model, x = _model(), torch.rand(4, 6)
    if register == "global":
        register_custom_op("custom::ScaleShift", BoundScaleShift)
        bounded = BoundedModule(model, x)
    else:
        bounded = BoundedModule(model, x, custom_ops={"custom::ScaleShift": BoundScaleShift})
    assert any(isinstance(m, BoundScaleShift) for m in bounded.modules())
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1)),), method=method)
    torch.testing.assert_close(bounded(x), model(x))
    assert_sound(model, x, 0.1, lb, ub, n_samples=200, pgd_steps=20)
