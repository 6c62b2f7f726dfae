"""Certification in blocks: the unit of work that processes and shards share.

The N selected images are cut into blocks of ``block_size`` consecutive images (the last one
shorter). Everything about block ``b`` -- predictions, PGD (seeded with ``b``), IBP, CROWN on the
block's points that IBP did not certify and PGD did not break, Lipschitz, smoothing (seeded with
the image's place among the smoothed ones) -- is computed from that block alone, in the same
batches. A block's results therefore do not depend on which process computes it or on which other
blocks it computes, and certifying the blocks in one process, on the ranks of ``torchrun`` or in
``--shard K/N`` jobs and merging gives the same numbers (only timings differ; tested).

Blocks go round-robin: shard K of N owns blocks K, K + N, ...; inside a process group, rank r of W
owns every W-th of those from its r-th (the embedded splits are ordered by class, so round-robin
spreads the harder classes).

A block's results are a JSON-serialisable dict (see :meth:`BlockCertifier.run`); ``summary.py``
turns the list of every block into the summary and per-image records.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from .._progress import Progress
from ..training import make_bounded, pgd_robust, predict
from . import methods as M
from .report import finite


def spread(total, num):
    """``num`` evenly spaced indices in range(total) (LongTensor), all of them when num >= total."""
    if num >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, num).round().long()


@dataclass
class Plan:
    """What a certification run computes, independent of who computes it.

    num_images: N selected images; eps: radii; methods: requested methods in order; block_size:
    images per block (= per bound computation); subsets: {method: number of evenly spaced images it
    runs on}; smoothing: the smoothing options (None: no smoothing); input_dim: numbers per image."""

    num_images: int
    eps: List[float]
    methods: List[str]
    block_size: int
    pgd_steps: int = 20
    pgd_restarts: int = 1
    all_points: bool = False
    subsets: Dict[str, int] = field(default_factory=dict)
    smoothing: Optional[dict] = None
    input_dim: int = 0
    num_classes: int = 10

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_images / self.block_size)

    def block(self, b: int):
        """(start, stop) positions of block b."""
        return b * self.block_size, min((b + 1) * self.block_size, self.num_images)

    def bound_methods(self) -> List[str]:
        """The bound methods that run (an unavailable 'lipschitz' is reported, not run)."""
        return [m for m in self.methods if m != "smoothing" and (m != "lipschitz" or M.lipschitz_status()[0])]

    def subset(self, method: str) -> torch.Tensor:
        return spread(self.num_images, self.subsets.get(method) or self.num_images)

    def smoothing_positions(self) -> Optional[torch.Tensor]:
        """Positions of the smoothed images (None: no smoothing)."""
        if "smoothing" not in self.methods or not self.smoothing:
            return None
        num = min(int(self.smoothing.get("num") or self.num_images), self.num_images)
        return spread(self.num_images, num)

    def to_dict(self) -> dict:
        return asdict(self)


def assigned_blocks(plan: Plan, shard=(0, 1), rank: int = 0, world_size: int = 1) -> List[int]:
    """Blocks of shard ``shard = (K, N)`` computed by rank ``rank`` of ``world_size``."""
    k, n = shard
    mine = list(range(k, plan.num_blocks, n))
    return mine[rank::world_size]


def _bools(t) -> list:
    return [bool(v) for v in t.tolist()]


class BlockCertifier:
    """Certifies blocks of the selected images ``x`` (N, ...) / ``y`` (N,) (validated by the
    caller) with ``indices`` (N,) their dataset indices; one BoundedModule shared by every block."""

    def __init__(self, model, x, y, indices, plan: Plan):
        self.model, self.x, self.y, self.indices, self.plan = model, x, y, list(indices), plan
        self.bounded = None

    def _certify(self, xb, yb, k, method):
        if self.bounded is None:
            self.bounded = make_bounded(self.model, self.x[:1])
        return M.certify_linf(self.model, xb, yb, self.plan.eps[k], method, num_classes=self.plan.num_classes,
                              batch_size=self.plan.block_size, bounded=self.bounded)

    def run(self, b: int, bar: Progress = None) -> dict:
        """Block b's results: 'block', 'start', 'stop', per image 'index' / 'label' / 'prediction',
        'pgd' (per eps, per image; None without PGD) and 'pgd_seconds', 'bounds' {method: per eps
        'certified' / 'margin' (None where it did not run or is not finite), 'in_subset',
        'evaluated', 'seconds', 'errors'}, 'ibp' (per eps IBP 'certified' when IBP ran on the whole
        block, else None), 'smoothing' ({'position', 'prediction', 'radius', 'seconds'} or None)."""
        plan = self.plan
        p0, p1 = plan.block(b)
        xb, yb = self.x[p0:p1], self.y[p0:p1]
        stage = bar.stage if bar is not None else (lambda name: None)
        out = {"block": b, "start": p0, "stop": p1, "index": self.indices[p0:p1], "label": yb.tolist(),
               "prediction": predict(self.model, xb).tolist(), "pgd": None, "pgd_seconds": 0.0}
        pgd = None
        if plan.pgd_steps > 0:
            stage(f"block {b}: PGD")
            t0 = time.time()
            pgd = [pgd_robust(self.model, xb, yb, e, steps=plan.pgd_steps, restarts=plan.pgd_restarts, seed=b).cpu()
                   for e in plan.eps]
            out["pgd"], out["pgd_seconds"] = [_bools(p) for p in pgd], time.time() - t0
        ibp = {}
        out["bounds"] = {}
        for m in plan.bound_methods():
            stage(f"block {b}: {m}")
            out["bounds"][m] = self._method(m, xb, yb, p0, p1, pgd, ibp)
        out["ibp"] = [_bools(ibp[k]["certified"]) for k in range(len(plan.eps))] if len(ibp) == len(plan.eps) else None
        out["smoothing"] = self._smoothing(p0, p1, stage, b)
        return out

    def _method(self, method, xb, yb, p0, p1, pgd, ibp) -> dict:
        """One bound method on one block, with the skipping rules of ``certify_cmd.evaluate``."""
        plan, n = self.plan, p1 - p0
        sel = plan.subset(method)
        full = len(sel) == plan.num_images
        in_subset = torch.zeros(n, dtype=torch.bool)
        in_subset[sel[(sel >= p0) & (sel < p1)] - p0] = True

        def ibp_at(k):
            if k not in ibp:
                ibp[k] = self._certify(xb, yb, k, "ibp")
            return ibp[k]

        res = {"certified": [], "margin": [], "in_subset": _bools(in_subset), "evaluated": 0, "seconds": 0.0,
               "errors": []}
        for k in range(len(plan.eps)):
            if method == "ibp" and full:
                r = ibp_at(k)
                res["evaluated"] += n
            else:
                todo = in_subset.clone()
                r = {"certified": torch.zeros(n, dtype=torch.bool), "margin": torch.full((n,), float("nan")),
                     "seconds": 0.0}
                if not plan.all_points and method != "ibp":
                    if pgd is not None:
                        todo &= pgd[k]
                    if method == "crown":  # CROWN is intersected with IBP: its pass is part of the cost
                        base = ibp_at(k)
                        todo &= ~base["certified"]
                        r["certified"][in_subset] = base["certified"][in_subset]
                        r["margin"][in_subset] = base["margin"][in_subset]
                        r["seconds"] = base["seconds"] * int(in_subset.sum()) / n
                idx = todo.nonzero().flatten()
                if len(idx):
                    sub = self._certify(xb[idx], yb[idx], k, method)
                    r["certified"][idx], r["margin"][idx] = sub["certified"], sub["margin"]
                    r["seconds"] += sub["seconds"]
                    res["errors"] += sub.get("errors", [])
                res["evaluated"] += len(idx)
            res["certified"].append(_bools(r["certified"]))
            res["margin"].append([finite(float(v)) for v in r["margin"]])
            res["seconds"] += r["seconds"]
        return res

    def _smoothing(self, p0, p1, stage, b) -> Optional[dict]:
        plan, pos = self.plan, self.plan.smoothing_positions()
        if pos is None:
            return None
        first = int(((pos < p0).sum()))  # place of the block's first smoothed image among all of them
        mine = pos[(pos >= p0) & (pos < p1)]
        if not len(mine):
            return {"position": [], "prediction": [], "radius": [], "seconds": 0.0}
        stage(f"block {b}: smoothing")
        o = plan.smoothing
        r = M.certify_smoothing(self.model, self.x[mine], self.y[mine], sigma=o["sigma"], n=o["n"], n0=o["n0"],
                                alpha=o["alpha"], srs_steps=o.get("srs_steps", 0), batch_size=o.get("batch_size", 500),
                                num_classes=plan.num_classes, seed=first, progress=False)
        return {"position": mine.tolist(), "prediction": r["prediction"].tolist(),
                "radius": [float(v) for v in r["radius"]], "seconds": r["seconds"]}


def run_blocks(certifier: BlockCertifier, blocks: List[int], progress=False) -> List[dict]:
    """Results of ``blocks`` in order, with one progress bar over them (rank 0, on a terminal)."""
    out = []
    with Progress(progress, len(blocks), "certify", unit="block") as bar:
        for b in blocks:
            out.append(certifier.run(b, bar))
            bar.advance(1)
    return out
