"""The model as a flat list of layers, each with the linear-algebra pieces the bounds need.

``flatten_model`` accepts ``nn.Sequential`` (nested) of the supported layers and returns
``Layer`` objects of three kinds:

* ``'affine'``: ``y = A x + b`` (Flatten, Identity, Linear, Conv2d, BatchNorm in eval, AvgPool2d)
  with ``lin`` (``A x``), ``abs_lin`` (``|A| x``), ``lin_t`` (``A^T g``), ``abs_t`` (``|A|^T g``),
  optionally ``sq_lin`` (``(A o A) x``, for exact l2 radii) and ``fan_in`` (terms per output,
  used by the floating-point rounding margin).
* ``'relu'``: ``nn.ReLU``.
* ``'deq'``: ``lirpa_deq.nn.DEQ`` with a ReLU-affine cell.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import DEQ

SUPPORTED = ("nn.Sequential (nested)", "nn.Flatten", "nn.Identity", "nn.Linear", "nn.Conv2d",
             "nn.BatchNorm1d / nn.BatchNorm2d (eval mode)", "nn.ReLU", "nn.AvgPool2d",
             "lirpa_deq.nn.DEQ (ReLU-affine cell)")


def gamma(dtype, fan_in):
    """Relative rounding margin of a sum of ``fan_in`` products (Higham's gamma_n, padded)."""
    return (int(fan_in) + 4) * torch.finfo(dtype).eps


def _vjp(fn, g, in_shape):
    """``A^T g`` for the linear map ``fn`` (by autograd on a zero input of shape ``in_shape``)."""
    with torch.enable_grad():
        x0 = torch.zeros((g.shape[0],) + tuple(in_shape), dtype=g.dtype, device=g.device,
                         requires_grad=True)
        (gx,) = torch.autograd.grad(fn(x0), x0, g, create_graph=g.requires_grad)
    return gx


class Layer:
    """Wrapper of one module; see the module docstring for the methods of each kind."""

    kind = "affine"
    name = ""
    fan_in = 1  # terms per output of A x
    fan_t = 1  # terms per output of A^T g
    bias = None  # broadcastable to the output, or None
    sq_lin = None

    def forward(self, x):
        return self.module(x)

    def cast(self, dtype):
        """A shallow copy whose weight tensors are converted to ``dtype`` (exact for upcasts)."""
        new = copy.copy(self)
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(new, k, v.to(dtype))
        return new

    def lin_t(self, g, in_shape):
        return _vjp(self.lin, g, in_shape)

    def abs_t(self, g, in_shape):
        return _vjp(self.abs_lin, g, in_shape)


class _Reshape(Layer):
    def __init__(self, module):
        self.module = module

    def lin(self, x):
        return self.module(x)

    abs_lin = lin
    sq_lin = lin

    def lin_t(self, g, in_shape):
        return g.reshape((g.shape[0],) + tuple(in_shape))

    abs_t = lin_t


class _Linear(Layer):
    def __init__(self, m: nn.Linear):
        self.module, self.W = m, m.weight.detach()
        self.absW, self.bias, self.fan_in = self.W.abs(), m.bias, m.in_features
        self.fan_t = m.out_features
        if self.bias is not None:
            self.bias = self.bias.detach()

    def lin(self, x):
        return x @ self.W.T

    def abs_lin(self, x):
        return x @ self.absW.T

    def sq_lin(self, x):
        return x @ (self.W * self.W).T

    def lin_t(self, g, in_shape):
        return g @ self.W

    def abs_t(self, g, in_shape):
        return g @ self.absW


class _Conv(Layer):
    def __init__(self, m: nn.Conv2d):
        if m.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported "
                             "(only 'zeros')")
        self.module, self.K = m, m.weight.detach()
        self.absK = self.K.abs()
        self.bias = None if m.bias is None else m.bias.detach().view(1, -1, 1, 1)
        self.fan_in = self.K.shape[1] * self.K.shape[2] * self.K.shape[3]
        self.fan_t = self.K.shape[0] * self.K.shape[2] * self.K.shape[3]

    def _conv(self, x, K):
        m = self.module
        return F.conv2d(x, K, None, m.stride, m.padding, m.dilation, m.groups)

    def lin(self, x):
        return self._conv(x, self.K)

    def abs_lin(self, x):
        return self._conv(x, self.absK)

    def sq_lin(self, x):
        return self._conv(x, self.K * self.K)


