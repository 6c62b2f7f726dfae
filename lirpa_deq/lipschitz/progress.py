"""A tqdm progress bar over the samples of one analysis, or a no-op.

Shown only when asked for (``progress=True``) AND stderr is a terminal, so logs, pipes and tests
stay clean; it writes to stderr only (printed tables on stdout are unchanged).
"""
from __future__ import annotations

import sys


def stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """``stage(name)``: what runs now; ``advance(n)``: n more samples done; ``close()``: finish.
    ``total``: the number of samples (B)."""

    def __init__(self, enabled: bool, total: int, desc: str = "lipschitz"):
        self.bar = None
        if enabled and stderr_is_tty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                            dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def stage(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def finish(self):
        """Mark every sample done (stages that are not per sample) and close the bar."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.refresh()  # draw the final count even within tqdm's mininterval
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return False
