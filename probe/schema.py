"""The versioned JSON schema of a ProbeReport, and its validator.

The schema is written as data (a nested spec of expected types) so the validator, the
docs (docs/probe.md) and the planner agree on one definition. Validation walks a loaded
document and raises :class:`ReportSchemaError` naming the exact path of the first
problem (``sites[3].errors.rowwise.fprop: missing key 'ci_hi'``).

Non-finite floats are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so the
file is strict JSON (``loka.jsonio``, the one codec). A key ending in ``?`` in a spec is
optional. Every consumer reads a report through ``loka.probe.reader.read_report``, which
checks the fields it reads with the same machinery.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
KIND = "loka.probe.report"
VERDICTS = ("safe", "unsafe", "undecided")
SPEEDS = ("fast", "slow", "unknown")

NUM = "number"  # int or float (or "inf"/"-inf"/"nan" before decoding)
OPT_NUM = "number|null"

GEMM_ERROR = {"mean": NUM, "ci_lo": NUM, "ci_hi": NUM, "sqnr_db": NUM, "n": int, "threshold": NUM, "verdict": VERDICTS}
VERDICT = {"verdict": VERDICTS, "reason": str}
TIMING_ENTRY = {"gemm": ("fprop", "dgrad", "wgrad"), "kernel": str, "recipe": str, "median_ms": NUM,
                "p10_ms": NUM, "p90_ms": NUM, "iters": int}
TIMINGS = {"device_name": str, "representative": bool, "m": int, "bf16_ms": {"*": NUM}, "entries": [TIMING_ENTRY]}
SENSITIVITY = {"loss_ref": NUM, "loss_fp8": NUM, "loss_delta": NUM, "rel_loss_delta": NUM,
               "abs_rel_loss_delta": NUM, "ci_lo": NUM, "ci_hi": NUM, "n": int}
FIT = {"family": str, "params": [NUM], "ks": NUM, "n": int, "p_zero": NUM, "p_pos": NUM}

SITE = {
    "fqn": str,
    "module_type": str,
    "in_features": int,
    "out_features": int,
    "m_values": [int],
    "micro_batches": int,
    "steps": [int],
    "operands": {"*": dict},
    "fits": {"*": [FIT]},
    "errors": {"*": {"*": GEMM_ERROR}},
    "predicted_errors": {"*": {"*": NUM}},
    "recipe_verdicts": {"*": VERDICT},
    "sensitivity": {"*": SENSITIVITY},
    "timings": (TIMINGS, None),
    "verdict": VERDICTS,
    "speed": SPEEDS,
    "best_recipe": (str, None),
    "speedup": OPT_NUM,
    "reason": str,
}

REPORT = {
    "schema_version": int,
    "kind": str,
    "created_utc": str,
    "meta": dict,
    "config": dict,
    "sampled_steps": [int],
    "sites": [SITE],
    "recipes?": {"*": dict},  # hand-built candidates' fields (loka.recipe_json), absent when all are named
}


class ReportSchemaError(ValueError):
    """A probe report does not match the schema; the message names the path."""


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("inf", "-inf", "nan")


def _check(value, spec, path: str) -> None:
    if spec is None:
        if value is not None:
            raise ReportSchemaError(f"{path}: expected null, got {type(value).__name__}")
    elif spec == NUM:
        if not _is_num(value):
            raise ReportSchemaError(f"{path}: expected a number, got {value!r}")
    elif spec == OPT_NUM:
        if value is not None and not _is_num(value):
            raise ReportSchemaError(f"{path}: expected a number or null, got {value!r}")
    elif isinstance(spec, tuple) and all(isinstance(s, str) for s in spec):
        if value not in spec:
            raise ReportSchemaError(f"{path}: {value!r} is not one of {list(spec)}")
    elif isinstance(spec, tuple):  # alternatives
        errors = []
        for alt in spec:
            try:
                return _check(value, alt, path)
            except ReportSchemaError as exc:
                errors.append(str(exc))
        raise ReportSchemaError(errors[0])
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ReportSchemaError(f"{path}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]")
    elif isinstance(spec, dict):
        _check_dict(value, spec, path)
    elif spec is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ReportSchemaError(f"{path}: expected an integer, got {value!r}")
    elif not isinstance(value, spec):
        raise ReportSchemaError(f"{path}: expected {spec.__name__}, got {type(value).__name__}")


def _check_dict(value, spec: dict, path: str) -> None:
    if not isinstance(value, dict):
        raise ReportSchemaError(f"{path}: expected an object, got {type(value).__name__}")
    if "*" in spec:
        for k, v in value.items():
            _check(v, spec["*"], f"{path}.{k}")
        return
    for key, sub in spec.items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        if key not in value:
            if optional:
                continue
            raise ReportSchemaError(f"{path}: missing key {key!r}")
        _check(value[key], sub, f"{path}.{key}" if path else key)


def validate(doc: dict, spec: dict = REPORT) -> None:
    """Raise :class:`ReportSchemaError` unless ``doc`` is a valid report of this schema version.

    ``spec``: the full :data:`REPORT` (what the probe writes), or the part a reader reads.
    """
    if not isinstance(doc, dict):
        raise ReportSchemaError(f"a probe report is a JSON object, got {type(doc).__name__}")
    if doc.get("kind") != KIND:
        raise ReportSchemaError(f"kind: expected {KIND!r}, got {doc.get('kind')!r}; is this a probe report?")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportSchemaError(
            f"schema_version: this loka reads version {SCHEMA_VERSION}, the file has {version!r}; "
            "re-run the probe or use the loka version that wrote it"
        )
    _check_dict(doc, spec, "")
