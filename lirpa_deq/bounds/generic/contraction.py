"""Well-posedness of a generic DEQ cell: a PROVED contraction of ``z -> cell(z, x)``.

The fixed-point bounds of a generic cell need the fixed point to be unique for every admissible x
(otherwise a box containing *a* fixed point says nothing about the one the solver returns). We
require a constant ``L < 1`` with ``||cell(z, x) - cell(z', x)||_2 <= L ||z - z'||_2`` for all z, z'
and x (Banach: a unique fixed point). It comes from one of:

* a **computed** bound: a walk over the nested auto_LiRPA graph of the cell composing per-op l2
  Lipschitz constants along every path from z (linear / conv / eval BatchNorm / activations /
  residual adds / reshapes). Sound: products and sums of operator-norm upper bounds; matrix norms by
  float64 SVD, convolutions by min(sqrt(||.||_1 ||.||_inf), ||K||_2 sqrt(kh kw), sum_ij ||K_ij||_2);
* a **declared** bound: ``declare_contraction(cell, L)`` (or a ``lipschitz_z`` attribute, a number
  or a callable returning one), e.g. from the user's own proof. Declared bounds are checked
  against a sampled lower estimate (power iteration on the Jacobian at the current point) and
  rejected when violated; they are trusted otherwise, so the soundness of a declared value is
  the declarer's responsibility.

When both exist the smaller one is used. Errors are :class:`ContractionError`.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.func import jvp, vjp

from ..._compat import bound_classes, gemm_scale


def _exact(*names):
    """The installed auto_LiRPA classes of these names, as a set matched by EXACT type (subclasses
    such as BoundSigmoid < BoundTanh have rules of their own)."""
    return set(bound_classes(*names))


# l2 Lipschitz constants of elementwise activations, by exact operator class
_ACTIVATIONS = {cls: value for name, value in {
    "BoundRelu": 1.0, "BoundTanh": 1.0, "BoundSigmoid": 0.25, "BoundSoftplus": 1.0, "BoundAbs": 1.0,
    "BoundAtan": 1.0, "BoundSin": 1.0, "BoundCos": 1.0}.items() for cls in bound_classes(name)}
_IDENTITY_LIKE = _exact("BoundReshape", "BoundFlatten", "BoundUnsqueeze", "BoundSqueeze", "BoundTranspose",
                        "BoundIdentity", "BoundCast", "BoundNeg")
_CONSTANTS = _exact("BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant",
                    "BoundShape", "BoundConstantOfShape")
_LEAKY, _MATRIX, _CONV, _BATCHNORM = (_exact("BoundLeakyRelu"), _exact("BoundLinear", "BoundMatMul"),
                                      _exact("BoundConv"), _exact("BoundBatchNormalization"))
_ADD_SUB, _MUL, _DIV, _CONCAT = (_exact("BoundAdd", "BoundSub"), _exact("BoundMul"), _exact("BoundDiv"),
                                 _exact("BoundConcat"))
SLACK = 1e-6  # relative margin for the float64 evaluation of the norms


class ContractionError(ValueError):
    """A generic cell's contraction in z cannot be established (or is violated). ``reason``: the short
    cause (without the list of paths to take)."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


def refusal_paths(cell) -> str:
    """What a user whose cell is refused can do (docs/existing_deq.md), as one sentence list."""
    return ("What to do (docs/existing_deq.md): (1) for a relu(W z + U x) DEQ, lirpa_deq.convert(model, ...) "
            "moves its weights into IBP-MonDEQ cells (IBPMonLinear, well-posed by construction) with a short "
            "certified fine-tune; (2) solve the layer by fixed-point iteration, DEQ(cell, "
            "solver='fixed_point_iter'), to get bounds of its Picard limit when an invariant box exists; "
            "(3) constrain the z-path weights (e.g. torch.nn.utils.parametrizations.spectral_norm and a scale "
            "< 1: well-posed, but certified accuracy often collapses, prefer (1)), or declare a proved smaller "
            "constant with lirpa_deq.nn.declare_contraction(cell, L).")