class _BatchNorm(Layer):
    def __init__(self, m):
        if m.training:
            raise ValueError(f"{type(m).__name__} is in training mode; call model.eval() first "
                             "(the bounds use the running statistics)")
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"{type(m).__name__} without running statistics "
                             "(track_running_stats=False) is not supported")
        self.module = m
        scale = (m.running_var.detach() + m.eps).rsqrt()
        shift = -m.running_mean.detach() * scale
        if m.weight is not None:
            scale, shift = scale * m.weight.detach(), shift * m.weight.detach()
        if m.bias is not None:
            shift = shift + m.bias.detach()
        self.scale, self.shift = scale, shift
        self.fan_in = self.fan_t = 4

    def _view(self, v, x):
        return v.view((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x):
        return x * self._view(self.scale, x) + self._view(self.shift, x)

    def bias_for(self, x):
        return self._view(self.shift, x)

    def lin(self, x):
        return x * self._view(self.scale, x)

    def abs_lin(self, x):
        return x * self._view(self.scale.abs(), x)

    def sq_lin(self, x):
        return x * self._view(self.scale * self.scale, x)

    def lin_t(self, g, in_shape):
        return self.lin(g)

    def abs_t(self, g, in_shape):
        return self.abs_lin(g)


class _AvgPool(Layer):
    def __init__(self, m: nn.AvgPool2d):
        self.module = m
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
        self.fan_in = self.fan_t = int(k[0]) * int(k[1]) + 2

    def lin(self, x):
        return self.module(x)

    abs_lin = lin  # nonnegative weights

    def abs_t(self, g, in_shape):
        return self.lin_t(g, in_shape)


class _ReLU(Layer):
    kind = "relu"

    def __init__(self, m):
        self.module = m


class _DEQ(Layer):
    kind = "deq"

    def __init__(self, m: DEQ):
        self.module, self.cell = m, m.cell


def bias_of(layer, like):
    """The layer's bias broadcastable to ``like`` (an output tensor), or None."""
    if isinstance(layer, _BatchNorm):
        return layer.bias_for(like)
    return layer.bias


_WRAPPERS = [
    (nn.Flatten, _Reshape), (nn.Identity, _Reshape), (nn.Linear, _Linear), (nn.Conv2d, _Conv),
    (nn.BatchNorm1d, _BatchNorm), (nn.BatchNorm2d, _BatchNorm), (nn.AvgPool2d, _AvgPool),
    (nn.ReLU, _ReLU), (DEQ, _DEQ),
]


def flatten_model(model: nn.Module, prefix: str = "") -> list:
    """The supported layers of ``model`` in execution order (nested Sequentials flattened).

    Raises ValueError naming the first unsupported module and listing the supported ones."""
    if isinstance(model, nn.Sequential):
        out = []
        for name, child in model.named_children():
            out.extend(flatten_model(child, f"{prefix}{name}."))
        return out
    for cls, wrapper in _WRAPPERS:
        if type(model) is cls or (cls is DEQ and isinstance(model, DEQ)):
            layer = wrapper(model)
            layer.name = f"{prefix.rstrip('.') or 'model'} ({type(model).__name__})"
            return [layer]
    where = prefix.rstrip(".") or "the model itself"
    raise ValueError(f"unsupported layer {type(model).__name__} at {where}; lirpa_deq.lipschitz "
                     f"supports: {', '.join(SUPPORTED)}")
