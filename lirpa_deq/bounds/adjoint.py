"""Linear (CROWN) bounds through a DEQ node by an adjoint DEQ (after CerDEQ), for every cell family.

Setting: z* = cell(z*, u) with a PROVED box B = [lo, hi] containing z*(u) for every u of the input
region U. A *relaxation* of the cell over B x U gives, for every vector nu (z's shape),

    nu^T cell(z, u) >= <A_in(nu), u> + <M(nu), z> + const(nu)     for all z in B, u in U.

Theorem. For a specification row g and ANY nu, with r = nu - g - M(nu):

    g^T z* >= <A_in(nu), u> + const(nu) + min_{z in B} (-r^T z).

Proof: g^T z* = nu^T cell(z*, u) - (nu - g)^T z* >= <A_in, u> + const + (M(nu) - nu + g)^T z*, and
z* is in B. The bound is linear in u; its coefficient A_in(nu) goes back to auto_LiRPA, which
carries it through the layers before the DEQ (and concretizes it over the input region). Every nu is
sound -- an inexact adjoint solve only loosens the bound through r; the tightest choice solves the
adjoint fixed point nu = g + M(nu). Upper bounds use the theorem on -g.

Relaxations (:class:`ReLUAffineRelaxation`, :class:`MatrixRelaxation`):
* ReLU-affine cells relu(W z + u), with aL s <= relu(s) <= aU s + t on the pre-activation box:
  D_nu = diag(aL where nu >= 0, aU where nu < 0); A_in = D_nu nu, M = W^T D_nu nu,
  const = <min(nu, 0), t>. Matrix-free (the cell's WeightOperator).
* generic cells with CROWN's Lz z + Lx x + bl <= cell <= Uz z + Ux x + bu (nested auto_LiRPA):
  A_in = Lx^T nu+ - Ux^T nu-, M = Lz^T nu+ - Uz^T nu-, const = <nu+, bl> - <nu-, bu>.
For ReLU-affine cells the second is exactly the first with Lz = D W, Lx = D.

Shapes: specifications g are (spec, B, N) with N the state size per sample; boxes (B, N) / (B, M).
"""
from __future__ import annotations

import torch

from .._compat import dense_coefficients
from .spec_batching import DEFAULT_MAX_ELEMENTS, chunked_adjoint_bound

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6


def relu_relaxation(l, h):
    """Slopes and intercept of aL s <= relu(s) <= aU s + t on [l, h] (CROWN's adaptive lower slope).

    Returns (aL, aU, t), each shaped like l."""
    active, inactive = l >= 0, h <= 0
    unstable = ~(active | inactive)
    denom = torch.where(unstable, h - l, torch.ones_like(h))
    aU = torch.where(unstable, h / denom, active.to(l.dtype))
    t = torch.where(unstable, -l * h / denom, torch.zeros_like(l))
    aL = torch.where(unstable, (h >= -l).to(l.dtype), active.to(l.dtype))
    return aL, aU, t


def _dot(a, b):
    """sum over the state of a (spec, B, N) times b (B, N): a batched matmul, no temporaries."""
    return torch.einsum("sbn,bn->sb", a, b)


class ReLUAffineRelaxation:
    """The relaxation of relu(W z + u): ``op`` the cell's WeightOperator, ``relax`` = (aL, aU, t)
    each (B, *state) (from :func:`relu_relaxation`).

    Valid slopes (what the theorem needs, for s in the PROVED pre-activation box [l, h]): on
    unstable neurons (l < 0 < h) the upper line is the chord (aU = h / (h - l), t = -l h / (h - l))
    and the lower slope aL is ANY value in [0, 1] (aL s <= relu(s) for every s); on stable neurons
    aL = aU = 1 (active) or 0 (inactive), t = 0. :meth:`with_lower_slopes` swaps in optimized
    lower slopes (alpha-CROWN), clamped to [0, 1] and used on unstable neurons only."""

    def __init__(self, op, relax):
        self.op = op
        self.state = tuple(relax[0].shape[1:])
        batch = relax[0].shape[0]
        self.aL, self.aU, self.t = (r.reshape(batch, -1) for r in relax)
        self.unstable = self.t > 0  # t = -l h / (h - l) > 0 exactly on unstable neurons

    def with_lower_slopes(self, slopes):
        """The same relaxation with lower slopes ``slopes`` ((spec, B, *state), (B, *state) or flat
        (..., B, N)) on the unstable neurons; the chord and the stable neurons are kept."""
        new = object.__new__(ReLUAffineRelaxation)
        new.op, new.state, new.aU, new.t, new.unstable = self.op, self.state, self.aU, self.t, self.unstable
        tail = len(self.state) if tuple(slopes.shape[-len(self.state):]) == self.state else 1  # state or flat
        lead = slopes.shape[:slopes.dim() - tail]
        slopes = slopes.reshape(*lead, -1).to(self.aL.dtype).clamp(0, 1)
        new.aL = torch.where(self.unstable, slopes, self.aL)
        return new

    def rows(self, index):
        """This relaxation for the specification rows ``index`` (LongTensor) only: per-row lower
        slopes (spec, B, N) are selected, shared ones kept (lirpa_deq.bounds.spec_batching)."""
        if self.aL.dim() < 3 or self.aL.shape[0] == 1:
            return self
        new = object.__new__(ReLUAffineRelaxation)
        new.__dict__.update(self.__dict__)
        new.aL = self.aL[index]
        return new

    def apply(self, nu):
        spec, batch = nu.shape[:2]
        A = torch.where(nu >= 0, self.aL, self.aU) * nu
        M = self.op.WT(A.reshape(spec * batch, *self.state)).reshape(nu.shape)
        return A, M, _dot(nu.clamp(max=0), self.t)


