"""Bounds of ONE application of a generic cell, ``cell(z, x)``, by a nested auto_LiRPA module.

:class:`CellBounder` wraps the cell in a ``BoundedModule`` over the two inputs (z, x), both
perturbed in l_inf boxes, and exposes what the fixed-point bounds need:

* ``ibp(z_box, x_box)`` -> an interval containing ``cell(z, x)`` for every z, x of the boxes
  (auto_LiRPA's IBP, sound up to floating-point rounding, which callers widen for);
* ``linear(z_box, x_box)`` -> CROWN's linear bounds of the cell over the boxes,
  ``Lz z + Lx x + bl <= cell(z, x) <= Uz z + Ux x + bu`` (``return_A`` w.r.t. both inputs).

The nested module shares the cell's parameters (auto_LiRPA registers the same tensors), so
gradients of these bounds reach the cell. It snapshots buffers (e.g. BatchNorm statistics), so
it is rebuilt whenever a buffer changes: see :meth:`CellBounder.matches`. Cells with torch
parametrizations (``spectral_norm``, ``orthogonal``) are traced as a copy whose parametrized weights
are plain tensors (auto_LiRPA cannot trace the parametrization's own ops): the module is then
rebuilt whenever any parameter changes, and bound gradients do not reach the parametrized weights.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn


@contextlib.contextmanager
def _default_dtype(dtype):
    """auto_LiRPA creates some specification tensors in the default dtype (upstream: float32
    intermediate specifications of ReLU nodes); a float64 cell needs them in float64."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class _CellOfZX(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, z, x):
        # flattened: auto_LiRPA 0.3's CROWN needs a (B, n) output for its identity specification
        return self.cell(z, x).flatten(1)


def _parametrized(cell):
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) for m in cell.modules())


def _without_parametrizations(cell):
    """A copy of the cell whose parametrized tensors are plain parameters holding their current
    values (torch refuses to trace through cached parametrizations). torch's own
    remove_parametrizations edits the parametrized class, which the copy shares with the
    original, so the instance is switched back to its base class by hand."""
    import copy

    from torch.nn.utils import parametrize

    clone = copy.deepcopy(cell)
    for m in clone.modules():
        if parametrize.is_parametrized(m):
            with torch.no_grad():
                values = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            del m._modules["parametrizations"]
            m.__class__ = m.__class__.__bases__[0]
            for name, value in values.items():
                m.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return clone


def _snapshot(cell):
    """Tensors whose change invalidates the nested module: buffers (auto_LiRPA copies them) and,
    for parametrized cells (traced with their weights as constants), every parameter."""
    tensors = list(cell.buffers())
    if _parametrized(cell):
        tensors += list(cell.parameters())
    return tuple(t.detach() for t in tensors)


def check_eval_mode(cell):
    """Batch statistics make a cell depend on the whole batch (no per-sample bound exists), and a
    parametrization in training mode (spectral_norm's power iteration) changes the weights at every
    call: both must be in eval mode."""
    from torch.nn.utils import parametrize

    for name, m in cell.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"cell module {name or type(m).__name__!r} is a BatchNorm in training mode; its "
                             "output depends on the batch statistics, so the cell has no per-sample bound. "
                             "Call model.eval() before computing bounds.")
        if parametrize.is_parametrized(m):
            raise ValueError(f"cell module {name or type(m).__name__!r} is parametrized (e.g. spectral_norm) and "
                             "in training mode, where its weights change at every call. Call model.eval() "
                             "before computing bounds.")


