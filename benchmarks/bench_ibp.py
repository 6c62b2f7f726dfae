#!/usr/bin/env python
"""Benchmark: cost of IBP bounds through a DEQ layer relative to the plain forward pass.

Two IBP-MonDEQ models on 28x28 inputs (the embedded MNIST-5k test split, or uniform noise in
[0, 1] with --data random), batch 128, l_inf eps = 0.1, the same weights for both measurements:

    fc:   Flatten -> Linear(784, 128) -> DEQ(IBPMonLinear(128)) -> Linear(128, 10)
    conv: Conv2d(1, 32, 3, pad 1) -> DEQ(IBPMonConv2d(32)) -> AvgPool2d(4) -> Flatten -> Linear(1568, 10)

For each model it reports, in one run, the ratios  compute_bounds(method='IBP') / model(x)  of

* time: the fastest of --repeats wall-clock timings (each on a new batch; forward and bounds
  interleaved, after one warm-up call of each). The minimum is the estimate least disturbed by
  other processes on a shared machine; the median is printed in the last column for reference;
* memory: the peak of live tensor bytes allocated by PyTorch's CPU allocator during ONE call,
  above what was live when the call started, read from torch.profiler's allocation/free events
  (profile_memory=True) in time order. This counts every tensor the call creates (intermediate
  results, solver histories, autograd saved tensors), and nothing that existed before (weights,
  the input). It does not count Python objects or allocator/OS overhead (resident-set size).
  With --device cuda: torch.cuda.max_memory_allocated above the start instead.

Both are measured in two modes: "no_grad" (certification: torch.no_grad() around both calls)
and "grad" (training: parameters require grad, so both calls keep what backward needs; the
backward pass itself is not timed). The DEQ layers use their defaults (Anderson, tol 1e-4,
max_iter 50); the interval options are those of OPTION_ROWS: the IntervalOptions defaults, the
interval search tolerance matched to the forward solve (tol=1e-4), and "fast" (see below).

    python benchmarks/bench_ibp.py                 # embedded MNIST, batch 128, eps 0.1
    python benchmarks/bench_ibp.py --repeats 3 --threads 2

Not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

import lirpa_deq  # noqa: F401  (registers the DEQ node; applies the auto_LiRPA bridge)
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear


OPTION_ROWS = (  # (label, bound_opts)
    ("default", {}),
    ("tol=1e-4", {"deq": {"tol": 1e-4}}),
    # one search step, a float32-sized inflation floor (proof passes at the first attempt), then
    # 4 interval steps that contract the (sound) box: widths within ~1e-4 relative of the default
    ("fast", {"deq": {"max_iter": 1, "inflate_abs": 1e-4, "tighten_steps": 4}}),
)


def build(kind: str) -> nn.Module:
    if kind == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), DEQ(IBPMonLinear(128)), nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), DEQ(IBPMonConv2d(32)), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def input_batches(source: str, batch: int, count: int, seed: int):
    """``count`` DIFFERENT batches: every measured call sees inputs it has not seen before, so no
    cache (BoundDEQ keeps the last proved box for identical input bounds) can skip the work."""
    if source == "mnist":
        from lirpa_deq.data import load_mnist5k

        images = load_mnist5k("test").tensors[0]
        if count * batch > len(images):
            raise SystemExit(f"--data mnist has {len(images)} test images: need batch * "
                             f"(repeats + 2) <= that; lower --repeats or use --data random")
        return [images[i * batch:(i + 1) * batch].clone() for i in range(count)]
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, 28, 28, generator=g) for _ in range(count)]


def _cpu_peak_bytes(fn):
    """Peak live CPU tensor bytes allocated during fn(), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_peak_bytes(fn)


def seconds(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(model, bm, batches, eps, mode, device):
    """batches[0]: warm-up; batches[1]: memory; batches[2:]: timing (one call each)."""
    ctx = torch.no_grad if mode == "no_grad" else contextlib.nullcontext
    for p in model.parameters():
        p.requires_grad_(mode == "grad")

    def forward(x):
        with ctx():
            return model(x)

    def bounds(x):
        with ctx():
            return bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),),
                                     method="IBP")

    forward(batches[0]), bounds(batches[0])  # warm-up (allocator, lazy initialisation)
    m_fwd = peak_bytes(lambda: forward(batches[1]), device)
    m_ibp = peak_bytes(lambda: bounds(batches[1]), device)
    t_fwd, t_ibp, widths = [], [], []
    for x in batches[2:]:  # interleaved: both see the same machine load
        t_fwd.append(seconds(lambda: forward(x), device))
        t_ibp.append(seconds(lambda: bounds(x), device))
    lb, ub = bounds(batches[-1])  # (a cache hit at most: only for the reported width)
    return dict(t_fwd=min(t_fwd), t_ibp=min(t_ibp), m_fwd=m_fwd, m_ibp=m_ibp,
                med=statistics.median(t_ibp) / statistics.median(t_fwd), width=float((ub - lb).detach().mean()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls (each on a new batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--data", choices=("mnist", "random"), default="mnist")
    ap.add_argument("--models", default="fc,conv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [b.to(device) for b in input_batches(args.data, args.batch, args.repeats + 2, args.seed)]
    x = batches[0]
    print(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"data {args.data}, batch {x.shape[0]}, eps {args.eps}, repeats {args.repeats}")
    header = (f"{'model':5} {'options':9} {'mode':8} {'fwd ms':>9} {'IBP ms':>9} {'time x':>7} "
              f"{'fwd MiB':>8} {'IBP MiB':>8} {'mem x':>6} {'mean width':>11} {'median time x':>13}")
    print(header)
    print("-" * len(header))
    worst_t = worst_m = 0.0
    for kind in args.models.split(","):
        torch.manual_seed(args.seed)
        model = build(kind).to(device).eval()
        for label, opts in OPTION_ROWS:
            bm = BoundedModule(model, x, bound_opts=opts, device=device)
            for mode in ("no_grad", "grad"):
                r = measure(model, bm, batches, args.eps, mode, device)
                tr, mr = r["t_ibp"] / r["t_fwd"], r["m_ibp"] / max(r["m_fwd"], 1)
                worst_t, worst_m = max(worst_t, tr), max(worst_m, mr)
                print(f"{kind:5} {label:9} {mode:8} {1e3 * r['t_fwd']:9.1f} {1e3 * r['t_ibp']:9.1f} "
                      f"{tr:7.2f} {r['m_fwd'] / 2**20:8.1f} {r['m_ibp'] / 2**20:8.1f} {mr:6.2f} "
                      f"{r['width']:11.4g} {r['med']:13.2f}", flush=True)
    print(f"# worst ratios: time {worst_t:.2f}x (target <= 3), memory {worst_m:.2f}x (target <= 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
