"""``lirpa-deq certify``: certify a trained checkpoint on a dataset split with several methods.

:func:`evaluate` is shared with ``demo``: clean accuracy, PGD accuracy, every requested method at
every eps, per-sample records and a JSON-serialisable summary. Any point that is certified but
broken by PGD is counted in ``summary['certified_but_attacked']`` (must be 0: a soundness check).

Before any work: every eps is a finite real >= 0, the methods are known and available, x / y are
a finite batch of the model's dtype inside [0, 1] with labels (N,) in [0, num_classes), the
smoothing sample sizes satisfy n >= n0, and ``--json PATH`` is writable (``lirpa_deq.validate``);
the JSON is written atomically.
"""
from __future__ import annotations

import time

import torch

from ..data import dataset_info, get_dataset
from ..training import load_checkpoint, make_bounded, model_from_checkpoint, pgd_robust, predict
from ..validate import (check_eps, check_finite_params, check_labels, check_sample_sizes, check_x,
                        check_writable_file)
from . import methods as M
from .report import finite, format_table, write_json_lines


def evaluate(model, x, y, eps_list, methods, num_classes=10, batch_size=250, pgd_steps=20, pgd_restarts=1,
             smoothing=None, indices=None, log=print, dataset="", all_points=False, subsets=None, progress=False):
    """Run everything; returns (summary, records).

    x (N, *input_shape) finite, in [0, 1], of the model's dtype; y (N,) labels in [0, num_classes);
    eps_list finite reals >= 0 (all validated first: ValueError); methods: subset of ``methods.METHODS`` (an unavailable
    'lipschitz' is reported as n/a instead of failing). smoothing: dict(sigma, n, n0, alpha,
    srs_steps, radii, num, batch_size) used when 'smoothing' is in methods. subsets: optional
    {method: number of images} to run a (slow) bound method on evenly spaced images only; its
    certified accuracy is then over those images (``summary['methods'][m]['num_images']``).

    Unless ``all_points``, CROWN runs only on points IBP did not certify and PGD did not break,
    and Lipschitz only on points PGD did not break: the certified sets are the same (a broken point
    cannot be certified soundly; CROWN is intersected with IBP), only the cost differs. Skipped
    points get the IBP margin (CROWN) or NaN (Lipschitz). ``summary['methods'][m]['evaluated']``
    counts the (image, eps) pairs a method actually ran on. ``progress``: tqdm bars for the PGD
    pass (shown only on a TTY)."""
    eps_list = [check_eps(e, "eps") for e in eps_list]
    M.check_available(methods)
    if smoothing and "smoothing" in methods:
        check_sample_sizes(smoothing["n0"], smoothing["n"])
    model.eval()
    check_finite_params(model)
    x = check_x(x, model, clip=(0.0, 1.0))
    y = check_labels(y, len(x), num_classes, x.device)
    indices = list(range(len(x))) if indices is None else list(indices)
    t0 = time.time()
    pred = predict(model, x)
    summary = {"dataset": dataset, "num_images": len(x), "eps": [float(e) for e in eps_list],
               "clean_accuracy": float((pred == y).float().mean()), "methods": {}, "certified_but_attacked": {}}
    log(f"clean accuracy {100 * summary['clean_accuracy']:.1f}% on {len(x)} images ({time.time() - t0:.1f}s)")
    pgd = None
    if pgd_steps > 0:
        t0 = time.time()
        pgd = [pgd_robust(model, x, y, e, steps=pgd_steps, restarts=pgd_restarts, progress=progress).cpu()
               for e in eps_list]
        summary["pgd_accuracy"] = [float(p.float().mean()) for p in pgd]
        summary["pgd_seconds_per_image"] = (time.time() - t0) / max(1, len(x) * len(eps_list))
        summary["pgd"] = {"steps": pgd_steps, "restarts": pgd_restarts}
        log("PGD accuracy " + ", ".join(f"eps={e:g}: {100 * a:.1f}%" for e, a in zip(eps_list, summary["pgd_accuracy"])))
    runner = _BoundRunner(model, x, y, eps_list, pgd, num_classes, batch_size, all_points)
    results = {}
    for m in methods:
        if m == "smoothing":
            continue
        if m == "lipschitz" and not M.lipschitz_status()[0]:
            summary["methods"][m] = {"available": False, "reason": M.lipschitz_status()[1]}
            log(f"lipschitz: n/a ({M.lipschitz_status()[1]})")
            continue
        sel = spread(len(x), (subsets or {}).get(m) or len(x))
        per_eps, seconds, n_eval = runner.run(m, sel)
        results[m] = (sel, per_eps)
        errors = [e for r in per_eps for e in r.get("errors", [])]
        res = summary["methods"][m] = {
            "num_images": len(sel), "failed": len(errors), "first_error": errors[0] if errors else None,
            "linf_certified_accuracy": [float(r["certified"][sel].float().mean()) for r in per_eps],
            "seconds_per_image": seconds / max(1, len(sel) * len(eps_list)),
            "evaluated": n_eval, "seconds_per_evaluated_image": seconds / max(1, n_eval)}
        if pgd is not None:
            summary["certified_but_attacked"][m] = int(sum(int((r["certified"] & ~p).sum()) for r, p in zip(per_eps, pgd)))
        log(f"{m}: " + ", ".join(f"eps={e:g}: {100 * a:.1f}%" for e, a in zip(eps_list, res["linf_certified_accuracy"]))
            + f" on {len(sel)} images ({seconds:.1f}s; ran on {n_eval} of {len(sel) * len(eps_list)} (image, eps) pairs)"
            + (f"; {len(errors)} bound computation(s) FAILED and count as not certified: {errors[0]}" if errors else ""))
    records = []
    for k, e in enumerate(eps_list):
        for i in range(len(x)):
            cert, margin = {}, {}
            for m, (sel, per_eps) in results.items():
                if per_eps[k]["in_subset"][i]:
                    cert[m] = bool(per_eps[k]["certified"][i])
                    margin[m] = finite(float(per_eps[k]["margin"][i]))
            records.append({"index": indices[i], "label": int(y[i]), "prediction": int(pred[i]), "eps": float(e),
                            "pgd_robust": None if pgd is None else bool(pgd[k][i]),
                            "certified_by": next((m for m in cert if cert[m]), None), "certified": cert,
                            "margin_lower": margin})
    if "smoothing" in methods and smoothing:
        records += _smoothing(model, x, y, eps_list, smoothing, num_classes, x[0].numel(), indices, summary, log)
    for res in summary["methods"].values():  # PGD / IBP on the same images as a subset method
        if res.get("available", True) and res["num_images"] < len(x):
            sel = spread(len(x), res["num_images"])
            ref = res["subset_reference"] = {}
            if pgd is not None:
                ref["pgd_accuracy"] = [float(p[sel].float().mean()) for p in pgd]
            if runner.ibp:
                ref["ibp_certified_accuracy"] = [float(runner.ibp[k]["certified"][sel].float().mean())
                                                 for k in range(len(eps_list))] if len(runner.ibp) == len(eps_list) else None
    return summary, records


