"""Shared helpers for the lirpa_deq.nn / solvers tests (no tests here).

Independent dense constructions (explicit loops, no F.conv2d) so that the operators are
checked against arithmetic that does not share code with them.
"""
import torch

import lirpa_deq.nn as L

FC_N, CONV_C, IMG = 12, 3, (5, 4)  # small, non-square images catch H/W mix-ups

# (name, factory(dtype) -> cell, is_conv)
CELL_SPECS = [
    ("MonLinear", lambda dt: L.MonLinear(FC_N, m=0.3, dtype=dt), False),
    ("IBPMonLinear", lambda dt: L.IBPMonLinear(FC_N, m=0.5, dtype=dt), False),
    ("IBPMonLinear-sim", lambda dt: L.IBPMonLinear(FC_N, m=0.4, similarity=True, dtype=dt), False),
    ("OrthoLinear", lambda dt: L.OrthoLinear(FC_N, margin=0.2, dtype=dt), False),
    ("MonConv2d", lambda dt: L.MonConv2d(CONV_C, m=0.3, dtype=dt), True),
    ("IBPMonConv2d", lambda dt: L.IBPMonConv2d(CONV_C, m=0.5, dtype=dt), True),
    ("IBPMonConv2d-sim", lambda dt: L.IBPMonConv2d(CONV_C, m=0.4, similarity=True, dtype=dt), True),
    ("OrthoConv2d", lambda dt: L.OrthoConv2d(CONV_C, margin=0.2, dtype=dt), True),
]
CELL_IDS = [s[0] for s in CELL_SPECS]


def make_cell(spec, dtype=torch.float64, seed=0, scale=None):
    """Build a cell; optionally redraw every raw parameter as ``randn * scale`` (incl. ``s``)."""
    name, factory, is_conv = spec
    torch.manual_seed(seed)
    cell = factory(dtype)
    with torch.no_grad():
        for pname, p in cell.named_parameters():
            if scale is not None:
                # log-similarity s enters as exp(s_j - s_i): cap it to stay in float range
                p.copy_(torch.randn_like(p) * (min(scale, 3.0) if pname == "s" else scale))
            elif pname == "s":  # nontrivial similarity by default
                p.copy_(torch.randn_like(p) * 0.5)
    return cell


def state_shape(cell, batch):
    if hasattr(cell, "n"):
        return (batch, cell.n)
    return (batch, cell.channels) + IMG


def single_shape(cell):
    return state_shape(cell, 1)[1:]


def dense_conv(K, H, W, circular=False):
    """Matrix of a stride-1 3x3 conv (cross-correlation, padding 1) on (C, H, W), flattened
    in (c, y, x) order: zero padding, or circular on the H x W torus when ``circular``."""
    Co, Ci = K.shape[:2]
    M = K.new_zeros(Co, H, W, Ci, H, W)
    for a in range(3):
        for b in range(3):
            for y in range(H):
                for x in range(W):
                    yy, xx = y + a - 1, x + b - 1
                    if circular:
                        yy, xx = yy % H, xx % W
                    elif not (0 <= yy < H and 0 <= xx < W):
                        continue
                    M[:, y, x, :, yy, xx] += K[:, :, a, b]
    return M.reshape(Co * H * W, Ci * H * W)


def independent_dense(cell, shape=None):
    """The cell's W built from its parameters with explicit formulas (no operator code)."""
    p = {k: v.detach() for k, v in cell.named_parameters()}
    eye = lambda N: torch.eye(N, dtype=next(iter(p.values())).dtype)  # noqa: E731
    name = type(cell).__name__
    if hasattr(cell, "n"):
        mats = {k: v for k, v in p.items() if v.dim() == 2}
    else:
        C, H, W = shape
        mats = {k: dense_conv(v, H, W) for k, v in p.items() if v.dim() == 4}
    N = next(iter(mats.values())).shape[0]
    if name.startswith("Mon"):
        A, B = mats["A"], mats["B"]
        return (1 - cell.margin) * eye(N) - A.T @ A + B - B.T
    if name.startswith("IBPMon"):
        M = mats["M"]
        d = (M.abs().sum(1) + M.abs().sum(0)) / (2 * (1 - cell.margin)) + 1e-8
        W0 = M / d.sqrt()[:, None] / d.sqrt()[None, :]
        if not cell.similarity:
            return W0
        s = p["s"].exp()
        if not hasattr(cell, "n"):
            s = s.view(-1, 1, 1).expand(shape).reshape(-1)
        return W0 * s[None, :] / s[:, None]
    if name == "OrthoLinear":
        S = p["S"]
        return (1 - cell.margin) * torch.linalg.matrix_exp(S - S.T)
    if name == "OrthoConv2d":
        C, H, W = shape
        circ = dense_conv(p["K"], H + 2, W + 2, circular=True)
        return (1 - cell.margin) * mats["K"] / torch.linalg.svdvals(circ).max()
    raise AssertionError(name)


def unscaled(cell, Wd, shape=None):
    """``W0 = S W S^-1`` for similarity cells (the matrix that carries the guarantee)."""
    if not getattr(cell, "similarity", False):
        return Wd
    s = cell.s.detach().exp()
    if not hasattr(cell, "n"):
        s = s.view(-1, 1, 1).expand(shape).reshape(-1)
    return s[:, None] * Wd / s[None, :]


def fixed_point_residual(cell, z, u):
    """Independent per-sample ``||relu(W z + u) - z|| / ||z||``."""
    with torch.no_grad():
        fz = cell.step(z, u)
        return (fz - z).flatten(1).norm(dim=1) / (z.flatten(1).norm(dim=1) + 1e-8)
