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

import copy
import math

import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from torch.nn.utils import parametrize

from ..._compat import bound_classes, default_dtype
from ...rounding import dot_error
from .fingerprint import fingerprint, same_fingerprint

# auto_LiRPA operator classes, matched by exact type
_INPUTS = set(bound_classes("BoundInput"))  # the traced roots z and x (not parameters / buffers)
_PARAMS = set(bound_classes("BoundParams"))
_CONVS = set(bound_classes("BoundConv"))
_WEIGHTED = set(bound_classes("BoundLinear", "BoundMatMul")) | _CONVS


class _CellOfZX(nn.Module):
    def __init__(self, cell, dtype):
        super().__init__()
        self.cell = cell
        # auto_LiRPA 0.3 takes its specification dtype from the traced module's first parameter (and
        # fails without one, e.g. when the cell's weights are buffers): an exact zero term carries it
        self.anchor = nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, z, x):
        # flattened: auto_LiRPA 0.3's CROWN needs a (B, n) output for its identity specification
        return self.cell(z, x).flatten(1) + self.anchor


def _parametrized(cell):
    return any(parametrize.is_parametrized(m) for m in cell.modules())


def _without_parametrizations(cell):
    """A copy of the cell whose parametrized tensors are plain parameters holding their current
    values (torch refuses to trace through cached parametrizations). torch's own
    remove_parametrizations edits the parametrized class, which the copy shares with the
    original, so the instance is switched back to its base class by hand."""
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


