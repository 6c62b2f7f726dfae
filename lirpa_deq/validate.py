"""Up-front checks of user input, shared by every public entry point: training and evaluation
(``lirpa_deq.training``), the Lipschitz analysis (``lirpa_deq.lipschitz``), randomized smoothing
(``lirpa_deq.smoothing``) and the ``lirpa-deq`` command.

One function per idea. Each raises ``ValueError`` with ONE line saying what was given, what is
expected and how to fix it, and returns the normalised value; nothing here computes a bound. The
checks run before any work, so a bad input never reaches a bound (a negative eps would be an
empty box, which any bound encloses; a NaN input has a constant argmax).

What is refused (see ``docs/training.md``, "Validated input"):

* eps: anything but a finite real number >= 0 (bool, NaN, inf, negative, strings, tensors with more
  than one element);
* x: not a floating tensor (or not one of the allowed dtypes), an empty batch, NaN / inf entries,
  a dtype or device other than the model's tensors', values outside the data domain ``clip``;
* labels: not an integer tensor of shape (B,), a class outside [0, num_classes);
* specification rows C of the wrong shape / dtype, or with NaN / inf;
* method / norm / clip / batch sizes / alpha / sigma / sample sizes / flags outside their ranges;
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


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name: str, value) -> int:
    """``int(value)``; ValueError unless it is an integer >= 1 (bool refused)."""
    if not _integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonneg_int(name: str, value) -> int:
    """``int(value)``; ValueError unless it is an integer >= 0 (bool refused)."""
    if not _integer(value) or value < 0:
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


def check_bool(name: str, value) -> bool:
    """``value`` if it is True or False (no other truthy / falsy values)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_method(method, valid, what: str = "bound method") -> str:
    """The entry of ``valid`` equal to ``method`` up to case; ValueError listing ``valid`` otherwise."""
    if isinstance(method, str):
        for v in valid:
            if method.strip().lower() == v.lower():
                return v
    raise ValueError(f"unknown {what} {method!r}; valid: {', '.join(valid)}")


_NORM_NAMES = {"inf": math.inf, "linf": math.inf, "l_inf": math.inf, "2": 2.0, "l2": 2.0}


def check_norm(norm) -> float:
    """math.inf (l_inf; also 'inf', 'linf', 'l_inf') or 2.0 (l2; also '2', 'l2'); ValueError otherwise."""
    v = _NORM_NAMES.get(norm.strip().lower()) if isinstance(norm, str) else _real(norm)
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


def _model_tensors(model) -> list:
    """The floating parameters, then buffers, of ``model`` (none for a plain callable)."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


def check_dtype(u: torch.Tensor, params) -> None:
    """TypeError unless the DEQ input ``u`` has the dtype of the cell's parameters (tensors)."""
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if dtypes and u.dtype not in dtypes:
        raise TypeError(f"the DEQ layer's input is {u.dtype} but its cell's parameters are "
                        f"{sorted(map(str, dtypes))[0]}: convert the input (x.to(dtype)) or the model "
                        "(model.to(dtype)) so they agree")


def check_matches_model(x: torch.Tensor, model, name: str = "x", device: bool = True) -> torch.Tensor:
    """ValueError unless ``x`` has the dtype (and, if ``device``, the device) of EVERY floating
    parameter and buffer of the model (the message names the first that differs)."""
    tensors = _model_tensors(model)
    p = next((t for t in tensors if t.dtype != x.dtype), None)
    if p is not None:
        raise ValueError(f"{name} is {_dname(x.dtype)} but the model's parameters are {_dname(p.dtype)}; use "
                         f"{name}.{_TO_DTYPE.get(p.dtype, 'to(' + str(p.dtype) + ')')}() or "
                         f"model.{_TO_DTYPE.get(x.dtype, 'to(' + str(x.dtype) + ')')}()")
    p = next((t for t in tensors if t.device != x.device), None) if device else None
    if p is not None:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {p.device}; use "
                         f"{name}.to('{p.device}') or model.to('{x.device}')")
    return x


def check_finite(x: torch.Tensor, name: str = "x", batched: bool = False) -> torch.Tensor:
    """ValueError if ``x`` holds NaN or inf (with their count; ``batched``: x is (B, ...) and the
    message also lists the first offending samples)."""
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        n_nan = int(torch.isnan(x.detach()).sum())
        rows = f" (samples {bad.flatten(1).any(1).nonzero().flatten().tolist()[:10]})" if batched else ""
        raise ValueError(f"{name} contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values{rows}: nothing "
                         f"can be certified about them; clean or drop those inputs")
    return x


