"""The ``lirpa-deq`` command (``python -m lirpa_deq.cli``)."""
from .main import main

__all__ = ["main"]
