"""Long run of the randomized soundness suite (issue #14): >= 10,000 cases against a float64 ground truth.

    .venv/bin/python benchmarks/bench_soundness.py --cases 10000 --seed 0 --json runs/soundness.json
    .venv/bin/python benchmarks/bench_soundness.py --replay 8      # one group, every case in detail

The cases are those of tests/test_soundness_random.py (its ``make_group`` / ``run_group``): group
seeds ``seed * 1_000_000 + i`` for i = 0, 1, ... until ``--cases`` cases are done (seed 0 starts
with the CI slice's groups). Prints a table of scenario x outcome and one of cell kind x outcome
(sound / refused:<error type> / undetermined, then the failing outcomes: violated, non-finite,
crossed (lb > ub), crash (an unclear error), number-for-bad-input), the failing cases with their
seeds, and the slowest groups; ``--json`` writes every case record and the tables. Exit status 1
when any case failed. Runs on 1 CPU thread (``--threads``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import lirpa_deq  # noqa: E402,F401  (registers the DEQ node; applies the auto_LiRPA bridge)
from lirpa_deq.testing import FAILING  # noqa: E402
from test_soundness_random import (describe_failures, make_group, outcome, run_group,  # noqa: E402
                                   summary_table)


def replay(seed, n_samples, pgd_steps):
    """Rebuild group ``seed`` and print its set-up and every case's verdict."""
    g = make_group(seed)
    print(f"seed {seed}: scenario {g.scenario}, cell {g.cell}, {g.info}")
    print(g.model)
    for i, (x, eps) in enumerate(g.calls, 1):
        print(f"call {i}: eps {eps!r}, x {tuple(x.shape)} {x.dtype}, norm {g.norm}, spec "
              f"{None if g.spec is None else tuple(g.spec.shape)}, bound_opts {g.bound_opts}"
              + (", after the in-place change" if i == 2 and g.mutate is not None else ""))
    for rec in run_group(g, n_samples, pgd_steps):
        print(f"  {rec['method']:9s} call {rec['call']}: {rec['status']:20s} worst {rec['worst']:.3e} "
              f"points {rec['points']} discarded {rec['discarded']}  {rec['detail']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all records and the tables here")
    ap.add_argument("--replay", type=int, default=None, help="run one group seed verbosely")
    ap.add_argument("--samples", type=int, default=48, help="random / vertex points per ball")
    ap.add_argument("--pgd-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replay is not None:
        replay(args.replay, args.samples, args.pgd_steps)
        return 0
    from tqdm import tqdm

    records, groups, t_start = [], [], time.time()
    with tqdm(total=args.cases, unit="case", smoothing=0.05) as bar:
        i = 0
        while len(records) < args.cases:
            seed, t0 = args.seed * 1_000_000 + i, time.time()
            recs = run_group(make_group(seed), args.samples, args.pgd_steps)
            records += recs
            groups.append((time.time() - t0, seed, recs[0]["scenario"], recs[0]["cell"]))
            failed = sum(r["status"] in FAILING for r in records)
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(len(recs))
            i += 1
    wall = time.time() - t_start
    failed = [r for r in records if r["status"] in FAILING]
    discarded = sum(r["discarded"] for r in records)
    points = sum(r["points"] for r in records)
    head = (f"# {len(records)} cases in {len(groups)} groups (seeds {args.seed * 1_000_000}.."
            f"{args.seed * 1_000_000 + len(groups) - 1}), {wall / 60:.1f} min, torch {torch.__version__}, "
            f"{args.threads} thread(s), {platform.node()}")
    tables = {"scenario": summary_table(records, "scenario"), "cell": summary_table(records, "cell"),
              "method": summary_table(records, "method"), "dtype": summary_table(records, "dtype"),
              "norm": summary_table(records, "norm")}
    print(head)
    for name, table in tables.items():
        print(f"\n{table}")
    worst = max((r["worst"] for r in records if r["status"] == "sound"), default=float("nan"))
    print(f"\nground-truth points checked: {points}, discarded (re-solve above 1e-8): {discarded}; "
          f"largest relative excess among sound cases: {worst:.2e}")
    print(f"FAILED: {len(failed)} cases" + (f"\n{describe_failures(failed, limit=50)}" if failed else ""))
    print("slowest groups: " + ", ".join(f"seed {s} {sc}/{c} {t:.1f}s" for t, s, sc, c in
                                         sorted(groups, reverse=True)[:5]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        counts = collections.Counter(outcome(r) for r in records)
        with open(args.json, "w") as fh:
            json.dump(dict(header=head, argv=sys.argv[1:], minutes=wall / 60, counts=counts, tables=tables,
                           failed_seeds=sorted({r["seed"] for r in failed}), records=records),
                      fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
