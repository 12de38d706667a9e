"""Gate: does a candidate (an FP8 plan, a new kernel, a new model version) lose quality?

Compares a candidate against a baseline on the same held-out examples with paired
bootstrap intervals on NE, AUC and calibration, plus per-site FP8 error from probe
reports, and says pass / regression / inconclusive. This is what CI runs.
"""

from loka.gate.outputs import EvalOutputs, EvalOutputsError, fingerprint
from loka.gate.stats import BootstrapResult, auc, calibration, normalized_entropy, paired_bootstrap

__all__ = [
    "BootstrapResult",
    "EvalOutputs",
    "EvalOutputsError",
    "fingerprint",
    "auc",
    "calibration",
    "normalized_entropy",
    "paired_bootstrap",
]
