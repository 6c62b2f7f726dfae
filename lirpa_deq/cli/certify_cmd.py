"""``lirpa-deq certify``: certify a trained checkpoint on a dataset split with several methods.

:func:`evaluate` is shared with ``demo``: clean accuracy, PGD accuracy, every requested method at
every eps, per-sample records and a JSON-serialisable summary. Any point that is certified but
broken by PGD is counted in ``summary['certified_but_attacked']`` (must be 0: a soundness check).

The work is done in blocks of ``--batch-size`` images (``blocks.py``), each computed on its own,
so it can be split: under ``torchrun`` the ranks certify every W-th block and rank 0 gathers the
results (and alone prints and writes); with ``--shard K/N`` a process certifies shard K's blocks
and writes them to a shard file for ``lirpa-deq merge`` (``merge_cmd.py``). Either way the
summary and records are those of a one-process run (timings aside).

Before any work: every eps is a finite real >= 0, the methods are known and available, x / y are
a finite batch of the model's dtype inside [0, 1] with labels (N,) in [0, num_classes), the
smoothing sample sizes satisfy n >= n0, and ``--json PATH`` is writable (``lirpa_deq.validate``);
the JSON is written atomically.
"""
from __future__ import annotations

from .. import distributed
from ..data import dataset_info, get_dataset
from ..training import load_checkpoint, model_from_checkpoint
from ..validate import (check_eps, check_finite_params, check_labels, check_sample_sizes, check_x,
                        check_writable_file)
from . import methods as M
from .blocks import BlockCertifier, Plan, assigned_blocks, run_blocks, spread
from .report import format_table, write_json_lines
from .summary import log_lines, summarize

__all__ = ["evaluate", "prepare", "certify_blocks", "spread", "run_certify"]

SMOOTHING_KEYS = ("sigma", "n", "n0", "alpha", "srs_steps", "radii", "num", "batch_size")


def prepare(model, x, y, eps_list, methods, num_classes=10, batch_size=250, pgd_steps=20, pgd_restarts=1,
            smoothing=None, indices=None, all_points=False, subsets=None):
    """Validate the arguments of :func:`evaluate` (ValueError) and return ``(plan, certifier)``."""
    eps_list = [check_eps(e, "eps") for e in eps_list]
    M.check_available(methods)
    if smoothing and "smoothing" in methods:
        check_sample_sizes(smoothing["n0"], smoothing["n"])
    model.eval()
    check_finite_params(model)
    x = check_x(x, model, clip=(0.0, 1.0))
    y = check_labels(y, len(x), num_classes, x.device)
    indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
    plan = Plan(num_images=len(x), eps=[float(e) for e in eps_list], methods=list(methods), block_size=int(batch_size),
                pgd_steps=int(pgd_steps), pgd_restarts=int(pgd_restarts), all_points=bool(all_points),
                subsets={m: int(v) for m, v in (subsets or {}).items() if v},
                smoothing={k: smoothing[k] for k in SMOOTHING_KEYS if k in smoothing} if smoothing else None,
                input_dim=int(x[0].numel()), num_classes=int(num_classes))
    return plan, BlockCertifier(model, x, y, indices, plan)


def certify_blocks(certifier, plan, shard=(0, 1), progress=False) -> list:
    """Results of every block of shard ``shard = (K, N)``: this process's share (all of them in one
    process; every W-th in a process group of W ranks, gathered onto every rank)."""
    ctx = distributed.current()
    mine = run_blocks(certifier, assigned_blocks(plan, shard, ctx.rank, ctx.world_size), progress)
    return [blk for part in distributed.all_gather_objects(mine) for blk in part]


def evaluate(model, x, y, eps_list, methods, num_classes=10, batch_size=250, pgd_steps=20, pgd_restarts=1,
             smoothing=None, indices=None, log=print, dataset="", all_points=False, subsets=None, progress=False):
    """Run everything; returns (summary, records) (on every rank of a process group, whose ranks
    share the blocks).

    x (N, *input_shape) finite, in [0, 1], of the model's dtype; y (N,) labels in [0, num_classes);
    eps_list finite reals >= 0 (all validated first: ValueError); methods: subset of ``methods.METHODS`` (an unavailable
    'lipschitz' is reported as n/a instead of failing). smoothing: dict(sigma, n, n0, alpha,
    srs_steps, radii, num, batch_size) used when 'smoothing' is in methods. subsets: optional
    {method: number of images} to run a (slow) bound method on evenly spaced images only; its
    certified accuracy is then over those images (``summary['methods'][m]['num_images']``).
    batch_size: images per block and per bound computation (``blocks.py``).

    Unless ``all_points``, CROWN runs only on points IBP did not certify and PGD did not break
    (within each block), and Lipschitz only on points PGD did not break: the certified sets are
    the same (a broken point cannot be certified soundly; CROWN is intersected with IBP), only the
    cost differs. Skipped points get the IBP margin (CROWN) or NaN (Lipschitz).
    ``summary['methods'][m]['evaluated']`` counts the (image, eps) pairs a method actually ran on.
    ``progress``: a tqdm bar over the blocks (rank 0, on a TTY)."""
    plan, certifier = prepare(model, x, y, eps_list, methods, num_classes, batch_size, pgd_steps, pgd_restarts,
                              smoothing, indices, all_points, subsets)
    summary, records = summarize(plan, certify_blocks(certifier, plan, progress=progress), dataset)
    for line in log_lines(summary):
        log(line)
    return summary, records


