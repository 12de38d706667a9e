"""A ranker checkpoint as one side of the gate: checkpoint (+ precision) -> EvalOutputs.

The gate (``loka.gate``) compares EvalOutputs and never builds a model; this module is
where the bundled ranker meets it (``loka gate`` wires it in for ``.pt`` inputs). A
checkpoint of the ranker (``loka.models`` format, ``.pt``) is evaluated here: its weights
are loaded, converted for ``precision`` (``bf16``, ``fp32``, ``fp8`` or a plan JSON;
default the precision it was trained with), and scored on the held-out synthetic stream
its training config names (``eval_seed``, ``teacher_seed``), so two checkpoints of one
run are scored on the same examples. A saved ``EvalOutputs`` (``.npz``) is used as is;
any other file is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loka.cli_vocab import resolve_device
from loka.dispatch import PlanMismatchError
from loka.gate import GateResult, gate
from loka.gate.compare import GateInputError, read_outputs
from loka.gate.outputs import EvalOutputs, EvalOutputsError, fingerprint, is_eval_outputs_file

from .checkpoint import load_checkpoint, load_model_state
from .config import RankerConfig
from .evaluate import evaluate
from .precision import apply_precision
from .ranker import Ranker
from .synthetic import SyntheticStream

CHECKPOINT_SUFFIX = ".pt"


@dataclass(frozen=True)
class CheckpointEval:
    """How a checkpoint side is evaluated (shared by both sides so they see the same examples).

    ``eval_examples``: held-out examples scored. ``eval_seed``: None = the checkpoint's
    training config's ``eval_seed``. ``device``: torch device string.
    """

    eval_examples: int = 50_000
    eval_seed: int | None = None
    batch_size: int = 4096
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.eval_examples < 100:
            raise ValueError(f"eval_examples={self.eval_examples} is too few to compare NE; use >= 100 (50000 is typical)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


def load_side(
    side: str, value: object, precision: str | None = None, how: CheckpointEval | None = None
) -> EvalOutputs:
    """EvalOutputs for one side of the gate from an EvalOutputs, a saved file or a checkpoint."""
    if is_checkpoint(value):
        return evaluate_checkpoint(value, precision, how or CheckpointEval())
    if precision is not None:
        raise EvalOutputsError(f"{side}: a precision/plan applies to checkpoints ({CHECKPOINT_SUFFIX}), not to "
                               f"saved outputs {value}")
    return read_outputs(side, value)


def is_checkpoint(value: object) -> bool:
    """A path to an existing ``.pt`` file that is not saved EvalOutputs: a ranker checkpoint to evaluate."""
    return (isinstance(value, (str, os.PathLike)) and os.fspath(value).endswith(CHECKPOINT_SUFFIX)
            and os.path.isfile(value) and not is_eval_outputs_file(value))


def evaluate_checkpoint(path: str | os.PathLike, precision: str | None, how: CheckpointEval) -> EvalOutputs:
    """Load a ranker checkpoint, convert it for ``precision`` and score its held-out stream."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise EvalOutputsError(f"{path}: neither saved EvalOutputs nor a loka ranker checkpoint ({exc})") from None
    precision = precision or state.get("precision") or "bf16"
    train_cfg = state.get("train_config") or {}
    try:
        model = Ranker(RankerConfig.from_dict(state["ranker_config"]))
        load_model_state(model, state, path)
        apply_precision(model, precision)
    except (ValueError, NotImplementedError, RuntimeError, KeyError) as exc:
        reason = exc.summary() if isinstance(exc, PlanMismatchError) else " ".join(str(exc).split())
        raise EvalOutputsError(f"{path}: cannot build the model for precision {precision!r}: {reason}") from None
    model.to(torch.device(how.device))
    seed = how.eval_seed if how.eval_seed is not None else train_cfg.get("eval_seed", 1_000_003)
    stream = SyntheticStream(model.config, min(how.batch_size, how.eval_examples), seed=seed,
                             teacher_seed=train_cfg.get("teacher_seed", 0), device=how.device)  # fmt: skip
    out = evaluate(model, stream, n_examples=how.eval_examples).outputs
    plan_id = fingerprint(Path(precision).read_bytes()) if os.path.isfile(precision) else precision
    meta = dict(out.meta)
    # the state dict is the same for bf16 and FP8 conversions: the precision makes the model
    meta["model_fingerprint"] = fingerprint(str(meta.get("model_fingerprint", "")), plan_id)
    meta["info"] = {**dict(meta.get("info") or {}), "checkpoint": os.fspath(path), "precision": precision}
    return EvalOutputs(out.example_ids, out.labels, out.probs, meta)


def gate_checkpoints(
    baseline: object,
    candidate: object,
    *,
    baseline_precision: str | None = None,
    candidate_precision: str | None = None,
    checkpoint_eval: CheckpointEval | None = None,
    **gate_options,
) -> GateResult:
    """``loka.gate.gate`` of two sides that may be ranker checkpoints (each evaluated first, same examples).

    ``*_precision``: bf16 / fp32 / fp8 / plan JSON for a checkpoint side (default: as
    trained); ``gate_options`` go to ``gate``. Raises GateInputError when a side cannot be
    loaded or evaluated.
    """
    sides = []
    for side, value, precision in (("baseline", baseline, baseline_precision),
                                   ("candidate", candidate, candidate_precision)):  # fmt: skip
        try:
            sides.append(load_side(side, value, precision, checkpoint_eval))
        except (EvalOutputsError, ValueError) as exc:
            raise GateInputError(f"{side}: {exc}") from None
    return gate(*sides, **gate_options)


def checkpoint_loader(side: str, path: str, precision: str | None, *, eval_examples: int, eval_seed: int | None,
                      device: str) -> EvalOutputs:
    """The ``loka gate`` command's loader of a ``.pt`` side (wired by ``loka.app.cli``)."""
    return load_side(side, path, precision, CheckpointEval(eval_examples=eval_examples, eval_seed=eval_seed,
                                                          device=resolve_device(device)))