class MatrixRelaxation:
    """The relaxation from CROWN's per-sample matrices: ``lin`` with Lz, Uz (B, N, N), Lx, Ux
    (B, N, M), bl, bu (B, N) (lirpa_deq.bounds.generic.CellBounder.linear)."""

    def __init__(self, lin):
        self.lin = lin

    def with_lower_slopes(self, slopes):  # the nested module's slopes are not exposed (see docs/crown.md)
        return self

    def rows(self, index):  # the same matrices for every specification row
        return self

    def apply(self, nu):
        lin = self.lin
        # (where, not clamp: at nu_i = 0 clamp would pass a gradient to both parts)
        zero = torch.zeros((), dtype=nu.dtype, device=nu.device)
        pos, neg = torch.where(nu >= 0, nu, zero), torch.where(nu < 0, -nu, zero)
        M = torch.einsum("sbi,bij->sbj", pos, lin["Lz"]) - torch.einsum("sbi,bij->sbj", neg, lin["Uz"])
        A = torch.einsum("sbi,bij->sbj", pos, lin["Lx"]) - torch.einsum("sbi,bij->sbj", neg, lin["Ux"])
        return A, M, _dot(pos, lin["bl"]) - _dot(neg, lin["bu"])


def _bias(const, r, box):
    c, rad = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
    return const - _dot(r, c) - _dot(r.abs(), rad)


def bound_at(nu, g, relaxation, box):
    """The theorem's bound for ONE fixed nu (spec, B, N): (A_in (spec, B, M), bias (spec, B)).
    Differentiable in nu, g, the relaxation and the box."""
    A, M, const = relaxation.apply(nu)
    return A, _bias(const, nu - g - M, box)


def best_adjoint_bound(g, relaxation, box, in_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, offset=None,
                       record=None, max_elements=DEFAULT_MAX_ELEMENTS, keep_nu=True):
    """Sound lower bound g^T z* >= <A_in, u> + bias, the best of the adjoint iterates.

    g: (spec, B, N); box: (lo, hi) of z*, (B, N); in_box: (lo, hi) of u, (B, M) (to rank iterates).
    offset: a coefficient (spec, B, M) that the caller adds to A_in (the ``+ u_i`` of a
    pre-activation bound), so that iterates are ranked by the quantity that is concretized.
    Iterates nu <- g + M(nu) from nu = g; every iterate gives a sound bound (its r is the residual
    nu - nu_next), and per specification row the iterate with the best concrete value over in_box is
    kept, so a diverging iteration (rho(|W|) > 1) cannot end worse than its best iterate (nor can a
    converging one: the fixed point is not always the best nu, and an earlier iterate may win).
    Rows go through in chunks of at most ``max_elements`` entries (rows x batch x state) and each
    row stops at its own tolerance (lirpa_deq.bounds.spec_batching).
    record: a dict that receives ``pick`` (spec, B), the index k of the chosen iterate
    nu_k = (g + M)^k (g), ``last`` (spec, 1), the index of each row's last iterate, and ``converged``
    (every row met its tolerance). ``keep_nu=False``: nu is not kept (returned as None; saves a
    tensor as large as g).
    Returns A_in (spec, B, M), bias (spec, B), the number of iterations, and the chosen nu."""
    return chunked_adjoint_bound(g, relaxation, box, in_box, max_iter, tol, offset=offset, record=record,
                                 max_elements=max_elements, keep_nu=keep_nu)


