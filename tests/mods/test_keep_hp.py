"""Keep-in-hp policy: raw dense first projection, task heads and tiny GEMMs, each with a reason."""

import pytest
import torch
from torch import nn

import loka
from loka.mods import ModResult, get_mod, keep_in_hp, module_filter_fn


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 64)
        self.dense_in = nn.Linear(8, 64)
        self.mid = nn.Linear(128, 64)
        self.head = nn.Linear(64, 1)

    def forward(self, ids, dense):
        h = torch.cat([self.emb(ids), self.dense_in(torch.log1p(dense.abs()))], -1)  # [B, 128]
        return self.head(torch.relu(self.mid(h))).squeeze(-1)


def test_policy_reasons():
    m = Tower()
    sample = (torch.randint(0, 10, (4,)), torch.randn(4, 8))
    policy = keep_in_hp(m, sample=sample, min_dim=4)
    assert set(policy) == {"dense_in", "head"}
    assert "raw dense" in policy["dense_in"] and "task head" in policy["head"]
    assert "tiny" in keep_in_hp(m, sample=sample, min_dim=100)["mid"]


def test_filter_plugs_into_convert():
    m = Tower()
    sample = (torch.randint(0, 10, (4,)), torch.randn(4, 8))
    policy = keep_in_hp(m, sample=sample)
    res = loka.convert(m, "tensorwise", kernels="emulated", module_filter_fn=module_filter_fn(policy))
    assert res.converted == ["mid"]


def test_tiny_ranker_heads_and_dense_input():
    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker
    from loka.models.synthetic import SyntheticStream

    cfg = RankerConfig.from_size("tiny")
    policy = keep_in_hp(Ranker(cfg), sample=SyntheticStream(cfg, batch_size=4).batch(0), min_dim=0)
    assert "task head" in policy["over.heads.ctr"] and "task head" in policy["over.heads.cvr"]
    assert "raw dense" in policy["dense.mlp.blocks.0.linear"]
    assert "interaction.layers.0.fmb.mlp.blocks.0.linear" not in policy


def test_registry_and_result_table():
    apply = get_mod("keep_hp")
    res = apply(Tower(), sample=(torch.randint(0, 10, (2,)), torch.randn(2, 8)))
    assert isinstance(res, ModResult) and "keep bf16" in res.table()
    try:
        get_mod("nope")
    except ValueError as e:
        assert "unknown mod" in str(e)
    else:
        raise AssertionError("get_mod accepted an unknown name")


def test_linear_feeding_a_linear_directly_is_not_a_head():
    m = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 1))
    policy = keep_in_hp(m, sample=torch.randn(2, 8), min_dim=0, raw_inputs=False)
    assert set(policy) == {"1"}


def test_keep_hp_changes_nothing_and_says_so():
    res = get_mod("keep_hp")(Tower(), sample=(torch.randint(0, 10, (2,)), torch.randn(2, 8)))
    assert not res.changes and res.sites == []  # the model is unchanged: nothing listed as changed
    assert res.advice and dict(res.advice).keys() == res.data["policy"].keys()


def test_mod_result_refuses_a_change_that_is_none():
    from loka.mods.result import SiteChange

    with pytest.raises(ValueError, match="before == after"):
        ModResult("x", True, "nothing", (SiteChange("a", "K=16", "K=16"),))
