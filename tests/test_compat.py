"""Every shim in lirpa_deq._compat is needed: with it disabled (LIRPA_DEQ_DISABLE_SHIMS), the probe
for its code path fails in a fresh interpreter; with all shims on, every probe passes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lirpa_deq import _compat

PROBES = Path(__file__).with_name("compat_probes.py")
sys.path.insert(0, str(PROBES.parent))
from compat_probes import SHIM_PROBES  # noqa: E402


def _run(probes, disabled=""):
    env = dict(os.environ, LIRPA_DEQ_DISABLE_SHIMS=disabled, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(PROBES), *probes], env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_shim_has_a_probe():
    assert set(SHIM_PROBES) == set(_compat.ALL_SHIMS)


def test_all_probes_pass_with_all_shims():
    result = _run(sorted(set(SHIM_PROBES.values())))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("shim", sorted(SHIM_PROBES))
def test_probe_fails_without_shim(shim):
    if shim not in _compat.APPLIED:
        pytest.skip(f"shim {shim!r} is not needed by the installed auto_LiRPA/torch/numpy")
    result = _run([SHIM_PROBES[shim]], disabled=shim)
    assert result.returncode != 0, f"probe {SHIM_PROBES[shim]!r} passed without shim {shim!r}: the shim is unneeded"