class CellBounder:
    """Nested auto_LiRPA bounds of ``cell(z, x)`` for z of ``z_example``'s shape and x of
    ``x_example``'s shape (both ``(B, ...)``; a new bounder is built for other shapes)."""

    def __init__(self, cell, z_example, x_example):
        from auto_LiRPA import BoundedModule
        from auto_LiRPA.bound_ops import BoundInput, BoundParams, BoundBuffers

        check_eval_mode(cell)
        self.cell = cell
        self.key = (tuple(z_example.shape), tuple(x_example.shape), z_example.dtype, z_example.device)
        self.buffers = tuple(b.clone() for b in _snapshot(cell))
        self.parametrized = _parametrized(cell)
        traced = _without_parametrizations(cell) if self.parametrized else cell
        wrapper = _CellOfZX(traced)
        wrapper.training = cell.training  # the wrapper's own flag only; auto_LiRPA traces in its mode
        self.module = BoundedModule(wrapper, (z_example.detach(), x_example.detach()),
                                    bound_opts={"conv_mode": "matrix"}, device=z_example.device)
        roots = [name for name, node in self.module._modules.items()
                 if isinstance(node, BoundInput) and not isinstance(node, (BoundParams, BoundBuffers))]
        if len(roots) != 2:
            raise RuntimeError(f"nested auto_LiRPA module of the cell has inputs {roots}, expected (z, x)")
        self.z_name, self.x_name = roots
        self.out_name = self.module.final_name
        self.num_ops, self.fan_in = _rounding_profile(self.module, z_example, x_example)

    def matches(self, z, x):
        """Usable for these inputs: same shapes/dtype/device and unchanged buffers."""
        if (tuple(z.shape), tuple(x.shape), z.dtype, z.device) != self.key:
            return False
        now = _snapshot(self.cell)
        return len(now) == len(self.buffers) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(now, self.buffers))

    def _inputs(self, z_box, x_box):
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        def bounded(lo, hi):
            return BoundedTensor((lo + hi) / 2, PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=hi))

        return (bounded(*z_box), bounded(*x_box))

    def ibp(self, z_box, x_box):
        """(lo, hi) of cell(z, x) over the boxes, each (B, *z_shape)."""
        with _default_dtype(z_box[0].dtype):
            lb, ub = self.module.compute_bounds(x=self._inputs(z_box, x_box), method="IBP")
        return lb.reshape(z_box[0].shape), ub.reshape(z_box[0].shape)

    def linear(self, z_box, x_box):
        """CROWN's linear bounds of the cell over the boxes, flattened per sample: dict with
        Lz, Uz (B, n, n), Lx, Ux (B, n, m), bl, bu (B, n), and the concrete lo, hi (B, *z_shape);
        n = z numel, m = x numel per sample."""
        batch, n = z_box[0].shape[0], z_box[0][0].numel()
        # explicit identity specification: 0.3's default C is float32 whatever the model's dtype
        C = torch.eye(n, dtype=z_box[0].dtype, device=z_box[0].device).expand(batch, n, n)
        with _default_dtype(z_box[0].dtype):
            lb, ub, A = self.module.compute_bounds(
                x=self._inputs(z_box, x_box), C=C, method="CROWN", return_A=True,
                needed_A_dict={self.out_name: [self.z_name, self.x_name]})
        Az, Ax = A[self.out_name][self.z_name], A[self.out_name][self.x_name]
        flat = lambda t, width: t.reshape(batch, n, width)  # noqa: E731
        m = x_box[0][0].numel()
        lin = dict(Lz=flat(Az["lA"], n), Uz=flat(Az["uA"], n), Lx=flat(Ax["lA"], m), Ux=flat(Ax["uA"], m),
                   lo=lb.reshape(z_box[0].shape), hi=ub.reshape(z_box[0].shape))
        zf = tuple(t.reshape(batch, n) for t in z_box)
        xf = tuple(t.reshape(batch, m) for t in x_box)
        lin["bl"] = _pure_bias(lb.reshape(batch, n), lin["Lz"], lin["Lx"], zf, xf, Az["lbias"], Ax["lbias"], 1.0)
        lin["bu"] = _pure_bias(ub.reshape(batch, n), lin["Uz"], lin["Ux"], zf, xf, Az["ubias"], Ax["ubias"], -1.0)
        return lin

    def rounding_slack(self, *tensors):
        """Per-sample margin (B, 1, ..) for the floating-point rounding of the nested bounds
        (auto_LiRPA computes in plain float arithmetic): Higham's bound (fan-in + 8) * eps *
        magnitude per operation, summed over the graph's operations, with the largest fan-in of
        its linear / conv layers and the largest magnitude among ``tensors``."""
        ref = tensors[0]
        eps = torch.finfo(ref.dtype).eps
        mag = torch.stack([t.detach().abs().flatten(1).max(1).values for t in tensors]).max(0).values
        per_sample = self.num_ops * (self.fan_in + 8) * eps * (1 + mag)
        return per_sample.view((-1,) + (1,) * (ref.dim() - 1)) + torch.finfo(ref.dtype).tiny