def check_eval_mode(cell):
    """Batch statistics make a cell depend on the whole batch (no per-sample bound exists), and a
    parametrization in training mode (spectral_norm's power iteration) changes the weights at every
    call: both must be in eval mode."""
    for name, m in cell.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(f"cell module {name or type(m).__name__!r} is a BatchNorm without running statistics "
                             "(track_running_stats=False): it normalizes with batch statistics even in eval mode, "
                             "so the cell has no per-sample bound")
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

        check_eval_mode(cell)
        dtypes = {t.dtype for t in list(cell.parameters()) + list(cell.buffers()) if t.is_floating_point()}
        if len(dtypes) > 1 or (dtypes and z_example.dtype not in dtypes):
            raise ValueError(f"{type(cell).__name__} mixes floating dtypes {sorted(str(d) for d in dtypes)} with states "
                             f"of {z_example.dtype}: convert the whole model (model.to(dtype)), not the BoundedModule")
        self.cell = cell
        self.key = (tuple(z_example.shape), tuple(x_example.shape), z_example.dtype, z_example.device)
        self.parametrized = _parametrized(cell)
        self.fingerprint = fingerprint(cell, with_parameters=self.parametrized)
        traced = _without_parametrizations(cell) if self.parametrized else cell
        wrapper = _CellOfZX(traced, z_example.dtype)
        wrapper.training = cell.training  # the wrapper's own flag only; auto_LiRPA traces in its mode
        modes = [(m, m.training) for m in cell.modules()]
        grads = [(p, p.requires_grad) for p in cell.parameters()]
        try:
            self.module = BoundedModule(wrapper, (z_example.detach(), x_example.detach()),
                                        bound_opts={"conv_mode": "matrix"}, device=z_example.device)
            self.module.eval()  # 0.3 may switch the traced model to training mode (e.g. for Dropout)
            self.sync_parameters()
        except Exception as err:  # auto_LiRPA's own errors say little about the cell
            raise RuntimeError(f"auto_LiRPA could not build a bounded module of {type(cell).__name__}(z, x): "
                               f"{type(err).__name__}: {err}. Generic cells must be built from operations "
                               "auto_LiRPA supports (linear, conv2d, batchnorm in eval, relu/tanh/sigmoid, "
                               "add/mul, reshape...)") from err
        finally:
            for m, mode in modes:  # tracing must not change the user's modules
                m.training = mode
            for p, flag in grads:  # (auto_LiRPA's forward sets requires_grad from the node's mode)
                p.requires_grad_(flag)
        roots = [name for name, node in self.module._modules.items()
                 if type(node) in _INPUTS]
        if len(roots) != 2:
            raise ValueError(f"{type(cell).__name__}(z, x) must use both the state z and the input x: its traced "
                             f"graph has {len(roots)} input(s). A cell that ignores x has a constant fixed point "
                             "(nothing to certify); one that ignores z is an explicit layer, not a DEQ.")
        self.z_name, self.x_name = roots
        self.out_name = self.module.final_name
        self.num_ops, self.fan_in = _rounding_profile(self.module, z_example, x_example)

    def sync_parameters(self):
        """auto_LiRPA's BoundParams.forward calls ``param.requires_grad_(node.training)`` on the SHARED
        cell parameters; keep each node's flag equal to its parameter's own requires_grad so that a
        nested pass neither freezes the user's parameters nor unfreezes frozen ones (and gradients of
        the nested bounds flow exactly where the user's model allows). Called before every pass."""
        for node in self.module._modules.values():
            param = getattr(node, "param", None)
            if type(node) in _PARAMS and isinstance(param, torch.Tensor):
                node.training = bool(param.requires_grad)

    def forward(self, z, x):
        """The nested module's forward (fills every node's forward_value)."""
        self.sync_parameters()
        return self.module(z, x)

    def reproduces(self, z, x, tol=None):
        """Does the nested module compute what the live cell computes at (z, x)? ``tol``: relative
        tolerance (default: a few rounding errors of the traced graph's operations)."""
        with torch.no_grad():
            traced = self.forward(z, x).reshape(z.shape[0], -1)
            live = self.cell(z, x).reshape(z.shape[0], -1)
        if tol is None:
            tol = 4 * self.num_ops * (self.fan_in + 8) * torch.finfo(z.dtype).eps
        return bool(((traced - live).abs() <= tol * (1 + live.abs())).all())

    def fits(self, z, x):
        """Built for inputs of these shapes, dtype and device."""
        return (tuple(z.shape), tuple(x.shape), z.dtype, z.device) == self.key

    def matches(self, z, x):
        """Usable for these inputs: it fits them and the cell's fingerprint is unchanged (buffers,
        Python and tensor attributes; parameters too for parametrized cells)."""
        return self.fits(z, x) and same_fingerprint(self.fingerprint, fingerprint(self.cell, with_parameters=self.parametrized))

    def _inputs(self, z_box, x_box):

        def bounded(lo, hi):
            return BoundedTensor((lo + hi) / 2, PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=hi))

        return (bounded(*z_box), bounded(*x_box))

    def ibp(self, z_box, x_box):
        """(lo, hi) of cell(z, x) over the boxes, each (B, *z_shape)."""
        self.sync_parameters()
        with default_dtype(z_box[0].dtype):
            lb, ub = self.module.compute_bounds(x=self._inputs(z_box, x_box), method="IBP")
        self.last_magnitude = _graph_magnitude(self.module, lb.shape[0])
        return lb.reshape(z_box[0].shape), ub.reshape(z_box[0].shape)

    def linear(self, z_box, x_box):
        """CROWN's linear bounds of the cell over the boxes, flattened per sample: dict with
        Lz, Uz (B, n, n), Lx, Ux (B, n, m), bl, bu (B, n), and the concrete lo, hi (B, *z_shape);
        n = z numel, m = x numel per sample."""
        batch, n = z_box[0].shape[0], z_box[0][0].numel()
        # explicit identity specification: 0.3's default C is float32 whatever the model's dtype
        C = torch.eye(n, dtype=z_box[0].dtype, device=z_box[0].device).expand(batch, n, n)
        self.sync_parameters()
        with default_dtype(z_box[0].dtype):
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
        lin["bl"] = _pure_bias(lb.reshape(batch, n), lin["Lz"], lin["Lx"], zf, xf, 1.0)
        lin["bu"] = _pure_bias(ub.reshape(batch, n), lin["Uz"], lin["Ux"], zf, xf, -1.0)
        self._spot_check(lin, zf, xf, z_box[0].shape, x_box[0].shape)
        return lin

    def _spot_check(self, lin, zf, xf, z_shape, x_shape):
        """The linear bounds must hold at the boxes' centres and at one corner: a cheap guard against
        an auto_LiRPA whose bound conventions differ from the ones assumed here."""
        points = [((zf[0] + zf[1]) / 2, (xf[0] + xf[1]) / 2), (zf[1], xf[0])]
        for z, x in points:
            with torch.no_grad():
                value = self.cell(z.reshape(z_shape), x.reshape(x_shape)).reshape(z.shape)
            low = torch.einsum("bij,bj->bi", lin["Lz"], z) + torch.einsum("bij,bj->bi", lin["Lx"], x) + lin["bl"]
            up = torch.einsum("bij,bj->bi", lin["Uz"], z) + torch.einsum("bij,bj->bi", lin["Ux"], x) + lin["bu"]
            tol = torch.finfo(z.dtype).eps ** 0.5 * (1 + value.abs())
            if bool((low > value + tol).any() or (up < value - tol).any()):
                raise RuntimeError("the nested linear bounds of the cell (auto_LiRPA return_A) do not hold at a test "
                                   "point: either the traced cell no longer computes what the cell computes "
                                   "(data-dependent control flow in forward?) or the installed auto_LiRPA's "
                                   "conventions differ from the ones lirpa_deq assumes; no bound is returned")

    def rounding_slack(self, *tensors):
        """Per-sample margin (B, 1, ..) for the floating-point rounding of the last nested IBP pass
        (auto_LiRPA computes in plain float arithmetic): Higham's (fan-in + 8) * eps * sum|terms| per
        operation, summed over the graph's operations, with the largest fan-in of its linear / conv
        layers and sum|terms| <= (largest absolute row sum of a weight) * (largest |bound| of any
        node, the inputs' boxes included). A generous margin, not a machine-checked rounding proof."""
        ref = tensors[0]
        mag = torch.stack([t.detach().abs().flatten(1).max(1).values for t in tensors]).max(0).values
        last = getattr(self, "last_magnitude", None)
        if last is not None and last[0].shape == mag.shape:
            nodes, gain = last
            mag = torch.maximum(mag, nodes) * max(1.0, gain)
        per_sample = self.num_ops * (dot_error(self.fan_in, 1 + mag) - torch.finfo(ref.dtype).tiny)
        return per_sample.view((-1,) + (1,) * (ref.dim() - 1)) + torch.finfo(ref.dtype).tiny


