"""Norm-constrained cells (CerDEQ-style): ``||W||_2 <= 1 - margin``, proven.

Guarantee ('contraction'): ``z -> relu(W z + u)`` is a ``(1 - margin)``-contraction in l2
(relu is 1-Lipschitz), so plain fixed-point iteration converges, the fixed point is unique,
and ``I - W >= margin I`` (monotone too).

- :class:`OrthoLinear`: ``W = (1 - margin) Q``, ``Q = matrix_exp(S - S^T)`` is exactly
  orthogonal (exp of a skew-symmetric matrix) and smooth in the raw ``S``; computed in
  float64 for lower precisions, so in float32 it holds up to the final rounding (~1e-7).
- :class:`OrthoConv2d`: a 3x3 zero-padded conv scaled by a proven bound on its norm,
  ``W = (1 - margin) K / ||C_K||`` with ``||C_K||`` the exact l2 norm of the circular conv on
  the ``(H+2) x (W+2)`` torus (see ``conv_ops``), which upper-bounds the zero-padded conv. This
  is a spectrally *normalised* conv (not exactly orthogonal): ``||W||_2 <= 1 - margin`` holds
  for every image size, with near-equality for large images. It depends on ``(H, W)`` and
  is computed for the size at hand. ``absW`` is exact (a single conv times a positive scalar).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._shapes import conv_check_shape, validate_conv, validate_fc
from .base import MatrixOperator, ReLUAffineCell, check_spectral_norm
from .conv_ops import ScaledConvOperator, circular_conv_norm


def _check_margin(margin):
    if not (isinstance(margin, (int, float)) and 0 < margin <= 1):
        raise ValueError(f"contraction margin must be in (0, 1], got {margin!r}")
    return float(margin)


class OrthoLinear(ReLUAffineCell):
    """Fully connected ``W = (1 - margin) matrix_exp(S - S^T)`` on ``(B, n)``; raw ``S (n, n)``.
    ``absW`` is exact."""

    guarantee = "contraction"
    _check_margin = staticmethod(_check_margin)

    def __init__(self, n: int, margin: float = 0.1, *, device=None, dtype=None):
        super().__init__()
        self.n, self.margin = int(n), _check_margin(margin)
        self.S = nn.Parameter(torch.randn(n, n, device=device, dtype=dtype) / math.sqrt(n))

    def _build_operator(self, p):
        S = p["S"]
        # matrix_exp loses orthogonality in float32 (|| Q || - 1 ~ 1e-5 for large raw S);
        # computing it in float64 leaves only the final rounding (~1e-7 relative).
        S64 = S.to(torch.float64) if S.dtype in (torch.float32, torch.float16, torch.bfloat16) else S
        Q = torch.linalg.matrix_exp(S64 - S64.transpose(0, 1)).to(S.dtype)
        return MatrixOperator((1 - self.margin) * Q)

    def _validate_state(self, shape):
        validate_fc(self, shape)

    def _check(self, shape, tol):
        return check_spectral_norm(self.operator().dense(), 1 - self.margin, tol)

    def extra_repr(self):
        return f"n={self.n}, margin={self.margin}"


class OrthoConv2d(ReLUAffineCell):
    """Conv cell ``W = (1 - margin) K / ||C_K||_{(H+2)x(W+2)}`` on ``(B, C, H, W)``; raw
    kernel ``K (C, C, 3, 3)``. ``absW`` is exact."""

    guarantee = "contraction"
    _check_margin = staticmethod(_check_margin)

    def __init__(self, channels: int, margin: float = 0.1, *, device=None, dtype=None):
        super().__init__()
        self.channels, self.margin = int(channels), _check_margin(margin)
        bound = 1 / math.sqrt(9 * channels)
        self.K = nn.Parameter(torch.empty(channels, channels, 3, 3, device=device, dtype=dtype)
                              .uniform_(-bound, bound))

    def _build_operator(self, p):
        K, gain = p["K"], 1 - self.margin

        def scales(H, W):
            # tiny floor: a zero kernel gives W = 0, still within the bound
            norm = circular_conv_norm(K, H, W).clamp_min(torch.finfo(K.dtype).tiny)
            return gain / norm, K.new_ones(())

        return ScaledConvOperator(K, scales)

    def _validate_state(self, shape):
        validate_conv(self, shape)

    def _check(self, shape, tol):
        shape = conv_check_shape(self, shape)
        return check_spectral_norm(self.operator().dense(shape), 1 - self.margin, tol)

    def extra_repr(self):
        return f"channels={self.channels}, margin={self.margin}"
