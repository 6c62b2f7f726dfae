"""Up-front checks of user input, shared by every public entry point of training / evaluation
(``lirpa_deq.training``), the ``lirpa-deq`` command and randomized smoothing.

Each check raises ``ValueError`` with ONE line saying what was given, what is expected and how to
fix it, and returns the normalised value. The checks run before any work, so a bad input never
reaches a bound: before them a negative eps gave "16/16 certified" (``x_L = x + 0.5 > x_U = x -
0.5`` is an empty box, which the bounds happily enclosed), a NaN eps gave "0 certified" silently
and a NaN input was "certified" by smoothing with a positive radius.

What is refused (see ``docs/training.md``, "Validated input"):

* eps: anything but a finite real number >= 0 (bool, NaN, inf, negative, strings, tensors with more
  than one element);
* x: not a floating tensor, an empty batch, NaN / inf entries, a dtype or device other than the
  model's parameters', values outside the data domain ``clip``;
* labels: not an integer tensor of shape (B,), a class outside [0, num_classes);
* method / norm / clip / batch sizes / alpha / sigma / sample sizes outside their ranges;
* models with NaN / inf parameters or buffers, models whose logits are not (B, num_classes);
* output paths that cannot be written (checked before the work starts).
"""
from __future__ import annotations

import math
import numbers
import os
import tempfile

import numpy as np
import torch

#: Bound methods of :func:`lirpa_deq.training.margin_lower_bounds` / ``certify_bounds``.
BOUND_METHODS = ("IBP", "CROWN", "CROWN-IBP", "CROWN-Optimized")

_TO_DTYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "half", torch.bfloat16: "bfloat16"}


def _real(value):
    """float(value) for a python / numpy real or a one-element real tensor; None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_eps(eps, name: str = "eps") -> float:
    """``eps`` as a float; ValueError unless it is a finite real number >= 0."""
    v = _real(eps)
    head = f"{name} must be a finite real number >= 0 (the radius of the perturbation ball), got {eps!r}"
    if v is None:
        raise ValueError(f"{head} of type {type(eps).__name__}; pass a float such as 0.1")
    if math.isnan(v):
        raise ValueError(f"{head}: a NaN radius certifies nothing; check how {name} was computed")
    if math.isinf(v):
        raise ValueError(f"{head}: use a finite radius (pixels live in [0, 1])")
    if v < 0:
        raise ValueError(f"{head}: a negative radius is an empty ball, not a certificate; "
                         f"did you mean {name}={-v:g}?")
    return v


def check_positive_int(name: str, value) -> int:
    """``int(value)``; ValueError unless it is an integer >= 1 (bool refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonneg_int(name: str, value) -> int:
    """``int(value)``; ValueError unless it is an integer >= 0 (bool refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_alpha(alpha) -> float:
    """The failure probability as a float in the open interval (0, 1)."""
    a = _real(alpha)
    if a is None:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha!r} "
                         "(it is the failure probability, e.g. 0.001)")
    return a


def check_sigma(sigma) -> float:
    """The smoothing noise level as a finite float > 0."""
    s = _real(sigma)
    if s is None or not (s > 0.0 and math.isfinite(s)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r} "
                         "(sigma = 0 would be the undefended classifier)")
    return s


def check_sample_sizes(n0, n):
    """(n0, n) of Cohen's CERTIFY: positive integers with n >= n0."""
    n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
    if n < n0:
        raise ValueError(f"n (estimation samples, {n}) must be >= n0 (selection samples, {n0}): "
                         "n0 only picks the candidate class and n gives the certificate; "
                         "did you swap them? Typical values: n0=100, n=10000..100000")
    return n0, n


def check_unit(name: str, value) -> float:
    """A float in the closed interval [0, 1] (mixing weights such as kappa and beta)."""
    v = _real(value)
    if v is None or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


def check_method(method, valid, what: str = "bound method") -> str:
    """The entry of ``valid`` equal to ``method`` up to case; ValueError listing ``valid`` otherwise."""
    if isinstance(method, str):
        for v in valid:
            if method.strip().lower() == v.lower():
                return v
    raise ValueError(f"unknown {what} {method!r}; valid: {', '.join(valid)}")


def check_norm(norm) -> float:
    """math.inf (l_inf) or 2.0 (l2); ValueError otherwise."""
    v = _real(norm)
    if v == math.inf or v == 2:
        return v
    raise ValueError(f"norm must be math.inf (l_inf) or 2 (l2), got {norm!r}")


def check_clip(clip):
    """None or the data domain as a (lo, hi) pair of finite floats with lo < hi."""
    if clip is None:
        return None
    try:
        lo, hi = (_real(c) for c in clip)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip must be None or a pair (lo, hi) of finite numbers with lo < hi (the data "
                         f"domain, e.g. (0.0, 1.0)), got {clip!r}")
    return lo, hi


def check_num_classes(num_classes) -> int:
    """The number of classes as an int >= 2."""
    k = check_positive_int("num_classes", num_classes)
    if k < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    return k


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_tensor(model):
    """The first floating parameter (else buffer) of ``model``; None for a plain callable / none."""
    if not isinstance(model, torch.nn.Module):
        return None
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def check_matches_model(x: torch.Tensor, model, name: str = "x", device: bool = True) -> torch.Tensor:
    """ValueError unless ``x`` has the dtype (and, if ``device``, the device) of the model's parameters."""
    p = model_tensor(model)
    if p is None:
        return x
    if x.dtype != p.dtype:
        raise ValueError(f"{name} is {_dname(x.dtype)} but the model's parameters are {_dname(p.dtype)}; use "
                         f"{name}.{_TO_DTYPE.get(p.dtype, 'to(' + str(p.dtype) + ')')}() or "
                         f"model.{_TO_DTYPE.get(x.dtype, 'to(' + str(x.dtype) + ')')}()")
    if device and x.device != p.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {p.device}; use "
                         f"{name}.to('{p.device}') or model.to('{x.device}')")
    return x


