"""Seeded, streaming synthetic ads logs with a planted ground truth (see `teacher.py`).

No dataset files: batch k of a stream is a pure function of (seed, k), generated with a
counter-seeded `torch.Generator` on any device (the GPU for `large`), so

- the stream position is one integer (checkpoint it, resume exactly);
- data-parallel ranks read disjoint batches (rank r of W reads k*W + r);
- train and held-out streams share the teacher (``teacher_seed``) but not the examples (``seed``).

Distributions: Zipf ids, log-normal and Student-t dense features with rare 1000x outliers,
history lengths log-normal (most users short, some at the cap) with padding masks, a yearly
periodic category for 30% of users, CTR about 3% and CVR about 10% of clicks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import Batch
from .config import RankerConfig
from .teacher import ADVERTISER, AGE, CATEGORY, DEVICE, HOUR, ITEM, REGION, USER, Teacher

CTR_RATE, CVR_RATE = 0.03, 0.10
_MULTIPLIERS = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 1181783497, 3144134277)
_PRIME = 2147483647
_CALIBRATION: dict[tuple, tuple[float, float]] = {}


def _hash(x: Tensor, salt: int) -> Tensor:
    """Deterministic integer hash of non-negative ids (per-user latent traits)."""
    h = (x * _MULTIPLIERS[salt]) % _PRIME
    return h ^ (h >> 13)


def _zipf(gen: torch.Generator, n: int, shape, s: float, device) -> Tensor:
    """Ids in [0, n) with P(id) ~ (id+1)^-s, by inverting the continuous Zipf CDF."""
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float64)
    x = ((n ** (1.0 - s) - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
    return (x.floor().long() - 1).clamp(0, n - 1)


def _student_t(gen, shape, df: int, device) -> Tensor:
    z = torch.randn(shape, generator=gen, device=device)
    chi2 = (torch.randn((df,) + tuple(shape), generator=gen, device=device) ** 2).sum(0)
    return z / torch.sqrt(chi2 / df)


def history_length(gen: torch.Generator, b: int, t: int, device=None) -> Tensor:
    """History lengths [B] float (floor and clamp to [0, t] for events): log-normal around t / 6,
    and no history for one user in ten. `loka.models.estimate` draws masks from it too."""
    length = torch.exp(math.log(max(t / 6, 1.0)) + torch.randn(b, generator=gen, device=device))
    return torch.where(torch.rand(b, generator=gen, device=device) < 0.1, 0.0, length)


class SyntheticStream:
    """Batches of ``batch_size`` synthetic examples for ``cfg``; iterate or index by position.

    >>> stream = SyntheticStream(RankerConfig.from_size("tiny"), batch_size=8, seed=1)
    >>> b = stream.batch(0); b.sparse.shape, b.labels.shape
    (torch.Size([8, 8]), torch.Size([8, 2]))
    """

    def __init__(self, cfg: RankerConfig, batch_size: int, seed: int = 0, teacher_seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> None:
        if cfg.n_sparse < 8 or cfg.n_multi_hot < 1 or cfg.n_dense < 4 or cfg.tasks[:2] != ("ctr", "cvr"):
            raise ValueError("SyntheticStream needs >= 8 sparse features (user, item, advertiser, "
                             "category, age, region, device, hour), >= 1 multi-hot, >= 4 dense and "
                             "tasks starting ('ctr', 'cvr'); use RankerConfig.from_size(...).")
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError("batch_size must be >= 1 and 0 <= rank < world_size.")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # next batch this rank reads
        self.teacher = Teacher(cfg.sparse_cardinalities, teacher_seed, self.device)
        key = (cfg, teacher_seed, self.device.type)
        if key not in _CALIBRATION:  # the biases depend on the config and teacher only
            calib = self._features(self._generator(0, seed=-1 - teacher_seed), 20_000)
            self.teacher.calibrate(calib, CTR_RATE, CVR_RATE)
            _CALIBRATION[key] = (self.teacher.ctr_bias, self.teacher.cvr_bias)
        self.teacher.ctr_bias, self.teacher.cvr_bias = _CALIBRATION[key]

    def base_rates(self) -> dict[str, float]:
        """Target label rates per task (CVR among clicks), used to initialize head biases."""
        rates = {"ctr": CTR_RATE, "cvr": CVR_RATE}
        return {t: rates.get(t, CTR_RATE) for t in self.cfg.tasks}

    # -- stream position ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"Stream state is for seed={state['seed']}, batch_size="
                             f"{state['batch_size']}; build the stream with those to resume.")
        self.position = int(state["position"])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.position)
        self.position += 1
        return batch

    # -- generation --------------------------------------------------------------------------
    def _generator(self, index: int, seed: int | None = None) -> torch.Generator:
        seed = self.seed if seed is None else seed
        gen = torch.Generator(device=self.device)
        gen.manual_seed((seed * 1_000_003 + index * 7919 + 12345) % (1 << 62))
        return gen

    def batch(self, position: int) -> Batch:
        """This rank's batch at ``position`` (a pure function of seed, rank and position)."""
        index = position * self.world_size + self.rank
        gen = self._generator(index)
        f = self._features(gen, self.batch_size)
        ctr_logit, cvr_logit = self.teacher.logits(f)
        p = torch.stack([torch.sigmoid(ctr_logit), torch.sigmoid(cvr_logit)], 1)
        u = torch.rand(p.shape, generator=gen, device=self.device)
        click = (u[:, 0] < p[:, 0]).float()
        conv = (u[:, 1] < p[:, 1]).float() * click
        n_extra = len(self.cfg.tasks) - 2  # extra tasks get the CTR label (documented)
        labels = torch.stack([click, conv] + [click] * n_extra, 1)
        weights = torch.stack([torch.ones_like(click), click] + [torch.ones_like(click)] * n_extra, 1)
        probs = torch.cat([p, p[:, :1].expand(-1, n_extra)], 1)
        ids = index * self.batch_size + torch.arange(self.batch_size, device=self.device)
        return Batch(f["dense"], f["sparse"], f["multi_hot"], f["multi_hot_mask"], f["hist_items"],
                     f["hist_actions"], f["hist_gaps"], f["hist_mask"], labels, weights, probs, ids)

    def _features(self, gen: torch.Generator, b: int) -> dict[str, Tensor]:
        c, dev = self.cfg.sparse_cardinalities, self.device
        n_cat = c[CATEGORY]
        user = _zipf(gen, c[USER], (b,), 1.1, dev)
        fav = torch.stack([_hash(user, 0) % n_cat, _hash(user, 1) % n_cat], 1)  # [B, 2]
        yearly_cat = _hash(user, 2) % n_cat
        has_yearly = (_hash(user, 3) % 10) < 3
        # Candidate: from a favourite category, the yearly one, or the popular head.
        r = torch.rand(b, generator=gen, device=dev)
        coin = torch.randint(0, 2, (b,), generator=gen, device=dev)
        per_cat = max(c[ITEM] // n_cat, 1)
        cat = torch.where(r < 0.35, fav.gather(1, coin[:, None])[:, 0],
                          torch.where(r < 0.45, yearly_cat, _zipf(gen, n_cat, (b,), 1.1, dev)))
        item = (cat + n_cat * _zipf(gen, per_cat, (b,), 1.1, dev)).clamp_max(c[ITEM] - 1)
        cat = item % n_cat
        sparse = [user, item, (item // n_cat) % c[ADVERTISER], cat, _hash(user, 4) % c[AGE],
                  _hash(user, 5) % c[REGION], _zipf(gen, c[DEVICE], (b,), 1.5, dev),
                  torch.randint(0, c[HOUR], (b,), generator=gen, device=dev)]
        sparse += [_zipf(gen, card, (b,), 1.05, dev) for card in c[8:]]
        f = {"sparse": torch.stack(sparse, 1), "dense": self._dense(gen, b)}
        f.update(self._multi_hot(gen, b, fav, cat))
        f.update(self._history(gen, b, fav, yearly_cat, has_yearly, cat))
        return f

    def _dense(self, gen, b: int) -> Tensor:
        cols = []
        for j in range(self.cfg.n_dense):
            if j % 2 == 0:
                cols.append(torch.exp(1.0 + 1.5 * torch.randn(b, generator=gen, device=self.device)))
            else:
                cols.append(_student_t(gen, (b,), 3, self.device))
        dense = torch.stack(cols, 1)
        outlier = torch.rand(dense.shape, generator=gen, device=self.device) < 0.002
        return torch.where(outlier, dense * 1000.0, dense)

    def _multi_hot(self, gen, b: int, fav: Tensor, cat: Tensor) -> dict[str, Tensor]:
        cfg, dev = self.cfg, self.device
        length = self.cfg.multi_hot_len
        n = torch.randint(1, length + 1, (b, cfg.n_multi_hot), generator=gen, device=dev)
        mask = torch.arange(length, device=dev) < n[..., None]  # [B, M, L]
        ids = torch.stack([_zipf(gen, card, (b, length), 1.1, dev)
                           for card in cfg.multi_hot_cardinalities], 1)
        # Bag 0 = interest categories; its first slots are the user's favourites.
        interests = ids[:, 0].clone()
        interests[:, : min(2, length)] = fav[:, : min(2, length)]
        ids[:, 0] = interests % cfg.multi_hot_cardinalities[0]
        match = ((ids[:, 0] == cat[:, None]) & mask[:, 0]).any(1).float()
        return {"multi_hot": ids, "multi_hot_mask": mask, "interest_match": match}

    def _history(self, gen, b, fav, yearly_cat, has_yearly, cat) -> dict[str, Tensor]:
        t, dev, c = self.cfg.history_len, self.device, self.cfg.sparse_cardinalities
        n_cat = c[CATEGORY]
        if t == 0:
            items, actions, gaps, mask = Batch.empty_history(b, dev)
            return {"hist_items": items, "hist_actions": actions, "hist_gaps": gaps,
                    "hist_mask": mask, "hist_cats": items, "hist_converted_cat": torch.zeros(b, device=dev)}
        length = history_length(gen, b, t, dev)
        mask = torch.arange(t, device=dev) < length.floor().clamp(0, t)[:, None]  # [B, T]
        from_fav = torch.rand(b, t, generator=gen, device=dev) < 0.5
        coin = torch.randint(0, 2, (b, t), generator=gen, device=dev)
        hcat = torch.where(from_fav, fav.gather(1, coin), _zipf(gen, n_cat, (b, t), 1.1, dev))
        gaps = torch.exp(torch.empty(b, t, device=dev).uniform_(math.log(0.01), math.log(730.0),
                                                                generator=gen))
        # Yearly signal: one real event of the yearly category about 365 days ago.
        slot = (torch.rand(b, generator=gen, device=dev) * length.clamp(1, t)).long().clamp_max(t - 1)
        yearly = has_yearly[:, None] & (torch.arange(t, device=dev) == slot[:, None]) & mask
        hcat = torch.where(yearly, yearly_cat[:, None], hcat)
        gaps = torch.where(yearly, 365.0 + 4.0 * torch.randn(b, t, generator=gen, device=dev), gaps)
        per_cat = max(c[ITEM] // n_cat, 1)
        items = (hcat + n_cat * _zipf(gen, per_cat, (b, t), 1.1, dev)).clamp_max(c[ITEM] - 1)
        hcat = items % n_cat
        r = torch.rand(b, t, generator=gen, device=dev)
        actions = torch.where(r < 0.7, 1, torch.where(r < 0.95, 2, 3))
        converted = ((hcat == cat[:, None]) & (actions == 3) & mask).any(1).float()
        return {"hist_items": torch.where(mask, items, 0), "hist_actions": torch.where(mask, actions, 0),
                "hist_gaps": torch.where(mask, gaps, 0.0), "hist_mask": mask, "hist_cats": hcat,
                "hist_converted_cat": converted}
