"""What ``loka gate`` accepts on each side: saved EvalOutputs, or a ranker checkpoint (+ plan).

A saved ``EvalOutputs`` (``.npz``) is used as is. A checkpoint of the bundled ranker
(``loka.models`` format) is evaluated here: its weights are loaded, converted for
``precision`` (``bf16``, ``fp32``, ``fp8`` or a plan JSON; default the precision it was
trained with), and scored on the held-out synthetic stream its training config names
(``eval_seed``, ``teacher_seed``), so two checkpoints of one run are scored on the
same examples. Both files are zip archives; an EvalOutputs file is recognised by its
metadata entry.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loka.gate.outputs import EvalOutputs, EvalOutputsError, fingerprint

_OUTPUTS_MARKER = "meta_json.npy"


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


def is_eval_outputs_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``EvalOutputs.save``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return _OUTPUTS_MARKER in zf.namelist()


def load_side(
    side: str, value: object, precision: str | None = None, how: CheckpointEval | None = None
) -> EvalOutputs:
    """EvalOutputs for one side of the gate from an EvalOutputs, a saved file or a checkpoint."""
    if isinstance(value, EvalOutputs):
        if precision is not None:
            raise EvalOutputsError(f"{side}: a precision/plan applies to checkpoints, not to EvalOutputs")
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise EvalOutputsError(f"{side} must be EvalOutputs or a path, not {type(value).__name__}")
    if not os.path.isfile(value):
        raise EvalOutputsError(f"{side}: {value}: no such file")
    if is_eval_outputs_file(value):
        if precision is not None:
            raise EvalOutputsError(f"{side}: a precision/plan applies to checkpoints, not to saved outputs {value}")
        return EvalOutputs.load(value)
    return evaluate_checkpoint(value, precision, how or CheckpointEval())


def evaluate_checkpoint(path: str | os.PathLike, precision: str | None, how: CheckpointEval) -> EvalOutputs:
    """Load a ranker checkpoint, convert it for ``precision`` and score its held-out stream."""
    try:
        import torch

        from loka.models.checkpoint import load_checkpoint
        from loka.models.config import RankerConfig
        from loka.models.evaluate import evaluate
        from loka.models.precision import apply_precision
        from loka.models.ranker import Ranker
        from loka.models.synthetic import SyntheticStream
    except ImportError as exc:
        raise EvalOutputsError(f"checkpoint inputs need loka.models, which failed to import: {exc}") from None
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise EvalOutputsError(f"{path}: neither saved EvalOutputs nor a loka ranker checkpoint ({exc})") from None
    precision = precision or state.get("precision") or "bf16"
    train_cfg = state.get("train_config") or {}
    try:
        model = Ranker(RankerConfig.from_dict(state["ranker_config"]))
        model.load_state_dict(state["model"])
        apply_precision(model, precision)
    except (ValueError, NotImplementedError, RuntimeError, KeyError) as exc:
        raise EvalOutputsError(f"{path}: cannot build the model for precision {precision!r}: {exc}") from None
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