class _BoundRunner:
    """Runs the bound methods with the skipping rules of :func:`evaluate` (IBP results cached)."""

    def __init__(self, model, x, y, eps_list, pgd, num_classes, batch_size, all_points):
        self.model, self.x, self.y, self.eps_list, self.pgd = model, x, y, eps_list, pgd
        self.kw = dict(num_classes=num_classes, batch_size=batch_size)
        self.all_points, self.bounded, self.ibp = all_points, None, {}

    def _certify(self, idx, k, method):
        if self.bounded is None:
            self.bounded = make_bounded(self.model, self.x[:1])
        return M.certify_linf(self.model, self.x[idx], self.y[idx], self.eps_list[k], method, bounded=self.bounded,
                              **self.kw)

    def ibp_at(self, k):
        if k not in self.ibp:
            self.ibp[k] = self._certify(torch.arange(len(self.x)), k, "ibp")
        return self.ibp[k]

    def run(self, method, sel):
        """Per eps: dict(certified (N,), margin (N,), in_subset (N,), seconds); plus total seconds
        and the number of (image, eps) pairs evaluated."""
        N = len(self.x)
        in_subset = torch.zeros(N, dtype=torch.bool)
        in_subset[sel] = True
        per_eps, seconds, n_eval = [], 0.0, 0
        for k in range(len(self.eps_list)):
            if method == "ibp" and len(sel) == N:
                r = dict(self.ibp_at(k))
                n_eval += N
            else:
                todo = in_subset.clone()
                r = {"certified": torch.zeros(N, dtype=torch.bool), "margin": torch.full((N,), float("nan")),
                     "seconds": 0.0}
                if not self.all_points and method != "ibp":
                    if self.pgd is not None:
                        todo &= self.pgd[k]
                    if method == "crown":  # CROWN is intersected with IBP: its pass is part of the cost
                        base = self.ibp_at(k)
                        todo &= ~base["certified"]
                        r["certified"][sel] = base["certified"][sel]
                        r["margin"][sel] = base["margin"][sel]
                        r["seconds"] = base["seconds"] * len(sel) / N
                idx = todo.nonzero().flatten()
                if len(idx):
                    sub = self._certify(idx, k, method)
                    r["certified"][idx], r["margin"][idx] = sub["certified"], sub["margin"]
                    r["seconds"] += sub["seconds"]
                    r["errors"] = sub.get("errors", [])
                n_eval += len(idx)
            r["in_subset"] = in_subset
            per_eps.append(r)
            seconds += r["seconds"]
        return per_eps, seconds, n_eval