# ------------------------------------------------------------- exact gradients of the bound
def implicit_adjoint(nu_star, g, relaxation, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """nu_star (spec, B, N), found without gradients, as a differentiable function of g and the
    relaxation: the value is nu_star exactly (so the bound keeps its sound value), the gradient is
    the implicit-function one of the adjoint fixed point nu = g + M(nu; theta).

    One differentiable step nu1 = g + M(nu_star; theta) carries d/dtheta; the gradient v reaching
    it is replaced by w solving w = v + J^T w, J = dM/dnu at nu_star (M is linear in nu on the sign
    pattern of nu_star: J^T w is one vector-Jacobian product), which is d nu*/d theta^T v by the
    implicit function theorem. Iterated like the adjoint itself (a contraction where it is); a
    non-converged w only makes the gradient approximate, never the bound unsound."""
    if not torch.is_grad_enabled():
        return nu_star
    base = nu_star.detach()
    nu1 = g + relaxation.apply(base)[1]
    if not nu1.requires_grad:
        return base
    probe = base.clone().requires_grad_(True)
    with torch.enable_grad():
        m_probe = relaxation.apply(probe)[1]

    def correct(v):
        w = v
        with torch.no_grad():
            for _ in range(max_iter):
                (jt,) = torch.autograd.grad(m_probe, probe, w, retain_graph=True)
                w_next = v + jt
                done = float((w_next - w).abs().max()) <= tol * (1 + float(w_next.abs().max()))
                w = w_next
                if done or not torch.isfinite(w).all():
                    break
        return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)

    nu1.register_hook(correct)
    return base + (nu1 - nu1.detach())


def replay_adjoint(nu_star, g, relaxation, pick):
    """nu_star (spec, B, N), the iterate nu_k = (g + M)^k (g) with k = pick (spec, B) per row, as a
    differentiable function of g and the relaxation: the k steps are recomputed with autograd (rows
    stop at their own k), so the gradient is exactly that of the chosen iterate; the value is
    nu_star itself. Memory: one step's graph per iteration up to max(pick)."""
    if not torch.is_grad_enabled():
        return nu_star
    nu = g
    for step in range(1, int(pick.max()) + 1 if pick.numel() else 1):
        nu = torch.where((pick >= step).unsqueeze(-1), g + relaxation.apply(nu)[1], nu)
    return nu_star.detach() + (nu - nu.detach())


