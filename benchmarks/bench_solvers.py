"""Solver benchmark: iterations and wall time per batch for every solver on MNIST-sized cells.

Not a test. Cells: fc (hidden 128, injection from a random Linear 784->128) and conv
(32 channels, 28x28, injection from a random 3x3 Conv2d 1->32), each in the three
parameterisations, on random inputs shaped and scaled like normalised MNIST (mostly-zero
images with values in [0, 1], then (x - 0.1307) / 0.3081).

    .venv/bin/python benchmarks/bench_solvers.py [--tol 1e-4] [--max-iter 200] [--batch 128]
        [--backward] [--only fc|conv] [--solvers a,b] [--threads N] [--device cpu|cuda]
        [--dtype float32|float64] [--scrambled]

Prints a Markdown table: forward iterations, final max relative residual, converged flag, and
median wall time of the forward solve (and, with --backward, of the implicit backward pass).

--scrambled (issue #14): the monotone cells only, with every raw parameter set to
``param + 2 randn`` (``||I - W|| ~ 1e3`` at ``m = 0.5``), and two extra rows per cell: ``default``
(``DEQ(cell)`` as built without solver / max_iter: Peaceman-Rachford, max_iter 200) and
``old default`` (Anderson, max_iter 50, the default before #14). Use float64 for fc: the float32
rounding floor of the residual at the exact fixed point is ~1.5e-4 > tol at n = 128.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, MonConv2d, MonLinear, OrthoConv2d, OrthoLinear
from lirpa_deq.solvers import SOLVERS


def mnist_like(batch, gen, device, dtype):
    x = torch.rand(batch, 1, 28, 28, generator=gen) * (torch.rand(batch, 1, 28, 28, generator=gen) > 0.8)
    return ((x - 0.1307) / 0.3081).to(device=device, dtype=dtype)


def injections(kind, batch, device, dtype):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = mnist_like(batch, gen, device, dtype)
    if kind == "fc":
        inj = nn.Sequential(nn.Flatten(), nn.Linear(784, 128)).to(device=device, dtype=dtype)
    else:
        inj = nn.Conv2d(1, 32, 3, padding=1).to(device=device, dtype=dtype)
    with torch.no_grad():
        return inj(x)


def cells(kind, device, dtype):
    torch.manual_seed(1)
    fk = dict(device=device, dtype=dtype)
    if kind == "fc":
        return [("MonLinear(m=0.5)", MonLinear(128, **fk)), ("IBPMonLinear(m=0.5)", IBPMonLinear(128, **fk)),
                ("OrthoLinear(margin=0.1)", OrthoLinear(128, **fk))]
    return [("MonConv2d(m=0.5)", MonConv2d(32, **fk)), ("IBPMonConv2d(m=0.5)", IBPMonConv2d(32, **fk)),
            ("OrthoConv2d(margin=0.1)", OrthoConv2d(32, **fk))]


def scramble(cell, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(2 * torch.randn(p.shape, generator=g).to(p))
    return cell


def monotone_cells(kind, device, dtype):
    torch.manual_seed(1)
    fk = dict(device=device, dtype=dtype)
    cell = MonLinear(128, **fk) if kind == "fc" else MonConv2d(32, **fk)
    name = "MonLinear(m=0.5)" if kind == "fc" else "MonConv2d(m=0.5)"
    return [(name + " scrambled", scramble(cell))]


ROW_KW = {"default": {}, "old default": dict(solver="anderson", max_iter=50)}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_one(cell, solver, u, args):
    kw = ROW_KW.get(solver, dict(solver=solver, max_iter=args.max_iter))
    deq = DEQ(cell, tol=args.tol, on_nonconvergence="ignore", **kw)
    fwd, bwd = [], []
    for rep in range(args.repeats + 1):  # first run is a warm-up
        sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            deq(u)
        sync(args.device)
        t1 = time.perf_counter()
        stats = deq.last_stats
        if args.backward:
            uu = u.clone().requires_grad_()
            z = deq(uu)
            sync(args.device)
            t2 = time.perf_counter()
            z.square().sum().backward()
            sync(args.device)
            bwd.append((time.perf_counter() - t2, deq.last_backward_stats))
        if rep:
            fwd.append(t1 - t0)
    row = dict(iters=stats.iterations, res=stats.residual, conv=stats.converged,
               t=statistics.median(fwd))
    if args.backward:
        row["b_iters"] = bwd[-1][1].iterations
        row["b_conv"] = bwd[-1][1].converged
        row["bt"] = statistics.median(b[0] for b in bwd[1:] or bwd)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--only", choices=["fc", "conv"])
    ap.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--scrambled", action="store_true", help="scrambled monotone cells (issue #14)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, batch {args.batch}, tol {args.tol:g}, max_iter {args.max_iter}")
    head = "| cell | solver | iters | residual | conv | fwd time (s) |"
    sep = "|---|---|---:|---:|:-:|---:|"
    if args.backward:
        head += " bwd iters | bwd time (s) |"
        sep += "---:|---:|"
    print(head)
    print(sep, flush=True)
    for kind in ("fc", "conv"):
        if args.only and kind != args.only:
            continue
        u = injections(kind, args.batch, args.device, dtype)
        make = monotone_cells if args.scrambled else cells
        names = args.solvers.split(",") + (list(ROW_KW) if args.scrambled else [])
        for cname, cell in make(kind, args.device, dtype):
            for solver in names:
                r = bench_one(cell, solver, u, args)
                line = (f"| {cname} | {solver} | {r['iters']} | {r['res']:.1e} | "
                        f"{'yes' if r['conv'] else 'NO'} | {r['t']:.3f} |")
                if args.backward:
                    line += f" {r['b_iters']}{'' if r['b_conv'] else ' (NO)'} | {r['bt']:.3f} |"
                print(line, flush=True)


if __name__ == "__main__":
    main()
