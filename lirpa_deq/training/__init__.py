"""Certified training of DEQs (natural, IBP, CROWN-IBP) through auto_LiRPA, with exact resume.

See ``docs/training.md``. Main entry points: :class:`TrainConfig`, :class:`Trainer`
(``Trainer(config).train(checkpoint_path=...)``, ``Trainer.resume(path)``), the losses
(:func:`certified_loss`, :func:`margin_spec`, :func:`robust_ce`), the schedules, checkpoints
(:func:`load_checkpoint`, :func:`model_from_checkpoint`, :class:`CheckpointError`) and
evaluation (:func:`pgd_robust`, :func:`certify_bounds`). Every entry point validates its input
first (``lirpa_deq.validate``: ValueError saying what is wrong and how to fix it).
"""
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import certify_bounds, pgd_robust, predict
from .losses import (METHODS, bound_opts_for, certified_loss, make_bounded, margin_lower_bounds,
                     margin_spec, perturbation, robust_ce, sync_buffers)
from .schedules import LinearRamp, SmoothedRamp, StepLR
from .trainer import RampFitWarning, Trainer

__all__ = [
    "TrainConfig", "Trainer", "RampFitWarning", "CheckpointError", "load_checkpoint", "save_checkpoint", "model_from_checkpoint",
    "certify_bounds", "pgd_robust", "predict", "METHODS", "bound_opts_for", "certified_loss",
    "make_bounded", "margin_lower_bounds", "margin_spec", "perturbation", "robust_ce", "sync_buffers",
    "SmoothedRamp", "LinearRamp", "StepLR",
]
