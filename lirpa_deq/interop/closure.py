"""A DEQ cell ``cell(z, x)`` recovered from a closure ``z -> f(z, u)`` (the torchdeq idiom).

torchdeq calls its solver on a function of z alone that reads the injection ``u`` from the
enclosing scope (``lambda z: self.f(z, u)``). auto_LiRPA needs the injection as an explicit input
of one node, so :class:`ClosureCell` rebuilds the same Python function with the captured injection
replaced by the cell's second argument: ``ClosureCell(func, ...)(z, x)`` runs ``func``'s code with
``u := x``. What the closure may capture:

* exactly ONE tensor that is not a parameter or buffer: the injection (a function of the model's
  input); a closure over no such tensor has nothing to certify, one over several is refused;
* any modules (``self``, ``self.f``): the modules it *calls* are registered as submodules of the
  cell (shared with the model, so parameters and gradients are the model's own), and parameters
  must be reached through such calls (a bare ``z @ self.W`` is refused: the nested bounds could
  not override it).

torchdeq's weight normalizations (``torchdeq.norm.apply_norm``: ``weight_norm``,
``spectral_norm``) keep the normalized weight as a plain tensor attribute recomputed by
``reset_norm``. The cell recomputes it from the module's parameters at every call (no power
iteration, so the weight is a fixed function of the parameters and the current singular-vector
estimates), with gradients in eager mode; while auto_LiRPA traces the cell, it is computed outside
the trace and enters it as a constant (the nested module is rebuilt when it changes, because the
cell's fingerprint records tensor attributes by value).
"""
from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn as nn

from ..bounds.node import _suspend_tracing


class ClosureError(TypeError):
    """A closure lirpa_deq cannot turn into a cell ``cell(z, x)``."""


def _slots(func):
    """[(index, free-variable name, value)] of a Python function's closure cells."""
    if not isinstance(func, types.FunctionType):
        what = "functools.partial" if isinstance(func, functools.partial) else type(func).__name__
        raise ClosureError(f"the DEQ function must be a Python function of z (a lambda or a nested def) that reads "
                           f"its injection from the enclosing scope, e.g. lambda z: self.f(z, u); got a {what}")
    cells = func.__closure__ or ()
    out = []
    for i, (name, cell) in enumerate(zip(func.__code__.co_freevars, cells)):
        try:
            out.append((i, name, cell.cell_contents))
        except ValueError:  # an unset cell
            continue
    return out


def find_injection(func):
    """(slot index, name) of the one captured tensor that is not a parameter or buffer."""
    tensors = [(i, n) for i, n, v in _slots(func) if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]
    modules = [v for _, _, v in _slots(func) if isinstance(v, nn.Module)]
    buffers = {id(b) for m in modules for b in m.buffers()}
    tensors = [(i, n) for i, n in tensors if id(func.__closure__[i].cell_contents) not in buffers]
    if len(tensors) != 1:
        names = [n for _, n in tensors]
        raise ClosureError(f"the DEQ function must capture exactly one injection tensor (the input-dependent "
                           f"term, e.g. u in lambda z: self.f(z, u)); it captures {len(tensors)}: {names}. "
                           "Concatenate several injections into one tensor, or write the cell as an nn.Module "
                           "f(z, x) and use lirpa_deq.nn.DEQ(f) directly.")
    return tensors[0]


def _captured_modules(func):
    return [v for _, _, v in _slots(func) if isinstance(v, nn.Module)]


def invoked_modules(func, z, skip=()):
    """The outermost modules ``func(z)`` calls (in call order), among those it captures and their
    submodules; modules in ``skip`` (and their submodules) are ignored."""
    roots = _captured_modules(func)
    skipped = {id(m) for s in skip for m in s.modules()}
    called, hooks = [], []
    for root in roots:
        for m in root.modules():
            if id(m) not in skipped:
                hooks.append(m.register_forward_pre_hook(lambda mod, args: called.append(mod)))
    try:
        with torch.no_grad():
            func(z)
    finally:
        for h in hooks:
            h.remove()
    seen, unique = set(), []
    for m in called:
        if id(m) not in seen:
            seen.add(id(m))
            unique.append(m)
    inner = {id(sub) for m in unique for sub in m.modules() if sub is not m}
    return [m for m in unique if id(m) not in inner]


def _module_names(func):
    """id(module) -> a readable name ('f', 'block_conv') from the captured modules' trees."""
    names = {}
    for _, var, root in ((i, n, v) for i, n, v in _slots(func) if isinstance(v, nn.Module)):
        for path, m in root.named_modules():
            names.setdefault(id(m), (path or var).replace(".", "_"))
    return names


