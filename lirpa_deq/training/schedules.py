"""Schedules of certified training, as pure functions of the global step (so a checkpoint only
needs the step counter to resume them exactly).

* :class:`SmoothedRamp` -- the eps schedule of Wei & Kolter / CROWN-IBP (Zhang et al. 2020):
  0 during ``warmup`` steps, then a ramp of ``length`` steps from ``initial`` to ``final``: a
  polynomial ``initial + a s^beta`` for the first ``mid`` fraction of the ramp, then linear, with
  the two pieces meeting with equal value and slope (C^1). Constant ``final`` after the ramp.
* :class:`LinearRamp` -- linear from ``initial`` to ``final`` over the same window (kappa, the
  natural-loss weight; beta, the CROWN-IBP / IBP mixing weight).
* :class:`StepLR` -- learning rate ``lr * gamma ** (number of milestones <= step)``.
* :func:`fit_ramp` -- shrinks a warm-up + ramp that would not end before the last epoch of the run
  (so that the last epoch trains at the final value, not part-way up the ramp).

Derivation of the smoothed ramp (s = step - warmup, L = length, s_m = mid * L, D = final -
initial): polynomial p(s) = a s^beta on [0, s_m], line q(s) = p(s_m) + k (s - s_m) on [s_m, L]
with q(L) = D and k = p'(s_m) = a beta s_m^(beta - 1). Then a s_m^beta + a beta s_m^(beta-1)
(L - s_m) = D, i.e. a = D / (s_m^(beta - 1) (s_m + beta (L - s_m))).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence


def _check(warmup, length):
    if int(warmup) < 0 or int(length) < 0:
        raise ValueError(f"schedule warmup and length must be >= 0, got {warmup}, {length}")


@dataclass(frozen=True)
class SmoothedRamp:
    """Value at a step (see module doc). ``length = 0`` jumps to ``final`` after the warm-up."""

    final: float
    warmup: int
    length: int
    initial: float = 0.0
    mid: float = 0.25
    beta: float = 4.0

    def __post_init__(self):
        _check(self.warmup, self.length)
        if not 0.0 < self.mid <= 1.0 or self.beta < 1:
            raise ValueError(f"SmoothedRamp needs 0 < mid <= 1 and beta >= 1, got {self.mid}, {self.beta}")

    def __call__(self, step: int) -> float:
        s = step - self.warmup
        if s < 0:
            return 0.0
        if s >= self.length:
            return float(self.final)
        D, L = self.final - self.initial, float(self.length)
        s_m = self.mid * L
        a = D / (s_m ** (self.beta - 1) * (s_m + self.beta * (L - s_m)))
        if s < s_m:
            return float(self.initial + a * s ** self.beta)
        p_m = a * s_m ** self.beta
        return float(self.initial + p_m + (D - p_m) * (s - s_m) / max(L - s_m, 1e-12))


@dataclass(frozen=True)
class LinearRamp:
    """``initial`` up to ``warmup``, linear to ``final`` over ``length`` steps, then ``final``."""

    initial: float
    final: float
    warmup: int
    length: int

    def __post_init__(self):
        _check(self.warmup, self.length)

    def __call__(self, step: int) -> float:
        s = step - self.warmup
        if s <= 0:
            return float(self.initial) if self.length > 0 or s < 0 else float(self.final)
        frac = min(1.0, s / self.length) if self.length > 0 else 1.0
        return float(self.initial + (self.final - self.initial) * frac)


@dataclass(frozen=True)
class StepLR:
    """``lr * gamma ** #{milestones m : m <= step}`` (milestones in steps, sorted)."""

    lr: float
    milestones: Sequence[int] = ()
    gamma: float = 0.2

    def __call__(self, step: int) -> float:
        return float(self.lr * self.gamma ** bisect.bisect_right(sorted(self.milestones), step))


def fit_ramp(warmup: int, length: int, total: int, steps_per_epoch: int):
    """(warmup, length, fitted) in steps such that warm-up + ramp end by ``total - tail``, where
    ``tail`` = one epoch (``steps_per_epoch``) for runs of >= 2 epochs, else half the run (at least
    one step): the last epoch (half) then runs at the final value.

    Unchanged (``fitted`` False) when they already end in time; otherwise both are scaled by the same
    factor (the warm-up rounded down, the ramp taking the rest) and ``fitted`` is True."""
    _check(warmup, length)
    warmup, length, total, spe = int(warmup), int(length), int(total), max(1, int(steps_per_epoch))
    tail = spe if total >= 2 * spe else max(1, total // 2)
    end = max(0, total - tail)
    if warmup + length <= end:
        return warmup, length, False
    new_warmup = int(warmup * end / (warmup + length))
    return new_warmup, end - new_warmup, True
