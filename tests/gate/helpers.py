"""Synthetic evaluation outputs with a controlled quality difference (fresh randomness)."""

from __future__ import annotations

import numpy as np

from loka.gate.outputs import EvalOutputs


def synthetic_pair(
    n: int = 8_000,
    *,
    noise: float = 0.0,
    tasks: tuple[str, ...] = ("click",),
    model: str = "ranker-a",
    rng: np.random.Generator | None = None,
) -> tuple[EvalOutputs, EvalOutputs]:
    """(baseline, candidate) on the same examples: the candidate's logits get N(0, noise) added.

    Extra logit noise can only hurt a calibrated model, so noise=0.3 is a clear NE
    regression and noise=0.002 a change far below the 0.02% budget.
    """
    rng = rng or np.random.default_rng(np.random.randint(2**31))
    ids = rng.choice(100 * n, size=n, replace=False)
    labels, base, cand = {}, {}, {}
    for task in tasks:
        z = rng.normal(size=n) - 1.5  # true logit
        labels[task] = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
        base_logit = z + rng.normal(0.0, 0.2, n)
        base[task] = 1.0 / (1.0 + np.exp(-base_logit))
        cand[task] = 1.0 / (1.0 + np.exp(-(base_logit + rng.normal(0.0, noise, n))))
    a = EvalOutputs.build(ids, labels, base, model=model, model_fingerprint="a")
    b = EvalOutputs.build(ids, labels, cand, model=model, model_fingerprint="b")
    return a, b