def declare_contraction(cell, lipschitz: float):
    """Declare ``||cell(z, x) - cell(z', x)||_2 <= lipschitz * ||z - z'||_2`` (0 <= lipschitz < 1)
    for every x. Returns the cell. The bounds trust this (after a sampled sanity check)."""
    if not isinstance(lipschitz, numbers.Real) or isinstance(lipschitz, bool) or not 0 <= lipschitz < 1:
        raise ContractionError(f"declared Lipschitz constant must be a real number in [0, 1), got {lipschitz!r}: "
                               "a DEQ cell with L >= 1 has no proved unique fixed point")
    cell.lipschitz_z = float(lipschitz)
    return cell


def _spectral(matrix):
    return float(torch.linalg.matrix_norm(matrix.detach().double(), ord=2))


def _conv_norm(weight, groups):
    """Upper bound of the l2 operator norm of a convolution with kernel (Cout, Cin/g, *kernel) (1-D,
    2-D or 3-D), any stride / padding / dilation: zero padding only removes terms, an input entry
    meets each kernel position at most once, and for a fixed kernel position the output -> input map
    is injective (so that term is the channel mix K_p composed with a norm-<=1 selection)."""
    K = weight.detach().double()
    absK = K.abs()
    spatial = tuple(range(2, K.dim()))
    row = float(absK.sum(dim=(1, *spatial)).max())  # an output uses each (cin, position) at most once
    col = float(absK.sum(dim=(0, *spatial)).max())  # over all Cout: >= the per-group column sum
    bound = math.sqrt(row * col)
    if groups == 1:
        positions = math.prod(K.shape[2:])
        per_position = K.reshape(K.shape[0], K.shape[1], positions)
        bound = min(bound, _spectral(K.reshape(K.shape[0], -1)) * math.sqrt(positions),
                    sum(_spectral(per_position[:, :, p]) for p in range(positions)))
    return bound


def _value(node):
    v = getattr(node, "forward_value", None)
    if v is None:
        for attr in ("param", "buffer", "value"):
            v = getattr(node, attr, None)
            if isinstance(v, torch.Tensor):
                break
    if not isinstance(v, torch.Tensor):
        raise ContractionError(f"no value for constant node {node.name} ({type(node).__name__})")
    return v.detach().double()


