"""Model builders: DEQ classifiers (IBP-MonDEQ and orthogonal cells) and explicit CNN baselines.

Every builder has the signature ``builder(input_shape=(C, H, W), num_classes=10, **kwargs)`` and
returns an ``nn.Sequential`` mapping images ``(B, C, H, W)`` (values in [0, 1]) to logits
``(B, num_classes)``. All of them are made of layers auto_LiRPA 0.3 understands (Conv2d, Linear,
BatchNorm, ReLU, AvgPool2d, Flatten) plus at most one :class:`lirpa_deq.nn.DEQ` layer, so
``BoundedModule(model, x)`` works on each (IBP, CROWN, CROWN-IBP; tested for soundness).

Guarantees: the DEQ cells carry their own proven structure (``cell.check()``); IBP-MonDEQ cells
make the interval system itself monotone, so the interval fixed point is provable. Orthogonal
cells (CerDEQ-style, ``||W||_2 <= 1 - margin``) need the bounds' monotone-ball fallback, which is
looser. Conv DEQ states are ``(B, width, H, W)``; fc DEQ states ``(B, width)``.

Architectures (W&K = Wei & Kolter 2022, CNN-7 as in Shi et al. 2021):

* ``fc_deq``: Flatten, Linear(d, width), DEQ(width), Linear(width, K).
* ``conv_fc_deq``: 2 strided convs (16, 32 ch, 4x4, stride 2) + ReLU, Linear(., width),
  DEQ(width), Linear(width, K) -- a CPU-friendly model with a conv front end.
* ``deq3``: Conv3x3(C, width) + BN + ReLU (the injection U x), DEQ(conv cell, width channels),
  AvgPool(4), Flatten, Linear(width * H/4 * W/4, K) (W&K's DEQ-3; default width 128).
* ``deq7``: CNN-7 with the two 64-channel convs replaced by one conv DEQ: Conv3x3(C, w) + BN +
  ReLU, DEQ(w), Conv3x3 stride 2 (2w) + BN + ReLU, 2 x [Conv3x3 (2w) + BN + ReLU], Flatten,
  Linear(., 8w) + BN + ReLU, Linear(8w, K) (default w = 64, i.e. 128 and 512 as in CNN-7).
* ``cnn3`` / ``cnn7``: the explicit counterparts (the DEQ replaced by Conv3x3 + BN + ReLU).
"""
from __future__ import annotations

import torch.nn as nn

from ..nn import DEQ, IBPMonConv2d, IBPMonLinear, OrthoConv2d, OrthoLinear

#: DEQ layer defaults of the builders (Anderson, forward tolerance 1e-4 as in W&K's code).
DEQ_DEFAULTS = dict(solver="anderson", tol=1e-4, max_iter=50)


def _fc_cell(cell, width, margin):
    if cell == "ibp":
        return IBPMonLinear(width, m=0.5 if margin is None else margin)
    if cell == "ortho":
        return OrthoLinear(width, margin=0.1 if margin is None else margin)
    raise ValueError(f"unknown cell {cell!r}; valid: 'ibp', 'ortho'")


def _conv_cell(cell, width, margin):
    if cell == "ibp":
        return IBPMonConv2d(width, m=0.5 if margin is None else margin)
    if cell == "ortho":
        return OrthoConv2d(width, margin=0.1 if margin is None else margin)
    raise ValueError(f"unknown cell {cell!r}; valid: 'ibp', 'ortho'")


def _deq(cell, deq_opts):
    opts = dict(DEQ_DEFAULTS)
    opts.update(deq_opts or {})
    return DEQ(cell, **opts)


def _check_positive(**kw):
    for k, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")


def _check_input(input_shape, pool=1):
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    if h % pool or w % pool:
        raise ValueError(f"this model needs H and W divisible by {pool}, got {h}x{w}")
    return c, h, w


def conv_bn_relu(c_in, c_out, stride=1):
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def fc_deq(input_shape=(1, 28, 28), num_classes=10, width=256, cell="ibp", margin=None, deq_opts=None):
    """Flatten -> Linear(d, width) -> DEQ(fc cell) -> Linear(width, K). DEQ state (B, width)."""
    _check_positive(width=width, num_classes=num_classes)
    c, h, w = _check_input(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width),
                         _deq(_fc_cell(cell, width, margin), deq_opts), nn.Linear(width, num_classes))


