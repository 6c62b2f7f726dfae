#!/usr/bin/env python
"""Generate docs/api.md, the API reference of lirpa_deq's public surface, from the code.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date (tests/test_api_docs.py)

For every module in MODULES it lists the names of ``__all__`` (or, without ``__all__``, the public
names defined in the module): the signature (``inspect.signature``, annotations dropped), the
first paragraph of the docstring and, for classes, their public methods and properties. Constants
(which have no docstrings) are described in CONSTANTS. The hand-written part is only the short
overview of each module (NOTES: shapes, what is guaranteed, errors) and CONSTANTS; everything else
comes from the code, so regenerate after changing a public signature or docstring.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"

#: (module, one-line title, hand-written overview: shapes / guarantee / errors / where to read more)
MODULES = [
    ("lirpa_deq", "package", """
`import lirpa_deq` first: it applies the auto_LiRPA / torch version bridge (`lirpa_deq._compat`)
and registers the DEQ operator, so `BoundedModule(model, x)` accepts models containing
`lirpa_deq.nn.DEQ` layers. The names below are re-exports."""),
    ("lirpa_deq.nn", "DEQ layers and cells", """
**Shapes.** A DEQ layer maps an injection `u` to its fixed point `z*` of the same shape: `(B, n)` for
fc cells, `(B, C, H, W)` for conv cells; a generic cell `cell(z, x)` has the state shape
`cell.state_shape(x_shape)` (x's shape by default). **Guarantee.** Each ReLU-affine cell's
parameterisation PROVES its structural property for any raw parameter values (`cell.guarantee`:
'monotone', 'interval-monotone' or 'contraction'; `cell.check()` verifies it numerically), hence a
unique fixed point; generic cells need a proved contraction in z (computed, or
`declare_contraction`). The forward output is a solver result (tolerance `tol`), not exact.
**Errors.** `ValueError` for bad solver names / options / shapes, `TypeError` for non-modules,
`DEQConvergenceWarning` / `DEQConvergenceError` when a solve misses `tol`, `ContractionError` when a
generic cell's contraction cannot be proved. See `docs/layers.md`, `docs/generic.md`."""),
    ("lirpa_deq.solvers", "fixed-point solvers", """
All solvers: `solve(f, z0, *, tol, max_iter, **opts) -> (z, SolverStats)` on batched states
`(B, ...)`; the residual is per sample `||f(z) - z|| / (||z|| + 1e-8)`; the returned `z` is per
sample the lowest-residual iterate. No guarantee of convergence except where stated (splitting
solvers on monotone cells). Unknown names / options: `ValueError`. See `docs/layers.md`."""),
    ("lirpa_deq.bounds", "auto_LiRPA node and bounds of the DEQ", """
One `BoundDEQ` node per DEQ layer inside `BoundedModule`. **Guarantee (sound).** IBP: the interval
fixed point is PROVED (post-fixpoint check with rounding slack), so the true fixed point of every
admissible input lies in the box; CROWN: the adjoint-DEQ linear bound is sound for any adjoint
vector. Options via `BoundedModule(..., bound_opts={'deq': {...}})` (`IntervalOptions`).
**Errors.** `IntervalProofError` when no box can be proved and `fallback=False`;
`NotImplementedError` for perturbed cell weights; `ValueError` for unknown options. See
`docs/ibp.md`, `docs/crown.md`."""),
    ("lirpa_deq.bounds.generic", "bounds through generic cells", """
A generic cell `cell(z, x)` is bounded through a nested auto_LiRPA `BoundedModule` of the cell over
(z, x) (`CellBounder`). **Guarantee (sound)**, given the cell's contraction constant L < 1 in z
(l2): computed by `graph_lipschitz` (sound upper bound), or declared (`declare_contraction`,
sample-checked, then trusted). IBP: a proved post-fixpoint box or the contraction-ball box; CROWN:
the adjoint bound over that box. **Errors.** `ContractionError` (no proved contraction, an op
without a Lipschitz rule, a declared constant violated); `ValueError` for BatchNorm or
parametrizations in training mode. See `docs/generic.md`."""),
    ("lirpa_deq.lipschitz", "Lipschitz bounds and certificates", """
**Shapes.** `x` (B, *input_shape) float32/float64; `C` (B, K, num_classes); results (B, K).
**Guarantee (sound).** Every returned bound is >= the true supremum of the dual gradient norm over
the closed ball, for the model in exact arithmetic on its stored parameters (DEQ fixed points are
enclosed by proofs, never taken from a solver). **Errors.** `ValueError` for bad eps / x / C /
labels / norm / method / unsupported layers; `LipschitzFallbackWarning` when rows fall back to a
looser bound (`on_fallback='raise'`: `RuntimeError`). See `docs/lipschitz.md`."""),
    ("lirpa_deq.smoothing", "randomized smoothing", """
**Shapes.** `x` is ONE input without batch dimension; the model maps `(B, *input_shape)` to
`(B, num_classes)`. **Guarantee (probabilistic).** With probability >= 1 - alpha (over the noise
and, for SRS, the audit positions), a returned `(class, radius)` is correct for the SMOOTHED
classifier of the converged model on the whole l2 ball of that radius; `ABSTAIN` (-1) otherwise.
**Errors.** `ValueError` for bad sigma / n / n0 / alpha / shapes (including `n < n0`). See
`docs/smoothing.md`."""),
    ("lirpa_deq.training", "certified training and evaluation", """
**Shapes.** Images `(B, C, H, W)` in [0, 1], labels `(B,)` int64; margin specifications
`C` (B, K-1, K) with rows `e_y - e_j`. The perturbation set is the l_inf ball intersected with the
data domain [0, 1]. **Guarantee.** `certify_bounds` is sound (the bound's guarantee; CROWN is
intersected with IBP); `pgd_robust` is an attack, i.e. an UPPER bound on certified accuracy.
Training is deterministic and resumes bit-exactly. **Errors.** `ValueError` (config),
`CheckpointError` (missing / corrupt / mismatched checkpoints), `FloatingPointError` (non-finite
loss). See `docs/training.md`."""),
    ("lirpa_deq.models", "model builders", """
Every builder: `builder(input_shape=(C, H, W), num_classes=10, **options) -> nn.Sequential` from
images `(B, C, H, W)` to logits `(B, num_classes)`, made of layers auto_LiRPA understands plus at
most one DEQ. Unknown names / options: `ValueError` listing the valid ones. See `docs/training.md`."""),
    ("lirpa_deq.data", "datasets (never downloads)", """
Every loader returns `TensorDataset(images, labels)`: images float32 `(N, C, H, W)` in [0, 1]
(no normalisation), labels int64 `(N,)`. **Errors.** `ValueError` for unknown names / splits,
`FileNotFoundError` (listing every path tried) for missing local files. See `docs/data.md`."""),
    ("lirpa_deq.testing", "empirical soundness checks", """
Counter-example searches (random points, l_inf vertices, PGD) against claimed bounds: they can
find unsoundness, never prove soundness. Shapes: `x` (B, *input_shape), bounds (B, K)."""),
    ("lirpa_deq.cli", "the `lirpa-deq` command", """
`lirpa-deq` (console script) or `python -m lirpa_deq.cli`. Usage errors print ONE line on stderr
and exit with status 2; `certify` / `demo` exit with 1 if PGD broke a certified point. See
`docs/cli.md`. The flags of each subcommand are listed after `main`."""),
]

