"""loka.gate (layer 3): does a candidate (an FP8 plan, a new kernel, a new model version) lose quality?

Compares a candidate against a baseline on the same held-out examples with paired
bootstrap intervals on NE, AUC and calibration, plus per-site FP8 error from probe
reports, and says pass / regression / inconclusive. This is what CI runs:

    result = loka.gate("bf16.npz", "fp8.npz")   # EvalOutputs or saved .npz paths
    print(result.table()); sys.exit(result.exit_code)

For a model *trained* in FP8 against one trained in bf16, give several runs a side:
``gate_replicates(baselines, candidates)`` (``loka gate --baseline b1 b2 --candidate c1 c2``)
includes the between-run training noise that one pair cannot see (``loka.gate.replicates``);
``paired=True`` / ``--paired`` when run j of each side shares its seed and data order. Lists
work from the facade too: ``loka.gate([b1, b2], [c1, c2], paired=True)``.

It takes EvalOutputs and probe reports and never builds a model: scoring a ranker
checkpoint is ``loka.models.gate_inputs``' job. The package is callable:
``loka.gate(...)`` is ``loka.gate.gate(...)``.
"""

from loka.callable_module import make_callable
from loka.gate.budget import DEFAULT_NE_BUDGET, GateBudget
from loka.gate.compare import GateInputError, gate, load_input
from loka.gate.outputs import EvalOutputs, EvalOutputsError, fingerprint
from loka.gate.replicates import ReplicateError, gate_replicates, replicate_ne
from loka.gate.result import Check, GateResult
from loka.gate.sites import ReportError, error_entries
from loka.gate.stats import BootstrapResult, auc, calibration, normalized_entropy, paired_bootstrap

__all__ = [
    "DEFAULT_NE_BUDGET",
    "BootstrapResult",
    "Check",
    "EvalOutputs",
    "EvalOutputsError",
    "GateBudget",
    "GateInputError",
    "GateResult",
    "ReplicateError",
    "ReportError",
    "auc",
    "calibration",
    "error_entries",
    "fingerprint",
    "gate",
    "gate_replicates",
    "load_input",
    "normalized_entropy",
    "paired_bootstrap",
    "replicate_ne",
]

make_callable(__name__, gate)  # ``loka.gate(baseline, candidate)`` is ``loka.gate.gate(...)``
