"""torchdeq models through ``BoundedModule``: a drop-in ``get_deq`` (``from lirpa_deq.interop.torchdeq
import get_deq`` instead of ``from torchdeq import get_deq``).

It keeps torchdeq's construction (``get_deq(args, **kwargs)``: an argparse Namespace, a dict or
keywords) and call signature (``z_out, info = deq(lambda z: self.f(z, u), z0)``), and solves with a
:class:`lirpa_deq.nn.DEQ` over the closure's cell (lirpa_deq.interop.closure), so auto_LiRPA sees
ONE ``custom::DEQFixedPoint`` node and the generic-cell bounds apply (docs/existing_deq.md).
torchdeq itself is not imported: its norms (``torchdeq.norm.apply_norm``) are recognised by the
``_deq_norm`` object they attach to a module.

Settings map onto lirpa_deq's (:data:`SOLVER_NAMES`, :func:`deq_settings`):

| torchdeq | lirpa_deq ``DEQ`` |
|---|---|
| ``f_solver`` / ``b_solver`` ('fixed_point_iter' (default), 'simple_fixed_point_iter', 'anderson', 'broyden') | ``solver`` / ``backward_solver`` ('fixed_point_iter', 'fixed_point_iter', 'anderson', 'broyden') |
| ``f_max_iter`` (40), ``eval_f_max_iter`` / ``eval_factor`` | ``max_iter`` in training mode / in eval mode (bounds run in eval mode) |
| ``f_tol`` (1e-3), ``b_tol`` (1e-6), ``b_max_iter`` (40) | ``tol``, ``backward_tol``, ``backward_max_iter`` |
| ``f_stop_mode`` 'abs' / 'rel' | lirpa_deq always stops on the relative residual; 'abs' tolerances are used as relative ones |
| call-time ``solver_kwargs``: ``tau`` (damping), ``m``, ``lam`` (Anderson), ``f_max_iter`` | ``damping``, ``m``, ``lam``, ``max_iter`` |
| ``ift``, ``hook_ift``, ``grad``, ``tau`` (PhantomGrad's), ``n_states``, ``indexing``, ``core``, ... | ignored: gradients are always implicit (IFT), one state is returned |

Which fixed point is bounded: the one the layer's solve starts from zeros (the node ignores
``z_init``; the eager forward honours it as a warm start). With torchdeq's default solver
(fixed-point iteration) a cell that is not a proved contraction still gets bounds of the Picard
limit when an invariant box exists (docs/existing_deq.md).
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn as nn

from ..bounds.node import _suspend_tracing
from ..nn import DEQ
from .closure import ClosureCell, ClosureError

SOLVER_NAMES = {"fixed_point_iter": "fixed_point_iter", "simple_fixed_point_iter": "fixed_point_iter",
                "anderson": "anderson", "broyden": "broyden"}
# torchdeq solver keyword -> lirpa_deq solver option (per lirpa_deq solver)
_OPTION_NAMES = {"tau": "damping", "m": "m", "lam": "lam"}
_SOLVER_OPTIONS = {"fixed_point_iter": {"damping"}, "anderson": {"damping", "m", "lam"}, "broyden": set()}
_DEFAULTS = dict(f_solver="fixed_point_iter", b_solver="fixed_point_iter", f_max_iter=40, b_max_iter=40,
                 f_tol=1e-3, b_tol=1e-6, eval_factor=1.0, eval_f_max_iter=0)


def _config(args, kwargs):
    if args is None:
        config = {}
    elif isinstance(args, dict):
        config = dict(args)
    elif isinstance(args, argparse.Namespace):
        config = vars(args).copy()
    elif hasattr(args, "config") and isinstance(args.config, dict):  # torchdeq's DEQConfig
        config = dict(args.config)
    else:
        config = dict(vars(args))
    config.update(kwargs)
    return config


def _solver(config, key):
    name = config.get(key, _DEFAULTS[key])
    if name not in SOLVER_NAMES:
        raise ValueError(f"torchdeq {key}={name!r} has no lirpa_deq counterpart; supported: {sorted(SOLVER_NAMES)}")
    return SOLVER_NAMES[name]


def deq_settings(config: dict, solver_kwargs: dict | None = None, training: bool = False) -> dict:
    """Keyword arguments of :class:`lirpa_deq.nn.DEQ` for a torchdeq configuration (``get_deq``'s
    arguments) and the call's ``solver_kwargs`` (see module doc). As in torchdeq, solver options
    (``tau``, ``m``, ``lam``) come from ``solver_kwargs`` only: a ``tau`` in the configuration is
    PhantomGrad's damping, not the solver's."""
    call = dict(solver_kwargs or {})
    f_max_iter = int(config.get("f_max_iter", _DEFAULTS["f_max_iter"]))
    eval_max = int(config.get("eval_f_max_iter", 0) or 0)
    if eval_max <= 0:
        eval_max = int(f_max_iter * float(config.get("eval_factor", _DEFAULTS["eval_factor"])))
    max_iter = f_max_iter if training else eval_max
    if isinstance(call.get("f_max_iter"), (int, float)):
        max_iter = int(call["f_max_iter"])
    solver, backward = _solver(config, "f_solver"), _solver(config, "b_solver")
    opts = {}
    for theirs, ours in _OPTION_NAMES.items():
        if theirs in call and ours in (_SOLVER_OPTIONS[solver] | _SOLVER_OPTIONS[backward]):
            opts[ours] = call[theirs]
    return dict(solver=solver, backward_solver=backward, max_iter=max(1, max_iter),
                tol=float(config.get("f_tol", _DEFAULTS["f_tol"])),
                backward_tol=float(config.get("b_tol", _DEFAULTS["b_tol"])),
                backward_max_iter=max(1, int(config.get("b_max_iter", _DEFAULTS["b_max_iter"]))),
                on_nonconvergence="ignore", **opts)


class TorchDEQ(nn.Module):
    """torchdeq's DEQ layer interface over a lirpa_deq :class:`DEQ` (see module doc).

    ``forward(func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None)`` ->
    ``([z*], info)``: ``func`` is ``z -> f(z, u)`` (one tensor state; torchdeq's tuple states are
    refused), ``z*`` has ``z_init``'s shape, ``info`` has torchdeq's keys ``abs_lowest``,
    ``rel_lowest`` (B,), ``nstep`` (B,), ``sradius``. ``layer`` is the lirpa_deq DEQ of the last
    call (kept outside the module tree: its cell shares the model's modules)."""

    def __init__(self, args=None, **kwargs):
        super().__init__()
        self.config = _config(args, kwargs)
        deq_settings(self.config)  # validate now (unknown solver names)
        self.__dict__["_layer"] = None  # not a submodule: its cell holds modules of the model

    @property
    def layer(self):
        return self._layer

    # the layer's cell wraps a closure over THIS model: copies and pickles drop it (rebuilt at the next call)
    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = None if key == "_layer" else copy.deepcopy(value, memo)
        return clone

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layer"] = None
        return state

    def _layer_for(self, func, z_init, solver_kwargs):
        layer = self._layer
        with _suspend_tracing():  # plain Python checks, nothing to record
            tail = tuple(int(s) for s in z_init.shape[1:])
            reuse = layer is not None and layer.cell.accepts(func) and layer.cell._state_tail == tail
        settings = deq_settings(self.config, solver_kwargs, training=self.training)
        options = {k: v for k, v in settings.items() if k in ("damping", "m", "lam")}
        if not reuse or layer.solver_opts != options:
            cell = ClosureCell(func, z_init, skip=(self,)) if not reuse else layer.cell
            layer = DEQ(cell, **settings)
            self.__dict__["_layer"] = layer
        else:
            layer.max_iter = settings["max_iter"]
        return layer

    def forward(self, func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        if not isinstance(z_init, torch.Tensor):
            raise ClosureError("lirpa_deq's torchdeq layer supports one tensor state z (torchdeq's tuple / "
                               "multi-equilibrium states are not supported): concatenate the states")
        layer = self._layer_for(func, z_init, solver_kwargs)
        x = layer.cell.injection(func)
        tracing = torch._C._get_tracing_state() is not None
        z = layer(x) if tracing else layer(x, z0=z_init.detach())
        info = self._info(layer, z, sradius_mode)
        return [z], info

    @staticmethod
    def _info(layer, z, sradius_mode):
        stats = layer.last_stats
        batch = z.shape[0]
        if stats is None:
            rel = torch.zeros(batch)
            steps = torch.zeros(batch)
        else:
            rel = stats.per_sample_residual.detach().reshape(-1).to("cpu", torch.float32)
            steps = torch.full((batch,), float(stats.iterations))
        if sradius_mode:
            warnings.warn("sradius_mode is not computed by lirpa_deq's torchdeq layer (info['sradius'] = 0); "
                          "lirpa_deq.bounds.generic.sampled_lipschitz estimates the Jacobian's norm", RuntimeWarning)
        norm = z.detach().flatten(1).norm(dim=1).to("cpu", torch.float32)
        return {"abs_lowest": rel * (norm + 1e-8), "rel_lowest": rel, "nstep": steps,
                "sradius": torch.zeros(1)}

    def extra_repr(self):
        s = deq_settings(self.config, training=self.training)
        return f"solver={s['solver']!r}, max_iter={s['max_iter']}, tol={s['tol']:g}"


def get_deq(args=None, **kwargs) -> TorchDEQ:
    """Drop-in for ``torchdeq.get_deq``: the same arguments, a layer bounded by lirpa_deq."""
    return TorchDEQ(args, **kwargs)
