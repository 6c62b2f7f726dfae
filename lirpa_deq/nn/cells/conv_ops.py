"""Zero-padded 3x3 convolution operators and a proven bound on their l2 norm.

``conv3x3(z, K)`` is ``F.conv2d(z, K, padding=1)`` (same spatial size); ``conv3x3_t`` is
``F.conv_transpose2d(., K, padding=1)``, its exact adjoint. A single zero-padded conv has
``|conv_K| = conv_|K|`` entrywise (every matrix entry is a single kernel tap or 0).

Norm bound (used by OrthoConv2d and the forward-backward step size): embed the ``H x W``
image at offset (1, 1) of a zero ``(H+2) x (W+2)`` grid (an isometry ``E``), apply the
*circular* conv ``C`` on that grid, restrict to the interior (``R``, norm 1). No interior
output wraps around and the border inputs are zero, so ``conv3x3 = R C E`` and
``||conv3x3||_2 <= ||C||_2 = max_k ||K_hat(k)||_2`` (the DFT block-diagonalises ``C`` into
``C_out x C_in`` blocks). The bound is exact up to floating-point rounding of FFT and SVD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import WeightOperator


def conv3x3(z, K):
    return F.conv2d(z, K, padding=1)


def conv3x3_t(g, K):
    return F.conv_transpose2d(g, K, padding=1)


def _adjoint_kernel(K):
    """Kernel of the adjoint of a stride-1, padding-1 3x3 conv (swap channels, flip taps)."""
    return K.transpose(0, 1).flip(2, 3)


def circular_blocks(K: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """DFT blocks ``(H+2, (W+2)//2 + 1, C_out, C_in)`` of the circular conv with kernel ``K``
    on the ``(H+2) x (W+2)`` torus (half spectrum: the rest are complex conjugates). Tap
    placement multiplies each block by a unit phase only (singular values unchanged), and the
    adjoint conv has the conjugate-transposed block at the same frequency."""
    P, Q = H + 2, W + 2
    Kp = F.pad(K, (0, Q - K.shape[-1], 0, P - K.shape[-2]))
    return torch.fft.rfft2(Kp).permute(2, 3, 0, 1)


def circular_conv_norm(K: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``||C||_2`` of the circular conv with kernel ``K (C_out, C_in, 3, 3)`` on the
    ``(H+2) x (W+2)`` torus: a proven upper bound on the zero-padded conv's norm on ``H x W``.
    Differentiable (scalar tensor)."""
    return torch.linalg.matrix_norm(circular_blocks(K, H, W), ord=2).max()


class _ConvOperatorBase(WeightOperator):
    channels: int

    def _probe_shape(self, state_shape):
        shape = tuple(int(s) for s in state_shape)
        if len(shape) != 3 or shape[0] != self.channels:
            raise ValueError(f"conv operator needs state_shape=(C, H, W) with C={self.channels}, "
                             f"got {tuple(state_shape)}")
        return shape


class ScaledConvOperator(_ConvOperatorBase):
    """``W z = r * conv3x3(c * z, K)`` with positive scalings ``(r, c) = scales(H, W)``.

    ``r``, ``c``: positive tensors broadcastable to ``(1, C, H, W)`` (per channel and pixel,
    or scalars); they may depend on the image size, so they are computed per ``(H, W)`` and
    cached per grad mode (a version computed under ``no_grad`` is never reused where a
    gradient is needed). ``absW`` is exact: ``|R M C| = R |M| C`` for positive diagonal R, C.
    """

    abs_exact = True

    def __init__(self, K: torch.Tensor, scales, similarity: torch.Tensor | None = None):
        self.K, self.scales, self.similarity = K, scales, similarity
        self.channels = K.shape[0]
        self._absK = None
        self._cache = {}

    def prepare(self, state_shape):
        """Precompute the size-dependent scalings in the current grad mode."""
        self._rc(int(state_shape[-2]), int(state_shape[-1]))

    def _rc(self, H, W):
        grad = torch.is_grad_enabled()
        hit = self._cache.get((H, W))
        if hit is not None and (hit[2] or not grad):
            return hit[0], hit[1]
        r, c = self.scales(H, W)
        self._cache[(H, W)] = (r, c, grad)
        return r, c

    def _abs(self):
        if self._absK is None:
            self._absK = self.K.abs()
        return self._absK

    def W(self, z):
        r, c = self._rc(z.shape[-2], z.shape[-1])
        return r * conv3x3(c * z, self.K)

    def WT(self, g):
        r, c = self._rc(g.shape[-2], g.shape[-1])
        return c * conv3x3_t(r * g, self.K)

    def absW(self, z):
        r, c = self._rc(z.shape[-2], z.shape[-1])
        return r * conv3x3(c * z, self._abs())

    def absWT(self, g):
        r, c = self._rc(g.shape[-2], g.shape[-1])
        return c * conv3x3_t(r * g, self._abs())

    @torch.no_grad()
    def norm_bound(self, state_shape):
        H, W = int(state_shape[-2]), int(state_shape[-1])
        r, c = self._rc(H, W)
        rmax = float(torch.as_tensor(r).abs().max())
        cmax = float(torch.as_tensor(c).abs().max())
        return rmax * cmax * float(circular_conv_norm(self.K, H, W))

    def _probe_dtype_device(self):
        return dict(dtype=self.K.dtype, device=self.K.device)


class MonConvOperator(_ConvOperatorBase):
    """``W = (1 - m) I - A^T A + B - B^T`` with zero-padded 3x3 convs ``A``, ``B``.

    ``absW``/``absWT`` are an elementwise UPPER bound (``abs_exact = False``):
    ``|W| <= |1 - m| I + |A|^T |A| + |B| + |B|^T``, because ``|A^T A| <= |A|^T |A|``
    entrywise and the diagonal of ``B - B^T`` is 0. The exact ``|W|`` is a position-dependent
    5x5 stencil near the border (not a conv), too costly to build for every forward.
    """

    abs_exact = False

    def __init__(self, A: torch.Tensor, B: torch.Tensor, m: float):
        self.A, self.B, self.m = A, B, float(m)
        self.channels = A.shape[0]
        # For stride 1 and padding 1, conv_transpose2d(z, K) == conv2d(z, flip(K^T)), exactly
        # (zero padding included), so B - B^T is ONE conv with kernel B - flip(B^T).
        self.skew = B - _adjoint_kernel(B)
        self._absA = self._abs_skew = None

    def _abs(self):
        if self._absA is None:
            aB = self.B.abs()
            self._absA, self._abs_skew = self.A.abs(), aB + _adjoint_kernel(aB)
        return self._absA, self._abs_skew

    def W(self, z):
        return (1 - self.m) * z - conv3x3_t(conv3x3(z, self.A), self.A) + conv3x3(z, self.skew)

    def WT(self, g):
        return (1 - self.m) * g - conv3x3_t(conv3x3(g, self.A), self.A) - conv3x3(g, self.skew)

    def absW(self, z):
        aA, aS = self._abs()  # aS: kernel of |B| + |B|^T
        return abs(1 - self.m) * z + conv3x3_t(conv3x3(z, aA), aA) + conv3x3(z, aS)

    def absWT(self, g):
        return self.absW(g)  # the bound matrix is symmetric

    @torch.no_grad()
    def _part_norms(self, state_shape):
        # With E the interior embedding, A = E^T C_A E and B - B^T = E^T (C_B - C_B^T) E, so
        # ||A|| <= ||C_A|| and ||B - B^T|| <= max_k ||B_hat(k) - B_hat(k)^H||.
        # Cached per image size and parameter version (the solvers ask for several bounds).
        H, W = int(state_shape[-2]), int(state_shape[-1])
        key = (H, W, self.A._version, self.B._version)
        cache = self.__dict__.setdefault("_norm_cache", {})
        if key not in cache:
            a = float(circular_conv_norm(self.A, H, W))
            Bb = circular_blocks(self.B, H, W)
            skew = float(torch.linalg.matrix_norm(Bb - Bb.transpose(-2, -1).conj(), ord=2).max())
            cache[key] = (a, skew)
        return cache[key]

    def norm_bound(self, state_shape):
        """Proven ``||W||_2 <= |1 - m| + ||A||^2 + ||B - B^T||`` (circular-embedding bounds)."""
        a, skew = self._part_norms(state_shape)
        return abs(1 - self.m) + a * a + skew

    def i_minus_w_norm_bound(self, state_shape):
        """Proven ``||I - W||_2 <= m + ||A||^2 + ||B - B^T||``."""
        a, skew = self._part_norms(state_shape)
        return self.m + a * a + skew

    def monotone_parts_bound(self, state_shape):
        """Proven ``(s, k)`` with ``sym(I - W) = m I + A^T A <= s I`` and
        ``||skew(I - W)||_2 = ||B - B^T||_2 <= k`` (used for the splitting step sizes)."""
        a, skew = self._part_norms(state_shape)
        return self.m + a * a, skew

    def _probe_dtype_device(self):
        return dict(dtype=self.A.dtype, device=self.A.device)
