"""Up-front validation of the arguments of the public API (one function per argument).

Every function raises ValueError saying what is wrong (expected vs got) and how to fix it, and
returns the normalised value. Nothing here computes a bound.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..nn.cells.base import ReLUAffineCell

METHODS = ("global", "elementwise", "local")
NORMS = (math.inf, 2)


def check_norm(norm):
    """math.inf (also 'inf', 'linf', 'l_inf') or 2 (also '2', 'l2')."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        table = {"inf": math.inf, "linf": math.inf, "l_inf": math.inf, "2": 2, "l2": 2}
        if key in table:
            return table[key]
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        if norm == math.inf:
            return math.inf
        if norm == 2:
            return 2
    raise ValueError(f"norm must be math.inf (l_inf ball, dual l1) or 2 (l2 ball), got {norm!r}")


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return method


def check_eps(eps) -> float:
    """The radius as a float >= 0: a finite real number or a one-element tensor."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be one radius, got a tensor of shape {tuple(eps.shape)}; "
                             "per-sample radii are not supported (call once per radius)")
        if eps.is_complex() or eps.dtype == torch.bool:
            raise ValueError(f"eps must be a real number, got a {eps.dtype} tensor")
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a real number (float, int or one-element tensor), got "
                         f"{type(eps).__name__} {eps!r}")
    eps = float(eps)
    if math.isnan(eps):
        raise ValueError("eps must be a number >= 0, got NaN; pass the radius of the ball")
    if math.isinf(eps):
        raise ValueError(f"eps must be finite, got {eps}; a bound for every input is "
                         "method='global' (any finite eps gives it)")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (the radius of the ball), got {eps}")
    return eps


def check_x(x) -> torch.Tensor:
    """A non-empty float32/float64 batch (B, *input_shape) of finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, *input_shape), got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}; convert it with x.double() "
                         "(or x.float()) and use the same dtype for the model")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, *input_shape), got shape {tuple(x.shape)}; "
                         "a single input needs a batch dimension: x.unsqueeze(0)")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"x contains NaN or infinite values (samples {rows[:10]}); bounds are only "
                         "defined for finite inputs")
    return x.detach()


def check_model_tensors(model, x):
    """Every floating parameter / buffer of ``model`` has ``x``'s dtype and device."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and (p.dtype != x.dtype or p.device != x.device):
            raise ValueError(
                f"x is {x.dtype} on {x.device} but model tensor {name!r} is {p.dtype} on {p.device}; "
                f"the analysis runs in one dtype and device: pass x.to({p.dtype}, '{p.device}') or move "
                f"the model with model.to(x) first")


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
    input (expected vs got), or if the output is not ``(B, num_classes)``."""
    shapes, h = [], x[:1]
    with torch.no_grad():
        for layer in layers:
            got = tuple(h.shape)
            shapes.append(got[1:])
            want = _expected_input(layer)
            where = f"x of shape {tuple(x.shape)} does not fit the model: layer {layer.name}"
            if want is not None and not want[0](got):
                raise ValueError(f"{where} expects inputs {want[1]}, got (B, {', '.join(map(str, got[1:]))})")
            if layer.kind == "deq" and isinstance(layer.module.cell, ReLUAffineCell):
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
    """Specification rows (B, K, num_classes) in ``x``'s dtype/device; None: identity (each logit)."""
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


def check_labels(labels, B, num_classes, device):
    """Integer class indices (B,) in [0, num_classes - 1], on ``device``."""
    if num_classes < 2:
        raise ValueError(f"certification needs at least 2 classes, the model has {num_classes}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of class indices, shape (B={B},), got "
                         f"{type(labels).__name__}; use torch.as_tensor(labels)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}; use labels.long()")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape (B={B},) (one class per sample of x), got "
                         f"{tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (the model has {num_classes} "
                         f"classes), got values in [{lo}, {hi}]")
    return labels.to(device)


def check_progress(progress) -> bool:
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    return progress