#: Descriptions of public constants (they cannot carry docstrings).
CONSTANTS = {
    "lirpa_deq.__version__": "The package version.",
    "lirpa_deq.solvers.SOLVERS": "Registry: solver name -> solver function.",
    "lirpa_deq.solvers.RESIDUAL_EPS": "The `1e-8` in the relative residual `||f(z) - z|| / (||z|| + eps)`.",
    "lirpa_deq.bounds.OP_NAME": "Name of the custom ONNX operator that a traced DEQ layer becomes "
                                "(`custom_ops={OP_NAME: BoundDEQ}` registers it explicitly).",
    "lirpa_deq.lipschitz.METHODS": "Valid `method` values, from looser and cheaper to tighter and dearer.",
    "lirpa_deq.lipschitz.NORMS": "Valid `norm` values: the l_inf ball (dual l1) and the l2 ball.",
    "lirpa_deq.lipschitz.SUPPORTED": "Layer types the Lipschitz analysis supports (others raise ValueError).",
    "lirpa_deq.smoothing.ABSTAIN": "Prediction returned when the smoothed classifier abstains.",
    "lirpa_deq.training.METHODS": "Valid training methods (`TrainConfig.method`).",
    "lirpa_deq.models.MODELS": "Registry: model name -> `ModelEntry` (see `build_model`).",
    "lirpa_deq.data.DATASETS": "Registry: dataset name -> `DatasetInfo`.",
    "lirpa_deq.data.DEFAULT_DATASET": "The dataset used when none is given (embedded, no files needed).",
}

#: Descriptions of public functions/classes whose source has no docstring yet (shown in italics;
#: tests/test_api_docs.py lists them, so they are visible; the owners should add docstrings).
MISSING_DOC_NOTES: dict = {}

