"""The ranker's arches: shapes, named GEMM sites, masking, and the FM against an fp64 reference."""

from __future__ import annotations

import pytest
import torch

from loka.models import Ranker, RankerConfig, SyntheticStream
from loka.models.interaction import FMInteraction
from loka.models.layers import BatchMatmul


def _batch(cfg, n=16, seed=None):
    seed = int(torch.randint(0, 1 << 30, ())) if seed is None else seed
    return SyntheticStream(cfg, batch_size=n, seed=seed).batch(0)


def test_tiny_is_tiny_and_outputs_one_logit_per_task():
    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg)
    assert model.num_parameters() < 1_000_000
    out = model(_batch(cfg))
    assert set(out) == {"ctr", "cvr"}
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in out.values())


def test_every_named_gemm_site_is_visible():
    model = Ranker(RankerConfig.from_size("tiny"))
    names = dict(model.named_modules())
    for fqn in ("interaction.layers.0.fmb.fm.proj", "interaction.layers.0.fmb.mlp.out",
                "interaction.layers.0.lcb.linear", "sequence.blocks.0.qkv", "sequence.blocks.0.ffn_gate",
                "dense.mlp.out", "over.trunk.blocks.0.linear", "over.heads.ctr", "over.heads.cvr"):
        assert isinstance(names[fqn], torch.nn.Linear), fqn
    assert isinstance(names["interaction.layers.0.fmb.fm.bmm"], BatchMatmul)


def test_fm_interaction_matches_fp64_reference():
    n, d, k = 7, 5, 3
    fm = FMInteraction(n, k).double()
    x = torch.randn(4, n, d, dtype=torch.float64)
    ref = torch.einsum("bnd,bmd,km->bnk", x, x, fm.proj.weight)
    torch.testing.assert_close(fm(x), ref, rtol=1e-12, atol=1e-12)


def test_padding_in_history_and_bags_does_not_change_scores():
    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg).eval()
    batch = _batch(cfg, 32)
    ref = model.predict(batch)
    noisy = batch.slice(0, batch.size)
    pad = ~batch.hist_mask
    noisy.hist_items = torch.where(pad, torch.randint_like(batch.hist_items, cfg.sparse_cardinalities[1]), batch.hist_items)
    noisy.hist_actions = torch.where(pad, torch.randint_like(batch.hist_actions, cfg.n_actions), batch.hist_actions)
    noisy.hist_gaps = torch.where(pad, torch.rand_like(batch.hist_gaps) * 500, batch.hist_gaps)
    noisy.multi_hot = torch.where(batch.multi_hot_mask, batch.multi_hot, torch.randint_like(batch.multi_hot, 16))
    out = model.predict(noisy)
    for task in ref:
        torch.testing.assert_close(out[task], ref[task], rtol=1e-5, atol=1e-6)


def test_users_without_history_get_finite_scores():
    cfg = RankerConfig.from_size("tiny")
    batch = _batch(cfg, 8)
    batch.hist_mask = torch.zeros_like(batch.hist_mask)
    out = Ranker(cfg)(batch)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_every_parameter_gets_a_gradient():
    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg)
    batch = _batch(cfg, 64)
    sum(v.sum() for v in model(batch).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_model_without_history_or_multi_hot():
    cfg = RankerConfig.from_size("tiny", history_len=0, multi_hot_cardinalities=(), tasks=("ctr",))
    model = Ranker(cfg)
    assert model.sequence is None
    b = 5
    from loka.models import Batch
    items, actions, gaps, mask = Batch.empty_history(b)
    batch = Batch(torch.randn(b, cfg.n_dense), torch.zeros(b, cfg.n_sparse, dtype=torch.long),
                  torch.zeros(b, 0, 4, dtype=torch.long), torch.zeros(b, 0, 4, dtype=torch.bool),
                  items, actions, gaps, mask)
    assert model(batch)["ctr"].shape == (b,)


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_named_sizes_validate_and_round_trip(size):
    cfg = RankerConfig.from_size(size)
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes", [{"embed_dim": 0}, {"seq_dim": 15, "seq_heads": 2},
                                     {"tasks": ()}, {"sparse_cardinalities": ()},
                                     {"history_item_feature": 99}])
def test_bad_config_raises_value_error_with_advice(changes):
    with pytest.raises(ValueError):
        RankerConfig.from_size("tiny", **changes)


def test_unknown_size_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        RankerConfig.from_size("huge")


def test_heavy_tailed_and_nonfinite_dense_inputs_stay_finite():
    cfg = RankerConfig.from_size("tiny")
    batch = _batch(cfg, 8)
    batch.dense[0, 0] = 1e30
    batch.dense[1, 1] = float("nan")
    batch.dense[2, 2] = float("inf")
    out = Ranker(cfg)(batch)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_cpu_attention_matches_sdpa_with_padding():
    import torch.nn.functional as F

    from loka.models.sequence import attention

    q, k, v = (torch.randn(3, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 6) < 0.6
    mask[:, 0] = True  # the CLS token is always valid
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(attention(q, k, v, mask), ref, rtol=1e-10, atol=1e-12)
