"""Randomized soundness suite (issue #14), CI slice; the long run is benchmarks/bench_soundness.py.

A *group* is everything one integer seed determines: a random small model (fc / conv / generic
cells, layers before and after, sometimes two DEQs in series), an input batch x (B = 1-2), eps in
[0, 2], l_inf or l2, float32 or float64, maybe a specification C, maybe poor solver options,
maybe an in-place change between two calls. Each ``compute_bounds`` call of a group is a *case*
(IBP, CROWN and CROWN-IBP on one BoundedModule, CROWN with the DEQ's refined relaxation and, on
float32 models, alpha-CROWN through the DEQ on BoundedModules of their own (``VARIANTS``); or one
method before and after an in-place change). A case passes when its bounds contain the ground truth (``lirpa_deq.testing``: every DEQ
re-solved independently in float64 at random, vertex and PGD points; tolerance 1e-6 (float64) /
1e-4 (float32) of 1 + max|y|) or when it raises one of the project's clear errors. Bad inputs
(negative / NaN eps, NaN in x, weights or C) must raise: any number returned for them fails.

The scenario of seed s is ``SCHEDULE[s % len(SCHEDULE)]`` and its cell kind cycles too, so every
slice of consecutive seeds covers every scenario; ``make_group(s)`` rebuilds a case from its seed
(``benchmarks/bench_soundness.py --replay s`` prints it). ``KNOWN_BUGS`` names the bugs the
suite was built to catch (failures of those scenarios say so); nothing is xfailed.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random
import time
import warnings

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from torch.nn.utils.parametrizations import spectral_norm

from lirpa_deq.nn import (DEQ, ConvBNCell, DenseReLUCell, IBPMonConv2d, IBPMonLinear, MonConv2d,
                          MonLinear, OrthoConv2d, OrthoLinear, ResidualCell, TanhCell)
from lirpa_deq.nn.cells.base import ReLUAffineCell
from lirpa_deq.testing import FAILING, GroundTruth, Verdict, judge_bounds, judge_error, truth_outputs

VALID = ["plain", "plain", "series", "edge", "scrambled", "poor-opts", "inplace-weight",
         "inplace-margin", "l2-direct"]
BAD = ["bad-neg-eps", "bad-nan-eps", "bad-nan-x", "bad-nan-weight", "bad-nan-C"]
SCHEDULE = VALID + VALID[:6] + BAD  # 20 seeds: 15 valid groups (3 cases each), 5 bad (3 each)
SCENARIOS = sorted(set(SCHEDULE))
FC_CELLS = ["fc-ibpmon", "fc-mon", "fc-ortho", "gen-tanh", "gen-residual", "gen-sntanh", "gen-dense"]
CONV_CELLS = ["conv-ibpmon", "conv-mon", "conv-ortho", "gen-convbn"]
CELLS = FC_CELLS + CONV_CELLS
MARGIN_CELLS = ["fc-ibpmon", "conv-mon", "fc-ortho", "gen-residual", "conv-ibpmon", "fc-mon",
                "gen-sntanh", "conv-ortho", "gen-convbn"]  # cells with a margin / Python attribute
METHODS = ("IBP", "CROWN", "CROWN-IBP")
# bound methods with their own options, each on a second BoundedModule of the same model: name ->
# (auto_LiRPA method, bound_opts['deq'] added to the group's, other bound_opts). alpha-CROWN runs
# on float32 groups only (auto_LiRPA 0.3's alpha-CROWN crashes on float64 models, docs/crown.md).
VARIANTS = {
    "CROWN-refined": ("CROWN", {"crown_refine": 2}, {}),
    "alpha-CROWN": ("CROWN-Optimized", {"crown_refine": 2, "optimize_adjoint": True, "refine_opt_steps": 1},
                    {"optimize_bound_args": {"iteration": 2}}),
}
KNOWN_BUGS = {  # scenario -> the bug this suite was written to catch (fixed in 7f17917); named in failures
    "l2-direct": "an l2 perturbation straight into a DEQ gets unsound bounds",
    "inplace-margin": "the box cache ignores cell.margin: a stale box after `cell.margin = ...`",
    "bad-nan-x": "NaN in x gives NaN bounds through the fallback instead of an error",
    "bad-neg-eps": "negative eps returns lb > ub instead of an error",
}
CI_GROUPS = 100  # seeds 0..99: 5 per schedule slot, ~520 cases


class SNTanhCell(nn.Module):
    """a z + b tanh(SN(A) z + U x): a spectral-norm parametrized generic cell, L <= a + b < 1."""

    def __init__(self, n, m, a, b):
        super().__init__()
        self.A, self.U, self.a, self.b, self.n = spectral_norm(nn.Linear(n, n)), nn.Linear(m, n), a, b, n

    def forward(self, z, x):
        return self.a * z + self.b * torch.tanh(self.A(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], self.n)


@dataclasses.dataclass
class Group:
    """One seed's set-up: ``calls`` is a list of (x (B, *in), eps) bounded in turn on ONE
    BoundedModule, each with every method of ``methods``; ``mutate(model)``, if set, is the
    in-place change made before the second call. spec None or (B, S, K); ``bad``: only errors
    are acceptable."""

    seed: int
    scenario: str
    cell: str
    model: nn.Module
    calls: list
    norm: float
    spec: torch.Tensor | None
    methods: tuple
    bound_opts: dict | None
    mutate: object = None
    bad: bool = False
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def rtol(self):
        return 1e-6 if self.calls[0][0].dtype == torch.float64 else 1e-4


def _margin(r, kind, edge):
    lo, hi = {"ibpmon": (0.05, 0.9), "mon": (0.05, 1.0), "ortho": (0.05, 0.5)}[kind]
    return r.uniform(0.005, 0.03) if edge else r.uniform(lo, hi)


def _scramble(cell, r):
    """Large, sparse, sign-flipped raw weights; guarantees hold by construction of the cells."""
    with torch.no_grad():
        for name, p in cell.named_parameters():
            if name == "s":
                p.normal_(0, r.uniform(1, 4))
            elif p.dim() >= 2:
                p.mul_(10 ** r.uniform(0.5, 1.5) * (torch.rand_like(p) > r.uniform(0, 0.7)))


def make_cell(kind, r, n, m, channels, edge, scrambled):
    """A DEQ cell of ``kind`` on states (B, n) (fc; x of width m for generic cells) or (B, C, H, W)."""
    family, name = kind.split("-")
    if family in ("fc", "conv"):
        cls = {("fc", "ibpmon"): IBPMonLinear, ("fc", "mon"): MonLinear, ("fc", "ortho"): OrthoLinear,
               ("conv", "ibpmon"): IBPMonConv2d, ("conv", "mon"): MonConv2d,
               ("conv", "ortho"): OrthoConv2d}[(family, name)]
        kw = dict(similarity=r.random() < 0.5) if name == "ibpmon" else {}
        cell = cls(n if family == "fc" else channels, _margin(r, name, edge), **kw)
        if scrambled:
            _scramble(cell, r)
        return cell
    L = r.uniform(0.96, 0.985) if edge else r.uniform(0.3, 0.9)
    if name == "tanh":
        cell = TanhCell(n, m, contraction=L)
    elif name == "residual":
        cell = ResidualCell(n, m, contraction=L, skip=r.uniform(0.05, 0.9) * L)
    elif name == "sntanh":
        a = r.uniform(0, L)
        cell = SNTanhCell(n, m, a, L - a)
        cell.A(torch.randn(3, n))  # one power-iteration update in training mode
    elif name == "dense":
        w = torch.randn(n, n)
        cell = DenseReLUCell(w * L / torch.linalg.matrix_norm(w, ord=2))
    else:  # convbn
        cell = ConvBNCell(channels, in_channels=m, scale=0.32 if edge else r.uniform(0.1, 0.25))
        with torch.no_grad():  # non-trivial BatchNorm statistics and spectral-norm vectors
            for _ in range(2):
                cell(torch.randn(4, channels, 5, 5), torch.randn(4, m, 5, 5))
    if scrambled and (hasattr(cell, "U") or hasattr(cell, "inj")):  # large injections: saturation
        with torch.no_grad():
            (cell.U if hasattr(cell, "U") else cell.inj).weight.mul_(10 ** r.uniform(0.5, 1.5))
    return cell


def _deq(cell, r, poor, dtype, bad=False):
    """The DEQ layer; ``bad`` (NaN inputs follow) leaves out Peaceman-Rachford, whose inner CG
    runs all its iterations on NaN (~10 s per forward on a small conv cell; a cost, not a bound)."""
    if not isinstance(cell, ReLUAffineCell):
        solvers = ["anderson", "broyden", "fixed_point_iter"]
    elif isinstance(cell, (MonLinear, MonConv2d)):
        solvers = ["peaceman_rachford", "forward_backward"] + (["anderson"] if poor else [])
    else:
        solvers = ["anderson", "peaceman_rachford", "forward_backward", "fixed_point_iter"]
    if bad:
        solvers = [name for name in solvers if name != "peaceman_rachford"]
    tol, max_iter = (1e-8 if dtype == torch.float64 else 1e-5), 100
    if poor:
        tol, max_iter = r.choice([1e-1, 1.0]), r.choice([1, 2, 3])
    return DEQ(cell, solver=r.choice(solvers), tol=tol, max_iter=max_iter, on_nonconvergence="ignore")


def build_model(cell_kind, r, scenario, direct, bad=False):
    """(model, input shape of one sample, number of outputs K)."""
    edge, scr, poor = scenario == "edge", scenario == "scrambled", scenario == "poor-opts"
    conv = cell_kind in CONV_CELLS
    generic = cell_kind.startswith("gen")
    n, d_in, K = r.randint(4, 16), r.randint(3, 8), r.randint(2, 4)
    C, H, c_in = r.randint(2, 4), r.randint(4, 6), r.randint(1, 2)
    m = (c_in if conv else r.randint(3, 8)) if generic and cell_kind != "gen-dense" else (C if conv else n)
    dtype = torch.float64 if r.random() < 0.5 else torch.float32
    layers = []
    if direct:
        in_shape = (m, H, H) if conv else (m,)
    elif conv:
        in_shape, layers = (c_in, H, H), [nn.Conv2d(c_in, m, 3, padding=1)]
    else:
        in_shape, hidden = (d_in,), r.randint(4, 12)
        layers = ([nn.Linear(d_in, m)] if r.random() < 0.6 else
                  [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, m)])
    layers.append(_deq(make_cell(cell_kind, r, n, m, C, edge, scr), r, poor, dtype, bad))
    width = C * H * H if conv else n
    if scenario == "series":  # a second DEQ (ReLU-affine or generic) after a mixing layer
        second = r.choice(["conv-ibpmon", "conv-ortho", "conv-mon"] if conv else FC_CELLS)
        m2 = r.randint(3, 8) if second.startswith("gen") and second != "gen-dense" else n
        layers.append(nn.Conv2d(C, C, 3, padding=1) if conv else nn.Linear(n, m2))
        layers.append(_deq(make_cell(second, r, n, m2, C, False, False), r, False, dtype, bad))
    if conv:
        pool = r.random() < 0.3
        layers += [nn.AvgPool2d(2)] if pool else ([nn.ReLU()] if r.random() < 0.3 else [])
        layers += [nn.Flatten(), nn.Linear(C * (H // 2) ** 2 if pool else width, K)]
    elif r.random() < 0.15:
        K = n  # the DEQ state is the output
    else:
        layers += ([nn.ReLU()] if r.random() < 0.3 else []) + [nn.Linear(n, K)]
    if scr:
        with torch.no_grad():
            layers[0].weight.mul_(10 ** r.uniform(0, 1)) if hasattr(layers[0], "weight") else None
    return nn.Sequential(*layers).to(dtype).eval(), in_shape, K


def _mutation(model, r, scenario):
    """The in-place change of an inplace-* group: a cell weight / pre-layer weight / BatchNorm
    statistic (inplace-weight), or ``cell.margin = ...`` / a Python attribute (inplace-margin)."""
    deq = next(mod for mod in model.modules() if isinstance(mod, DEQ))
    cell, factor = deq.cell, r.uniform(0.5, 0.95)

    def mutate(_model):
        with torch.no_grad():
            if scenario == "inplace-margin" and isinstance(cell, ReLUAffineCell):  # a big change of W
                m = cell.margin
                if isinstance(cell, (MonLinear, MonConv2d)):
                    cell.margin = m + r.uniform(0.3, 1.0) if m < 0.5 else m * r.uniform(0.05, 0.3)
                else:  # (0, 1): scale 1 - m up or down
                    cell.margin = m * r.uniform(0.05, 0.3) if m > 0.3 else 1 - (1 - m) * r.uniform(0.2, 0.6)
            elif scenario == "inplace-margin" and hasattr(cell, "skip"):
                cell.skip = cell.skip * factor
            elif scenario == "inplace-margin" and hasattr(cell, "scale"):
                cell.scale = cell.scale * factor
            elif scenario == "inplace-margin" and hasattr(cell, "a"):
                cell.a, cell.b = cell.b, cell.a
            elif isinstance(getattr(cell, "bn", None), nn.BatchNorm2d) and r.random() < 0.5:
                cell.bn.running_mean.add_(torch.randn_like(cell.bn.running_mean))
            elif r.random() < 0.3 and hasattr(model[0], "weight"):
                model[0].weight.mul_(1 + factor)
            else:
                p = max((p for p in cell.parameters() if p.dim() >= 2), key=lambda p: p.numel())
                p.mul_(factor)
    return mutate


def make_group(seed):
    """The group of ``seed`` (deterministic: python and torch RNGs seeded from it)."""
    r = random.Random(seed)
    scenario = SCHEDULE[seed % len(SCHEDULE)]
    pool = MARGIN_CELLS if scenario == "inplace-margin" else CELLS  # rounds cycle through the pool
    cell_kind = pool[(seed // len(SCHEDULE) + seed % len(SCHEDULE)) % len(pool)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        direct = scenario == "l2-direct" or (scenario != "inplace-margin" and r.random() < 0.1)
        base = "plain" if scenario.startswith("bad") else scenario
        model, in_shape, K = build_model(cell_kind, r, base, direct, bad=scenario.startswith("bad"))
        dtype = next(model.parameters()).dtype
        B = r.randint(1, 2)
        x = (torch.randn(B, *in_shape) * (10 if scenario == "scrambled" else 1)).to(dtype)
        norm = 2.0 if scenario == "l2-direct" or (not direct and r.random() < 0.3) else math.inf
        eps = 0.0 if r.random() < 0.1 else 10 ** r.uniform(-5, math.log10(2))
        spec = None
        if r.random() < 0.4 and K >= 2:
            if r.random() < 0.5:  # margins e_y - e_j
                y = torch.randint(0, K, (B,))
                eye = torch.eye(K)
                others = torch.stack([torch.tensor([j for j in range(K) if j != int(t)]) for t in y])
                spec = eye[y].unsqueeze(1) - eye[others]
            else:
                spec = torch.randn(B, r.randint(1, 3), K)
            spec = spec.to(dtype)
        opts = None
        if scenario == "poor-opts":
            keys = dict(max_iter=1, tol=1.0, retries=0, retry_iters=0, tighten_steps=0, inflate_abs=0.0,
                        inflate_rel=0.0, adjoint_max_iter=1, solver="fixed_point_iter", fallback=False)
            opts = {"deq": {k: v for k, v in keys.items() if r.random() < 0.5}}
        elif r.random() < 0.2:
            opts = {"deq": {"tighten_steps": r.randint(0, 4)}}
        mutate = _mutation(model, r, scenario) if scenario.startswith("inplace") else None
        if scenario == "bad-neg-eps":
            eps = -10 ** r.uniform(-4, 0)
        elif scenario == "bad-nan-eps":
            eps = math.nan
        elif scenario == "bad-nan-x":
            x.view(-1)[r.randrange(x.numel())] = math.nan
        elif scenario == "bad-nan-weight":
            deq = next(mod for mod in model.modules() if isinstance(mod, DEQ))
            holder = deq.cell if r.random() < 0.6 or not hasattr(model[0], "weight") else model[0]
            p = max(holder.parameters(), key=lambda p: p.numel())
            with torch.no_grad():
                p.view(-1)[r.randrange(p.numel())] = math.nan
        elif scenario == "bad-nan-C":
            spec = torch.randn(B, 2, K).to(dtype) if spec is None else spec
            spec.view(-1)[r.randrange(spec.numel())] = math.nan
        calls = [(x, eps)]
        if mutate is not None:
            calls.append((x, eps))  # same input: the cached box must not survive the change
        elif not scenario.startswith("bad"):  # a new eps (cache keyed on it) or a new x
            calls.append((x, min(2.0, eps * 10 ** r.uniform(-2, 0.5))) if r.random() < 0.5 else
                         ((x + 0.1 * torch.randn_like(x)), eps))
    info = dict(dtype=str(dtype).replace("torch.", ""), norm="l2" if norm == 2 else "linf",
                B=B, spec=None if spec is None else list(spec.shape), opts=opts, direct=direct,
                arch=" > ".join(type(mod).__name__ for mod in model))
    # the variants run on the first 2 (CROWN-refined) / 1 (alpha-CROWN) rounds of every 100 seeds:
    # every scenario, a fifth to two fifths of the CI slice's time each
    methods = METHODS + (("CROWN-refined",) if seed % 100 < 2 * len(SCHEDULE) else ()) \
        + (("alpha-CROWN",) if dtype == torch.float32 and seed % 100 < len(SCHEDULE) else ())
    return Group(seed, scenario, cell_kind, model, calls, norm, spec, methods, opts, mutate,
                 scenario.startswith("bad"), info)




def run_group(g, n_samples=48, pgd_steps=12):
    """Run one group; returns a list of case records (dicts: seed, scenario, cell, method, call,
    status, detail, worst, points, discarded, seconds, plus the group's info)."""
    records = []

    def record(method, call, verdict, t0):
        records.append(dict(seed=g.seed, scenario=g.scenario, cell=g.cell, method=method, call=call,
                            eps=g.calls[call - 1][1], **dataclasses.asdict(verdict),
                            seconds=round(time.time() - t0, 3), **g.info))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.time()
        modules = {}  # method -> (BoundedModule or the exception building it, auto_LiRPA method)
        for method in g.methods:
            base, deq_extra, extra = VARIANTS.get(method, (method, {}, {}))
            opts = dict(g.bound_opts or {}, **extra)
            if deq_extra:
                opts["deq"] = {**(opts.get("deq") or {}), **deq_extra}
            try:
                modules[method] = (BoundedModule(g.model, g.calls[0][0], bound_opts=opts or None), base)
            except Exception as exc:  # noqa: BLE001 - classified, not swallowed
                modules[method] = (exc, base)
        for call, (x, eps) in enumerate(g.calls, 1):
            if call == 2 and g.mutate is not None:
                g.mutate(g.model)
            truth = None  # ground truth of this call's model, shared by the methods
            for method in g.methods:
                t0 = time.time()
                bm, base = modules[method]
                if isinstance(bm, Exception):
                    record(method, call, judge_error(bm), t0)
                    continue
                try:
                    ptb = PerturbationLpNorm(norm=g.norm, eps=eps)
                    lb, ub = bm.compute_bounds(x=(BoundedTensor(x, ptb),), method=base, C=g.spec)
                except Exception as exc:  # noqa: BLE001
                    record(method, call, judge_error(exc), t0)
                    continue
                if g.bad:
                    finite = bool(torch.isfinite(lb).all() and torch.isfinite(ub).all())
                    record(method, call, Verdict("number-for-bad-input",
                                                 f"returned {'finite' if finite else 'non-finite'} bounds"), t0)
                    continue
                try:
                    if truth is None:
                        truth = truth_outputs(g.model, x, eps, g.norm, g.spec, n_samples, pgd_steps,
                                              seed=g.seed)
                    verdict = judge_bounds(lb, ub, truth[0], truth[1], g.rtol)
                except Exception as exc:  # noqa: BLE001 - a harness problem, reported as such
                    verdict = Verdict("undetermined", f"ground truth failed: {type(exc).__name__}: {exc}")
                record(method, call, verdict, t0)
    return records


def outcome(rec):
    """Table column of a record: the status, refusals split by error type."""
    if rec["status"] == "refused":
        return "refused:" + rec["detail"].split(":")[0]
    return rec["status"]


def summary_table(records, by="scenario"):
    """Text table of ``by`` x outcome counts, failing columns last."""
    counts = collections.defaultdict(collections.Counter)
    for rec in records:
        counts[rec[by]][outcome(rec)] += 1
    cols = sorted({c for row in counts.values() for c in row}, key=lambda c: (c in FAILING, c))
    w = max([len(by)] + [len(k) for k in counts]) + 2
    lines = [by.ljust(w) + "".join(c.rjust(max(len(c), 5) + 2) for c in cols) + "  total"]
    for k in sorted(counts):
        lines.append(k.ljust(w) + "".join(str(counts[k][c]).rjust(max(len(c), 5) + 2) for c in cols)
                     + str(sum(counts[k].values())).rjust(7))
    return "\n".join(lines)


def describe_failures(records, limit=20):
    bad = [r for r in records if r["status"] in FAILING]
    lines = [f"seed {r['seed']} {r['scenario']}/{r['cell']} {r['method']} call {r['call']} "
             f"{r['dtype']} {r['norm']} eps={r['eps']:.3g}: {r['status']} {r['detail']}"
             + (f"  [known bug: {KNOWN_BUGS[r['scenario']]}]" if r["scenario"] in KNOWN_BUGS else "")
             for r in bad[:limit]]
    return "\n".join(lines + ([f"... and {len(bad) - limit} more"] if len(bad) > limit else []))


# ================================================================================== the CI slice
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_random_soundness(scenario):
    seeds = [s for s in range(CI_GROUPS) if SCHEDULE[s % len(SCHEDULE)] == scenario]
    records = [rec for s in seeds for rec in run_group(make_group(s))]
    print(f"\n{scenario}: {len(records)} cases, seeds {seeds}\n" + summary_table(records, "cell"))
    failed = [r for r in records if r["status"] in FAILING]
    note = f" (known bug of this kind: {KNOWN_BUGS[scenario]})" if scenario in KNOWN_BUGS else ""
    assert not failed, f"{len(failed)} / {len(records)} cases failed{note}:\n" + describe_failures(failed)
    undetermined = sum(r["status"] == "undetermined" for r in records)
    assert undetermined <= 0.05 * len(records), describe_failures(records)
    if not scenario.startswith("bad") and scenario != "poor-opts":
        # the suite must test bounds, not only refusals
        assert sum(r["status"] == "sound" for r in records) >= 0.5 * len(records), summary_table(records, "cell")


# ===================================================================== the harness can fail
def _small_model(cell, max_iter=100):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), DEQ(cell, solver="anderson" if not isinstance(cell, MonLinear)
                                              else "peaceman_rachford", max_iter=max_iter, tol=1e-12,
                                              on_nonconvergence="ignore"), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("make", [lambda: MonLinear(6, 0.05), lambda: TanhCell(6, 6, 0.9)])
