"""Argument parsing for ``lirpa-deq``; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import sys
import warnings


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="lirpa-deq", description="Certified robustness for DEQs (auto_LiRPA plugin)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small IBP-MonDEQ on embedded MNIST and certify it")
    demo.add_argument("--epochs", type=_positive_int, default=3)
    demo.add_argument("--eps-train", type=_nonneg_float, default=0.1)
    demo.add_argument("--eps", type=_nonneg_float, nargs="+", default=[0.01, 0.05, 0.1])
    demo.add_argument("--num-test", type=_positive_int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # auto_LiRPA/ONNX trace chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(epochs=args.epochs, eps_train=args.eps_train, eps_list=args.eps, num_test=args.num_test,
                 seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
