#!/usr/bin/env python
"""Benchmark: bounds of DEQs inside deep networks at CIFAR-10 shapes, each DEQ model against its
explicit twin, same run, same options.

Pairs (lirpa_deq.models.architectures, random weights with random BatchNorm statistics, eval mode):
    deq3 / cnn3 (default width 128) and deq7 / cnn7 (default width 64): the papers' sizes.
Input 3x32x32 (random images in [0, 1]), batch --batch, l_inf eps --eps (2/255), 9 margin
specifications, ``conv_mode='patches'`` (auto_LiRPA's default), --threads CPU threads.
Measured per model, each in a FRESH process (so peak memory is that of one measurement):
  * IBP, CROWN: wall-clock of one ``compute_bounds`` (no_grad);
  * CROWN-IBP step: one certified-training step (lirpa_deq.training.losses.certified_loss,
    'crown-ibp', kappa 0.5: forward, IBP + CROWN-IBP bounds, backward, SGD step), train mode;
  * peak resident memory of the process (ru_maxrss, includes ~0.3 GB of torch + auto_LiRPA).
A measurement that exceeds --timeout seconds is reported as such (its partial time is the limit);
each process's address space is capped at --max-memory-gb (an allocation beyond it fails, reported
as out of memory, instead of pushing a shared machine into swap).

    python benchmarks/bench_scale.py [--pairs deq7:cnn7:64 deq3:cnn3:128] [--batch 2]
        [--methods IBP CROWN CROWN-IBP-step] [--timeout 1500] [--threads 1] [--max-memory-gb 12]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

METHODS = ("IBP", "CROWN", "CROWN-IBP-step")


def measure(name, width, method, batch, eps, seed=0):
    """One measurement in this process: {'time': s, 'peak_gb': GB, 'lb_mean': mean margin bound}."""
    import torch

    import lirpa_deq  # noqa: F401
    from auto_LiRPA import BoundedModule, BoundedTensor
    from lirpa_deq.models import architectures
    from lirpa_deq.training.losses import certified_loss, margin_spec, perturbation

    torch.manual_seed(seed)
    model = getattr(architectures, name)(input_shape=(3, 32, 32), num_classes=10, width=width)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # random BN statistics: the BN layers are not identities
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    model.eval()
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if method == "CROWN-IBP-step":
        from lirpa_deq.training.losses import make_bounded

        bounded = make_bounded(model, x)
        bounded.train()
        opt = torch.optim.SGD(bounded.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        loss, stats = certified_loss(bounded, x, y, eps, "crown-ibp", kappa=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        elapsed, lb_mean = time.perf_counter() - t0, float(loss.detach())
    else:
        bounded = BoundedModule(model, x[:1], bound_opts={"conv_mode": "patches"})
        bx = BoundedTensor(x, perturbation(x, eps))
        t0 = time.perf_counter()
        with torch.no_grad():
            lb, _ = bounded.compute_bounds(x=(bx,), C=margin_spec(y, 10), method=method, bound_upper=False)
        elapsed, lb_mean = time.perf_counter() - t0, float(lb.mean())
    return {"time": elapsed, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "value": lb_mean}


def run_child(name, width, method, args):
    cmd = [sys.executable, __file__, "--one", name, str(width), method, "--batch", str(args.batch),
           "--eps", repr(args.eps), "--threads", str(args.threads), "--max-memory-gb", repr(args.max_memory_gb)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"time": time.perf_counter() - t0, "peak_gb": math.nan, "value": math.nan, "status": "timeout"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        oom = "MemoryError" in out.stderr or "not enough memory" in out.stderr or "alloc" in last.lower()
        status = f"out of memory (> {args.max_memory_gb:g} GB)" if oom else "failed: " + last[:120]
        return {"time": time.perf_counter() - t0, "peak_gb": math.nan, "value": math.nan, "status": status}
    return dict(json.loads(lines[-1]), status="ok")


def fmt(r):
    if r["status"] == "timeout":
        return f">{r['time']:7.1f} s (timeout)"
    if r["status"] != "ok":
        return r["status"]
    return f"{r['time']:7.2f} s {r['peak_gb']:5.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["deq7:cnn7:64", "deq3:cnn3:128"],
                        help="DEQ:EXPLICIT:WIDTH triples")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--eps", type=float, default=2 / 255)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-memory-gb", type=float, default=12.0, help="address-space cap per measurement")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "WIDTH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        cap = int(args.max_memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        name, width, method = args.one
        print(json.dumps(measure(name, int(width), method, args.batch, args.eps)))
        return
    print(f"batch {args.batch}, eps {args.eps:.5f}, 3x32x32, 9 margins, conv_mode patches, "
          f"{args.threads} thread(s), timeout {args.timeout:.0f} s and {args.max_memory_gb:g} GB per measurement")
    print(f"{'pair':>16} | {'method':>14} | {'DEQ model':>24} | {'explicit twin':>24} | time x | memory x")
    for pair in args.pairs:
        deq_name, explicit_name, width = pair.split(":")
        for method in args.methods:
            d = run_child(deq_name, int(width), method, args)
            e = run_child(explicit_name, int(width), method, args)
            ratio_t = d["time"] / e["time"] if e["status"] == "ok" else math.nan
            ratio_m = d["peak_gb"] / e["peak_gb"] if e["status"] == "ok" else math.nan
            print(f"{deq_name + '/' + explicit_name + ' w' + width:>16} | {method:>14} | {fmt(d):>24} | "
                  f"{fmt(e):>24} | {ratio_t:6.2f} | {ratio_m:6.2f}", flush=True)


if __name__ == "__main__":
    main()
