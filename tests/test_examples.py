"""Every ``examples/*.py`` runs with ``--quick`` and prints its result table with sensible numbers.

Each script runs in a subprocess (``sys.executable``, repository root as cwd, 1 OpenMP thread), as a
user would run it. Scripts are collected automatically; the known ones also have their table rows
checked (EXPECTED), every other one must exit 0 and print at least one percentage in [0, 100].
Budget: ~80 s for all five on 1 CPU thread (measured runtimes in examples/README.md).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
NUM = r"(-?\d+(?:\.\d+)?)"
PCT = r"(\d+(?:\.\d+)?)%"

#: script -> list of (regex that must match a line of stdout, checks of its numeric groups).
#: Percentages must lie in [0, 100]; other checks are (group index, low, high).
EXPECTED = {
    "simple_verification.py": [
        (rf"f_0\(x_0\):\s+{NUM} <= f_0\(x_0\+delta\) <=\s+{NUM}", [("le", 1, 2)]),
        (r"^\s*0\s+\d\s+\d\s+" + NUM + r"\s+" + NUM + r"\s+(certified|not certified)$", []),
        (rf"certified IBP: \d+/\d+ \({PCT}\), certified CROWN: \d+/\d+ \({PCT}\), clean accuracy: {PCT}",
         [("pct", 1), ("pct", 2), ("pct", 3), ("le", 1, 2)]),
    ],
    "train_ibp_mondeq.py": [
        (rf"^clean accuracy\s+{PCT}$", [("pct", 1), ("range", 1, 20, 100)]),
        (rf"^PGD accuracy \(upper bound\)\s+{PCT}\s+{PCT}$", [("pct", 1), ("pct", 2)]),
        (rf"^IBP certified accuracy\s+{PCT}\s+{PCT}$", [("pct", 1), ("pct", 2)]),
    ],
    "train_crown_ibp_deq.py": [
        (rf"^clean accuracy\s+{PCT}$", [("pct", 1), ("range", 1, 20, 100)]),
        (rf"^PGD accuracy \(upper bound\)\s+{PCT}\s+{PCT}$", [("pct", 1), ("pct", 2)]),
        (rf"^IBP certified accuracy\s+{PCT}\s+{PCT}$", [("pct", 1), ("pct", 2)]),
        (rf"^CROWN certified accuracy\s+{PCT}\s+{PCT}$", [("pct", 1), ("pct", 2)]),
    ],
    "lipschitz.py": [
        (rf"^gradient at x \(lower\)\s+{NUM}\s+1\.00$", [("range", 1, 0, 1e6)]),
        (rf"^global\s+{NUM}\s+{NUM}\s+\d+/\d+\s+{NUM}$", [("range", 2, 1, 1e6)]),
        (rf"^elementwise\s+{NUM}\s+{NUM}\s+\d+/\d+\s+{NUM}$", [("range", 2, 1, 1e6)]),
        (rf"^local\s+{NUM}\s+{NUM}\s+\d+/\d+\s+{NUM}$", [("range", 2, 1, 1e6)]),
    ],
    "smoothing_srs.py": [
        (rf"^plain RS\s+{PCT}\s+{PCT}\s+{PCT}\s+{NUM}\s+\d+$", [("pct", 1), ("pct", 2), ("pct", 3),
                                                                 ("range", 1, 20, 100)]),
        (rf"^SRS \(1 step\)\s+{PCT}\s+{PCT}\s+{PCT}\s+{NUM}\s+\d+$", [("pct", 1), ("pct", 2), ("pct", 3)]),
        (rf"^largest certifiable radius: plain RS {NUM}", [("range", 1, 0, 10)]),
    ],
    "custom_cell.py": [
        (rf"^contraction of MyCell in z: L = {NUM} \(computed\)", [("range", 1, 0, 0.95)]),
        (rf"^clean accuracy\s+{PCT}$", [("pct", 1), ("range", 1, 50, 100)]),
        (rf"^PGD accuracy \(upper bound\)\s+{PCT}$", [("pct", 1)]),
        (rf"^certified IBP\s+{PCT}\s+{NUM}$", [("pct", 1)]),
        (rf"^certified CROWN\s+{PCT}\s+{NUM}$", [("pct", 1)]),
        (r"^  ContractionError: MyCell is not a proved contraction in z", []),
    ],
}


def run_example(name, *args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_line(out, pattern, checks, name):
    m = re.search(pattern, out, flags=re.M)
    assert m, f"{name}: no line matching {pattern!r} in the output:\n{out[-3000:]}"
    for check in checks:
        kind, i = check[0], check[1]
        value = float(m.group(i))
        if kind == "pct":
            assert 0.0 <= value <= 100.0, f"{name}: {m.group(0)!r}: {value} is not a percentage"
        elif kind == "range":
            assert check[2] <= value <= check[3], f"{name}: {m.group(0)!r}: {value} not in [{check[2]}, {check[3]}]"
        elif kind == "le":
            assert value <= float(m.group(check[2])) + 1e-9, f"{name}: {m.group(0)!r}: not ordered"


def test_examples_are_collected():
    assert {"simple_verification.py", "train_ibp_mondeq.py", "train_crown_ibp_deq.py", "lipschitz.py",
            "smoothing_srs.py", "custom_cell.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick(name):
    proc = run_example(name, "--quick")
    out = proc.stdout
    assert proc.returncode == 0, f"{name} --quick exited {proc.returncode}:\n{out[-2000:]}\n{proc.stderr[-3000:]}"
    if name in EXPECTED:
        for pattern, checks in EXPECTED[name]:
            check_line(out, pattern, checks, name)
    else:  # a new example: it must at least print one real number (e.g. an accuracy)
        numbers = re.findall(r"-?\d+\.\d+", out)
        assert numbers, f"{name}: no real number in the output:\n{out[-2000:]}"
        for p in re.findall(PCT, out):
            assert 0.0 <= float(p) <= 100.0, f"{name}: {p}% is not a percentage"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name):
    """Every example documents the common flags."""
    proc = run_example(name, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--quick", "--data-root", "--dataset", "--device", "--seed"):
        assert flag in proc.stdout, f"{name} --help does not mention {flag}"
