"""From the results of every block (``blocks.py``) to the summary and the per-image records.

A pure function of the blocks: the same blocks give the same summary and records whichever
processes computed them (the seconds are the sums of the blocks' timings). Field list:
``docs/cli.md``.
"""
from __future__ import annotations

import torch

from . import methods as M
from .blocks import Plan, spread


def _concat(blocks, key):
    return [v for blk in blocks for v in blk[key]]


def _per_eps(parts, num_eps):
    """[[per image of block 0], ...] per eps for each block -> per eps over all images."""
    return [[v for part in parts for v in part[k]] for k in range(num_eps)]


def check_complete(plan: Plan, blocks) -> list:
    """The blocks sorted by number; ValueError unless each of 0 .. num_blocks - 1 is there once."""
    got = sorted(int(b["block"]) for b in blocks)
    if got != list(range(plan.num_blocks)):
        missing = sorted(set(range(plan.num_blocks)) - set(got))
        extra = sorted({b for b in got if got.count(b) > 1})
        raise ValueError(f"the certification results are incomplete: {plan.num_blocks} blocks expected"
                         + (f", missing {missing[:10]}" if missing else "")
                         + (f", duplicated {extra[:10]}" if extra else "")
                         + ": merge one results file of every shard K/N (K = 0 .. N - 1), each once")
    return sorted(blocks, key=lambda b: int(b["block"]))


def summarize(plan: Plan, blocks, dataset="") -> tuple:
    """(summary, records) of a run from its blocks (all of them; see :func:`check_complete`)."""
    blocks = check_complete(plan, blocks)
    N, eps, K = plan.num_images, [float(e) for e in plan.eps], len(plan.eps)
    labels, pred, indices = _concat(blocks, "label"), _concat(blocks, "prediction"), _concat(blocks, "index")
    y, p = torch.tensor(labels, dtype=torch.long), torch.tensor(pred, dtype=torch.long)
    summary = {"dataset": dataset, "num_images": N, "eps": eps, "clean_accuracy": float((p == y).float().mean()),
               "methods": {}, "certified_but_attacked": {}}
    pgd = None
    if plan.pgd_steps > 0:
        pgd = [torch.tensor(v, dtype=torch.bool) for v in _per_eps([b["pgd"] for b in blocks], K)]
        summary["pgd_accuracy"] = [float(v.float().mean()) for v in pgd]
        summary["pgd_seconds_per_image"] = sum(b["pgd_seconds"] for b in blocks) / max(1, N * K)
        summary["pgd"] = {"steps": plan.pgd_steps, "restarts": plan.pgd_restarts}
    results = {}
    for m in plan.methods:
        if m == "smoothing":
            continue
        if m not in plan.bound_methods():
            summary["methods"][m] = {"available": False, "reason": M.lipschitz_status()[1]}
            continue
        parts = [b["bounds"][m] for b in blocks]
        cert = [torch.tensor(v, dtype=torch.bool) for v in _per_eps([q["certified"] for q in parts], K)]
        margin = _per_eps([q["margin"] for q in parts], K)
        in_subset = torch.tensor(_concat(parts, "in_subset"), dtype=torch.bool)
        results[m] = (cert, margin, in_subset)
        errors = [e for q in parts for e in q["errors"]]
        seconds, n_eval, n_sel = sum(q["seconds"] for q in parts), sum(q["evaluated"] for q in parts), int(in_subset.sum())
        summary["methods"][m] = {
            "num_images": n_sel, "failed": len(errors), "first_error": errors[0] if errors else None,
            "linf_certified_accuracy": [float(c[in_subset].float().mean()) for c in cert],
            "seconds_per_image": seconds / max(1, n_sel * K), "evaluated": n_eval,
            "seconds_per_evaluated_image": seconds / max(1, n_eval)}
        if pgd is not None:
            summary["certified_but_attacked"][m] = int(sum(int((c & ~q).sum()) for c, q in zip(cert, pgd)))
    records = []
    for k, e in enumerate(eps):
        for i in range(N):
            cert, margin = {}, {}
            for m, (c, mg, sub) in results.items():
                if sub[i]:
                    cert[m] = bool(c[k][i])
                    margin[m] = mg[k][i]
            records.append({"index": indices[i], "label": labels[i], "prediction": pred[i], "eps": e,
                            "pgd_robust": None if pgd is None else bool(pgd[k][i]),
                            "certified_by": next((m for m in cert if cert[m]), None), "certified": cert,
                            "margin_lower": margin})
    records += _smoothing(plan, blocks, summary, indices, labels)
    ibp = None
    if all(b["ibp"] is not None for b in blocks):
        ibp = [torch.tensor(v, dtype=torch.bool) for v in _per_eps([b["ibp"] for b in blocks], K)]
    for res in summary["methods"].values():  # PGD / IBP on the same images as a subset method
        if res.get("available", True) and res["num_images"] < N:
            sel = spread(N, res["num_images"])
            ref = res["subset_reference"] = {}
            if pgd is not None:
                ref["pgd_accuracy"] = [float(q[sel].float().mean()) for q in pgd]
            if ibp is not None:
                ref["ibp_certified_accuracy"] = [float(c[sel].float().mean()) for c in ibp]
    return summary, records


