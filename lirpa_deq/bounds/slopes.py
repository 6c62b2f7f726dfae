"""Optimizable lower slopes of the DEQ's own ReLUs, tuned by auto_LiRPA's alpha-CROWN.

auto_LiRPA optimizes the ``alpha`` dict of every BoundOptimizableActivation node (one tensor per
start node of the backward pass) with its own optimizer and options (``optimize_bound_args``:
iterations, lr_alpha, keep_best...), clipping it with ``clip_alpha_`` after every step. The DEQ
node joins that machinery: ``alpha[start] = (2, spec, B, *state)``, index 0 for the lower bound
and 1 for the upper one, per neuron and per output specification as for auto_LiRPA's ReLU,
initialized at CROWN's adaptive slopes of the node's (refined) relaxation.

Theorem for optimized slopes. On an unstable neuron (l < 0 < h on the PROVED pre-activation
bounds) aL s <= relu(s) holds on [l, h] for every aL in [0, 1]; the upper line stays the chord.
The adjoint theorem holds for ANY valid relaxation and ANY nu, and a specification row may use
its own relaxation (each row is a separate inequality), so every alpha in [0, 1] gives a sound
bound; alpha is clamped to [0, 1] where it is used as well as by ``clip_alpha_``. The slopes enter
D_nu only where nu_i >= 0 (where nu_i < 0 the chord is used), and the bound's gradient in alpha is
exact through the adjoint fixed point (lirpa_deq.bounds.adjoint.implicit_adjoint).

The adjoint vector itself is optimizable too (``optimize_adjoint``, default False: on the measured models it did not beat the slopes alone): the theorem
holds for EVERY nu, and its fixed point is not always the best one, so ``alpha[start +
'/adjoint-shift']`` (same shape, starting at 0, not clipped) moves the bound's nu away from the
adjoint iterate by ``NU_STEP * max|nu|`` per unit (lirpa_deq.bounds.adjoint); gradients in the
slopes and the shift are exact (the slopes' through the adjoint iterate).

Families without optimizable slopes (``CellBounds.slope_shape`` None: generic cells, whose nested
auto_LiRPA relaxation is a constant here) create no alpha; auto_LiRPA then optimizes the layers
around the DEQ only.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .._compat import start_node_entry

SHIFT = "/adjoint-shift"  # key suffix of the optimizable adjoint shift next to a start node's slopes


class OptimizableSlopes:
    """Mixin of BoundDEQ: auto_LiRPA's optimizable-activation interface (``init_opt_parameters``,
    ``clip_alpha_``, ``alpha``, ``alpha_batch_dim``) over its CellBounds' slopes."""

    def init_opt_parameters(self, start_nodes):
        """One (2, spec, B, *state) tensor per start node, at CROWN's lower slopes of the last
        relaxation (auto_LiRPA ran a CROWN pass just before)."""
        self.alpha = OrderedDict()
        start = self.cell_bounds.last_lower_slopes
        box = self.cell_bounds.last_box
        if start is None or box is None or self.cell_bounds.slope_shape(box[0].shape[1:]) is None:
            return
        start = start.reshape(box[0].shape)
        for entry in start_nodes:
            name, size = start_node_entry(entry)
            if name == "_forward":  # forward-mode bounds do not pass through a DEQ node
                continue
            spec = size if isinstance(size, int) else math.prod(size)
            alpha = start.detach().unsqueeze(0).unsqueeze(0).repeat(2, int(spec), *[1] * start.dim()).clone()
            self.alpha[name] = alpha.requires_grad_(True)
            if self.adjoint_options.get("optimize_adjoint", False):
                self.alpha[name + SHIFT] = torch.zeros_like(alpha).requires_grad_(True)

    def clip_alpha_(self):
        for key, value in self.alpha.items():
            if not key.endswith(SHIFT):  # slopes live in [0, 1]; adjoint shifts are free
                value.data = value.data.clamp(0.0, 1.0)

    clip_alpha = clip_alpha_  # the name upstream auto_LiRPA calls after each step (0.3: clip_alpha_)

    def dump_optimized_params(self):
        return self.alpha

    def restore_optimized_params(self, alpha):
        self.alpha = alpha

    def slopes_for(self, start_node):
        """(slopes, shift) of ``start_node`` while auto_LiRPA optimizes or reuses them (each None
        where absent or built for another batch / state shape: CROWN's own, sound), else None."""
        if getattr(self, "opt_stage", None) not in ("opt", "reuse") or start_node is None:
            return None
        name = getattr(start_node, "name", None)
        box = self.cell_bounds.last_box

        def fitting(value):
            if value is None or box is None or tuple(value.shape[3:]) != tuple(box[0].shape[1:]) \
                    or value.shape[2] != box[0].shape[0]:
                return None
            return value
        pair = fitting(self.alpha.get(name)), fitting(self.alpha.get(f"{name}{SHIFT}"))
        return None if pair == (None, None) else pair