def conv_fc_deq(input_shape=(1, 28, 28), num_classes=10, width=256, channels=16, cell="ibp", margin=None,
                deq_opts=None):
    """Conv4x4/2 (channels) + ReLU -> Conv4x4/2 (2 channels) + ReLU -> Linear(., width) -> DEQ(fc)
    -> Linear(width, K). Needs H, W divisible by 4. DEQ state (B, width)."""
    _check_positive(width=width, channels=channels, num_classes=num_classes)
    c, h, w = _check_input(input_shape, pool=4)
    flat = 2 * channels * (h // 4) * (w // 4)
    return nn.Sequential(nn.Conv2d(c, channels, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(flat, width),
                         _deq(_fc_cell(cell, width, margin), deq_opts), nn.Linear(width, num_classes))


def deq3(input_shape=(1, 28, 28), num_classes=10, width=128, cell="ibp", margin=None, deq_opts=None):
    """DEQ-3 (W&K): Conv3x3 + BN + ReLU -> DEQ(conv cell, width ch) -> AvgPool(4) -> Linear.
    Needs H, W divisible by 4. DEQ state (B, width, H, W)."""
    _check_positive(width=width, num_classes=num_classes)
    c, h, w = _check_input(input_shape, pool=4)
    return nn.Sequential(*conv_bn_relu(c, width), _deq(_conv_cell(cell, width, margin), deq_opts),
                         nn.AvgPool2d(4), nn.Flatten(), nn.Linear(width * (h // 4) * (w // 4), num_classes))


def deq7(input_shape=(1, 28, 28), num_classes=10, width=64, cell="ibp", margin=None, deq_opts=None):
    """DEQ-7: CNN-7 with its two width-channel convs replaced by one conv DEQ (state
    (B, width, H, W)); then 2*width channels (stride 2), Linear 8*width. Needs even H, W."""
    _check_positive(width=width, num_classes=num_classes)
    c, h, w = _check_input(input_shape, pool=2)
    w2 = 2 * width
    return nn.Sequential(*conv_bn_relu(c, width), _deq(_conv_cell(cell, width, margin), deq_opts),
                         *conv_bn_relu(width, w2, stride=2), *conv_bn_relu(w2, w2), *conv_bn_relu(w2, w2),
                         nn.Flatten(), nn.Linear(w2 * (h // 2) * (w // 2), 8 * width), nn.BatchNorm1d(8 * width),
                         nn.ReLU(), nn.Linear(8 * width, num_classes))


def cnn3(input_shape=(1, 28, 28), num_classes=10, width=128):
    """Explicit DEQ-3 counterpart: 2 x [Conv3x3 + BN + ReLU] -> AvgPool(4) -> Linear."""
    _check_positive(width=width, num_classes=num_classes)
    c, h, w = _check_input(input_shape, pool=4)
    return nn.Sequential(*conv_bn_relu(c, width), *conv_bn_relu(width, width), nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(width * (h // 4) * (w // 4), num_classes))


def cnn7(input_shape=(1, 28, 28), num_classes=10, width=64):
    """CNN-7 (Shi et al. 2021): convs width, width, 2w/2, 2w, 2w (3x3, BN, ReLU), Linear 8w + BN
    + ReLU, Linear K. Needs even H, W."""
    _check_positive(width=width, num_classes=num_classes)
    c, h, w = _check_input(input_shape, pool=2)
    w2 = 2 * width
    return nn.Sequential(*conv_bn_relu(c, width), *conv_bn_relu(width, width), *conv_bn_relu(width, w2, stride=2),
                         *conv_bn_relu(w2, w2), *conv_bn_relu(w2, w2), nn.Flatten(),
                         nn.Linear(w2 * (h // 2) * (w // 2), 8 * width), nn.BatchNorm1d(8 * width), nn.ReLU(),
                         nn.Linear(8 * width, num_classes))
