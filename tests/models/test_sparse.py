"""The fused embedding lookup against per-table brute force; sparse gradients; old checkpoints."""

from __future__ import annotations

import pytest
import torch

from loka.models import Ranker, RankerConfig, RowWiseAdagrad, SyntheticStream, save_checkpoint
from loka.models.checkpoint import load_model
from loka.models.sparse import SparseArch, table_sizes


def _seed() -> int:
    seed = int(torch.randint(0, 1 << 30, ()))
    print("seed", seed)
    return seed


def _tables(arch: SparseArch, cfg: RankerConfig) -> list[torch.Tensor]:
    w = arch.table.weight.detach().double()
    return list(w.split(table_sizes(cfg)))


def test_fused_lookup_matches_one_table_per_feature_in_fp64():
    cfg = RankerConfig.from_size("small")
    arch = SparseArch(cfg).double()
    batch = SyntheticStream(cfg, 67, seed=_seed()).batch(0)
    batch.multi_hot_mask[:5] = False  # bags with no valid id pool to zeros
    n_h = 41
    gen = torch.Generator().manual_seed(_seed())
    items = torch.randint(0, cfg.sparse_cardinalities[cfg.history_item_feature], (n_h,), generator=gen)
    actions = torch.randint(0, cfg.n_actions, (n_h,), generator=gen)
    gaps = torch.randint(0, cfg.n_gap_buckets, (n_h,), generator=gen)
    context, events = arch(batch.sparse, batch.multi_hot, batch.multi_hot_mask, (items, actions, gaps))
    tables = _tables(arch, cfg)
    ref = [tables[i][batch.sparse[:, i]] for i in range(cfg.n_sparse)]
    for j in range(cfg.n_multi_hot):
        valid = batch.multi_hot_mask[:, j].double()
        bag = tables[cfg.n_sparse + j][batch.multi_hot[:, j]] * valid[..., None]
        ref.append(bag.sum(1) / valid.sum(1, keepdim=True).clamp_min(1))
    torch.testing.assert_close(context, torch.stack(ref, 1), rtol=1e-12, atol=1e-14)
    n_feat = cfg.n_sparse + cfg.n_multi_hot
    ref_events = tables[cfg.history_item_feature][items] + tables[n_feat][actions] + tables[n_feat + 1][gaps]
    torch.testing.assert_close(events, ref_events, rtol=1e-12, atol=1e-14)
    assert not context[:5, cfg.n_sparse:].any()


def test_gradient_is_sparse_and_adagrad_moves_only_touched_rows():
    cfg = RankerConfig.from_size("tiny")
    torch.manual_seed(_seed())
    model = Ranker(cfg)
    batch = SyntheticStream(cfg, 16, seed=_seed()).batch(0)
    out = model(batch)
    (out["ctr"].sum() + out["cvr"].sum()).backward()
    table = model.sparse.table.weight
    assert table.grad.is_sparse
    touched = torch.zeros(len(table), dtype=torch.bool)
    touched[table.grad.coalesce().indices()[0]] = True
    assert touched.sum() < len(table) / 2
    before = table.detach().clone()
    opt = RowWiseAdagrad([table], lr=0.1)
    opt.step()
    moved = (table.detach() != before).any(1)
    assert torch.equal(moved, touched & (table.grad.to_dense() != 0).any(1))
    assert opt.state[table]["sum"].shape == (len(table),)


def test_bf16_table_trains_with_float32_state():
    cfg = RankerConfig.from_size("tiny", embedding_dtype="bfloat16")
    model = Ranker(cfg)
    assert model.sparse.table.weight.dtype == torch.bfloat16
    batch = SyntheticStream(cfg, 32, seed=_seed()).batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    (out["ctr"].sum()).backward()
    opt = RowWiseAdagrad(model.embedding_parameters(), lr=0.1)
    opt.step()
    assert opt.state[model.sparse.table.weight]["sum"].dtype == torch.float32
    assert torch.isfinite(model.sparse.table.weight.float()).all()
    with pytest.raises(ValueError, match="embedding_dtype"):
        RankerConfig.from_size("tiny", embedding_dtype="float16")


def test_checkpoint_of_the_old_architecture_is_refused_naming_the_change(tmp_path):
    cfg = RankerConfig.from_size("tiny")
    path = save_checkpoint(tmp_path / "new.pt", Ranker(cfg))
    assert load_model(path).config == cfg  # this architecture round-trips
    state = torch.load(path, weights_only=False)
    del state["ranker_config"]["arch_version"]  # what architecture-1 checkpoints hold
    state["model"] = {"sparse.tables.0.weight": torch.zeros(500, 8)}
    del state["checksums"]  # architecture-1 checkpoints predate the per-tensor checksums
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="architecture 1.*fused embedding table"):
        load_model(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="architecture 2"):
        RankerConfig.from_size("tiny", arch_version=1)


@pytest.mark.slow
def test_compiled_step_keeps_the_lookup_eager_with_sparse_gradients():
    """torch.compile cannot trace the sparse backward: the lookup runs between graphs."""
    cfg = RankerConfig.from_size("tiny")
    torch.manual_seed(_seed())
    model = Ranker(cfg)
    compiled = torch.compile(model)
    batch = SyntheticStream(cfg, 64, seed=_seed()).batch(0)
    layout = model.history_layout(batch)
    out = compiled(batch, layout)
    out["ctr"].sum().backward()
    grad = model.sparse.table.weight.grad
    assert grad.is_sparse
    model.zero_grad(set_to_none=True)
    ref = model(batch, layout)
    ref["ctr"].sum().backward()
    torch.testing.assert_close(out["ctr"], ref["ctr"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.to_dense(), model.sparse.table.weight.grad.to_dense(), rtol=1e-4, atol=1e-6)