def _smoothing(plan, blocks, summary, indices, labels) -> list:
    pos = plan.smoothing_positions()
    if pos is None:
        return []
    parts = [b["smoothing"] for b in blocks]
    position = _concat(parts, "position")
    o, num = plan.smoothing, len(position)
    r = {"prediction": torch.tensor(_concat(parts, "prediction"), dtype=torch.long),
         "radius": torch.tensor(_concat(parts, "radius"), dtype=torch.float32)}
    ys = torch.tensor([labels[j] for j in position], dtype=torch.long)
    radii = [float(v) for v in o["radii"]]
    acc = M.smoothing_accuracy(r, ys, radii)
    summary["methods"]["smoothing"] = {
        "num_images": num, "sigma": o["sigma"], "n": o["n"], "n0": o["n0"], "alpha": o["alpha"],
        "srs_steps": o.get("srs_steps", 0), "radii": radii, "l2_certified_accuracy": [acc[v] for v in radii],
        "linf_certified_accuracy": [float(M.smoothing_linf(r, ys, e, plan.input_dim).float().mean())
                                    for e in plan.eps],
        "seconds_per_image": sum(q["seconds"] for q in parts) / max(1, num)}
    return [{"index": indices[j], "label": labels[j], "method": "smoothing", "sigma": o["sigma"],
             "smoothed_prediction": int(r["prediction"][i]), "radius": float(r["radius"][i])}
            for i, j in enumerate(position)]


def log_lines(summary) -> list:
    """The lines ``certify`` / ``demo`` print before the table (timings included)."""
    lines = [f"clean accuracy {100 * summary['clean_accuracy']:.1f}% on {summary['num_images']} images"]
    eps = summary["eps"]
    if summary.get("pgd_accuracy") is not None:
        lines.append("PGD accuracy " + ", ".join(f"eps={e:g}: {100 * a:.1f}%"
                                                 for e, a in zip(eps, summary["pgd_accuracy"])))
    for m, res in summary["methods"].items():
        if not res.get("available", True):
            lines.append(f"{m}: n/a ({res['reason']})")
        elif m == "smoothing":
            lines.append("smoothing: " + ", ".join(f"r={v:g}: {100 * a:.1f}%" for v, a in
                                                   zip(res["radii"], res["l2_certified_accuracy"]))
                         + f" ({res['seconds_per_image']:.3f} s/image, {res['num_images']} images)")
        else:
            n, seconds = res["num_images"], res["seconds_per_image"] * res["num_images"] * len(eps)
            lines.append(f"{m}: " + ", ".join(f"eps={e:g}: {100 * a:.1f}%" for e, a in
                                              zip(eps, res["linf_certified_accuracy"]))
                         + f" on {n} images ({seconds:.1f}s; ran on {res['evaluated']} of {n * len(eps)} (image, eps) "
                         "pairs)" + (f"; {res['failed']} bound computation(s) FAILED and count as not certified: "
                                     f"{res['first_error']}" if res["failed"] else ""))
    return lines
