"""Output of ``certify`` / ``demo``: the text table, JSON lines / JSON files and the PNG plot.

The summary dict (built by ``certify_cmd.evaluate``) is JSON-serialisable; its lists are aligned
with ``summary["eps"]``. See ``docs/cli.md`` for the field list. Files are written atomically
(``training.checkpoint.atomic_write``: a temporary file in the same directory, then ``os.replace``),
so an interrupted run never leaves a truncated JSON / PNG behind.
"""
from __future__ import annotations

import io
import json
import math
import sys

from ..training.checkpoint import atomic_write

LABELS = {"ibp": "IBP", "crown": "CROWN (with IBP)", "lipschitz": "Lipschitz",
          "smoothing": "smoothing"}


def _pct(v):
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def format_table(summary: dict) -> str:
    """One table: rows = clean / PGD / each method, columns = eps values, then seconds per image.
    Methods run on a subset get two reference rows (PGD and IBP on the same images)."""
    eps = summary["eps"]
    name_w = 44
    head = f"{'l_inf, ' + str(summary['num_images']) + ' images':<{name_w}}" + "".join(
        f"{'eps=' + format(e, 'g'):>9}" for e in eps) + f"{'s/image':>10}"
    lines = [head, "-" * len(head)]

    def row(name, values, seconds=None):
        cells = "".join(f"{_pct(v):>9}" for v in values)
        return f"{name[:name_w - 1]:<{name_w}}{cells}" + ("" if seconds is None else f"{seconds:>10.4f}")

    lines.append(f"{'clean accuracy':<{name_w}}{_pct(summary['clean_accuracy']):>9}")
    if summary.get("pgd_accuracy") is not None:
        lines.append(row("PGD accuracy (upper bound)", summary["pgd_accuracy"], summary["pgd_seconds_per_image"]))
    for name, res in summary["methods"].items():
        label = "certified " + LABELS.get(name, name)
        if not res.get("available", True):
            lines.append(f"{label:<{name_w}}n/a: {res['reason']}")
            continue
        notes = [f"{res['num_images']} img"] if res["num_images"] < summary["num_images"] else []
        if res.get("failed"):
            notes.append(f"{res['failed']} failed")
        if name == "smoothing":
            label = "certified smoothing*"
        if notes:
            label += f" ({', '.join(notes)})"
        lines.append(row(label, res["linf_certified_accuracy"], res["seconds_per_image"]))
        ref = res.get("subset_reference") or {}
        if ref.get("pgd_accuracy") is not None:
            lines.append(row(f"  same {res['num_images']} img: PGD accuracy", ref["pgd_accuracy"]))
        if ref.get("ibp_certified_accuracy") is not None:
            lines.append(row(f"  same {res['num_images']} img: IBP certified", ref["ibp_certified_accuracy"]))
    sm = summary["methods"].get("smoothing")
    if sm and sm.get("available", True):
        radii = ", ".join(f"r={r:g}: {100 * a:.1f}%" for r, a in zip(sm["radii"], sm["l2_certified_accuracy"]))
        lines.append(f"* smoothed classifier (sigma={sm['sigma']:g}, n={sm['n']}, alpha={sm['alpha']:g}"
                     f"{', SRS steps=' + str(sm['srs_steps']) if sm['srs_steps'] else ''}): probabilistic; "
                     f"l2 certified accuracy {radii};\n  an l2 radius r counts at l_inf eps when r > eps*sqrt(d)")
    failed = {m: r.get("first_error") for m, r in summary["methods"].items() if r.get("failed")}
    for m, err in failed.items():
        lines.append(f"{m}: failed bound computations count as not certified; first error: {err[:160]}")
    bad = {m: c for m, c in summary.get("certified_but_attacked", {}).items() if c}
    if bad:
        lines.append(f"WARNING: certified points broken by PGD (a soundness bug): {bad}")
    return "\n".join(lines)


def write_json_lines(path, records, summary):
    """Per-sample records then ``{"summary": summary}``, one JSON object per line; '-' = stdout,
    else written atomically to ``path``."""

    def write(out):
        for r in records:
            out.write(json.dumps(r) + "\n")
        out.write(json.dumps({"summary": summary}) + "\n")

    if path == "-":
        write(sys.stdout)
    else:
        atomic_write(path, write, mode="w")


def write_json(path, obj):
    """``obj`` as indented JSON, written atomically to ``path``."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def plot(summary: dict, path: str, title: str = "") -> str:
    """Certified accuracy vs eps, one line per method plus PGD (Agg backend); returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = summary["eps"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if summary.get("pgd_accuracy") is not None:
        ax.plot(eps, [100 * v for v in summary["pgd_accuracy"]], "k--o", label="PGD accuracy (upper bound)")
    for i, (name, res) in enumerate(summary["methods"].items()):
        if not res.get("available", True):
            continue
        label = LABELS.get(name, name) + (f" ({res['num_images']} img, l2->l_inf)" if name == "smoothing" else
                                          f" ({res['num_images']} img)" if res["num_images"] != summary["num_images"] else "")
        ax.plot(eps, [100 * v for v in res["linf_certified_accuracy"]], marker="os^v"[i % 4],
                linestyle=["-", ":", "-.", "-"][i % 4], markersize=[8, 5, 6, 6][i % 4], label=label)
    ax.set_xlabel("l_inf eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"certified accuracy, {summary.get('dataset', '')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def finite(v):
    """JSON-safe float (NaN/inf -> None)."""
    return None if v is None or not math.isfinite(v) else float(v)
