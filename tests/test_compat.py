"""Every shim in lirpa_deq._compat is needed: with it disabled (LIRPA_DEQ_DISABLE_SHIMS), the probe
for its code path fails in a fresh interpreter; with all shims on, every probe passes. And the
import order of auto_LiRPA and lirpa_deq does not matter (the import hook the install ships)."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lirpa_deq import _compat

PROBES = Path(__file__).with_name("compat_probes.py")
sys.path.insert(0, str(PROBES.parent))
from compat_probes import PROBE_NEEDS, SHIM_PROBES  # noqa: E402


def _run(probes, disabled=""):
    env = dict(os.environ, LIRPA_DEQ_DISABLE_SHIMS=disabled, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(PROBES), *probes], env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_shim_has_a_probe():
    assert set(SHIM_PROBES) == set(_compat.ALL_SHIMS)


def test_all_probes_pass_with_all_shims():
    from auto_LiRPA import BoundedModule

    probes = {p for p in SHIM_PROBES.values() if hasattr(BoundedModule, PROBE_NEEDS.get(p, "compute_bounds"))}
    assert len(probes) >= len(set(SHIM_PROBES.values())) - len(PROBE_NEEDS)
    result = _run(sorted(probes))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("shim", sorted(SHIM_PROBES))
def test_probe_fails_without_shim(shim):
    if shim not in _compat.APPLIED:
        pytest.skip(f"shim {shim!r} is not needed by the installed auto_LiRPA/torch/numpy")
    result = _run([SHIM_PROBES[shim]], disabled=shim)
    assert result.returncode != 0, f"probe {SHIM_PROBES[shim]!r} passed without shim {shim!r}: the shim is unneeded"


# ---------------------------------------------------------------------------------- import order
ROOT = PROBES.parent.parent
HOOK_PTH = "lirpa_deq_import_hook.pth"


def _python(code):
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _installed_hook():
    """Path of the import hook's .pth in the installed lirpa_deq distribution (None: not installed
    with pip; '' : installed without the hook)."""
    # (a source tree on sys.path may hold a lirpa_deq.egg-info too: look at every distribution)
    dists = list(importlib.metadata.distributions(name="lirpa_deq"))
    if not dists:
        return None
    return next((str(f.locate()) for d in dists for f in d.files or [] if f.name == HOOK_PTH), "")


def test_install_ships_the_import_hook():
    path = _installed_hook()
    if path is None:
        pytest.skip("lirpa_deq is not pip-installed here (run from a source tree): nothing to check")
    assert path, "the installed lirpa_deq has no import hook: reinstall it (make env, or pip install -e .)"
    assert Path(path).read_text().strip() == "import _lirpa_deq_import_hook"
    started = _python("import sys; print(sorted(m for m in ('_lirpa_deq_import_hook', 'torch', 'numpy', "
                      "'auto_LiRPA') if m in sys.modules))")
    # the .pth runs at start-up and imports nothing heavy
    assert started.returncode == 0 and started.stdout.split() == ["['_lirpa_deq_import_hook']"], started


ORDER_PROBE = """
import math, torch
{first}
from lirpa_deq.nn import DEQ, IBPMonLinear
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 6), DEQ(IBPMonLinear(6), tol=1e-8), torch.nn.Linear(6, 3)).double()
x = torch.rand(2, 4, dtype=torch.float64)
bounded = BoundedModule(model, torch.zeros_like(x))
lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method="CROWN")
import lirpa_deq._compat as c
print(sorted(c.APPLIED), [round(v, 12) for v in lb.flatten().tolist() + ub.flatten().tolist()])
"""


@pytest.mark.parametrize("hook", ["installed", "imported"])
def test_auto_lirpa_may_be_imported_first(hook):
    if hook == "installed" and not _installed_hook():
        pytest.skip("the import hook is not installed here (see test_install_ships_the_import_hook)")
    start = "import _lirpa_deq_import_hook\n" if hook == "imported" else ""
    auto_first = _python(start + ORDER_PROBE.format(
        first="from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm\nimport lirpa_deq"))
    ours_first = _python(ORDER_PROBE.format(
        first="import lirpa_deq\nfrom auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm"))
    assert auto_first.returncode == 0, auto_first.stderr[-3000:]
    assert ours_first.returncode == 0, ours_first.stderr[-3000:]
    assert auto_first.stdout == ours_first.stdout  # same shims, same bounds
