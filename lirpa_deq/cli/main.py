"""Argument parsing and error handling for ``lirpa-deq`` (subcommands: train, certify, merge, demo).

Under ``torchrun`` (its RANK / WORLD_SIZE / LOCAL_RANK variables set) ``train`` and ``certify``
join the process group first (``lirpa_deq.distributed``: gloo on CPU, nccl on GPU, ``--device
cuda`` meaning this rank's GPU) and only rank 0 prints; ``merge`` and ``demo`` run in one process.

Errors the user can cause (unknown dataset / model / method, missing data root, negative or NaN
eps, n < n0, an unwritable --out / --json, a corrupt, truncated, NaN-weighted or mismatched
checkpoint, ...) end with ONE line ``lirpa-deq: error: ...`` on stderr and exit status 2 -- never a
traceback. They are checked before the work starts (``lirpa_deq.validate``), so a long run
is not lost to a typo at its end. ``LIRPA_DEQ_DEBUG=1`` re-raises them for debugging.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from ..data import DATASETS
from ..models import MODELS
from ..training.losses import METHODS as TRAIN_METHODS
from .merge_cmd import parse_shard
from .methods import METHODS as CERT_METHODS

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text):
    value = _nonneg_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _unit_interval(text):
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _common(p, device=True):
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: this code's tensors are small, and on shared 2-core "
                        "machines 2 OpenMP threads measured 10x slower; raise it on dedicated many-core CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_train(sub):
    p = sub.add_parser("train", help="certified training (natural / IBP / CROWN-IBP) with checkpoints",
                       description="Train a model with certified training; writes OUT/checkpoint.pt "
                                   "(atomically, every epoch). See docs/training.md.")
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASETS), metavar="NAME",
                   help=f"dataset: {', '.join(sorted(DATASETS))} (default mnist5k, embedded)")
    p.add_argument("--data-root", default=None, help="directory with MNIST / CIFAR-10 files (never downloads)")
    p.add_argument("--model", default="conv-fc-deq", choices=list(MODELS), metavar="NAME",
                   help=f"model: {', '.join(MODELS)} (default conv-fc-deq)")
    p.add_argument("--width", type=_positive_int, default=None, help="model width (DEQ units / channels)")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra model option, e.g. channels=8 or margin=0.3 (repeatable)")
    p.add_argument("--method", default="ibp", choices=TRAIN_METHODS, help="training loss (default ibp)")
    p.add_argument("--eps-train", type=_nonneg_float, default=0.2, help="final training eps, l_inf (default 0.2)")
    p.add_argument("--epochs", type=_positive_float, default=10.0, help="epochs (default 10)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--lr-milestones", type=_nonneg_float, nargs="*", default=[], metavar="EPOCH",
                   help="epochs at which the LR is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=_positive_float, default=0.2)
    p.add_argument("--grad-clip", type=_nonneg_float, default=10.0, help="max gradient norm (0 = off)")
    p.add_argument("--warmup-epochs", type=_nonneg_float, default=1.0, help="epochs at eps = 0 (default 1)")
    p.add_argument("--ramp-epochs", type=_nonneg_float, default=5.0, help="epochs of the eps ramp (default 5)")
    p.add_argument("--kappa-final", type=_nonneg_float, default=0.0, help="final natural-loss weight (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=_positive_int, default=None, help="use only N evenly spaced training images (class-balanced on the embedded splits)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop at this global step (resumable)")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue OUT/checkpoint.pt (or CHECKPOINT) exactly")
    _common(p)


def _add_certify(sub):
    p = sub.add_parser("certify", help="certify a checkpoint (IBP, CROWN, Lipschitz, smoothing)",
                       description="Certify a trained checkpoint on a dataset split; prints one table and "
                                   "optionally per-sample JSON lines. See docs/cli.md.")
    p.add_argument("checkpoint", help="checkpoint written by 'lirpa-deq train' (or demo)")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS), metavar="NAME",
                   help="dataset (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="directory with MNIST / CIFAR-10 files")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--start", type=_nonneg_int, default=0, help="first image index")
    p.add_argument("--num", type=_positive_int, default=None,
                   help="number of images, evenly spaced from --start on (default all; the embedded splits "
                        "are ordered by class, so spacing keeps the classes balanced)")
    p.add_argument("--eps", type=_nonneg_float, nargs="+", default=[0.1], help="l_inf radii (default 0.1)")
    p.add_argument("--method", nargs="+", default=["ibp", "crown"], choices=CERT_METHODS, metavar="M",
                   help=f"methods among {', '.join(CERT_METHODS)} (default: ibp crown)")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="images per bound computation")
    p.add_argument("--pgd-steps", type=_nonneg_int, default=20, help="PGD steps (0 = no attack)")
    p.add_argument("--pgd-restarts", type=_positive_int, default=1)
    p.add_argument("--lipschitz-num", type=_positive_int, default=None,
                   help="run the Lipschitz method on N evenly spaced images only (it is the slowest)")
    p.add_argument("--all-points", action="store_true",
                   help="run CROWN / Lipschitz on every point (default: skip points PGD broke, and for CROWN "
                        "points IBP certified; the certified sets are the same, only slower)")
    g = p.add_argument_group("randomized smoothing (--method smoothing)")
    g.add_argument("--sigma", type=_positive_float, default=0.25, help="noise std (default 0.25)")
    g.add_argument("--n", type=_positive_int, default=1000, help="estimation samples (default 1000)")
    g.add_argument("--n0", type=_positive_int, default=100, help="selection samples (default 100)")
    g.add_argument("--alpha", type=_unit_interval, default=0.001, help="failure probability (default 0.001)")
    g.add_argument("--srs-steps", type=_nonneg_int, default=0,
                   help="Serialized RS solver steps per warm-started batch (0 = plain smoothing)")
    g.add_argument("--radii", type=_nonneg_float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="l2 radii for certified accuracy")
    g.add_argument("--smoothing-num", type=_positive_int, default=None,
                   help="smooth only the first N selected images (default all)")
    g.add_argument("--smoothing-batch", type=_positive_int, default=500, help="noise samples per batch")
    p.add_argument("--json", default=None, metavar="PATH", help="per-sample JSON lines + summary ('-' = stdout)")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                   help="certify only shard K of N (blocks of --batch-size images, round-robin) and write them to "
                        "--json PATH for 'lirpa-deq merge' (job arrays; see docs/scaling.md)")
    _common(p)


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge the shard files of 'certify --shard K/N' into one results file",
                       description="Check that the files are the shards 0/N .. N-1/N of one certify run and write "
                                   "the results file (JSON lines) and table that one process would. See "
                                   "docs/scaling.md.")
    p.add_argument("shards", nargs="+", metavar="SHARD_FILE", help="files written by certify --shard K/N --json")
    p.add_argument("--json", default=None, metavar="PATH", help="per-sample JSON lines + summary ('-' = stdout)")
    _common(p, device=False)


def _add_demo(sub):
    p = sub.add_parser("demo", help="train an IBP-MonDEQ on embedded MNIST and certify it (the main job)",
                       description="Train (or reuse) a small IBP-MonDEQ on the embedded MNIST-5k digits, certify "
                                   "the 1,000 test digits with every available method, print one table, write "
                                   "a PNG plot and JSON into --out.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--retrain", action="store_true", help="train again even if OUT/model.pt matches")
    p.add_argument("--eps", type=_nonneg_float, nargs="+", default=None, help="l_inf radii to certify")
    p.add_argument("--num-test", type=_positive_int, default=1000, help="test digits to certify (default 1000)")
    p.add_argument("--epochs", type=_positive_float, default=None, help="override the recipe's epochs")
    p.add_argument("--smoothing-num", type=_nonneg_int, default=None,
                   help="test digits for randomized smoothing (0 = skip)")
    p.add_argument("--smoothing-n", type=_positive_int, default=None, help="smoothing samples per digit")
    p.add_argument("--lipschitz-num", type=_nonneg_int, default=None,
                   help="test digits for the Lipschitz method (0 = skip; default 30)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)


def build_parser():
    parser = _Parser(prog="lirpa-deq", description="Certified robustness for DEQs (auto_LiRPA plugin)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="{train,certify,merge,demo}")
    _add_train(sub)
    _add_certify(sub)
    _add_merge(sub)
    _add_demo(sub)
    return parser


def _err(exc):
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"lirpa-deq: error: {first}"


def main(argv=None):
    """Run ``lirpa-deq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (0 ok, 1 a
    certified point was broken by PGD, 2 a usage or data error, reported as one line on stderr)."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # auto_LiRPA / ONNX trace chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..bounds import IntervalProofError
    from ..training.checkpoint import CheckpointError

    from .. import distributed

    try:
        if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available in this torch build")
        if distributed.launched_by_torchrun() and args.command in ("train", "certify"):
            _, args.device = distributed.init_from_env(args.device)
        elif distributed.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"'lirpa-deq {args.command}' runs in one process: start it without torchrun "
                             "(train and certify run under torchrun)")
        main_rank = distributed.is_main()
        log_err = lambda *a: main_rank and print(*a, file=sys.stderr, flush=True)  # noqa: E731
        log_out = lambda *a: main_rank and print(*a, flush=True)  # noqa: E731
        if args.command == "train":
            from .train_cmd import run_train

            return run_train(args, log=log_out)
        if args.command == "certify":
            from .certify_cmd import run_certify

            return run_certify(args, log=log_err if args.json == "-" else log_out)
        if args.command == "merge":
            from .merge_cmd import run_merge

            return run_merge(args, log=log_err if args.json == "-" else log_out)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args, log=log_out)
    except (ValueError, OSError, CheckpointError, IntervalProofError, FloatingPointError) as exc:
        if os.environ.get("LIRPA_DEQ_DEBUG"):
            raise
        ctx = distributed.current()
        print(_err(exc) + (f" (rank {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else ""), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lirpa-deq: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