SKIP_METHODS = {"extra_repr"}
WIDTH = 100


# ------------------------------------------------------------------------------------- helpers
def public_names(mod):
    names = getattr(mod, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, o in vars(mod).items()
            if not n.startswith("_") and getattr(o, "__module__", None) == mod.__name__]


def own_doc(obj):
    """The object's own docstring (not inherited, not a dataclass / namedtuple auto-signature)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return None
    if inspect.isclass(obj) and re.fullmatch(re.escape(obj.__name__) + r"\(.*\)", doc.strip(), flags=re.S):
        return None  # auto-generated by dataclasses / namedtuple
    return doc


def first_paragraph(doc, extend=False):
    """The docstring's first paragraph on one line; with ``extend``, a very short first paragraph
    (e.g. only the return shape) is followed by the second one unless that is a list or a table."""
    paras = [p for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    text = " ".join(line.strip() for line in paras[0].splitlines()).strip()
    if extend and len(text) < 100 and len(paras) > 1:
        nxt = paras[1].lstrip()
        if not re.match(r"(\*|-|=|\||>>>|\.\.|[A-Z][a-z]+:\s*$)", nxt) and "\n    " not in paras[1]:
            text += " " + " ".join(line.strip() for line in paras[1].splitlines()).strip()
    return text


def _clean_repr(text):
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return re.sub(r"<(function|built-in function|class) ([\w.]+)>", r"\2", text)


def signature(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return _clean_repr(str(sig))


def split_top_level(args):
    """Split 'a, b=(1, 2), c' at commas outside brackets and quotes."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in args:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def wrap_call(prefix, sig):
    """``prefix + sig`` on one line, or wrapped at top-level commas to WIDTH columns."""
    line = prefix + sig
    if len(line) <= WIDTH:
        return line
    parts = split_top_level(sig[1:-1])
    lines, cur = [], prefix + "("
    indent = " " * 4
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else ")")
        if len(cur) + len(piece) + 1 > WIDTH and cur.strip() not in (prefix + "(").strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += piece + " "
    lines.append(cur.rstrip())
    return "\n".join(lines)


def short_value(value):
    if isinstance(value, dict):
        keys = [repr(k) for k in value]
        return f"`dict` with keys {', '.join(keys) if keys else '(none)'}"
    if isinstance(value, (tuple, list)):
        items = [getattr(v, "__name__", repr(v)) for v in value]
        return f"`{type(value).__name__}`: {', '.join(items)}"
    return f"`{value!r}`"


def home_module(obj):
    """The documented module an object belongs to (longest prefix of its ``__module__``)."""
    mod = getattr(obj, "__module__", None) or ""
    best = None
    for name, _, _ in MODULES:
        if name != "lirpa_deq" and (mod == name or mod.startswith(name + ".")):
            if best is None or len(name) > len(best):
                best = name
    return best


