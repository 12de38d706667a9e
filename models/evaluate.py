"""Held-out evaluation of the ranker: NE, AUC and calibration per task, beside the Bayes floor.

Metrics come from `loka.gate.stats` (one definition shared with the gate), and every
evaluation also yields a `loka.gate.EvalOutputs` (example ids, labels, probabilities and
fingerprints) so `loka gate` can compare two checkpoints on the same examples. Tasks that
apply only to some examples (CVR applies to clicks) are scored on those examples in the
report, and exported to EvalOutputs as the post-impression task ``ct<task>`` (probability
P(click)·P(task | click), label 1 when both happened), which is defined on every example.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from loka.progress import progress_bar
from loka.gate import EvalOutputs, auc, calibration, fingerprint, normalized_entropy, paired_bootstrap

from .batch import Batch
from .config import input_mismatch


@dataclass(frozen=True)
class TaskMetrics:
    """One task on the examples it applies to. bayes_ne is None without true probabilities."""

    n: int
    positives: int
    ne: float
    auc: float
    calibration: float
    bayes_ne: float | None

    @property
    def gap_closed(self) -> float | None:
        """Fraction of the gap between NE = 1 (constant predictor) and the Bayes floor closed."""
        if self.bayes_ne is None or self.bayes_ne >= 1.0:
            return None
        return (1.0 - self.ne) / (1.0 - self.bayes_ne)


@dataclass
class EvalReport:
    tasks: dict[str, TaskMetrics]
    outputs: EvalOutputs

    def to_dict(self) -> dict:
        return {t: {**m.__dict__, "gap_closed": m.gap_closed} for t, m in self.tasks.items()}

    def table(self) -> str:
        lines = [f"{'task':<6} {'n':>8} {'pos':>7} {'NE':>7} {'Bayes NE':>9} {'gap closed':>10} "
                 f"{'AUC':>6} {'calib':>6}"]
        for t, m in self.tasks.items():
            bayes = f"{m.bayes_ne:.4f}" if m.bayes_ne is not None else "-"
            gap = f"{m.gap_closed:.1%}" if m.gap_closed is not None else "-"
            lines.append(f"{t:<6} {m.n:>8} {m.positives:>7} {m.ne:>7.4f} {bayes:>9} {gap:>10} "
                         f"{m.auc:>6.3f} {m.calibration:>6.3f}")
        return "\n".join(lines)


def _batches(data):
    """Iterate a stream from its start when it is indexable (reproducible evals)."""
    if hasattr(data, "batch"):
        return (data.batch(i) for i in itertools.count())
    return iter(data)


@torch.no_grad()
def predict(model, data, n_examples: int, progress: bool = False, device=None) -> dict[str, np.ndarray]:
    """Score the first ``n_examples`` of ``data``: ids [n], labels/weights/probs/true_probs [n, T]."""
    if n_examples <= 0:
        raise ValueError("n_examples must be >= 1.")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    cols = {k: [] for k in ("ids", "labels", "weights", "probs", "true_probs")}
    bar = progress_bar(total=n_examples, disable=not progress, desc="eval", unit="ex")
    done = 0
    try:
        for batch in _batches(data):
            batch: Batch = batch.slice(0, min(batch.size, n_examples - done)).to(device)
            probs = torch.stack(list(model.predict(batch).values()), 1)
            cols["probs"].append(probs.float().cpu())
            cols["labels"].append(batch.labels.cpu())
            cols["weights"].append(batch.label_weights.cpu())
            ids = batch.example_ids if batch.example_ids is not None else torch.arange(done, done + batch.size)
            cols["ids"].append(ids.cpu())
            if batch.true_probs is not None:
                cols["true_probs"].append(batch.true_probs.cpu())
            done += batch.size
            bar.update(batch.size)
            if done >= n_examples:
                break
    finally:
        bar.close()
        model.train(was_training)
    if done < n_examples:
        raise ValueError(f"the eval data ended after {done} of the {n_examples} examples asked for.")
    return {k: torch.cat(v).double().numpy() if k != "ids" else torch.cat(v).numpy()
            for k, v in cols.items() if v}


def _task_metrics(y, p, w, true_p) -> TaskMetrics:
    keep = w > 0
    y, p = y[keep], p[keep]
    bayes = normalized_entropy(y, true_p[keep]) if true_p is not None else None
    return TaskMetrics(n=int(keep.sum()), positives=int(y.sum()), ne=normalized_entropy(y, p),
                       auc=auc(y, p), calibration=calibration(y, p), bayes_ne=bayes)


def to_eval_outputs(model, pred: dict[str, np.ndarray], eval_name: str = "") -> EvalOutputs:
    """Predictions -> EvalOutputs; conditional tasks become ``ct<task>`` (see module docstring)."""
    tasks = list(model.config.tasks)
    labels, probs = {}, {}
    for i, task in enumerate(tasks):
        if np.all(pred["weights"][:, i] > 0):
            labels[task], probs[task] = pred["labels"][:, i], pred["probs"][:, i]
        else:  # applies only after a click (the first task)
            labels[f"ct{task}"] = pred["labels"][:, i] * pred["labels"][:, 0]
            probs[f"ct{task}"] = pred["probs"][:, i] * pred["probs"][:, 0]
    return EvalOutputs.build(pred["ids"], labels, probs, model=model.config.to_json(),
                             model_fingerprint=fingerprint(model.state_dict()),
                             info={"eval": eval_name, "size": model.config.size})


def evaluate(model, data, n_examples: int = 50_000, progress: bool = False) -> EvalReport:
    """NE / AUC / calibration (+ Bayes NE on synthetic data) per task on held-out ``data``.

    >>> from loka.models import Ranker, RankerConfig, SyntheticStream
    >>> cfg = RankerConfig.from_size("tiny")
    >>> report = evaluate(Ranker(cfg), SyntheticStream(cfg, 512, seed=9), n_examples=1024)
    >>> sorted(report.tasks)
    ['ctr', 'cvr']
    """
    pred = predict(model, data, n_examples, progress)
    true_p = pred.get("true_probs")
    tasks = {task: _task_metrics(pred["labels"][:, i], pred["probs"][:, i], pred["weights"][:, i],
                                 None if true_p is None else true_p[:, i])
             for i, task in enumerate(model.config.tasks)}
    name = f"seed={getattr(data, 'seed', '?')},n={n_examples}"
    return EvalReport(tasks=tasks, outputs=to_eval_outputs(model, pred, name))


def compare(model_a, model_b, data, n_examples: int = 50_000, metric: str = "ne",
            n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired comparison on the same eval examples: {task: BootstrapResult of b - a}.

    Both models score exactly the same examples, so example-level noise cancels and the
    interval is much tighter than comparing two separate NE numbers.
    """
    differ = input_mismatch(model_a.config, model_b.config)
    if differ:
        raise ValueError(f"cannot compare a {model_a.config.size!r} ranker with a {model_b.config.size!r} "
                         f"ranker: their inputs differ ({', '.join(differ)}), so no example feeds both; "
                         "compare two checkpoints of the same size and features.")
    pa, pb = predict(model_a, data, n_examples), predict(model_b, data, n_examples)
    if not np.array_equal(pa["ids"], pb["ids"]):
        raise ValueError("the two models did not score the same examples; pass a reproducible stream.")
    out = {}
    for i, task in enumerate(model_a.config.tasks):
        keep = pa["weights"][:, i] > 0
        out[task] = paired_bootstrap(pa["labels"][keep, i], pa["probs"][keep, i], pb["probs"][keep, i],
                                     metric=metric, n_boot=n_boot, seed=seed, confidence=confidence)
    return out
