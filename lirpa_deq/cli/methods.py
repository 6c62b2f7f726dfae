"""Certification methods behind ``lirpa-deq certify`` and ``demo``, with timings.

* 'ibp', 'crown': auto_LiRPA bounds on the margins (``lirpa_deq.training.certify_bounds``; CROWN
  is intersected with IBP, so it never certifies fewer points). Deterministic proofs, l_inf.
* 'lipschitz': ``lirpa_deq.lipschitz.certify_lipschitz`` when that module is installed.
* 'smoothing': randomized smoothing of the converged model (``lirpa_deq.smoothing``; SRS when
  ``srs_steps > 0``): a probabilistic (1 - alpha) certificate of the SMOOTHED classifier in l2.
  An l2 radius r certifies the l_inf ball of radius eps when ``r > eps * sqrt(d)`` (the l_inf
  ball lies in the l2 ball of radius eps sqrt(d)).
"""
from __future__ import annotations

import math
import time

import torch

from .._progress import progress_iter
from ..training.evaluate import certify_bounds
from ..validate import check_clip, check_eps, check_labels, check_method, check_x

BOUND_METHODS = ("ibp", "crown", "lipschitz")
METHODS = BOUND_METHODS + ("smoothing",)


def lipschitz_status():
    """(available, reason): whether ``lirpa_deq.lipschitz.certify_lipschitz`` can be imported."""
    try:
        from ..lipschitz import certify_lipschitz  # noqa: F401
    except ImportError as exc:
        return False, f"lirpa_deq.lipschitz is not available ({exc})"
    return True, ""


def check_available(methods):
    """ValueError (one line) for an unknown or unavailable method, or an empty list."""
    if not methods:
        raise ValueError(f"no certification method given; valid: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown certification method {m!r}; valid: {', '.join(METHODS)}")
        if m == "lipschitz":
            ok, why = lipschitz_status()
            if not ok:
                raise ValueError(f"method 'lipschitz' is unavailable: {why}")


def certify_linf(model, x, y, eps, method, num_classes=10, batch_size=250, clip=(0.0, 1.0), bounded=None):
    """Certify the l_inf ball of radius eps (intersected with ``clip``) around each x.

    Returns a dict: 'certified' bool (B,), 'margin' (B,) margin lower bounds (float; NaN when the
    method gives none), 'seconds' (wall time). ValueError first for an unknown method (listing the
    valid ones), an eps that is not a finite real >= 0, or x / y that ``validate.check_x`` /
    ``check_labels`` refuse."""
    method = check_method(method, BOUND_METHODS, "certification method")
    eps, clip = check_eps(eps), check_clip(clip)
    x = check_x(x, model, clip)
    y = check_labels(y, len(x), num_classes, x.device)
    t0 = time.time()
    if method in ("ibp", "crown"):
        cert, margin = certify_bounds(model, x, y, eps, "IBP" if method == "ibp" else "CROWN",
                                      num_classes=num_classes, clip=clip, batch_size=batch_size, bounded=bounded)
    elif method == "lipschitz":
        errors = []
        certs, margins = [], []
        for i in range(0, len(x), batch_size):
            c, m = _lipschitz_batch(model, x[i:i + batch_size], y[i:i + batch_size], eps, errors)
            certs.append(c)
            margins.append(m)
        cert, margin = torch.cat(certs), torch.cat(margins)
        return {"certified": cert, "margin": margin, "seconds": time.time() - t0, "errors": errors}
    return {"certified": cert.cpu(), "margin": margin.detach().float().cpu(), "seconds": time.time() - t0}


def _lipschitz_batch(model, x, y, eps, errors, progress=True):
    """certify_lipschitz on a batch; if it fails, image by image, and an image whose bound fails
    counts as NOT certified (no claim is made; the error is recorded in ``errors``). progress: a
    tqdm bar on stderr, shown only when stderr is a terminal."""
    from ..lipschitz import certify_lipschitz

    def one(xb, yb):
        c, m = certify_lipschitz(model, xb, yb, eps, norm=math.inf, method="local", progress=progress)
        return (torch.as_tensor(c, dtype=torch.bool).reshape(-1).cpu(),
                torch.as_tensor(m, dtype=torch.float32).detach().reshape(-1).cpu())

    try:
        return one(x, y)
    except Exception:  # noqa: BLE001  (a failing bound must not stop the other methods)
        certs, margins = [], []
        for i in range(len(x)):
            try:
                c, m = one(x[i:i + 1], y[i:i + 1])
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                c, m = torch.zeros(1, dtype=torch.bool), torch.full((1,), float("nan"))
            certs.append(c)
            margins.append(m)
        return torch.cat(certs), torch.cat(margins)


def certify_smoothing(model, x, y, sigma=0.25, n=1000, n0=100, alpha=0.001, srs_steps=0, batch_size=500,
                      num_classes=10, seed=0, progress=False):
    """Randomized-smoothing certificates of each image (one at a time).

    Returns a dict: 'prediction' long (B,) (-1 = abstain), 'radius' (B,) l2 radii, 'seconds'.
    srs_steps > 0: Serialized RS with that many warm-started solver steps per batch (per-sample agreement
    certificates when the model allows it, else audited; see docs/smoothing.md)."""
    from ..smoothing import SerializedSmooth, Smooth

    model.eval()
    if srs_steps > 0:
        sm = SerializedSmooth(model, num_classes, sigma, steps=int(srs_steps), audit_size=min(400, n),
                              input_shape=tuple(x.shape[1:]))
    else:
        sm = Smooth(model, num_classes, sigma, input_shape=tuple(x.shape[1:]))
    preds, radii = [], []
    t0 = time.time()
    for i in progress_iter(range(len(x)), progress, f"smoothing sigma={sigma}", unit="img"):
        c, r = sm.certify(x[i], n0, n, alpha, batch_size, seed=seed + i)
        preds.append(int(c))
        radii.append(float(r))
    return {"prediction": torch.tensor(preds, dtype=torch.long), "radius": torch.tensor(radii),
            "seconds": time.time() - t0}


def smoothing_accuracy(result, y, radii):
    """Certified accuracy of smoothing at each l2 radius: correct and radius >= r (r = 0: correct,
    not abstained). Returns {r: fraction}."""
    correct = result["prediction"] == y.cpu()
    return {float(r): float((correct & (result["radius"] >= r)).float().mean()) if len(y) else 0.0 for r in radii}


def smoothing_linf(result, y, eps, dim):
    """Bool (B,): smoothing certifies the l_inf ball of radius eps (r > eps * sqrt(dim))."""
    return (result["prediction"] == y.cpu()) & (result["radius"] > eps * math.sqrt(dim))
