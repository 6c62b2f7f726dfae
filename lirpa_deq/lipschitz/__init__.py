"""Upper bounds on local Lipschitz constants of DEQ classifiers, and certification from them.

``local_lipschitz(model, x, eps, norm, method, C)`` bounds, for each specification row ``C_k``,
``sup ||grad_x' (C_k . f(x'))||_dual`` over the ball ``||x' - x||_norm <= eps`` (``norm`` =
math.inf: dual l1; 2: dual l2), with ``method`` in ('global', 'elementwise', 'local') (looser and
cheaper to tighter and dearer). ``certify_lipschitz`` certifies ``f_y - f_j > 0`` on the ball.
See ``docs/lipschitz.md``.
"""
from .api import (METHODS, NORMS, LipschitzFallbackWarning, LipschitzOptions, LipschitzReport,
                  certify_lipschitz, lipschitz_report, local_lipschitz, margin_spec)
from .layers import SUPPORTED

__all__ = [
    "local_lipschitz", "certify_lipschitz", "lipschitz_report", "margin_spec",
    "LipschitzOptions", "LipschitzReport", "LipschitzFallbackWarning", "METHODS", "NORMS",
    "SUPPORTED",
]
