"""Serialized Randomized Smoothing (SRS; Gao et al., NeurIPS 2024) with an audited, provable correction.

Idea: the noisy copies of ``x`` are classified in a *sequence* of equally sized batches; inside a
serial context every DEQ layer starts from the previous batch's fixed points (row by row) and runs
only ``steps`` solver iterations, so a batch costs a few iterations instead of a full solve.  The
first batch (no previous solution) is a normal solve: it is the warm-up.

Those fast predictions ``h_i`` may differ from the converged model's ``f(x + d_i)``, and they are
not independent across samples (each warm start depends on earlier batches).  Soundness is kept
by an *audit* (see ``docs/smoothing.md`` for the theorem and proof):

1. a uniformly random set ``S`` of ``K`` positions among the ``n`` estimation samples is drawn
   before sampling; the serialized pass does not depend on ``S``;
2. after the serialized pass the converged ``model`` classifies the ``K`` audited noisy inputs;
3. ``a`` = #audited samples with ``h = cA != f`` ("harmful" disagreements), ``b`` = #audited samples
   with ``f = cA != h``; ``M_up = hypergeom_upper(a, n, K, alpha_2)`` bounds the number of harmful
   disagreements among all ``n`` samples (exact finite-population bound: valid under ANY
   dependence between the ``h_i``);
4. ``count = N_fast - M_up + b`` is, with probability >= 1 - alpha_2, a lower bound on the converged
   count ``N_conv ~ Binomial(n, pA)``; ``pA_lower = cp_lower(count, n, alpha_1)``.

With ``alpha_1 + alpha_2 = alpha`` the usual CERTIFY guarantee then holds for the smoothed
CONVERGED classifier.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, ContextManager, Optional, Sequence

import torch

from .._progress import progress_iter
from ..nn import serial_warm_start
from ..validate import check_positive_int
from .agreement import split_deq_model
from .core import Smooth, CertifyResult, gaussian_noise, make_generator
from .fastpath import AgreementPass
from .stats import hypergeom_upper

CERTIFICATES = ("auto", "agreement", "audit")


def default_serial_context(model, steps: int) -> ContextManager:
    """``lirpa_deq.nn.serial_warm_start(model, max_iter=steps)``."""
    return serial_warm_start(model, max_iter=steps)


class SerializedSmooth(Smooth):
    """SRS certification of the smoothed CONVERGED ``model``.

    Args:
        model: the converged classifier ``(B, *input_shape) -> (B, num_classes)`` (full solves).
        num_classes, sigma, input_shape: as in :class:`Smooth`.
        steps: solver iterations per warm-started batch (1-3 typical), passed to the default context.
        fast_model: callable used for the serialized predictions (default: ``model`` itself, run
            inside the serial context).  May be stateful; it must not depend on which positions
            are audited (it never sees that information).
        serial_context: zero-argument factory returning a context manager entered once per
            ``certify`` call around the serialized pass.  Default: ``serial_warm_start(model,
            max_iter=steps)`` when ``fast_model`` is None, else a null context.
        audit_size: K, the number of estimation samples re-classified by the converged model
            (clipped to n).  The correction costs K full solves; its slack is about
            n * log(1/alpha_2) / K samples when no disagreement is observed.
        audit_alpha_fraction: alpha_2 / alpha, in (0, 1).
        certificate: 'agreement' -- per-sample deterministic agreement certificates (needs
            ``model = nn.Sequential(*pre, DEQ, *post)`` with affine ``post`` and no
            ``fast_model`` / ``serial_context``): no audit, full alpha, certifies the smoothed
            EXACT-fixed-point classifier (see docs/smoothing.md); 'audit' -- the audited
            statistical correction (any fast predictor); 'auto' (default) -- 'agreement' when
            possible, else 'audit'.

    :meth:`predict` is inherited unchanged (converged model).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float,
                 steps: int = 1, *, fast_model: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 serial_context: Optional[Callable[[], ContextManager]] = None, audit_size: int = 400,
                 audit_alpha_fraction: float = 0.5, input_shape: Optional[Sequence[int]] = None,
                 certificate: str = "auto"):
        super().__init__(model, num_classes, sigma, input_shape)
        self.steps = check_positive_int("steps", steps)
        self.audit_size = check_positive_int("audit_size", audit_size)
        frac = float(audit_alpha_fraction)
        if not (0.0 < frac < 1.0):
            raise ValueError(f"audit_alpha_fraction must be in (0, 1), got {audit_alpha_fraction!r}")
        self.audit_alpha_fraction = frac
        if fast_model is not None and not callable(fast_model):
            raise ValueError("fast_model must be callable")
        self.fast_model = model if fast_model is None else fast_model
        self._custom_context = serial_context is not None
        if serial_context is None:
            if fast_model is None:
                serial_context = lambda: default_serial_context(model, self.steps)  # noqa: E731
            else:
                serial_context = contextlib.nullcontext
        self.serial_context = serial_context
        if certificate not in CERTIFICATES:
            raise ValueError(f"certificate must be one of {CERTIFICATES}, got {certificate!r}")
        parts = None
        if certificate != "audit":
            custom = fast_model is not None or self._custom_context
            parts = None if custom else split_deq_model(model)
            if parts is not None and not parts[1].cell.margin > 0:
                parts = None
            if parts is None and certificate == "agreement":
                raise ValueError("certificate='agreement' needs model = nn.Sequential(*pre, DEQ, *post) with "
                                 "affine post layers (Flatten/Linear/AvgPool2d/...), a cell margin > 0, and no "
                                 "fast_model / serial_context")
        self._parts = parts
        self.certificate = "audit" if parts is None else "agreement"
        if certificate == "auto" and parts is None and fast_model is None and not self._custom_context:
            warnings.warn("SerializedSmooth(certificate='auto') uses the audited correction: the model is not "
                          "nn.Sequential(*pre, DEQ(ReLU-affine cell with margin > 0), *affine layers in eval "
                          "mode), which the agreement certificate needs (docs/smoothing.md)", UserWarning,
                          stacklevel=2)

    def _serial_batches(self, x, num, batch_size, gen, progress, desc):
        """Yield (noisy[:b], fast_labels[:b]) for ``num`` samples in full batches of ``batch_size``.

        Every call of the fast model gets exactly ``batch_size`` rows (the last batch is padded with
        extra noise whose predictions are discarded), so row-by-row warm starts always match.
        """
        remaining = num
        for _ in progress_iter(range(math.ceil(num / batch_size)), progress, desc):
            noisy = gaussian_noise(x, batch_size, self.sigma, gen)
            labels = self._labels(self.fast_model, noisy)
            b = min(batch_size, remaining)
            remaining -= b
            yield noisy[:b], labels[:b]

    def certify_detailed(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 400, *,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                         progress: bool = False) -> CertifyResult:
        """SRS CERTIFY (see module docstring); ``extra`` holds the audit / agreement statistics."""
        x, n0, n, alpha, batch_size = self._validate_certify(x, n0, n, alpha, batch_size)
        gen = make_generator(x, seed, generator)
        if self._parts is not None:
            with torch.no_grad():  # the agreement pass never calls the model: check its output once
                self._labels(self.model, x.unsqueeze(0))
            return self._certify_agreement(x, n0, n, alpha, batch_size, gen, progress)
        alpha_2 = alpha * self.audit_alpha_fraction
        alpha_1 = alpha - alpha_2
        k = min(self.audit_size, n)

        # 1. audit positions: uniform K-subset of range(n), drawn before any sampling.
        perm_device = gen.device if gen is not None else torch.device("cpu")
        audit_pos = torch.randperm(n, generator=gen, device=perm_device)[:k].to(x.device)
        is_audit = torch.zeros(n, dtype=torch.bool, device=x.device)
        is_audit[audit_pos] = True

        fast = torch.empty(n, dtype=torch.int64, device=x.device)
        counts0 = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
        audit_inputs = []
        with torch.no_grad():
            with self.serial_context():
                # 2. selection (its first batch is the warm-up solve), then estimation, one stream.
                for _, labels in self._serial_batches(x, n0, batch_size, gen, progress, "SRS select"):
                    counts0 += torch.bincount(labels, minlength=self.num_classes)
                start = 0
                for noisy, labels in self._serial_batches(x, n, batch_size, gen, progress, "SRS estimate"):
                    b = labels.shape[0]
                    fast[start:start + b] = labels
                    sel = is_audit[start:start + b]
                    if bool(sel.any()):
                        audit_inputs.append(noisy[sel])
                    start += b
            # 3. converged predictions on the audited inputs, outside the serial context.
            audit_x = torch.cat(audit_inputs)
            conv = torch.cat([self._labels(self.model, audit_x[i:i + batch_size])
                              for i in range(0, k, batch_size)])

        c_a = int(torch.argmax(counts0))
        h_audit = fast[is_audit]  # positions in increasing order, same order as audit_x
        harmful = int(((h_audit == c_a) & (conv != c_a)).sum())
        helpful = int(((conv == c_a) & (h_audit != c_a)).sum())
        n_fast = int((fast == c_a).sum())
        m_up = hypergeom_upper(harmful, n, k, alpha_2)
        count = max(0, min(n, n_fast - m_up + helpful))
        extra = {
            "n_fast": n_fast, "audit_size": k, "audit_harmful": harmful, "audit_helpful": helpful,
            "audit_disagree": int((h_audit != conv).sum()), "harmful_upper": m_up,
            "alpha_1": alpha_1, "alpha_2": alpha_2, "selection_counts": counts0.cpu().numpy(),
        }
        result = self._finish(c_a, count, n, alpha_1, self.sigma, extra)
        result.alpha = alpha  # total failure probability (alpha_1 for the binomial + alpha_2 audit)
        return result

    def _certify_agreement(self, x, n0, n, alpha, batch_size, gen, progress) -> CertifyResult:
        """Agreement-certified SRS: ``count = #{i : certified_i and label_i = cA}`` is a
        deterministic lower bound on the exact classifier's count, so the full ``alpha`` goes to
        Clopper-Pearson (docs/smoothing.md, Theorem 2)."""
        pas = AgreementPass(*self._parts, self.num_classes, self.steps)
        counts0, c_a, labels, proved, fast = pas.run(x, n0, n, batch_size, self.sigma, gen, progress)
        count = int((proved & (labels == c_a)).sum())
        other = int((labels != c_a).sum())
        extra = {
            "certificate": "agreement", "n_fast": int((fast == c_a).sum()), "counted": count,
            "other_label": other, "uncertified": n - count - other, "uncertain_fast": pas.uncertain,
            "rescued": pas.rescued, "retried": pas.retried, "solver_iterations": pas.iterations,
            "row_iterations": pas.row_iterations, "solver_calls": pas.calls, "selection_counts": counts0.cpu().numpy(),
        }
        return self._finish(c_a, count, n, alpha, self.sigma, extra)
