"""Randomized smoothing for (DEQ) classifiers: Cohen et al. 2019 and audited Serialized RS.

See ``docs/smoothing.md`` for the statistics, the soundness theorem and its assumptions.
"""
from .core import ABSTAIN, CertifyResult, Smooth
from .serial import SerializedSmooth
from .stats import binom_two_sided_p, cp_lower, cp_upper, hypergeom_upper

__all__ = ["ABSTAIN", "CertifyResult", "Smooth", "SerializedSmooth", "cp_lower", "cp_upper",
           "hypergeom_upper", "binom_two_sided_p"]