def _smoothing(model, x, y, eps_list, opts, num_classes, dim, indices, summary, log):
    num = min(int(opts.get("num") or len(x)), len(x))
    sel = spread(len(x), num)  # evenly spaced: the embedded splits are ordered by class
    xs, ys = x[sel], y[sel]
    r = M.certify_smoothing(model, xs, ys, sigma=opts["sigma"], n=opts["n"], n0=opts["n0"], alpha=opts["alpha"],
                            srs_steps=opts.get("srs_steps", 0), batch_size=opts.get("batch_size", 500),
                            num_classes=num_classes, progress=opts.get("progress", False))
    radii = [float(v) for v in opts["radii"]]
    acc = M.smoothing_accuracy(r, ys, radii)
    summary["methods"]["smoothing"] = {
        "num_images": num, "sigma": opts["sigma"], "n": opts["n"], "n0": opts["n0"], "alpha": opts["alpha"],
        "srs_steps": opts.get("srs_steps", 0), "radii": radii, "l2_certified_accuracy": [acc[v] for v in radii],
        "linf_certified_accuracy": [float(M.smoothing_linf(r, ys, e, dim).float().mean()) for e in eps_list],
        "seconds_per_image": r["seconds"] / max(1, num)}
    log("smoothing: " + ", ".join(f"r={v:g}: {100 * acc[v]:.1f}%" for v in radii)
        + f" ({summary['methods']['smoothing']['seconds_per_image']:.3f} s/image, {num} images)")
    return [{"index": indices[int(j)], "label": int(ys[i]), "method": "smoothing", "sigma": opts["sigma"],
             "smoothed_prediction": int(r["prediction"][i]), "radius": float(r["radius"][i])}
            for i, j in enumerate(sel)]


def spread(total, num):
    """``num`` evenly spaced indices in range(total) (LongTensor), all of them when num >= total."""
    if num >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, num).round().long()


def run_certify(args, log=print):
    """The ``certify`` subcommand (args from ``main.build_parser``). Returns the exit code."""
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
                 "radii": args.radii, "num": args.smoothing_num, "batch_size": args.smoothing_batch,
                 "progress": not args.no_progress}
    summary, records = evaluate(model, x, y, args.eps, methods, num_classes=data["model"]["num_classes"],
                                batch_size=args.batch_size, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
                                smoothing=smoothing, indices=sel.tolist(), log=log, dataset=dataset,
                                all_points=args.all_points, subsets=subsets, progress=not args.no_progress)
    summary.update(checkpoint=str(args.checkpoint), split=args.split, model=data["model"])
    table = format_table(summary)
    if args.json == "-":
        import sys

        print(table, file=sys.stderr)
    else:
        print(table)
    if args.json:
        write_json_lines(args.json, records, summary)
    return 1 if any(summary["certified_but_attacked"].values()) else 0