def _concretize(A, box, sign):
    """min (sign=1) or max (sign=-1) of A v over the box, per row: (B, rows)."""
    c, r = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    return torch.einsum("bij,bj->bi", A, c) - sign * torch.einsum("bij,bj->bi", A.abs(), r)


def _pure_bias(bound, Az, Ax, z_box, x_box, bias_z, bias_x, sign):
    """The constant term b of CROWN's linear bound ``Az z + Ax x + b`` (B, n).

    auto_LiRPA's ``return_A`` bias differs between versions: 0.3 records the pure bias under every
    input, upstream (>= 0.6) records, per input, the concrete bound minus that input's own
    concretized term. Both satisfy ``bound = b + conc_z + conc_x``, so b is recovered from the
    concrete bound, and checked against the version's record (a semantics we do not know raises).
    The recovered b is moved outward by its rounding error (Higham), keeping the bound sound."""
    conc_z, conc_x = _concretize(Az, z_box, sign), _concretize(Ax, x_box, sign)
    bias = bound - conc_z - conc_x
    bz, bx = bias_z.reshape(bias.shape), bias_x.reshape(bias.shape)
    rel = max(1e-6, 10 * (Az.shape[-1] + Ax.shape[-1]) * torch.finfo(bias.dtype).eps)
    scale = rel * (1 + bound.abs() + conc_z.abs() + conc_x.abs())  # a semantics check, not the margin
    if not (bool(((bz - bias).abs() <= scale).all() and ((bx - bias).abs() <= scale).all())
            or bool(((bz + bx - bound - bias).abs() <= scale).all())):
        raise RuntimeError("the installed auto_LiRPA's return_A bias matches neither the 0.3 nor the "
                           "upstream convention; the generic-cell CROWN bound cannot be assembled soundly")
    eps = torch.finfo(bias.dtype).eps
    terms = (bound.abs() + torch.einsum("bij,bj->bi", Az.abs(), torch.maximum(z_box[0].abs(), z_box[1].abs()))
             + torch.einsum("bij,bj->bi", Ax.abs(), torch.maximum(x_box[0].abs(), x_box[1].abs())))
    fan_in = Az.shape[-1] + Ax.shape[-1] + 8
    return bias - sign * fan_in * eps * terms


_NOT_OPS = ("BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant")


def _rounding_profile(module, z_example, x_example):
    """(number of operations, largest dot-product length) of the traced cell; the fan-in falls
    back to the number of z and x entries when no linear / conv layer is recognised."""
    with torch.no_grad():
        module(z_example, x_example)  # forward values of the weights
    ops, fan_in = 0, 0
    for node in module._modules.values():
        kind = type(node).__name__
        if kind in _NOT_OPS:
            continue
        ops += 1
        if kind in ("BoundLinear", "BoundMatMul", "BoundConv") and len(node.inputs) > 1:
            w = getattr(node.inputs[1], "forward_value", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                size = math.prod(w.shape[1:]) if kind == "BoundConv" else max(w.shape[-1], w.shape[-2])
                fan_in = max(fan_in, int(size))
    if fan_in == 0:
        fan_in = z_example[0].numel() + x_example[0].numel()
    return max(ops, 1), fan_in
