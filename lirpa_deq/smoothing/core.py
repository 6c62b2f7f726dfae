"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) for any torch classifier.

The base classifier is ``f(x) = argmax_c model(x)[c]`` for a ``model`` mapping a batch
``(B, *input_shape)`` to logits ``(B, num_classes)``; for a DEQ this is the *converged* model.
The smoothed classifier is ``g(x) = argmax_c P_{d ~ N(0, sigma^2 I)}(f(x + d) = c)``.

* :meth:`Smooth.predict` -- Cohen's PREDICT: returns the top class of ``n`` noisy samples, or
  :data:`ABSTAIN` (-1) unless a two-sided binomial test of the top two counts rejects at ``alpha``.
  Guarantee: P(returns a class other than g(x) and not abstain) <= alpha.
* :meth:`Smooth.certify` -- Cohen's CERTIFY: the top class c of ``n0`` selection samples, then
  ``n`` fresh samples, ``pA_lower`` = one-sided Clopper-Pearson lower bound at level ``alpha`` on
  ``P(f(x+d) = c)``; returns ``(c, sigma * Phi^-1(pA_lower))`` if ``pA_lower > 1/2`` else
  ``(ABSTAIN, 0.0)``.  Guarantee: with probability >= 1 - alpha over the noise, a non-abstain
  answer ``(c, r)`` satisfies ``g(x') = c`` for all ``||x' - x||_2 < r``.

Inputs: ``x`` is ONE input without batch dimension (shape ``input_shape``); pass
``input_shape=`` to the constructor to also accept ``(1, *input_shape)`` and to have other shapes
rejected.  Noise is drawn on ``x.device`` with ``x.dtype``; reproducible with ``seed`` or a
``torch.Generator`` living on ``x.device``.

Validation (before any sample is drawn; ValueError with one line, from ``lirpa_deq.validate``, shared
with training, the Lipschitz analysis and the CLI): ``sigma`` finite and > 0; ``n0``, ``n``,
``batch_size`` positive integers with ``n >= n0``; ``alpha`` in (0, 1); ``x`` a non-empty floating
tensor with no NaN / inf (the argmax of NaN logits is a constant class, which would be "certified")
and, for an ``nn.Module`` model, of its parameters' dtype and device.

Progress: ``progress=True`` shows a tqdm bar over the sample batches on stderr, only when stderr is a
terminal (``lirpa_deq._progress``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import norm

from .._progress import progress_iter
from ..validate import (check_alpha, check_finite, check_matches_model, check_positive_int,
                        check_sample_sizes, check_sigma)
from .stats import binom_two_sided_p, cp_lower

ABSTAIN = -1


@dataclass
class CertifyResult:
    """Details of one certification.  ``radius`` is 0.0 when ``prediction == ABSTAIN``."""

    prediction: int
    radius: float
    p_lower: float
    count: int            # count used in the Clopper-Pearson bound (after any correction)
    n: int
    alpha: float
    extra: dict = field(default_factory=dict)

    def as_tuple(self) -> Tuple[int, float]:
        return self.prediction, self.radius


def make_generator(x: torch.Tensor, seed: Optional[int], generator: Optional[torch.Generator]):
    """``generator`` if given, else a fresh generator on ``x.device`` seeded with ``seed``, else None
    (None = torch's global RNG)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        return generator
    if seed is None:
        return None
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    return g


def gaussian_noise(x: torch.Tensor, batch: int, sigma: float, generator) -> torch.Tensor:
    """``batch`` noisy copies ``x + N(0, sigma^2 I)``: shape ``(batch, *x.shape)``, on x's device/dtype."""
    noise = torch.randn((batch, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return x.unsqueeze(0) + sigma * noise


class Smooth:
    """Gaussian randomized smoothing of ``model`` (see module docstring).

    Args:
        model: callable ``(B, *input_shape) -> (B, num_classes)`` logits (an ``nn.Module`` is put
            in eval mode by the caller, not here).
        num_classes: number of classes (>= 2).
        sigma: noise standard deviation (> 0), in the units of ``x`` (e.g. [0, 1] pixels).
        input_shape: optional shape of one input, enables strict shape checking.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float,
                 input_shape: Optional[Sequence[int]] = None):
        if not callable(model):
            raise ValueError("model must be callable: model(batch) -> logits")
        self.num_classes = check_positive_int("num_classes", num_classes)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        sigma = check_sigma(sigma)
        self.model = model
        self.sigma = sigma
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    # ------------------------------------------------------------------ helpers
    def _single_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor holding one input, got {type(x).__name__}")
        if x.dim() == 0 or x.numel() == 0:
            raise ValueError(f"x must be one non-empty input without batch dimension, got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"x must be floating point, got {x.dtype}")
        if self.input_shape is not None:
            if tuple(x.shape) == (1, *self.input_shape):
                x = x[0]
            elif tuple(x.shape) != self.input_shape:
                raise ValueError(f"x must be a single input of shape {self.input_shape} (or "
                                 f"(1, *{self.input_shape})), got {tuple(x.shape)}; smooth one input at a time")
        check_finite(x, "x")  # the argmax of NaN logits is a constant class: never "certify" it
        return check_matches_model(x, self.model, "x")

    def _labels(self, model, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)
        if not isinstance(logits, torch.Tensor) or logits.shape != (batch.shape[0], self.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model must map a batch of shape {tuple(batch.shape)} to logits of shape "
                             f"({batch.shape[0]}, {self.num_classes}); got {shape}. Is x a single input "
                             "without batch dimension, and num_classes right?")
        return logits.argmax(dim=1)

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, generator=None,
                      progress: bool = False, model=None) -> np.ndarray:
        """Class counts (int64 array of length num_classes) of ``num`` noisy samples of ``x``."""
        model = self.model if model is None else model
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        remaining = num
        with torch.no_grad():
            for _ in progress_iter(range(math.ceil(num / batch_size)), progress, "smoothing"):
                b = min(batch_size, remaining)
                labels = self._labels(model, gaussian_noise(x, b, self.sigma, generator))
                counts += torch.bincount(labels, minlength=self.num_classes)
                remaining -= b
        return counts.cpu().numpy()

    # ------------------------------------------------------------------ Cohen et al.
    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 400, *,
                seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                progress: bool = False) -> int:
        """PREDICT: top class of ``n`` samples or ABSTAIN (-1) if the binomial test p-value > alpha."""
        n = check_positive_int("n", n)
        alpha = check_alpha(alpha)
        batch_size = check_positive_int("batch_size", batch_size)
        x = self._single_input(x)
        counts = self.sample_counts(x, n, batch_size, make_generator(x, seed, generator), progress)
        top2 = np.argsort(-counts, kind="stable")[:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binom_two_sided_p(n_a, n_a + n_b) > alpha:
            return ABSTAIN
        return int(top2[0])

    def _validate_certify(self, x, n0, n, alpha, batch_size):
        n0, n = check_sample_sizes(n0, n)
        return self._single_input(x), n0, n, check_alpha(alpha), check_positive_int("batch_size", batch_size)

    @staticmethod
    def _finish(c_a: int, count: int, n: int, alpha: float, sigma: float, extra=None) -> CertifyResult:
        p_lower = cp_lower(count, n, alpha)
        if p_lower > 0.5:
            return CertifyResult(c_a, float(sigma * norm.ppf(p_lower)), p_lower, count, n, alpha, extra or {})
        return CertifyResult(ABSTAIN, 0.0, p_lower, count, n, alpha, extra or {})

    def certify_detailed(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 400, *,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         progress: bool = False) -> CertifyResult:
        """CERTIFY with details (class counts, pA_lower). See :meth:`certify`."""
        x, n0, n, alpha, batch_size = self._validate_certify(x, n0, n, alpha, batch_size)
        gen = make_generator(x, seed, generator)
        c_a = int(np.argmax(self.sample_counts(x, n0, batch_size, gen, progress)))
        counts = self.sample_counts(x, n, batch_size, gen, progress)
        return self._finish(c_a, int(counts[c_a]), n, alpha, self.sigma, {"counts": counts})

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 400, *,
                seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                progress: bool = False) -> Tuple[int, float]:
        """CERTIFY: ``(prediction, radius)`` or ``(ABSTAIN, 0.0)``; ValueError if ``n < n0``."""
        return self.certify_detailed(x, n0, n, alpha, batch_size, seed=seed, generator=generator,
                                     progress=progress).as_tuple()
