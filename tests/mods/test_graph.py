"""Pattern discovery on a recorded forward pass: user models and the tiny ranker."""

import torch

from loka.mods import record

from .helpers import NormLinearBlock, ResidualNorm, TransposedShared


def test_norm_linear_and_linear_norm_found_by_dataflow():
    m = NormLinearBlock()
    flow = record(m, torch.randn(5, 24))
    (nl,) = flow.norm_to_linear()
    assert nl.norm == "norm" and set(nl.linears) == {"a", "b"} and nl.exclusive
    pairs = {(p.linear, p.norm) for p in flow.linear_to_norm()}
    assert pairs == {("l2", "n2")}
    assert flow.shared_input() == [("a", "b")]


def test_other_consumer_makes_block_not_exclusive():
    flow = record(ResidualNorm(), torch.randn(3, 16))
    (nl,) = flow.norm_to_linear()
    assert not nl.exclusive and any("add" in c for c in nl.other_consumers)


def test_layout_ops_written_twice_are_one_value():
    flow = record(TransposedShared(), torch.randn(2, 12, 6))
    assert flow.shared_input() == [("p", "q", "r")]


def test_tiny_ranker_patterns():
    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker
    from loka.models.synthetic import SyntheticStream

    cfg = RankerConfig.from_size("tiny")
    flow = record(Ranker(cfg), SyntheticStream(cfg, batch_size=4).batch(0))
    norm_lin = {(b.norm, b.linears) for b in flow.norm_to_linear()}
    assert ("sequence.blocks.0.norm1", ("sequence.blocks.0.qkv",)) in norm_lin
    lin_norm = {(b.linear, b.norm) for b in flow.linear_to_norm()}
    assert ("over.trunk.blocks.0.linear", "over.trunk.blocks.0.norm") in lin_norm
    shared = [set(g) for g in flow.shared_input()]
    assert {"over.heads.ctr", "over.heads.cvr"} in shared
    assert {"interaction.layers.0.fmb.fm.proj", "interaction.layers.0.lcb.linear",
            "interaction.layers.0.residual.linear"} in shared


def test_user_norm_class_registered_by_kind():
    from torch import nn

    from loka.mods import register_norm
    from loka.mods.norms import NORM_KINDS

    class MyRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps, self.normalized_shape = nn.Parameter(torch.ones(d)), 1e-6, (d,)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    m = nn.Sequential(MyRMSNorm(8), nn.Linear(8, 4))
    assert record(m, torch.randn(2, 8)).norm_to_linear() == []
    register_norm(MyRMSNorm, "rmsnorm")
    try:
        (nl,) = record(m, torch.randn(2, 8)).norm_to_linear()
        assert nl.norm == "0" and nl.linears == ("1",) and nl.exclusive
    finally:
        NORM_KINDS.pop(MyRMSNorm)