def refresh_torchdeq_norms(module, trace_safe):
    """Recompute torchdeq-normalized weights of ``module``'s submodules from their parameters.

    ``trace_safe``: compute outside any active trace, without gradients (the result becomes a
    constant of the trace)."""
    for m in module.modules():
        norm = getattr(m, "_deq_norm", None)
        if norm is None:
            continue
        params = list(inspect.signature(norm.compute_weight).parameters)
        for name, dim in zip(norm.names, norm.dims):
            args = (m, False, name, dim) if "do_power_iteration" in params else (m, name, dim)
            if trace_safe:
                with _suspend_tracing(), torch.no_grad():
                    weight = norm.compute_weight(*args)
            else:
                weight = norm.compute_weight(*args)
            setattr(m, name, weight)


def _rebind(func, slot, value):
    """``func`` with closure cell ``slot`` holding ``value`` instead."""
    closure = tuple(types.CellType(value) if i == slot else c for i, c in enumerate(func.__closure__))
    fn = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, closure)
    fn.__kwdefaults__ = func.__kwdefaults__
    return fn


def _check_direct_parameters(func, z, modules, slot):
    """Refuse parameters the closure uses outside the calls of ``modules`` (they could not be
    overridden by the nested bounds, see module doc). The injection is detached first: the
    parameters that computed it are not the cell's."""
    func = _rebind(func, slot, func.__closure__[slot].cell_contents.detach())
    inside = {id(p) for m in modules for p in m.parameters()}
    candidates = [p for root in _captured_modules(func) for p in root.parameters()
                  if id(p) not in inside and p.requires_grad]
    candidates += [v for _, _, v in _slots(func) if isinstance(v, nn.Parameter) and id(v) not in inside]
    if not candidates:
        return
    with torch.enable_grad():
        out = func(z)
        if not out.requires_grad:
            return
        # retain_graph: the closure may share graph pieces with the caller's (torchdeq's normalized weights)
        grads = torch.autograd.grad(out.sum(), candidates, allow_unused=True, retain_graph=True)
    used = [p for p, g in zip(candidates, grads) if g is not None]
    if used:
        shapes = [tuple(p.shape) for p in used]
        raise ClosureError(f"the DEQ function uses parameter(s) of shape {shapes} outside any nn.Module call "
                           "(e.g. z @ self.W): lirpa_deq needs the cell's parameters inside modules it calls. "
                           "Use an nn.Linear / nn.Conv2d, or write the cell as an nn.Module f(z, x) for "
                           "lirpa_deq.nn.DEQ(f)")


class ClosureCell(nn.Module):
    """``cell(z, x) = func(z)`` with the captured injection replaced by x (see module doc).

    func: ``z -> f(z, u)``; z_example: a state of the solve's shape (B, *state); skip: modules the
    closure may call that are not part of the cell (the calling DEQ layer itself)."""

    def __init__(self, func, z_example, skip=()):
        super().__init__()
        self.slot, self.injection_name = find_injection(func)
        self._func, self._code, self._name = func, func.__code__, func.__name__
        self._closure = func.__closure__
        with _suspend_tracing():  # probing calls of the closure must not enter an active trace
            modules = invoked_modules(func, z_example.detach(), skip)
            if not modules:
                raise ClosureError("the DEQ function calls no nn.Module: lirpa_deq needs the cell's parameters "
                                   "inside modules it calls (e.g. lambda z: self.f(z, u) with self.f an nn.Module)")
            _check_direct_parameters(func, z_example.detach(), modules, self.slot)
        names = _module_names(func)
        for k, m in enumerate(modules):
            name = names.get(id(m), f"module{k}")
            self.add_module(name if name not in self._modules else f"{name}_{k}", m)
        self._state_tail = tuple(z_example.shape[1:])

    def state_shape(self, x_shape):
        return (int(x_shape[0]), *self._state_tail)

    def accepts(self, func):
        """Same code and same captured objects (but the injection) as the closure this cell wraps:
        a fresh lambda of the same forward, so the cell (and its nested bounds) can be reused."""
        if not isinstance(func, types.FunctionType) or func.__code__ is not self._code:
            return False
        mine, theirs = self._closure or (), func.__closure__ or ()
        if len(mine) != len(theirs):
            return False
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if i == self.slot:
                continue
            try:
                if a.cell_contents is not b.cell_contents:
                    return False
            except ValueError:
                return False
        return True

    def injection(self, func):
        """The injection tensor the closure ``func`` captures (this cell's x)."""
        return func.__closure__[self.slot].cell_contents

    def forward(self, z, x):
        refresh_torchdeq_norms(self, trace_safe=torch._C._get_tracing_state() is not None)
        return _rebind(self._func, self.slot, x)(z)

    def extra_repr(self):
        return f"closure {self._name!r} over injection {self.injection_name!r}"

