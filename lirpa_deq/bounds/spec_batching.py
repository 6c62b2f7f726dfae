"""Many specification rows through the adjoint DEQ: chunks under a memory cap, and a per-row stop.

An intermediate CROWN pass through a DEQ hands it one specification row per (unstable) neuron of a
later layer -- thousands of rows, each as large as the DEQ state. :func:`chunked_adjoint_bound`
computes exactly what the adjoint theorem of lirpa_deq.bounds.adjoint gives for each row (the best
of the adjoint iterates nu_0 = g, nu_{k+1} = g + M(nu_k), ranked by their concrete value over the
input box), but

* at most ``max_elements`` entries (rows x batch x state) of the working tensors exist at a time:
  the rows are split into chunks, each iterated on its own;
* each row stops when ITS change ||nu_{k+1} - nu_k||_max is at most tol * (1 + ||nu_{k+1}||_max)
  (or its next iterate is not finite); converged rows leave the working set, the others go on.

Soundness does not depend on either: every iterate of every row is a sound bound (the theorem holds
for any nu), and the reported bound of a row is the best of the iterates it computed. Compared with
iterating all rows until the largest change is small, a row may stop a few iterations earlier (it
met its own tolerance) or later (its scale is below the largest); its bound then differs by the
adjoint tolerance, never in soundness.

A relaxation whose data differ per specification row (alpha-CROWN's per-row lower slopes) gives
the rows of a chunk by ``relaxation.rows(index)``; one without ``rows`` is the same for every row.

Shapes: g (S, B, N) rows on the state; box (lo, hi) each (B, N); in_box (lo, hi) each (B, M);
offset None or (S, B, M), a coefficient the caller adds to A_in (it only changes the ranking).
"""
from __future__ import annotations

import torch

#: default cap on rows x batch x state entries of one chunk (2^22: 16 MB per float32 temporary)
DEFAULT_MAX_ELEMENTS = 1 << 22


def _dot(a, b):
    return torch.einsum("sbn,bn->sb", a, b)