def members(cls):
    """Public methods / properties defined in the class itself (not inherited), in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in SKIP_METHODS:
            continue
        if isinstance(value, property):
            out.append((name, "property", value.fget))
        elif isinstance(value, classmethod):
            out.append((name, "classmethod", value.__func__))
        elif isinstance(value, staticmethod):
            out.append((name, "staticmethod", value.__func__))
        elif inspect.isfunction(value):
            out.append((name, "method", value))
    return out


def describe(qualname, obj):
    doc = own_doc(obj)
    if doc:
        return first_paragraph(doc, extend=True)
    if qualname in MISSING_DOC_NOTES:
        return f"*{MISSING_DOC_NOTES[qualname]}*"
    return "*(no docstring)*"


# ------------------------------------------------------------------------------------- sections
def render_entry(modname, name, obj, lines):
    qual = f"{modname}.{name}"
    if inspect.ismodule(obj):
        lines += [f"### `{name}`", "", f"Submodule `{obj.__name__}` (section below).", ""]
        return
    home = home_module(obj)
    if (inspect.isclass(obj) or callable(obj)) and home and home != modname:
        lines += [f"### `{name}`", "", f"Re-export of `{home}.{name}` (see there).", ""]
        return
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        kind = "exception" if issubclass(obj, BaseException) else "class"
        if dataclasses.is_dataclass(obj):
            kind = "dataclass"
        lines += [f"### `{name}` ({kind}{', ' + ', '.join(bases) if bases else ''})", ""]
        if not issubclass(obj, BaseException):  # exceptions: the message is what matters
            lines += ["```python", wrap_call(name, signature(obj)), "```", ""]
        lines += [describe(qual, obj), ""]
        meths = members(obj)
        if meths:
            for mname, mkind, fn in meths:
                if mkind == "property":
                    head = f"* `{mname}` (property)"
                else:
                    sig = signature(fn)
                    if mkind == "method":
                        sig = re.sub(r"^\(self,? ?", "(", sig)
                    if mkind == "classmethod":
                        sig = re.sub(r"^\(cls,? ?", "(", sig)
                    head = f"* `{mname}{sig}`" + (f" ({mkind})" if mkind != "method" else "")
                doc = own_doc(fn)
                lines.append(head + (f": {first_paragraph(doc)}" if doc else ""))
            lines.append("")
        return
    if callable(obj):
        lines += [f"### `{name}`", "", "```python", wrap_call(name, signature(obj)), "```", "",
                  describe(qual, obj), ""]
        return
    note = CONSTANTS.get(qual, "*(undocumented constant)*")
    lines += [f"### `{name}`", "", f"{short_value(obj)}. {note}", ""]


def render_cli(lines):
    from lirpa_deq.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, p in sub.choices.items():
        lines += [f"#### `lirpa-deq {cmd}`", "", (p.description or "").strip(), "",
                  "| flag | default | meaning |", "|---|---|---|"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = ", ".join(a.option_strings) if a.option_strings else a.dest.upper()
            if a.nargs in ("+", "*"):
                flag += " ..."
            hidden = a.default is None or a.default is False or a.default == argparse.SUPPRESS or a.default == []
            default = "" if hidden else f"`{a.default}`"
            text = (a.help or "").replace("|", "\\|").replace("%%", "%")
            if a.choices and not a.metavar:
                text += f" (one of {', '.join(map(str, a.choices))})"
            lines.append(f"| `{flag}` | {default} | {text} |")
        lines.append("")


def generate():
    """The text of docs/api.md."""
    os.environ.setdefault("COLUMNS", "100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods = {name: importlib.import_module(name) for name, _, _ in MODULES}
    lines = ["# API reference", "",
             "<!-- Generated by docs/gen_api.py from the code; do not edit by hand. "
             "Regenerate: python docs/gen_api.py -->", "",
             "The public surface of `lirpa_deq`: every name in each module's `__all__`, with its "
             "signature and the first paragraph of its docstring. Each section starts with what the "
             "module guarantees and how it fails. Tutorials: `examples/`, `docs/getting_started.md`; "
             "measured numbers: `docs/results.md`.", "",
             "Guarantees in one line: IBP / CROWN bounds (`lirpa_deq.bounds` through auto_LiRPA) and "
             "Lipschitz bounds (`lirpa_deq.lipschitz`) are **sound** (proofs, rounding included, for the "
             "DEQ's true fixed point); randomized smoothing (`lirpa_deq.smoothing`) is **probabilistic** "
             "(wrong with probability <= alpha per input) and certifies the smoothed classifier; PGD "
             "(`lirpa_deq.training.pgd_robust`, `lirpa_deq.testing`) only finds counter-examples.", "",
             "## Contents", ""]
    for name, title, _ in MODULES:
        lines.append(f"* [`{name}`](#{name.replace('.', '')}) -- {title}")
    lines.append("")
    for name, title, note in MODULES:
        mod = mods[name]
        lines += [f"## {name}", "", f"*{title}.*", ""]
        doc = own_doc(mod)
        if doc:
            lines += [first_paragraph(doc), ""]
        lines += [note.strip(), ""]
        for n in public_names(mod):
            render_entry(name, n, getattr(mod, n), lines)
        if name == "lirpa_deq.cli":
            render_cli(lines)
    return "\n".join(lines).rstrip() + "\n"


def missing_docstrings():
    """Public functions / classes without their own docstring (constants and modules excluded)."""
    missing = []
    for name, _, _ in MODULES:
        mod = importlib.import_module(name)
        for n in public_names(mod):
            obj = getattr(mod, n)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            if home_module(obj) not in (None, name):
                continue  # documented in its home module
            if own_doc(obj) is None:
                missing.append(f"{name}.{n}")
    return missing


def undocumented_constants():
    out = []
    for name, _, _ in MODULES:
        mod = importlib.import_module(name)
        for n in public_names(mod):
            obj = getattr(mod, n)
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) and f"{name}.{n}" not in CONSTANTS:
                out.append(f"{name}.{n}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate docs/api.md from the code.")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = generate()
    if args.check:
        ok = OUTPUT.exists() and OUTPUT.read_text() == text
        print("docs/api.md is up to date" if ok else "docs/api.md is out of date: run python docs/gen_api.py")
        return 0 if ok else 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
