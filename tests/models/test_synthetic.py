"""Synthetic stream: reproducible, resumable, heavy-tailed, with a meaningful Bayes floor."""

from __future__ import annotations

import pytest
import torch

from loka.gate import normalized_entropy
from loka.models import RankerConfig, SyntheticStream


@pytest.fixture(scope="module")
def big_batch():
    cfg = RankerConfig.from_size("small")
    seed = int(torch.randint(0, 1 << 30, ()))
    return cfg, SyntheticStream(cfg, batch_size=20_000, seed=seed).batch(0)


def test_same_seed_same_batch_different_seed_different_batch():
    cfg = RankerConfig.from_size("tiny")
    seed = int(torch.randint(0, 1 << 30, ()))
    a, b = SyntheticStream(cfg, 64, seed=seed), SyntheticStream(cfg, 64, seed=seed)
    c = SyntheticStream(cfg, 64, seed=seed + 1)
    assert torch.equal(a.batch(3).sparse, b.batch(3).sparse)
    assert torch.equal(a.batch(3).labels, b.batch(3).labels)
    assert not torch.equal(a.batch(3).sparse, c.batch(3).sparse)


def test_rates_are_ads_like(big_batch):
    _, batch = big_batch
    ctr = batch.labels[:, 0].mean().item()
    clicks = batch.labels[:, 0].sum()
    cvr = (batch.labels[:, 1].sum() / clicks).item()
    assert 0.015 < ctr < 0.06
    assert 0.03 < cvr < 0.25
    assert torch.equal(batch.label_weights[:, 1], batch.labels[:, 0])  # CVR applies to clicks


def test_bayes_floor_is_below_one_but_not_trivial(big_batch):
    _, batch = big_batch
    ne = normalized_entropy(batch.labels[:, 0].numpy(), batch.true_probs[:, 0].double().numpy())
    assert 0.5 < ne < 0.95


def test_distributions_are_heavy_tailed_and_zipf(big_batch):
    cfg, batch = big_batch
    lognormal = batch.dense[:, 0]
    assert lognormal.max() / lognormal.median() > 100
    users = batch.sparse[:, 0]
    counts = torch.bincount(users, minlength=cfg.sparse_cardinalities[0]).float()
    assert counts.max() > 20 * counts.mean()  # a head of very frequent ids
    for i, card in enumerate(cfg.sparse_cardinalities):
        assert 0 <= batch.sparse[:, i].min() and batch.sparse[:, i].max() < card


def test_history_lengths_vary_and_padding_is_masked(big_batch):
    cfg, batch = big_batch
    lengths = batch.hist_mask.sum(1)
    assert (lengths == 0).any() and (lengths == cfg.history_len).any()
    assert lengths.float().median() < cfg.history_len / 2  # most users short
    assert (batch.hist_gaps[~batch.hist_mask] == 0).all()
    # masks are prefixes: no real event after a padding slot
    assert (batch.hist_mask[:, 1:] <= batch.hist_mask[:, :-1]).all()
    yearly = ((batch.hist_gaps - 365).abs() < 15) & batch.hist_mask
    assert yearly.any(1).float().mean() > 0.1  # the periodic signal is present


def test_position_is_checkpointable():
    cfg = RankerConfig.from_size("tiny")
    a = SyntheticStream(cfg, 32, seed=5)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = next(a)
    b = SyntheticStream(cfg, 32, seed=5)
    b.load_state_dict(state)
    assert torch.equal(next(b).example_ids, expected.example_ids)
    with pytest.raises(ValueError, match="seed"):
        SyntheticStream(cfg, 32, seed=6).load_state_dict(state)


def test_ranks_read_disjoint_examples():
    cfg = RankerConfig.from_size("tiny")
    r0 = SyntheticStream(cfg, 16, seed=1, rank=0, world_size=2)
    r1 = SyntheticStream(cfg, 16, seed=1, rank=1, world_size=2)
    ids0 = torch.cat([r0.batch(i).example_ids for i in range(4)])
    ids1 = torch.cat([r1.batch(i).example_ids for i in range(4)])
    assert not set(ids0.tolist()) & set(ids1.tolist())


def test_config_without_semantic_features_is_rejected():
    cfg = RankerConfig.from_size("tiny", sparse_cardinalities=(10, 10))
    with pytest.raises(ValueError, match="8 sparse"):
        SyntheticStream(cfg, 8)