def graph_lipschitz(bounder, z, x):
    """Computed upper bound of the l2 Lipschitz constant in z of the bounder's cell (float).

    Raises ContractionError naming the first operation on a path from z that has no rule."""
    module = bounder.module
    with torch.no_grad():
        bounder.forward(z.detach(), x.detach())  # fills forward_value of every node
    nodes = module._modules
    memo = {bounder.z_name: 1.0, bounder.x_name: 0.0}
    x_memo = {bounder.x_name: True, bounder.z_name: False}

    def on_x(name):  # does the node's value change with x (so it is no constant factor)?
        if name not in x_memo:
            x_memo[name] = any(on_x(i.name) for i in nodes[name].inputs)
        return x_memo[name]

    def copies(node, k):
        """sqrt of how many times broadcasting repeats each entry of input k in the output: a value
        repeated r times has r times the squared l2 norm."""
        # whole tensors: broadcasting may add leading dimensions, so dim 0 need not be the batch
        out_n, in_n = node.forward_value.numel(), node.inputs[k].forward_value.numel()
        return math.sqrt(out_n / in_n) if out_n > in_n else 1.0

    def factor(node, k):
        """The value of input k of node, a multiplicative factor that must not vary with x."""
        if on_x(node.inputs[k].name):
            raise ContractionError(f"{type(node).__name__} node {node.name}: a factor multiplying z depends on "
                                   "the input x, so its value at one x says nothing about the others; declare "
                                   "a proved constant with lirpa_deq.nn.declare_contraction(cell, L)")
        return _value(node.inputs[k])

    def lip(name):
        if name in memo:
            return memo[name]
        node = nodes[name]
        cls = type(node)
        kind = cls.__name__
        if cls in _CONSTANTS:
            memo[name] = 0.0
            return 0.0
        ins = [lip(i.name) for i in node.inputs]
        dep = [k for k, v in enumerate(ins) if v > 0]
        if not dep:
            memo[name] = 0.0
            return 0.0

        def only_first():
            if dep != [0]:
                raise ContractionError(f"{kind} node {name}: z reaches an input other than the data input "
                                       "(e.g. a weight computed from z); no Lipschitz rule for that")
            return ins[0]

        if cls in _ACTIVATIONS:
            out = _ACTIVATIONS[cls] * only_first()
        elif cls in _LEAKY:
            out = max(1.0, abs(float(node.alpha))) * only_first()
        elif cls in _IDENTITY_LIKE:
            out = only_first()
        elif cls in _MATRIX:
            weight = factor(node, 1)
            if weight.dim() != 2:
                raise ContractionError(f"{kind} node {name}: weight of shape {tuple(weight.shape)} is not a matrix")
            out = gemm_scale(node) * _spectral(weight) * only_first()
        elif cls in _CONV:
            out = _conv_norm(factor(node, 1), int(node.groups)) * only_first()
        elif cls in _BATCHNORM:
            if getattr(node, "training", False):
                raise ContractionError(f"BatchNorm node {name} is in training mode: call model.eval()")
            w, var = factor(node, 1), factor(node, 4)
            out = float((w / torch.sqrt(var + float(node.eps))).abs().max()) * only_first()
        elif cls in _ADD_SUB:
            out = sum(ins[k] * copies(node, k) for k in dep)
        elif cls in _MUL:
            if len(dep) != 1:
                raise ContractionError(f"Mul node {name}: both factors depend on z (a bilinear term)")
            k = dep[0]
            out = float(factor(node, 1 - k).abs().max()) * ins[k] * copies(node, k)
        elif cls in _DIV:
            out = only_first() * copies(node, 0) / float(factor(node, 1).abs().min())
        elif cls in _CONCAT:
            out = math.sqrt(sum(v * v for v in ins))
        else:
            raise ContractionError(
                f"no Lipschitz rule for {kind} (node {name}) on a path from z: the contraction of this cell "
                "cannot be computed. Declare a proved constant with lirpa_deq.nn.declare_contraction(cell, L).")
        memo[name] = out
        return out

    return lip(bounder.out_name) * (1 + SLACK)


def sampled_lipschitz(cell, z, x, iters=20):
    """A LOWER estimate of the z-Lipschitz constant: power iteration on J^T J at (z, x), per sample."""

    f = lambda zz: cell(zz, x)  # noqa: E731
    v = torch.randn_like(z)
    est = torch.zeros(z.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view((-1,) + (1,) * (z.dim() - 1))
            _, Jv = jvp(f, (z,), (v,))
            est = Jv.flatten(1).norm(dim=1).double()
            _, back = vjp(f, z)
            (v,) = back(Jv)
    return float(est.max())


def contraction_certificate(cell, bounder, z, x):
    """(L, source) with L < 1 a proved z-Lipschitz constant of the cell; see module doc."""
    declared = getattr(cell, "lipschitz_z", None)
    if callable(declared):
        declared = declared()
    if declared is not None:
        declared = float(declared)
        measured = sampled_lipschitz(cell, z, x)
        if measured > declared * (1 + 1e-3) + 1e-6:
            raise ContractionError(f"declared lipschitz_z={declared:g} of {type(cell).__name__} is violated: the "
                                   f"Jacobian in z has spectral norm >= {measured:.4g} at the current point")
    try:
        computed, why = graph_lipschitz(bounder, z, x), None
    except ContractionError as err:
        computed, why = None, str(err)
    if declared is None and computed is None:
        raise ContractionError(f"cannot certify {type(cell).__name__}: {why} {refusal_paths(cell)}", reason=why)
    candidates = [(v, s) for v, s in ((declared, "declared"), (computed, "computed")) if v is not None]
    value, source = min(candidates)
    if not value < 1:
        reason = f"Lipschitz bound {value:.4g} >= 1 ({source})"
        raise ContractionError(
            f"{type(cell).__name__} is not a proved contraction in z: {reason}. The fixed point may not be "
            f"unique, so no bound is returned. {refusal_paths(cell)}", reason=reason)
    return value, source