def check_x(x, model=None, clip=None, name: str = "x", device: bool = True, dtypes=None) -> torch.Tensor:
    """A non-empty finite floating batch (B, *input_shape) matching the model's dtype / device and,
    when ``clip = (lo, hi)`` is given, inside the data domain [lo, hi] (the perturbation set is the
    ball intersected with the domain, so a point outside it is not in its own set). ``dtypes``: the
    only dtypes accepted (e.g. (torch.float32, torch.float64)); None: any floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, *input_shape), got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(_dname(d) for d in dtypes)}, got {x.dtype}; convert it "
                         f"with {name}.{_TO_DTYPE.get(dtypes[-1])}() and use the same dtype for the model")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; use {name}.float()")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, *input_shape), got shape "
                         f"{tuple(x.shape)}; add a batch dimension with {name}.unsqueeze(0)")
    check_finite(x, name, batched=True)
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


# ------------------------------------------------------------------------------ layers and specifications
def _expected_input(layer):
    """(predicate on the full shape, description) of what ``layer`` accepts, or None."""
    m = layer.module
    name = type(m).__name__
    if name == "Linear":
        return (lambda s: s[-1] == m.in_features), f"(B, ..., {m.in_features}) [in_features={m.in_features}]"
    if name == "Conv2d":
        return (lambda s: len(s) == 4 and s[1] == m.in_channels), f"(B, {m.in_channels}, H, W)"
    if name == "BatchNorm1d":
        return (lambda s: len(s) in (2, 3) and s[1] == m.num_features), f"(B, {m.num_features}[, L])"
    if name == "BatchNorm2d":
        return (lambda s: len(s) == 4 and s[1] == m.num_features), f"(B, {m.num_features}, H, W)"
    if name == "AvgPool2d":
        return (lambda s: len(s) == 4), "(B, C, H, W)"
    return None


def check_input_shape(layers, x):
    """(shapes, out_shape): the per-sample input shape of every layer and of the output, from a
    point forward pass of ``x[:1]``. ValueError naming the first layer that does not accept its
    input (expected vs got), or if the output is not ``(B, num_classes)``. ``layers``: the
    flattened model of ``lirpa_deq.lipschitz.layers.flatten_model``."""
    from .nn.cells.base import ReLUAffineCell

    shapes, h = [], x[:1]
    with torch.no_grad():
        for layer in layers:
            got = tuple(h.shape)
            shapes.append(got[1:])
            want = _expected_input(layer)
            where = f"x of shape {tuple(x.shape)} does not fit the model: layer {layer.name}"
            if want is not None and not want[0](got):
                raise ValueError(f"{where} expects inputs {want[1]}, got (B, {', '.join(map(str, got[1:]))})")
            if layer.kind == "deq" and isinstance(layer.module.cell, ReLUAffineCell):  # names the shape it needs
                try:
                    layer.module.cell.state_shape(got)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from e
            try:
                h = layer.forward(h)
            except (RuntimeError, ValueError, IndexError) as e:
                raise ValueError(f"{where} cannot be applied to its input of shape (B, "
                                 f"{', '.join(map(str, got[1:]))}): {e}") from e
    if h.dim() != 2:
        raise ValueError(f"the model must return logits of shape (B, num_classes), got "
                         f"{(x.shape[0],) + tuple(h.shape[1:])}; end it with a Flatten / Linear")
    return shapes, tuple(h.shape[1:])


def check_C(C, B, num_classes, x):
    """Specification rows (B, K, num_classes) in ``x``'s dtype/device; None: the identity rows
    (each logit), expanded (B, num_classes, num_classes)."""
    if C is None:
        return torch.eye(num_classes, dtype=x.dtype, device=x.device).expand(B, -1, -1)
    want = f"C must be a tensor of shape (B={B}, K, num_classes={num_classes})"
    if not isinstance(C, torch.Tensor):
        raise ValueError(f"{want}, got {type(C).__name__}")
    if C.dim() == 2 and C.shape[1] == num_classes:
        raise ValueError(f"{want}, got {tuple(C.shape)}: the same rows for every sample are "
                         f"C.expand({B}, -1, -1)")
    if C.dim() != 3 or C.shape[0] != B or C.shape[2] != num_classes:
        raise ValueError(f"{want}, got {tuple(C.shape)}")
    if C.shape[1] == 0:
        raise ValueError("C has no specification rows (K = 0); pass at least one row per sample")
    if C.is_complex() or C.dtype == torch.bool:
        raise ValueError(f"C must be a real tensor, got {C.dtype}")
    C = C.detach().to(dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(C).all()):
        raise ValueError("C contains NaN or infinite values (after conversion to x's dtype)")
    return C



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
