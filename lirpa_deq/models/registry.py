"""Name -> model builder registry: ``build_model(name, input_shape, num_classes, **kwargs)``.

Names (see :mod:`lirpa_deq.models.architectures` for the layers):

=================  ===========================================================================
``fc-deq``         fc IBP-MonDEQ (Flatten, Linear, DEQ, Linear); ``width`` (256)
``conv-fc-deq``    2 strided convs + fc IBP-MonDEQ; ``width`` (256), ``channels`` (16)
``deq3``           DEQ-3, IBP-MonConv; ``width`` (128)
``deq7``           DEQ-7, IBP-MonConv; ``width`` (64)
``ortho-fc-deq``   ``fc-deq`` with an orthogonal cell (CerDEQ-style); ``width``, ``margin``
``ortho-deq3``     ``deq3`` with an orthogonal (spectrally normalised) conv cell
``ortho-deq7``     ``deq7`` with an orthogonal conv cell
``cnn3``           explicit counterpart of DEQ-3; ``width`` (128)
``cnn7``           explicit CNN-7; ``width`` (64)
=================  ===========================================================================

DEQ builders also take ``margin`` (the cell's m, default 0.5 for IBP-Mon, 0.1 for Ortho) and
``deq_opts`` (keyword arguments of :class:`lirpa_deq.nn.DEQ`, e.g. ``{"tol": 1e-5}``).
Unknown names or keyword arguments raise ValueError listing the valid ones.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch.nn as nn

from . import architectures as A


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``builder(input_shape, num_classes, **fixed, **kwargs)``."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    fixed: Dict[str, object] = field(default_factory=dict)
    is_deq: bool = True

    def options(self):
        """Keyword arguments a user may pass (builder parameters minus the fixed ones)."""
        params = inspect.signature(self.builder).parameters
        return sorted(k for k in params if k not in ("input_shape", "num_classes") and k not in self.fixed)


MODELS: Dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("fc-deq", A.fc_deq, "fully connected IBP-MonDEQ (MNIST)"),
    ModelEntry("conv-fc-deq", A.conv_fc_deq, "2 strided convs + fc IBP-MonDEQ (CPU-friendly)"),
    ModelEntry("deq3", A.deq3, "DEQ-3: IBP-MonConv + BN + AvgPool4 + FC (Wei & Kolter 2022)"),
    ModelEntry("deq7", A.deq7, "DEQ-7: CNN-7 with an IBP-MonConv DEQ for the 64-channel convs"),
    ModelEntry("ortho-fc-deq", A.fc_deq, "fc DEQ with an orthogonal cell (CerDEQ-style)", {"cell": "ortho"}),
    ModelEntry("ortho-deq3", A.deq3, "DEQ-3 with an orthogonal conv cell (CerDEQ-style)", {"cell": "ortho"}),
    ModelEntry("ortho-deq7", A.deq7, "DEQ-7 with an orthogonal conv cell (CerDEQ-style)", {"cell": "ortho"}),
    ModelEntry("cnn3", A.cnn3, "explicit CNN-3 baseline (DEQ-3 with the DEQ replaced by a conv)", is_deq=False),
    ModelEntry("cnn7", A.cnn7, "explicit CNN-7 baseline (Shi et al. 2021)", is_deq=False),
]}


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ValueError listing the valid names if unknown."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}") from None


def build_model(name: str, input_shape=(1, 28, 28), num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for images ``input_shape`` = (C, H, W) and
    ``num_classes`` classes. Returns an ``nn.Sequential``: (B, C, H, W) -> (B, num_classes)."""
    entry = model_entry(name)
    unknown = sorted(set(kwargs) - set(entry.options()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {entry.options()}")
    return entry.builder(tuple(int(s) for s in input_shape), int(num_classes), **entry.fixed, **kwargs)