def exact_adjoint(nu_star, g, relaxation, record, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """The chosen nu with the exact gradient of the chosen iterate: implicit differentiation through
    the adjoint fixed point when every row chose the last iterate of a converged iteration
    (:func:`implicit_adjoint`), otherwise the unrolled iterations (:func:`replay_adjoint`)."""
    if record.get("converged") and bool((record["pick"] == record["last"]).all()):
        return implicit_adjoint(nu_star, g, relaxation, max_iter=max_iter, tol=tol)
    return replay_adjoint(nu_star, g, relaxation, record["pick"])


def adjoint_lower(g, op, relax, box, u_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """:func:`best_adjoint_bound` for a ReLU-affine cell in state shape: g (spec, B, *state);
    relax = (aL, aU, t), box, u_box each (B, *state). Returns A_u (spec, B, *state), bias (spec, B),
    iterations, nu (spec, B, *state)."""
    spec, batch = g.shape[:2]
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    A, bias, iterations, nu = best_adjoint_bound(
        g.reshape(spec, batch, -1), ReLUAffineRelaxation(op, relax), tuple(map(flat, box)),
        tuple(map(flat, u_box)), max_iter=max_iter, tol=tol)
    return A.view(g.shape), bias, iterations, nu.view(g.shape)


NU_STEP = 0.002  # a unit of an optimized adjoint shift moves nu by 0.2% of the row's largest |nu|


def _side(param, index, spec):
    """One side (0: lower bound, 1: upper bound) of an optimizable (2, spec, B, *state) tensor for
    ``spec`` rows, or None when none is given or its specification dimension does not fit (then
    CROWN's adaptive slopes / the adjoint iterate itself are used: sound either way)."""
    if param is None:
        return None
    side = param[index]
    return side if side.shape[0] in (1, spec) else None


def linear_backward(cell_bounds, last_lA, last_uA, box, u_box, params, adjoint_options, slopes=None,
                    concretize=None):
    """CROWN through a DEQ node for any cell family: (lA, uA, lbias, ubias), the coefficients on the
    node's input u (shape (spec, B, *u_state)) and the biases (spec, B).

    cell_bounds: the node's CellBounds; last_lA / last_uA: auto_LiRPA's coefficients on z* (Tensor,
    Patches or None); box: the proved box of z*; u_box: the checked box of u; params: name -> cell
    parameter; slopes: None or (alpha, shift): optimizable lower slopes and adjoint shifts, each None
    or (2, spec, B, *state) (index 0 for the lower bound, 1 for the upper one;
    lirpa_deq.bounds.slopes): the bound is taken at nu + NU_STEP max|nu| shift, sound for every
    shift because the theorem holds for every nu; concretize: (callable, region key) for
    the refinement's rows over the input region, or None (lirpa_deq.bounds.prefix).

    The relaxation is the family's, over the box and pre-activation bounds tightened by CROWN
    (:meth:`CellBounds.refined`, computed once per input box and reused by every specification of
    the call). The adjoint vector is solved without gradients; when the bound needs gradients it is
    recomputed at the same nu (the same sound value), with ``crown_gradient='exact'`` (the default)
    nu differentiated as the iterate it is (:func:`exact_adjoint`: implicitly through the adjoint
    fixed point, or through the unrolled iterations) and the box with the implicit gradient of the
    interval fixed point; with ``'fixed'`` nu and the box are held constant."""
    u_lo, u_hi = u_box
    batch, in_state = box[0].shape[0], u_lo.shape[1:]
    flat = lambda t: t.detach().reshape(batch, -1)  # noqa: E731
    max_iter = int(adjoint_options.get("adjoint_max_iter", DEFAULT_MAX_ITER))
    tol = float(adjoint_options.get("adjoint_tol", DEFAULT_TOL))
    exact = adjoint_options.get("crown_gradient", "exact") == "exact"
    state = cell_bounds.refined(box, (u_lo.detach(), u_hi.detach()), params, concretize)
    lo, hi = state.box
    zbox, in_box = (flat(lo), flat(hi)), (flat(u_lo), flat(u_hi))
    max_elements = int(adjoint_options.get("adjoint_max_elements", DEFAULT_MAX_ELEMENTS))
    relaxation = cell_bounds.linear_relaxation(state, (u_lo.detach(), u_hi.detach()), params, grad=False)
    differentiable = []

    def one_side(last_A, sign, index):
        if last_A is None:
            return None, 0
        g = dense_coefficients(last_A, lo.shape).to(lo.dtype)  # 0.3's default C is float32
        g = g if sign > 0 else -g  # (no copy of the lower side's rows: they can be thousands)
        spec = g.shape[0]
        g = g.reshape(spec, batch, -1)
        side = _side(slopes[0], index, spec) if slopes is not None else None
        shift = _side(slopes[1], index, spec) if slopes is not None else None
        rel = relaxation if side is None else relaxation.with_lower_slopes(side.detach())
        record = {}
        needs = (g, u_lo, u_hi, *params.values()) + tuple(t for t in (side, shift) if t is not None)
        grad = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in needs)
        A, bias, _, nu = best_adjoint_bound(g.detach(), rel, zbox, in_box, max_iter=max_iter, tol=tol, record=record,
                                            max_elements=max_elements, keep_nu=grad or shift is not None)
        if shift is not None:
            step = NU_STEP * nu.abs().amax(-1, keepdim=True)
            shift = shift.reshape(shift.shape[0], batch, -1).to(nu.dtype)
            with torch.no_grad():
                A, bias = bound_at(nu + step * shift, g.detach(), rel, zbox)
        if grad:
            # the same bound, recomputed with gradients to g, the slopes, the cell weights, the u bounds
            if not differentiable:
                state_d = state.with_box(cell_bounds.differentiable_box(state, (u_lo, u_hi), params)) \
                    if exact else state
                differentiable.append(cell_bounds.linear_relaxation(state_d, (u_lo, u_hi), params, grad=True)
                                      if cell_bounds.differentiable_relaxation else relaxation)
                differentiable.append(tuple(t.reshape(batch, -1) for t in state_d.box))
            rel_d = differentiable[0] if side is None else differentiable[0].with_lower_slopes(side)
            box_d = differentiable[1]
            nu_d = exact_adjoint(nu, g, rel_d, record, max_iter=max_iter, tol=tol) if exact else nu
            if shift is not None:
                nu_d = nu_d + step * shift
            A, bias = bound_at(nu_d, g, rel_d, box_d)
        A = A.reshape(spec, batch, *in_state)
        if sign > 0:
            return A, bias
        return (-A, -bias) if A.requires_grad else (A.neg_(), bias.neg_())  # (A is this call's own buffer)

    lA, lbias = one_side(last_lA, 1.0, 0)
    uA, ubias = one_side(last_uA, -1.0, 1)
    return lA, uA, lbias, ubias