def check_finite(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """ValueError if ``x`` holds NaN or inf (with their count)."""
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        n_nan = int(torch.isnan(x.detach()).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values: nothing can be "
                         f"certified about them; clean or drop those inputs")
    return x


def check_x(x, model=None, clip=None, name: str = "x", device: bool = True) -> torch.Tensor:
    """A non-empty finite floating batch (B, *input_shape) matching the model's dtype / device and,
    when ``clip = (lo, hi)`` is given, inside the data domain [lo, hi] (the perturbation set is the
    ball intersected with the domain, so a point outside it is not in its own set)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, *input_shape), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; use {name}.float()")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, *input_shape), got shape "
                         f"{tuple(x.shape)}; add a batch dimension with {name}.unsqueeze(0)")
    check_finite(x, name)
    check_matches_model(x, model, name, device)
    if clip is not None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < clip[0] or hi > clip[1]:
            raise ValueError(f"{name} has values in [{lo:.4g}, {hi:.4g}], outside the data domain clip={tuple(clip)}: "
                             "rescale the inputs into the domain, or pass the right clip (None = no domain)")
    return x


def check_labels(y, batch_size: int, num_classes: int, device=None, name: str = "y") -> torch.Tensor:
    """Integer class indices of shape (batch_size,) within [0, num_classes) (on ``device`` if given)."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}; use {name}.long()")
    if tuple(y.shape) != (batch_size,):
        raise ValueError(f"{name} must have shape (B,) = ({batch_size},), one label per input, got "
                         f"{tuple(y.shape)}" + (f"; use {name}.view(-1)" if y.numel() == batch_size else ""))
    if batch_size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} has labels in [{int(y.min())}, {int(y.max())}], outside [0, {num_classes}) "
                         f"(num_classes={num_classes}); pass the right num_classes or fix the labels")
    if device is not None and y.device != torch.device(device):
        raise ValueError(f"{name} is on {y.device} but x is on {device}; use {name}.to(x.device)")
    return y


def first_non_finite(tensors: dict):
    """Name of the first floating tensor of ``tensors`` (name -> tensor, e.g. a state dict) holding
    NaN / inf, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def check_finite_params(model, what: str = "the model") -> None:
    """ValueError naming the first parameter or buffer of ``model`` that holds NaN / inf."""
    if not isinstance(model, torch.nn.Module):
        return
    bad = first_non_finite(dict(list(model.named_parameters()) + list(model.named_buffers())))
    if bad is not None:
        raise ValueError(f"{what} has NaN / inf in {bad!r}: it cannot be evaluated or certified; the training "
                         "run diverged (lower the learning rate) or the weights are damaged: use another checkpoint")


def check_logits(model, x1: torch.Tensor, num_classes=None) -> int:
    """The number of classes of ``model`` from one forward pass on x1 (1, *input_shape);
    ValueError unless the logits are (1, K) (and K == num_classes when given)."""
    try:
        with torch.no_grad():
            out = model(x1)
    except (RuntimeError, ValueError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the model cannot be applied to inputs of shape {tuple(x1.shape[1:])} (x is "
                         f"(B, *input_shape)): {text}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x1.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must map (B, *input_shape) to logits (B, num_classes); got {shape} for an "
                         f"input of shape {tuple(x1.shape)}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model outputs {out.shape[1]} logits; pass "
                         f"num_classes={out.shape[1]}")
    return int(out.shape[1])


# ------------------------------------------------------------------------------ output paths
def _unwritable(directory):
    """None if ``directory`` (created if needed) accepts a new file, else the reason (a string)."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lirpa-deq-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_writable_dir(path, flag: str = "--out") -> str:
    """Create directory ``path`` if needed and prove it writable by creating and removing a file
    in it; ValueError (one line, naming ``flag``) otherwise. Returns the path."""
    path = os.fspath(path)
    why = _unwritable(path)
    if why:
        raise ValueError(f"{flag} {path!r} is not a writable directory ({why}): choose another {flag} "
                         "or fix its permissions")
    return path


def check_writable_file(path, flag: str = "--json") -> str:
    """``path`` can be (re)written atomically: not a directory, and its directory (created if
    needed) is writable. ValueError (one line, naming ``flag``) otherwise. Returns the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory: give a file name, e.g. {os.path.join(path, 'out.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    why = _unwritable(directory)
    if why:
        raise ValueError(f"{flag} {path!r} cannot be written: its directory {directory!r} is not writable ({why}); "
                         f"choose another {flag} or fix the permissions")
    return path