def test_ground_truth_is_the_true_fixed_point_not_the_model_forward(make):
    torch.manual_seed(1)
    model, x = _small_model(make()), torch.randn(16, 5, dtype=torch.float64)
    y, valid, res = GroundTruth(model)(x)
    assert bool(valid.all()) and float(res.max()) <= 1e-8
    assert torch.allclose(y, model(x), atol=1e-9)  # the model's own tight solve agrees
    model[1].max_iter = 1  # a truncated forward is NOT the truth
    with torch.no_grad():
        assert float((GroundTruth(model)(x)[0] - model(x)).abs().max()) > 1e-3
    if not isinstance(model[1].cell, MonLinear):  # a re-solve that misses its residual is discarded
        assert not bool(GroundTruth(model, max_iter=2)(x)[1].any())


def test_judge_flags_every_kind_of_wrong_bound():
    model, x = _small_model(IBPMonLinear(6)), torch.randn(2, 5, dtype=torch.float64)
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(eps=0.1)),), method="IBP")
    y, valid, _ = truth_outputs(model, x, 0.1)
    assert judge_bounds(lb, ub, y, valid, 1e-6).status == "sound"
    mid = y[:, 0].mean(0)  # a bound cutting through the attained range
    assert judge_bounds(lb, torch.maximum(lb, mid), y, valid, 1e-6).status == "violated"
    assert judge_bounds(lb, ub.clone().fill_(math.nan), y, valid, 1e-6).status == "non-finite"
    assert judge_bounds(ub + 1, ub, y, valid, 1e-6).status == "crossed"
    assert judge_bounds(lb, ub, y, valid & False, 1e-6).status == "undetermined"
    assert judge_error(ValueError("eps must be >= 0")).status == "refused"
    assert judge_error(RuntimeError("boom")).status == "crash"  # not a clear error
    assert judge_error(ValueError("")).status == "crash"  # no message
