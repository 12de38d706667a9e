"""loka.probe: learn per-site operand statistics and FP8 error during real training steps.

See :mod:`loka.probe.probe` for how to wrap a training loop and docs/probe.md for the
report schema.
"""

from loka.probe.config import DEFAULT_CANDIDATES, DEFAULT_THRESHOLDS, ProbeConfig, SamplingSchedule
from loka.probe.probe import Probe
from loka.probe.sites import Site, find_sites

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_THRESHOLDS",
    "Probe",
    "ProbeConfig",
    "SamplingSchedule",
    "Site",
    "find_sites",
]
