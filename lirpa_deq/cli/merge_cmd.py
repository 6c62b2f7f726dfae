"""Shard files of ``lirpa-deq certify --shard K/N`` and ``lirpa-deq merge``.

A shard file is one JSON object::

    {"format": "lirpa_deq.certify-shard", "version": 1, "shard": [K, N],
     "plan": Plan.to_dict(), "meta": {"checkpoint", "split", "model", "dataset"},
     "checkpoint_sha256": "...", "blocks": [results of each block of shard K]}

``merge`` reads the N files, checks that they are shards 0 .. N-1 of the same run (same plan,
data selection, checkpoint path and checkpoint CONTENT) with every block once, and writes the
results file that ``certify --json`` writes for the whole run in one process (same records, same
summary; only the timings differ), prints the same table and exits the same way (1 when a
certified point was broken by PGD).
"""
from __future__ import annotations

import hashlib
import json
import os

from .blocks import Plan
from ..training.checkpoint import atomic_write
from .summary import log_lines, summarize

FORMAT = "lirpa_deq.certify-shard"
VERSION = 1


def parse_shard(text):
    """'K/N' -> (K, N) with 0 <= K < N (argparse type; ValueError otherwise)."""
    import argparse

    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (shard K of N, 0 <= K < N), got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return k, n


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path, shard, plan: Plan, meta: dict, blocks, checkpoint_path) -> str:
    """Write shard ``shard = (K, N)``'s blocks atomically to ``path``."""
    data = {"format": FORMAT, "version": VERSION, "shard": list(shard), "plan": plan.to_dict(), "meta": meta,
            "checkpoint_sha256": file_sha256(checkpoint_path), "blocks": blocks}
    return atomic_write(path, lambda f: json.dump(data, f), mode="w")


def read_shard(path) -> dict:
    """A shard file's content; ValueError (one line) for a missing, unreadable or foreign file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"shard file {path!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"shard file {path!r} is not readable JSON ({str(exc).splitlines()[0]}); run its "
                         "'lirpa-deq certify --shard K/N --json PATH' again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a shard file of 'lirpa-deq certify --shard K/N'")
    if data.get("version") != VERSION:
        raise ValueError(f"shard file {path!r} has version {data.get('version')!r}; this lirpa_deq reads {VERSION}")
    return data


def merge_shards(paths):
    """(plan, meta, blocks) of the shard files ``paths``: ValueError unless they are the N shards
    of one run, each once."""
    shards = [read_shard(p) for p in paths]
    first, ref = shards[0], paths[0]
    for path, s in zip(paths[1:], shards[1:]):
        for key, what in (("plan", "certification settings (eps, methods, batch size, PGD, subsets, smoothing, "
                                   "images)"), ("meta", "checkpoint path, dataset or split"),
                          ("checkpoint_sha256", "checkpoint content")):
            if s[key] != first[key]:
                raise ValueError(f"{path!r} and {ref!r} are shards of different runs: their {what} differ")
    n = first["shard"][1]
    got = sorted(s["shard"][0] for s in shards)
    if any(s["shard"][1] != n for s in shards) or got != list(range(n)):
        have = ", ".join(f"{k}/{m}" for k, m in sorted(tuple(s["shard"]) for s in shards))
        raise ValueError(f"merge needs every shard 0/{n} .. {n - 1}/{n} once, got {have}")
    try:
        return Plan(**first["plan"]), first["meta"], [b for s in shards for b in s["blocks"]]
    except (TypeError, KeyError) as exc:
        raise ValueError(f"shard file {ref!r} is malformed ({exc}); run its certify --shard again") from None


def run_merge(args, log=print) -> int:
    """The ``merge`` subcommand. Returns the exit code (that of the one-process ``certify``)."""
    from .certify_cmd import report
    from ..validate import check_writable_file

    if args.json and args.json != "-":
        check_writable_file(args.json, "--json")
    paths = [os.fspath(p) for p in args.shards]
    plan, meta, blocks = merge_shards(paths)
    try:
        summary, records = summarize(plan, blocks, meta["dataset"])
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"the shard files are malformed ({type(exc).__name__}: {exc}); run their certify --shard "
                         "again") from None
    for line in log_lines(summary):
        log(line)
    return report(summary, records, meta, args.json)
