"""Bounds for DEQs written with other tools: torchdeq layers (``interop.torchdeq.get_deq``) and
closures ``z -> f(z, u)`` turned into cells (``interop.closure.ClosureCell``)."""
from .closure import ClosureCell, ClosureError
from .torchdeq import TorchDEQ, deq_settings, get_deq

__all__ = ["ClosureCell", "ClosureError", "TorchDEQ", "get_deq", "deq_settings"]
