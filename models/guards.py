"""Training guards: a non-finite value stops the run (or skips its step) before it reaches a
checkpoint, and says where it first appeared; labels are checked before they train anything,
and NaN/Inf dense features are counted (warned about once per run, or refused).

Why: one NaN or Inf in a loss, a gradient or a learning rate spreads to every weight within a
step, and a run that goes on writes an all-NaN checkpoint over the last good one and exits 0.
The per-step check costs one reduction over the gradients and one host sync beside the loss's;
the full search for *which* tensor went bad runs only once something did.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .batch import Batch


NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_DENSE_POLICIES = ("warn", "stop")  # NaN/Inf dense features: replaced with a warning, or refused
MAX_CONSECUTIVE_SKIPS = 10  # a run that cannot take a finite step for this long has diverged


class NonFiniteError(RuntimeError):
    """Training met NaN/Inf; the message says where (loss, parameter, gradient or input)."""


def check_batch(batch: Batch, tasks: tuple[str, ...]) -> int:
    """ValueError unless labels are 0/1 and label weights finite and >= 0, shaped [B, n_tasks];
    returns how many dense feature values are NaN/Inf (the dense arch replaces them, the
    trainer counts them: a data bug made visible). One host sync for all of it."""
    labels, weights = batch.labels, batch.label_weights
    if labels is None or weights is None:
        raise ValueError("training batches need labels and label_weights ([B, n_tasks] each).")
    want = (batch.size, len(tasks))
    if tuple(labels.shape) != want or tuple(weights.shape) != want:
        raise ValueError(f"labels {tuple(labels.shape)} and label_weights {tuple(weights.shape)} "
                         f"must both be [B, n_tasks] = {want} for tasks {list(tasks)}.")
    bad_label = (labels != 0) & (labels != 1)  # NaN compares unequal to both
    bad_weight = ~torch.isfinite(weights) | (weights < 0)
    bad_dense = (~torch.isfinite(batch.dense)).sum() if batch.dense.is_floating_point() else labels.new_zeros(())
    flags = torch.stack([bad_label.any().long(), bad_weight.any().long(), bad_dense.long()]).tolist()
    if flags[0]:
        i, t = bad_label.nonzero()[0].tolist()
        raise ValueError(f"labels must be 0 or 1; example {i} has {labels[i, t].item()!r} for task "
                         f"{tasks[t]!r}. Fix the data source (label_weights = 0 marks a task that "
                         "does not apply; the label there must still be 0 or 1).")
    if flags[1]:
        i, t = bad_weight.nonzero()[0].tolist()
        raise ValueError(f"label_weights must be finite and >= 0; example {i} has "
                         f"{weights[i, t].item()!r} for task {tasks[t]!r}.")
    return int(flags[2])


def report_nonfinite_dense(policy: str, count: int, step: int, *, first: bool, write) -> None:
    """``count`` NaN/Inf dense values in step ``step``'s batch: ValueError under policy "stop";
    under "warn", one line through ``write`` if this is the run's ``first`` such batch."""
    where = f"step {step}'s batch has {count} NaN/Inf dense feature values"
    if policy == "stop":
        raise ValueError(f"{where}; fix the data source, or let the model replace them (NaN -> 0, "
                         "+-Inf -> +-1e30) with nonfinite_dense='warn' (--on-nonfinite-dense warn).")
    if first:
        write(f"warning: {where}; the model replaces them (NaN -> 0, +-Inf -> +-1e30). Said once per run: "
              "the run's total is in metrics.jsonl (nonfinite_dense); stop on them with --on-nonfinite-dense stop.")


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """Name of the first tensor holding NaN or Inf (one host sync), or None."""
    named = [(n, t) for n, t in named if t is not None and (t.is_floating_point() or t.is_complex())]
    if not named:
        return None
    bad = torch.stack([~torch.isfinite(t).all() for _, t in named]).tolist()
    return next((name for (name, _), b in zip(named, bad) if b), None)


def grads_finite(model: nn.Module) -> Tensor:
    """0-d bool tensor (no sync): every gradient finite. A sum in fp64 carries any NaN/Inf."""
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad
             for p in model.parameters() if p.grad is not None]
    sums = [g.sum(dtype=torch.float64) for g in grads]
    if not sums:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(sums).sum())


def optimizer_tensors(optimizers: dict) -> list[tuple[str, Tensor]]:
    """(name, tensor) for every optimizer state tensor, e.g. ``dense.state[3].exp_avg``."""
    out = []
    for name, opt in optimizers.items():
        for i, state in enumerate(opt.state.values()):
            out += [(f"{name}.state[{i}].{k}", v) for k, v in state.items() if isinstance(v, Tensor)]
    return out


def diagnose(model: nn.Module, losses: dict[str, Tensor], rerun) -> tuple[str, bool]:
    """(where the first non-finite value of this step is, whether skipping the step cannot help),
    looked for in the order a NaN spreads: weights, module outputs (``rerun()`` repeats the
    step's forward), task losses, gradients."""
    weights = first_nonfinite(model.named_parameters())
    if weights is not None:
        return (f"parameter {weights} is already NaN/Inf (an earlier update made "
                "it so: too high a learning rate, or an overflow)"), True
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach()).item()}
    if bad:
        module = first_nonfinite_output(model, rerun)
        where = f"; the first module output with NaN/Inf is {module}" if module is not None else ""
        return f"the loss is non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())}){where}", False
    grad = first_nonfinite((n, p.grad.to_dense() if p.grad is not None and p.grad.is_sparse else p.grad)
                           for n, p in model.named_parameters())
    return f"the gradient of {grad} is NaN/Inf (finite loss: an overflow in backward)", False


def first_nonfinite_output(model: nn.Module, rerun) -> str | None:
    """The fqn of the first module (in completion order) whose output holds NaN/Inf when
    ``rerun()`` runs the forward again; forward hooks are removed afterwards."""
    names = {id(m): (n or "the model's output") for n, m in model.named_modules()}
    found: list[str] = []

    def hook(module, args, output) -> None:
        if not found and any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(output)):
            found.append(names[id(module)])

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            rerun()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def last_good(last) -> str:
    """'the last good checkpoint is X' / 'no checkpoint was written', for error messages."""
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written"


def check_before_save(model: nn.Module, optimizers: dict, step: int, last=None, rerun=None) -> None:
    """NonFiniteError instead of writing a checkpoint that holds NaN/Inf anywhere, or whose
    weights, finite but blown up, give NaN/Inf when ``rerun()`` repeats the forward of the step
    that produced them (one extra forward per checkpoint). ``last``: the newest good checkpoint."""
    bad = first_nonfinite([*model.state_dict().items(), *optimizer_tensors(optimizers)])
    if bad is not None:
        raise NonFiniteError(f"not writing a checkpoint at step {step}: {bad} holds NaN/Inf; {last_good(last)}.")
    module = first_nonfinite_output(model, rerun) if rerun is not None else None
    if module is not None:
        raise NonFiniteError(
            f"not writing a checkpoint at step {step}: its weights are finite but the forward on that step's "
            f"batch gives NaN/Inf (first in {module}): the update blew them up (too high a learning rate?); "
            f"{last_good(last)}. Lower the learning rate{' and resume from it' if last else ''}.")
