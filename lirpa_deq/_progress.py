"""The one progress bar of lirpa_deq (training steps, PGD steps, smoothing batches, Lipschitz samples).

A bar is shown only when it is asked for (``enabled=True``) AND stderr is a terminal AND this
process is rank 0 (``lirpa_deq.distributed``: under torchrun the other ranks stay silent), so
logs, pipes and tests stay clean; it writes to stderr only (tables printed on stdout are
unchanged). A disabled bar is a no-op object with the same methods, so callers never test for None.
"""
from __future__ import annotations

import sys

from .distributed import is_main

__all__ = ["Progress", "progress_iter", "stderr_is_tty"]


def stderr_is_tty() -> bool:
    """Whether ``sys.stderr`` (as it is now: tests may replace it) is a terminal."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """A tqdm bar over ``total`` units starting at ``initial``, or a no-op (see the module doc).

    ``stage(name)``: what runs now (shown after the count); ``postfix(text)``: running statistics;
    ``advance(n)``: n more units done; ``clear()`` / ``refresh()``: around a line logged while the
    bar is open; ``finish()``: mark every unit done and close; ``close()``: close as it is. Usable
    as a context manager (closed on exit)."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str = "it", initial: int = 0):
        self.bar = None
        if enabled and total and stderr_is_tty() and is_main():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr,
                            dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        """True while a bar is shown."""
        return self.bar is not None

    def stage(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)

    def postfix(self, text: str):
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def clear(self):
        if self.bar is not None:
            self.bar.clear()

    def refresh(self):
        if self.bar is not None:
            self.bar.refresh()

    def finish(self):
        """Mark every unit done (stages that are not per unit) and close the bar."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.refresh()  # draw the final count even within tqdm's mininterval
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_iter(iterable, enabled: bool, desc: str, unit: str = "it"):
    """The items of ``iterable`` (a sized iterable, e.g. a range), advancing a :class:`Progress`
    bar by one per item; the bar is closed when the iteration ends or is abandoned."""
    if not enabled:  # no bar: the iterable itself (nothing to close)
        yield from iterable
        return
    with Progress(enabled, len(iterable), desc, unit) as bar:
        for item in iterable:
            yield item
            bar.advance(1)
