"""Small generic DEQ cells ``cell(z, x) -> z`` (any nn.Module works; these are reference
examples used by the tests, the benchmark and examples/custom_cell.py).

Each is a contraction in z by construction (its z-path weight is rescaled to the requested
spectral norm at initialisation), so its fixed point is unique and the generic bounds apply.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


def _rescale_(linear, target):
    with torch.no_grad():
        linear.weight.mul_(target / torch.linalg.matrix_norm(linear.weight.double(), ord=2).item())


class TanhCell(nn.Module):
    """z_next = tanh(A z + U x + b); A rescaled to ||A||_2 = contraction. z: (B, n), x: (B, m)."""

    def __init__(self, n, m, contraction=0.8):
        super().__init__()
        self.A = nn.Linear(n, n, bias=False)
        self.U = nn.Linear(m, n)
        self.n = n
        _rescale_(self.A, contraction)

    def forward(self, z, x):
        return torch.tanh(self.A(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.n)


class ResidualCell(nn.Module):
    """z_next = a z + relu(A z + U x); a + ||A||_2 = contraction. z: (B, n), x: (B, m)."""

    def __init__(self, n, m, contraction=0.9, skip=0.5):
        super().__init__()
        self.A = nn.Linear(n, n)
        self.U = nn.Linear(m, n)
        self.skip = skip
        self.n = n
        _rescale_(self.A, contraction - skip)

    def forward(self, z, x):
        return self.skip * z + torch.relu(self.A(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.n)


class ConvBNCell(nn.Module):
    """z_next = relu(scale * BN(conv(z)) + inj(x)) with a spectral-normalized conv (torch
    parametrization). z: (B, C, H, W), x: (B, Cx, H, W). Put it in eval mode for bounds."""

    def __init__(self, channels, in_channels=1, scale=0.25):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(channels)
        self.inj = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.scale = scale
        self.channels = channels

    def forward(self, z, x):
        return torch.relu(self.scale * self.bn(self.conv(z)) + self.inj(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.channels, x_shape[2], x_shape[3])


class DenseReLUCell(nn.Module):
    """relu(W z + u) with a given dense W: a ReLU-affine cell written as a generic one (to compare
    the generic path with the specialized one on the same weights). z, u: (B, n)."""

    def __init__(self, weight):
        super().__init__()
        self.W = nn.Parameter(weight.detach().clone())

    @classmethod
    def from_cell(cls, cell, state_shape=None):
        """The generic twin of a ReLUAffineCell (conv cells need ``state_shape``, e.g. (C, H, W);
        the twin then acts on flattened states)."""
        return cls(cell.operator().dense(state_shape))

    def forward(self, z, u):
        return torch.relu(z @ self.W.t() + u)
