"""What an exact resume needs beyond weights: the optimizers' state (refused in one line when it
is missing or does not fit), the RNG streams and the precision the run trained in (with the
plan's own text, since a plan file can move or change).

Why: a resume must continue the run that was checkpointed, not a neighbour of it. An FP8 run
resumed without naming its precision used to continue silently in bf16; now it resumes in
the precision its checkpoint records, and a plan that has gone or changed is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .precision import HP_PRECISIONS


def rng_record() -> dict:
    """Plain-tensor RNG states for a checkpoint (CPU always; CUDA devices if CUDA is in use)."""
    record = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["rng_cuda"] = torch.cuda.get_rng_state_all()
    return record


def restore_rng(state: dict) -> None:
    """Put back the RNG streams a checkpoint recorded (those it has)."""
    if isinstance(state.get("rng"), torch.Tensor):
        torch.set_rng_state(state["rng"])
    cuda = state.get("rng_cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def plan_record(precision: str) -> dict:
    """``{"plan_text": ...}`` for a plan-file precision (the plan as trained with), else {}."""
    if precision in HP_PRECISIONS or precision == "fp8":
        return {}
    return {"plan_text": Path(precision).read_text()}


def resume_precision(requested: str | None, state: dict | None, resume=None) -> str:
    """The precision to train in: ``requested`` when given (a deliberate switch), else bf16 for
    a new run and the checkpoint's own precision on resume.

    ValueError when the checkpoint's plan file is gone or no longer the plan it trained with.
    """
    if requested is not None:
        return requested
    if state is None:
        return "bf16"
    recorded = state.get("precision") or "bf16"
    if recorded in HP_PRECISIONS or recorded == "fp8":
        return recorded
    if not os.path.isfile(recorded):
        raise ValueError(f"{resume} was trained with the plan {recorded}, which no longer exists; "
                         "pass that plan again with --precision (precision=...) to resume in FP8, "
                         "or --precision bf16 to switch to bf16 deliberately.")
    text = state.get("plan_text")
    if text is not None and Path(recorded).read_text() != text:
        raise ValueError(f"the plan {recorded} changed since {resume} was written; pass "
                         "--precision PLAN explicitly to resume with a (new) plan on purpose.")
    return recorded


def load_optimizers(optimizers: dict, state: dict, resume) -> None:
    """Each optimizer's state from the checkpoint; ValueError (one line) when it is missing or
    does not fit this model's parameters."""
    saved = state.get("optimizers")
    for name, opt in optimizers.items():
        if not isinstance(saved, dict) or not isinstance(saved.get(name), dict):
            raise ValueError(f"{resume} has no state for the {name!r} optimizer, so it cannot resume a run "
                             "exactly; use a checkpoint written by `loka train`.")
        try:
            opt.load_state_dict(saved[name])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{resume}: the {name!r} optimizer state does not fit this model "
                             f"({' '.join(str(exc).split())[:200]}); use a checkpoint written by `loka train`.") from None