def rows_per_chunk(rows, batch, width, max_elements=DEFAULT_MAX_ELEMENTS):
    """How many specification rows of ``batch`` x ``width`` entries fit in ``max_elements`` (>= 1)."""
    return max(1, min(rows, int(max_elements) // max(1, batch * width)))


class _Evaluator:
    """One adjoint iterate of a set of rows: its coefficient A_in, bias, concrete value, next
    iterate, and whether the row has converged (its change is nu - nu_next = r, the residual the
    bias already needs, so the stopping test costs no extra pass over the rows)."""

    def __init__(self, relaxation, box, in_box, tol):
        self.relaxation, self.tol = relaxation, tol
        self.box_c, self.box_r = (box[1] + box[0]) / 2, (box[1] - box[0]) / 2
        self.u_c, self.u_r = (in_box[1] + in_box[0]) / 2, (in_box[1] - in_box[0]) / 2

    def __call__(self, nu, g, offset, rows):
        relaxation = self.relaxation
        if hasattr(relaxation, "rows"):  # per-row data (alpha-CROWN's per-specification slopes)
            relaxation = relaxation.rows(rows)
        A, M, const = relaxation.apply(nu)
        nu_next = g + M
        r = nu - nu_next
        r_abs = r.abs()
        bias = const - _dot(r, self.box_c) - _dot(r_abs, self.box_r)
        ranked = A if offset is None else A + offset
        value = bias + _dot(ranked, self.u_c) - _dot(ranked.abs(), self.u_r)
        # per row: change below tol relative to the row's size (converged), or a non-finite next
        # iterate (amax propagates NaN, and inf - inf in r is NaN): both stop the row
        flat = nu_next.flatten(1)
        change, scale = r_abs.flatten(1).amax(1), torch.maximum(flat.amax(1), -flat.amin(1))
        bad = ~torch.isfinite(scale) | ~torch.isfinite(change)
        return A, bias, value, nu_next, (change <= self.tol * (1 + scale)) & ~bad, bad


def _iterate_chunk(g, evaluate, max_iter, offset, first):
    """Best-of-iterates for the rows of one chunk, each row stopping on its own; see module doc.
    Returns A_in, bias, nu (best per row), the largest number of iterates any row computed, and
    the record: ``pick`` (k, B) index of the chosen iterate, ``last`` (k, 1) index of each row's
    last iterate, ``converged`` (every row stopped at its tolerance)."""
    active = torch.arange(g.shape[0], device=g.device)
    best_A, best_bias, best_value, nu_next, conv, bad = evaluate(g, g, offset, first + active)
    best_nu = g.clone()
    pick = torch.zeros(best_value.shape, dtype=torch.long, device=g.device)
    last = torch.zeros((g.shape[0], 1), dtype=torch.long, device=g.device)
    g_act, off_act, diverged = g, offset, bool(bad.any())
    iterations = 1
    while iterations <= max_iter:
        keep = ~(conv | bad)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, nu_next, g_act = active[keep], nu_next[keep], g_act[keep]
            off_act = None if off_act is None else off_act[keep]
        nu = nu_next
        A, bias, value, nu_next, conv, bad = evaluate(nu, g_act, off_act, first + active)
        diverged |= bool(bad.any())
        last[active] = iterations
        iterations += 1
        better = value > best_value[active]
        if bool(better.all()):  # the usual case of a contraction: every row improved everywhere
            if active.numel() == best_A.shape[0]:
                best_A, best_nu, best_bias, best_value = A, nu, bias, value
                pick.fill_(iterations - 1)
            else:
                best_A[active], best_nu[active], best_bias[active], best_value[active] = A, nu, bias, value
                pick[active] = iterations - 1
            continue
        take = better.any(1)
        if bool(take.any()):
            rows, sel = active[take], better[take]
            best_A[rows] = torch.where(sel.unsqueeze(-1), A[take], best_A[rows])
            best_nu[rows] = torch.where(sel.unsqueeze(-1), nu[take], best_nu[rows])
            best_bias[rows] = torch.where(sel, bias[take], best_bias[rows])
            best_value[rows] = torch.where(sel, value[take], best_value[rows])
            pick[rows] = torch.where(sel, iterations - 1, pick[rows])
    converged = not diverged and not bool((~conv).any())
    return best_A, best_bias, best_nu, iterations, dict(pick=pick, last=last, converged=converged)


@torch.no_grad()
def chunked_adjoint_bound(g, relaxation, box, in_box, max_iter, tol, offset=None, record=None,
                          max_elements=DEFAULT_MAX_ELEMENTS, keep_nu=True):
    """Sound lower bounds g_s^T z* >= <A_in_s, u> + bias_s for every row s of g (see module doc).

    record: None or a dict that receives ``pick`` (S, B), the index k of each chosen iterate
    nu_k = (g + M)^k (g), ``last`` (S, 1), the index of each row's last iterate, and ``converged``
    (every row met its tolerance before ``max_iter``). ``keep_nu=False``: nu is returned as None.
    Returns A_in (S, B, M), bias (S, B), the largest number of iterates of any row, nu (S, B, N)."""
    spec, batch, n = g.shape
    evaluate = _Evaluator(relaxation, box, in_box, tol)
    step = rows_per_chunk(spec, batch, max(n, in_box[0].shape[-1]), max_elements)
    out, iterations, notes = None, 1, []
    for start in range(0, spec, step):
        stop = min(spec, start + step)
        off = None if offset is None else offset[start:stop]
        A, bias, nu, its, note = _iterate_chunk(g[start:stop], evaluate, max_iter, off, start)
        if step >= spec:  # one chunk: hand its tensors out as they are
            out = (A, bias, nu if keep_nu else None)
        else:
            if out is None:  # the outputs are written chunk by chunk (no list of parts to concatenate)
                out = (A.new_empty((spec, *A.shape[1:])), bias.new_empty((spec, batch)),
                       nu.new_empty(g.shape) if keep_nu else None)
            out[0][start:stop], out[1][start:stop] = A, bias
            if keep_nu:
                out[2][start:stop] = nu
        iterations = max(iterations, its)
        notes.append(note)
    if record is not None:
        record.update(pick=torch.cat([n["pick"] for n in notes]), last=torch.cat([n["last"] for n in notes]),
                      converged=all(n["converged"] for n in notes))
    return out[0], out[1], iterations, out[2]
