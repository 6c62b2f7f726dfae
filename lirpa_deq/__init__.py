"""lirpa_deq: certified robustness for Deep Equilibrium Models, as an auto_LiRPA plugin.

Importing the package applies the version bridge for auto_LiRPA / torch (``lirpa_deq._compat``)
before anything of ours imports auto_LiRPA, and registers the DEQ fixed-point operator so that
``BoundedModule`` understands models containing ``lirpa_deq.nn.DEQ`` layers. An auto_LiRPA imported
BEFORE lirpa_deq gets the shims it needs at import time from ``_lirpa_deq_import_hook`` (started
by the ``.pth`` file that the install puts in site-packages).
"""
__version__ = "0.1.0"

from . import _compat  # noqa: E402  (the shims run before anything of ours imports auto_LiRPA)

_compat.apply()
from . import bounds, nn  # noqa: E402  (registers the DEQ operator with auto_LiRPA)
from .bounds import BoundDEQ, IntervalProofError, deq_nodes  # noqa: E402
from .bounds.generic import ContractionError  # noqa: E402
from .bounds.generic import picard as _picard  # noqa: E402,F401  (Picard-containment bounds of generic cells)
from .migrate import ConversionReport, convert  # noqa: E402

__all__ = ["__version__", "nn", "bounds", "BoundDEQ", "IntervalProofError", "ContractionError", "deq_nodes",
           "convert", "ConversionReport"]