def _graph_magnitude(module, batch):
    """(per-sample largest |lower|, |upper| over the nodes with bounds (B,), largest absolute row
    sum of a linear / conv weight) after an IBP pass."""
    mags, gain = [], 0.0
    for node in module._modules.values():
        lo, up = getattr(node, "lower", None), getattr(node, "upper", None)
        if isinstance(lo, torch.Tensor) and isinstance(up, torch.Tensor) and lo.dim() >= 1 and lo.shape[0] == batch:
            mags.append(torch.maximum(lo.detach().abs(), up.detach().abs()).reshape(batch, -1).max(1).values)
        if type(node) in _WEIGHTED and len(node.inputs) > 1:
            w = getattr(node.inputs[1], "forward_value", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                w = w.detach().abs()
                rows = w.sum(dim=tuple(range(1, w.dim()))).max()
                cols = w.sum(dim=0).max() if w.dim() == 2 else rows  # MatMul weights are (in, out)
                gain = max(gain, float(rows), float(cols))
    nodes = torch.stack(mags).max(0).values if mags else None
    return (nodes, gain) if nodes is not None else None


def _concretize(A, box, sign):
    """min (sign=1) or max (sign=-1) of A v over the box, per row: (B, rows)."""
    c, r = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    return torch.einsum("bij,bj->bi", A, c) - sign * torch.einsum("bij,bj->bi", A.abs(), r)


def _pure_bias(bound, Az, Ax, z_box, x_box, sign):
    """The constant term b of CROWN's linear bound ``Az z + Ax x + b`` (B, n).

    auto_LiRPA's ``return_A`` bias is not usable as is: 0.3 records a partial sum under each input
    (constant branches reached later are missing), upstream (>= 0.6) records, per input, the
    concrete bound minus that input's own term. In both, the concrete CROWN bound is
    ``b + conc_z + conc_x`` (the final bound is not intersected with IBP), so b is recovered from it
    and moved outward by the rounding error of that subtraction (Higham), keeping the bound sound.
    ``CellBounder.linear`` then spot-checks the assembled linear bounds against the cell."""
    conc_z, conc_x = _concretize(Az, z_box, sign), _concretize(Ax, x_box, sign)
    bias = bound - conc_z - conc_x
    eps = torch.finfo(bias.dtype).eps
    terms = (bound.abs() + torch.einsum("bij,bj->bi", Az.abs(), torch.maximum(z_box[0].abs(), z_box[1].abs()))
             + torch.einsum("bij,bj->bi", Ax.abs(), torch.maximum(x_box[0].abs(), x_box[1].abs())))
    fan_in = Az.shape[-1] + Ax.shape[-1] + 8
    return bias - sign * fan_in * eps * terms


_NOT_OPS = set(bound_classes("BoundInput", "BoundParams", "BoundBuffers", "BoundConstant", "BoundPrimConstant"))


def _rounding_profile(module, z_example, x_example):
    """(number of operations, largest dot-product length) of the traced cell; the fan-in falls
    back to the number of z and x entries when no linear / conv layer is recognised."""
    with torch.no_grad():
        module(z_example, x_example)  # forward values of the weights
    ops, fan_in = 0, 0
    for node in module._modules.values():
        if type(node) in _NOT_OPS:
            continue
        ops += 1
        if type(node) in _WEIGHTED and len(node.inputs) > 1:
            w = getattr(node.inputs[1], "forward_value", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                size = math.prod(w.shape[1:]) if type(node) in _CONVS else max(w.shape[-1], w.shape[-2])
                fan_in = max(fan_in, int(size))
    if fan_in == 0:
        fan_in = z_example[0].numel() + x_example[0].numel()
    return max(ops, 1), fan_in
