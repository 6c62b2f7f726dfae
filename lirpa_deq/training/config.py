"""Configuration of a certified-training run (a plain dataclass, stored in every checkpoint).

Units: ``epochs``, ``warmup_epochs``, ``ramp_epochs`` and ``lr_milestones`` are in epochs
(fractions allowed); they become steps with ``steps_per_epoch = ceil(train size / batch_size)``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .losses import METHODS

#: Fields that must agree between a checkpoint and a run that resumes from it. Everything else
#: (epochs, progress, device, ...) may change on resume; see ``Trainer.resume``.
IDENTITY_FIELDS = ("dataset", "model", "model_kwargs", "method", "batch_size", "seed", "norm", "num_train")


@dataclass
class TrainConfig:
    """Hyper-parameters. method: 'natural' | 'ibp' | 'crown-ibp'. eps_train: final training
    radius (l_inf in [0, 1] pixel units). kappa_final: final weight of the natural loss (it ramps
    from 1). beta_start/beta_final: CROWN-IBP mixing weight (ramps linearly over the eps ramp).
    lr_milestones: epochs at which the LR is multiplied by lr_gamma. grad_clip: max gradient
    norm (0 = off). num_train: use only N evenly spaced training images (None = all)."""

    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    model: str = "fc-deq"
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    method: str = "ibp"
    eps_train: float = 0.2
    norm: float = math.inf
    epochs: float = 10.0
    batch_size: int = 64
    lr: float = 1e-3
    lr_milestones: Tuple[float, ...] = ()
    lr_gamma: float = 0.2
    grad_clip: float = 10.0
    warmup_epochs: float = 1.0
    ramp_epochs: float = 5.0
    ramp_mid: float = 0.25
    ramp_beta: float = 4.0
    kappa_final: float = 0.0
    beta_start: float = 1.0
    beta_final: float = 0.0
    seed: int = 0
    num_train: Optional[int] = None

    def __post_init__(self):
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        self.model_kwargs = dict(self.model_kwargs)
        self.validate()

    def validate(self):
        """Raise ValueError with a one-line message for an invalid setting."""
        if self.method not in METHODS:
            raise ValueError(f"unknown training method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("eps_train", "lr_gamma", "grad_clip", "warmup_epochs", "ramp_epochs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (self.lr > 0 and self.epochs > 0):
            raise ValueError(f"lr and epochs must be > 0, got lr={self.lr!r}, epochs={self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.norm not in (math.inf, 2, 2.0):
            raise ValueError(f"norm must be inf or 2, got {self.norm!r}")
        for name in ("kappa_final", "beta_start", "beta_final"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.num_train is not None and self.num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {self.num_train!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["norm"] = "inf" if self.norm == math.inf else float(self.norm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        d = dict(d)
        if d.get("norm") in ("inf", "Inf", float("inf")):
            d["norm"] = math.inf
        return cls(**d)

    def identity(self) -> dict:
        """The fields that must match for a resume (see IDENTITY_FIELDS)."""
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_FIELDS}
