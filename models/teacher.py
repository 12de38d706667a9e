"""The hidden teacher that labels synthetic ads logs, so quality numbers mean something.

Click and conversion probabilities are a fixed function of the features, drawn once from
``teacher_seed``. A model can at best recover them, so NE computed with the true
probabilities is the Bayes-optimal floor that the trained model is reported against.
The teacher mixes the kinds of signal a production ranker must learn:

- id effects on Zipf-distributed ids (item, advertiser, user) -> embeddings;
- feature crosses (age x category, region x category, dense x device) -> interaction arch;
- heavy-tailed dense features seen through saturating transforms -> dense arch;
- interest match with a multi-hot bag -> pooled embeddings;
- short-term history match and a *yearly* periodic signal (same category bought about
  365 days ago) -> sequence arch with time gaps.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Feature roles of the first 8 sparse features (see loka.models.config).
USER, ITEM, ADVERTISER, CATEGORY, AGE, REGION, DEVICE, HOUR = range(8)
TABLE_ROWS = 1 << 18  # id-effect tables wrap ids beyond this (keeps `large` cheap)


def _normal(gen: torch.Generator, shape, std: float, device) -> Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(device)


class Teacher:
    """Ground-truth logits for (ctr, cvr | click); built on ``device`` from ``seed``."""

    def __init__(self, cardinalities: tuple[int, ...], seed: int, device) -> None:
        # Tables are drawn on CPU so the teacher is the same function on every device.
        gen = torch.Generator()
        gen.manual_seed(10_007 * seed + 17)
        c = cardinalities
        self.n_cat = c[CATEGORY]
        rows = lambda n: min(n, TABLE_ROWS)  # noqa: E731
        self.q_item = _normal(gen, (rows(c[ITEM]),), 0.6, device)
        self.q_adv = _normal(gen, (rows(c[ADVERTISER]),), 0.5, device)
        self.q_user = _normal(gen, (rows(c[USER]),), 0.3, device)
        self.age_cat = _normal(gen, (c[AGE], self.n_cat), 0.7, device)
        self.region_cat = _normal(gen, (rows(c[REGION]), self.n_cat), 0.4, device)
        self.q2_item = _normal(gen, (rows(c[ITEM]),), 0.5, device)
        self.device_cat = _normal(gen, (c[DEVICE], self.n_cat), 0.4, device)
        self.ctr_bias = 0.0
        self.cvr_bias = 0.0

    @staticmethod
    def _lookup(table: Tensor, ids: Tensor) -> Tensor:
        return table[ids % table.shape[0]]

    def logits(self, f: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Feature dict from `SyntheticStream` -> (ctr logits [B], cvr-given-click logits [B])."""
        s, d = f["sparse"], f["dense"]
        cat = s[:, CATEGORY]
        ctr = (self._lookup(self.q_item, s[:, ITEM]) + self._lookup(self.q_adv, s[:, ADVERTISER])
               + self._lookup(self.q_user, s[:, USER])
               + self.age_cat[s[:, AGE], cat] + self._lookup(self.region_cat, s[:, REGION])[
                   torch.arange(len(cat), device=cat.device), cat]
               + 0.5 * torch.tanh(torch.log1p(d[:, 0].abs()) - 1.0)
               + 0.5 * torch.tanh(d[:, 1] / 2.0)
               + 0.3 * torch.tanh(torch.log1p(d[:, 2].abs()) - 2.0)
               + 0.5 * torch.tanh(d[:, 3]) * torch.where(s[:, DEVICE] == 0, 1.0, -1.0)
               + 0.3 * torch.sin(2 * torch.pi * s[:, HOUR].float() / 24.0)
               + 0.7 * f["interest_match"] + self._history_terms(f, cat))
        cvr = (self._lookup(self.q2_item, s[:, ITEM]) + self.device_cat[s[:, DEVICE], cat]
               - 0.5 * torch.tanh(torch.log1p(d[:, 0].abs()) - 1.0)
               + 0.8 * f["hist_converted_cat"])
        return ctr + self.ctr_bias, cvr + self.cvr_bias

    @staticmethod
    def _history_terms(f: dict[str, Tensor], cat: Tensor) -> Tensor:
        """Short-term category match + yearly periodic match, both only over real events."""
        same = (f["hist_cats"] == cat[:, None]) & f["hist_mask"]
        recent = (f["hist_gaps"] < 14.0) & f["hist_mask"]
        short_term = (same & recent).sum(1) / (1.0 + recent.sum(1))
        yearly = (same & ((f["hist_gaps"] - 365.0).abs() < 10.0)).any(1).float()
        return 2.0 * short_term + 1.2 * yearly

    def calibrate(self, f: dict[str, Tensor], ctr_rate: float, cvr_rate: float) -> None:
        """Choose the biases so the mean CTR and the click-weighted mean CVR hit the targets."""
        self.ctr_bias = self.cvr_bias = 0.0
        ctr, cvr = self.logits(f)
        self.ctr_bias = _solve_bias(ctr, torch.ones_like(ctr), ctr_rate)
        self.cvr_bias = _solve_bias(cvr, torch.sigmoid(ctr + self.ctr_bias), cvr_rate)


def _solve_bias(logits: Tensor, weights: Tensor, target: float) -> float:
    """Bisection for b with sum(w * sigmoid(logits + b)) / sum(w) = target."""
    lo, hi = -30.0, 30.0
    logits, weights = logits.double(), weights.double()
    for _ in range(60):
        mid = (lo + hi) / 2
        rate = float((weights * torch.sigmoid(logits + mid)).sum() / weights.sum())
        lo, hi = (mid, hi) if rate < target else (lo, mid)
    return (lo + hi) / 2
