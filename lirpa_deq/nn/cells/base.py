"""Base classes for ReLU-affine DEQ cells ``z_next = relu(W z + u)``.

A cell owns unconstrained raw parameters and maps them to a weight ``W`` that satisfies a
proven structural guarantee (monotone, interval-monotone, contraction). ``W`` is exposed as a
:class:`WeightOperator` so that solvers and bound propagation never need the dense matrix.

Shapes: the state ``z`` and the injection ``u`` share one shape, ``(B, n)`` for fully
connected cells and ``(B, C, H, W)`` for conv cells. ``W`` acts on one sample; all operator
methods are batched over the leading dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

GUARANTEES = ("monotone", "interval-monotone", "contraction")


@dataclass
class CellCheck:
    """Outcome of :meth:`ReLUAffineCell.check`: ``value`` is the measured quantity, ``bound``
    the proven limit, ``what`` says which (and in which direction) they are compared."""

    ok: bool
    value: float
    bound: float
    what: str


class WeightOperator:
    """``W`` as a batched linear operator on states ``(B, *state_shape)``.

    Methods: ``W(z)``, ``WT(g)`` (the exact adjoint), ``absW(z)``, ``absWT(g)`` (the
    elementwise absolute matrix ``|W|`` and its transpose, exact iff ``abs_exact``; otherwise
    an elementwise upper bound ``|W| <= absW``, which keeps interval arithmetic sound).

    Optional attributes used by the solvers:
    ``matrix``: the dense ``(N, N)`` matrix if the operator is naturally dense (fc), else None.
    ``similarity``: None, or a positive tensor ``s`` broadcastable to ``(B, *state)`` with
    ``W = S^-1 W0 S`` where ``W0`` (not ``W``) carries the cell's monotonicity.
    ``norm_bound(state_shape)``: a proven upper bound on ``||W||_2`` or None; optionally
    ``i_minus_w_norm_bound(state_shape)``: one on ``||I - W||_2``.
    """

    abs_exact: bool = True
    matrix: torch.Tensor | None = None
    similarity: torch.Tensor | None = None

    def W(self, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def WT(self, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def absW(self, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def absWT(self, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def norm_bound(self, state_shape=None):
        return None

    def prepare(self, state_shape):
        """Precompute size-dependent quantities (in the current grad mode); no-op by default."""

    def _probe_shape(self, state_shape):
        return tuple(state_shape)

    def dense(self, state_shape=None) -> torch.Tensor:
        """``(N, N)`` matrix of ``W`` for one sample of shape ``state_shape`` (``N = prod``).

        Built by applying ``W`` to the identity basis, so it costs ``N`` operator applications:
        meant for checks and tests on small states.
        """
        if self.matrix is not None:
            return self.matrix
        if state_shape is None:
            raise ValueError("dense() of a matrix-free operator needs state_shape=(C, H, W)")
        shape = self._probe_shape(state_shape)
        probe = self._probe_dtype_device()
        N = 1
        for d in shape:
            N *= int(d)
        eye = torch.eye(N, **probe).view((N,) + shape)
        # Row j of W(eye) is W e_j, i.e. column j of W.
        return self.W(eye).reshape(N, N).transpose(0, 1)

    def dense_abs(self, state_shape=None) -> torch.Tensor:
        """``(N, N)`` matrix of the ``absW`` operator (exact ``|W|`` iff ``abs_exact``)."""
        if self.matrix is not None:
            return self.matrix.abs()
        shape = self._probe_shape(state_shape)
        N = 1
        for d in shape:
            N *= int(d)
        eye = torch.eye(N, **self._probe_dtype_device()).view((N,) + shape)
        return self.absW(eye).reshape(N, N).transpose(0, 1)

    def _probe_dtype_device(self):  # pragma: no cover - overridden
        raise NotImplementedError


class MatrixOperator(WeightOperator):
    """Dense ``W`` of shape ``(n, n)`` acting on ``(B, n)``; ``absW`` is exact.

    similarity: optional positive ``(n,)`` (see :class:`WeightOperator`).
    """

    abs_exact = True

    def __init__(self, matrix: torch.Tensor, similarity: torch.Tensor | None = None):
        self.matrix = matrix
        self.similarity = None if similarity is None else similarity.view(1, -1)
        self._abs = None

    def _absm(self):
        if self._abs is None:
            self._abs = self.matrix.abs()
        return self._abs

    def W(self, z):
        return z @ self.matrix.transpose(0, 1)

    def WT(self, g):
        return g @ self.matrix

    def absW(self, z):
        return z @ self._absm().transpose(0, 1)

    def absWT(self, g):
        return g @ self._absm()

    def norm_bound(self, state_shape=None):
        return float(torch.linalg.matrix_norm(self.matrix.detach(), ord=2))

    def _probe_dtype_device(self):
        return dict(dtype=self.matrix.dtype, device=self.matrix.device)


class ReLUAffineCell(nn.Module):
    """Base class of the cells. Subclasses set ``margin``, ``guarantee`` and implement
    ``_build_operator(p)`` (``p``: name -> tensor, same keys as ``named_parameters()``),
    ``_check(shape, tol)`` and ``_validate_state(shape)``.

    ``margin`` is validated whenever it is set (also after construction, since the operator and
    every bound read it): a finite real > 0, and whatever the subclass's ``_check_margin``
    (a staticmethod returning the float) requires on top.
    """

    guarantee: str
    _check_margin = None  # optional stricter validator of the margin, set by subclasses

    @property
    def margin(self) -> float:
        return self._margin

    @margin.setter
    def margin(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not value > 0:
            raise ValueError(f"{type(self).__name__}.margin must be a finite number > 0, got {value!r}")
        check = type(self)._check_margin
        self._margin = float(check(value) if check is not None else value)

    def operator(self, params: dict | None = None) -> WeightOperator:
        """``W`` as a :class:`WeightOperator`.

        params: optional overrides, name -> tensor, keys from ``dict(self.named_parameters())``
        (missing keys fall back to the cell's own parameters; unknown keys raise ValueError).
        The operator is differentiable w.r.t. whichever tensors it was built from.
        """
        own = dict(self.named_parameters())
        if params:
            unknown = sorted(set(params) - set(own))
            if unknown:
                raise ValueError(f"unknown parameter name(s) {unknown} for {type(self).__name__}; "
                                 f"valid names: {sorted(own)}")
            for k, v in params.items():
                if tuple(v.shape) != tuple(own[k].shape):
                    raise ValueError(f"parameter {k!r} has shape {tuple(v.shape)}, "
                                     f"expected {tuple(own[k].shape)}")
            own.update(params)
        for k, v in own.items():  # (NaN weights would surface as a LinAlgError of an SVD, or as NaN bounds)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{type(self).__name__} parameter {k!r} contains NaN or inf: no fixed point or "
                                 "bound is defined; check the training run (learning rate, divergence) or the "
                                 "loaded checkpoint")
        return self._build_operator(own)

    def step(self, z, u, op: WeightOperator | None = None):
        """One cell application ``relu(W z + u)``; ``z``, ``u`` of the state shape."""
        if op is None:
            op = self.operator()
        return torch.relu(op.W(z) + u)

    def forward(self, z, u):
        return self.step(z, u)

    def state_shape(self, u_shape):
        """Shape of ``z`` for an injection of shape ``u_shape`` (the same shape; validated)."""
        u_shape = tuple(u_shape)
        self._validate_state(u_shape)
        return u_shape

    def check(self, shape=None, tol: float = 1e-6) -> CellCheck:
        """Numerically verify the cell's own guarantee on the dense matrix (float64 algebra).

        shape: per-sample state shape for conv cells, e.g. ``(C, 6, 6)`` (default small).
        """
        with torch.no_grad():
            return self._check(shape, tol)

    # -- implemented by subclasses -----------------------------------------------------------
    def _build_operator(self, p):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, shape, tol):  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate_state(self, shape):  # pragma: no cover - abstract
        raise NotImplementedError


def sym(M: torch.Tensor) -> torch.Tensor:
    return (M + M.transpose(0, 1)) / 2


def check_min_eig_sym_i_minus(Wd: torch.Tensor, m: float, tol: float) -> CellCheck:
    """Monotone: ``lambda_min(sym(I - W)) >= m``."""
    Wd = Wd.double()
    eye = torch.eye(Wd.shape[0], dtype=Wd.dtype, device=Wd.device)
    v = float(torch.linalg.eigvalsh(sym(eye - Wd)).min())
    return CellCheck(v >= m - tol, v, float(m), "lambda_min(sym(I - W)) >= m")


def check_max_eig_sym_abs(Wd: torch.Tensor, bound: float, tol: float, what: str) -> CellCheck:
    """Interval-monotone: ``lambda_max(sym(|W0|)) <= 1 - m``."""
    Wd = Wd.double()
    v = float(torch.linalg.eigvalsh(sym(Wd.abs())).max())
    return CellCheck(v <= bound + tol, v, float(bound), what)


def check_spectral_norm(Wd: torch.Tensor, bound: float, tol: float) -> CellCheck:
    """Contraction: ``||W||_2 <= 1 - margin``."""
    v = float(torch.linalg.svdvals(Wd.double()).max())
    return CellCheck(v <= bound + tol, v, float(bound), "||W||_2 <= 1 - margin")
