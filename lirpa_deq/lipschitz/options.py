"""Options of the Lipschitz analysis (``LipschitzOptions``) and their validation."""
from __future__ import annotations

import dataclasses
import difflib
import numbers

from ..bounds.interval import IntervalOptions
from ..validate import check_bool, check_positive_int


@dataclasses.dataclass
class LipschitzOptions:
    """max_unroll / tail_rtol: the local method's unrolled DEQ steps (stop once the proven tail is
    below ``tail_rtol`` times the enclosure's l1 size). refine / refine_max_state / max_leaves:
    the local method's exact elimination of stable DEQ neurons with enumeration of up to
    ``max_leaves`` relu' patterns of the unstable ones (``schur.py``; dense states up to
    ``refine_max_state``). crown: tighten DEQ pre-activation bounds by the adjoint linear bound.
    interval: options of the DEQ interval proof (``IntervalOptions``, a dict of its fields, or
    None). on_fallback: 'warn' | 'ignore' | 'raise' when a method falls back to a cheaper one.
    Every field is validated on construction (ValueError naming the field)."""

    max_unroll: int = 500
    tail_rtol: float = 1e-6
    refine: bool = True
    refine_max_state: int = 1024
    max_leaves: int = 1024
    crown: bool = True
    interval: IntervalOptions | None = None
    on_fallback: str = "warn"

    def __post_init__(self):
        for name in ("max_unroll", "refine_max_state", "max_leaves"):
            check_positive_int(name, getattr(self, name))
        t = self.tail_rtol
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < float("inf"):
            raise ValueError(f"tail_rtol must be a finite number > 0, got {t!r}")
        for name in ("refine", "crown"):
            check_bool(name, getattr(self, name))
        if isinstance(self.interval, dict):
            try:
                self.interval = IntervalOptions(**self.interval)
            except TypeError as e:
                raise ValueError(f"interval: {e}; valid keys: "
                                 f"{[f.name for f in dataclasses.fields(IntervalOptions)]}") from e
        if self.interval is not None and not isinstance(self.interval, IntervalOptions):
            raise ValueError("interval must be None, a dict or lirpa_deq.bounds.interval.IntervalOptions, "
                             f"got {type(self.interval).__name__}")
        if self.on_fallback not in ("warn", "ignore", "raise"):
            raise ValueError(f"on_fallback must be 'warn', 'ignore' or 'raise', got {self.on_fallback!r}")


def check_options(options) -> LipschitzOptions:
    """``options`` (None, a dict of LipschitzOptions fields, or LipschitzOptions) as
    LipschitzOptions; ValueError for unknown keys (with the closest valid name) or bad values."""
    if options is None:
        return LipschitzOptions()
    if isinstance(options, LipschitzOptions):
        return options
    if isinstance(options, dict):
        valid = [f.name for f in dataclasses.fields(LipschitzOptions)]
        unknown = sorted(str(k) for k in set(options) - set(valid))
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1))
                     else repr(k) for k in unknown]
            raise ValueError(f"unknown option(s) {', '.join(hints)}; valid: {sorted(valid)}")
        return LipschitzOptions(**options)
    raise ValueError(f"options must be None, a dict or LipschitzOptions, got {type(options).__name__}")