def run_certify(args, log=print):
    """The ``certify`` subcommand (args from ``main.build_parser``). Returns the exit code."""
    shard = args.shard
    if shard is not None and (not args.json or args.json == "-"):
        raise ValueError("--shard K/N writes its share of the results to a shard file: pass --json PATH (then "
                         "'lirpa-deq merge' the N files)")
    if args.json and args.json != "-":
        check_writable_file(args.json, "--json")  # before the work, whose results it would lose
    methods = list(dict.fromkeys(args.method))
    M.check_available(methods)
    if "smoothing" in methods:
        check_sample_sizes(args.n0, args.n)
    data = load_checkpoint(args.checkpoint, map_location=args.device)
    model = model_from_checkpoint(data, device=args.device)
    cfg = data["config"]
    dataset = args.dataset or cfg.get("dataset", "mnist5k")
    root = args.data_root or cfg.get("data_root")
    if dataset_info(dataset).needs_root and not root:
        raise ValueError(f"dataset {dataset!r} is read from local files: pass --data-root DIR")
    ds = get_dataset(dataset, args.split, root)
    X, Y = ds.tensors
    if tuple(X.shape[1:]) != tuple(data["model"]["input_shape"]):
        raise ValueError(f"dataset {dataset!r} has images of shape {tuple(X.shape[1:])}, the checkpoint's model "
                         f"expects {tuple(data['model']['input_shape'])}")
    if args.start >= len(X):
        raise ValueError(f"--start {args.start} is beyond the {len(X)} images of the {args.split} split")
    sel = args.start + spread(len(X) - args.start, args.num or len(X))
    subsets = {"lipschitz": args.lipschitz_num} if args.lipschitz_num else None
    x, y = X[sel].to(args.device), Y[sel].to(args.device)
    smoothing = {"sigma": args.sigma, "n": args.n, "n0": args.n0, "alpha": args.alpha, "srs_steps": args.srs_steps,
                 "radii": args.radii, "num": args.smoothing_num, "batch_size": args.smoothing_batch}
    plan, certifier = prepare(model, x, y, args.eps, methods, num_classes=data["model"]["num_classes"],
                              batch_size=args.batch_size, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
                              smoothing=smoothing, indices=sel.tolist(), all_points=args.all_points, subsets=subsets)
    meta = {"checkpoint": str(args.checkpoint), "split": args.split, "model": data["model"], "dataset": dataset}
    blocks = certify_blocks(certifier, plan, shard or (0, 1), progress=not args.no_progress)
    if shard is not None:
        from .merge_cmd import write_shard

        if distributed.is_main():
            write_shard(args.json, shard, plan, meta, blocks, args.checkpoint)
        distributed.barrier()
        log(f"shard {shard[0]}/{shard[1]}: {len(blocks)} of {plan.num_blocks} blocks of {plan.block_size} images "
            f"({sum(b['stop'] - b['start'] for b in blocks)} of {plan.num_images}) -> {args.json}; when every shard "
            "is done: lirpa-deq merge SHARD_FILES... --json RESULTS")
        return 0
    summary, records = summarize(plan, blocks, dataset)
    for line in log_lines(summary):
        log(line)
    return report(summary, records, meta, args.json)


def report(summary, records, meta, json_path) -> int:
    """Add the run's checkpoint / split / model to ``summary``, print the table (stderr when the JSON
    goes to stdout) and write the JSON lines, on rank 0 only. Returns the exit code (1 when a
    certified point was broken by PGD), the same on every rank."""
    summary.update(checkpoint=meta["checkpoint"], split=meta["split"], model=meta["model"])
    if distributed.is_main():
        import sys

        print(format_table(summary), file=sys.stderr if json_path == "-" else sys.stdout)
        if json_path:
            write_json_lines(json_path, records, summary)
    distributed.barrier()
    return 1 if any(summary["certified_but_attacked"].values()) else 0
