"""loka.probe (layer 2): learn per-site operand statistics and FP8 error during real training steps.

It writes the ``ProbeReport`` (JSON schema in ``schema``) and owns its one reader,
``reader.read_report`` / ``report_sites``, that every consumer (planner, gate) uses. It
imports only the core (recipes, quantize, kernels for timing) and knows no model: a
workload is whatever the caller hands it. See :mod:`loka.probe.probe` for how to wrap a
training loop and docs/probe.md for what is measured.
"""

from loka.probe.census import GemmCensus, gemm_census
from loka.probe.config import DEFAULT_CANDIDATES, DEFAULT_THRESHOLDS, ProbeConfig, SamplingSchedule
from loka.probe.fit import Fit, fit_values, predict_gemm_error
from loka.probe.probe import Probe
from loka.probe.report import ProbeReport
from loka.probe.schema import SCHEMA_VERSION, ReportSchemaError
from loka.probe.sites import Site, find_sites
from loka.probe.site_timing import SiteTiming
from loka.probe.timing import Timing, time_fn, time_site
from loka.probe.workload import Workload

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_THRESHOLDS",
    "SCHEMA_VERSION",
    "Fit",
    "GemmCensus",
    "Probe",
    "ProbeConfig",
    "ProbeReport",
    "ReportSchemaError",
    "SamplingSchedule",
    "Site",
    "SiteTiming",
    "Timing",
    "Workload",
    "find_sites",
    "gemm_census",
    "fit_values",
    "predict_gemm_error",
    "time_fn",
    "time_site",
]
