"""The TorchRec sparse arch (KJT + EBC + fused row-wise Adagrad) against the pure-PyTorch one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from loka.models.config import RankerConfig
from loka.models.ranker import Ranker
from loka.models.synthetic import SyntheticStream
from loka.models.train import TrainConfig, train

pytest.importorskip("torchrec", reason="torchrec not installed (scripts/setup.sh installs it)")

from loka.models.sharded_train import train_sharded  # noqa: E402
from loka.models.sharding import ShardingConfig, table_placement  # noqa: E402
from loka.models.torchrec_sparse import TorchRecSparseArch, feature_names, use_torchrec_sparse  # noqa: E402


@pytest.fixture
def own_process_group():
    """A one-process sharded run makes a one-rank gloo group; later tests must not see it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _embed(sparse_arch, model, batch):
    history = model.sequence.event_ids(model.history_layout(batch), batch.hist_items, batch.hist_actions,
                                       batch.hist_gaps)
    return sparse_arch(batch.sparse, batch.multi_hot, batch.multi_hot_mask, history)


def test_same_embeddings_and_logits_as_the_fused_table():
    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg)
    batch = SyntheticStream(cfg, 24, seed=int(torch.randint(0, 1000, ()))).batch(0)
    with torch.no_grad():
        model.sparse.table.weight.normal_()  # every row distinct: a wrong row shows
    ref = copy.deepcopy(model)
    use_torchrec_sparse(model)
    assert isinstance(model.sparse, TorchRecSparseArch)
    (ctx_ref, ev_ref), (ctx, ev) = _embed(ref.sparse, ref, batch), _embed(model.sparse, ref, batch)
    assert ev.shape[0] == int(batch.hist_mask.sum()) > 0
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ev, ev_ref, rtol=1e-6, atol=1e-6)
    for task, z in model(batch).items():
        torch.testing.assert_close(z, ref(batch)[task], rtol=1e-5, atol=1e-6)


def test_kjt_layout_shares_the_item_table_and_pads_events():
    cfg = RankerConfig.from_size("tiny")
    arch = TorchRecSparseArch(cfg)
    tables = {c.name: c.feature_names for c in arch.ebc.embedding_bag_configs()}
    assert tables[f"t{cfg.history_item_feature}"] == [f"sparse_{cfg.history_item_feature}", "hist_item"]
    batch = SyntheticStream(cfg, 5, seed=3).batch(0)
    model = Ranker(cfg)
    layout = model.history_layout(batch)
    kjt = arch.kjt(batch.sparse, batch.multi_hot, batch.multi_hot_mask,
                   model.sequence.event_ids(layout, batch.hist_items, batch.hist_actions, batch.hist_gaps))
    assert kjt.keys() == list(feature_names(cfg)) and kjt.stride() == 5 * (1 + cfg.history_len)
    lengths = kjt.to_dict()
    assert lengths["multi_hot_0"].lengths()[:5].tolist() == batch.multi_hot_mask[:, 0].sum(-1).tolist()
    assert int(lengths["hist_gap"].lengths().sum()) == int(batch.hist_mask.sum())


def test_fused_rowwise_adagrad_trains_as_the_pure_path(own_process_group):
    """Same seed, data and recipe: the pure fused table with loka's RowWiseAdagrad and the EBC
    with FBGEMM's fused EXACT_ROWWISE_ADAGRAD (one process) give the same losses."""
    config = TrainConfig(size="tiny", steps=6, batch_size=32, precision="fp32", progress=False,
                         seed=int(torch.randint(0, 1000, ())), warmup_steps=2)
    pure = train(config).losses
    fused = train_sharded(config, ShardingConfig(tables="row-wise"), print_plan=False).losses
    assert len(fused) == len(pure) == 6
    # AdamW's update normalizes each gradient: float rounding differences stay around 1e-7 relative
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(pure), rtol=1e-5, atol=0)


def test_a_nan_loss_stops_before_its_fused_update(own_process_group):
    from loka.models.guards import NonFiniteError

    cfg = RankerConfig.from_size("tiny")
    stream = SyntheticStream(cfg, 16, seed=1)

    def batches():
        for step in range(3):
            batch = stream.batch(step)
            if step == 2:
                batch.labels[3, 0] = float("nan")  # a corrupt label: its BCE is NaN
            yield batch

    config = TrainConfig(size="tiny", steps=3, batch_size=16, precision="fp32", progress=False)
    with pytest.raises(NonFiniteError, match="step 3: the global loss is nan"):
        train_sharded(config, ShardingConfig(), data=batches(), print_plan=False)


def test_sigterm_ends_after_the_step_with_a_checkpoint_that_resumes(own_process_group, tmp_path):
    import os
    import signal

    cfg = RankerConfig.from_size("tiny")
    stream = SyntheticStream(cfg, 16, seed=2)

    def batches():
        for step in range(10):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 is read: it still runs
            yield stream.batch(step)

    config = TrainConfig(size="tiny", steps=5, batch_size=16, precision="fp32", progress=False)
    cut = train_sharded(config, ShardingConfig(), data=batches(), print_plan=False, save=tmp_path / "ck")
    assert cut.stopped_by == "SIGTERM" and cut.step == 3 and (tmp_path / "ck" / ".metadata").is_file()
    dist.destroy_process_group()
    uncut = train_sharded(config, ShardingConfig(), data=iter(stream.batch(i) for i in range(5)), print_plan=False)
    dist.destroy_process_group()
    rest = train_sharded(config, ShardingConfig(), data=iter(stream.batch(i) for i in range(3, 5)), print_plan=False,
                         resume=tmp_path / "ck")
    assert rest.first_step == 3 and rest.losses == uncut.losses[3:]
    assert cut.losses == uncut.losses[:3]


def test_table_placement_balances_rows():
    assert table_placement([500, 400, 40, 16], 2) == [0, 1, 1, 1]
    assert table_placement([10, 10, 10], 1) == [0, 0, 0]


def test_bad_sharding_choices_name_the_options():
    with pytest.raises(ValueError, match="table-wise"):
        ShardingConfig(tables="column-wise")
    with pytest.raises(ValueError, match="fsdp2"):
        ShardingConfig(dense="fsdp1")
    with pytest.raises(ValueError, match="FP8 comms need a GPU"):
        ShardingConfig(table_comms="fp8")
    with pytest.raises(ValueError, match="fp8_all_gather needs dense='fsdp2'"):
        ShardingConfig(dense="ddp", fp8_all_gather=True)
    with pytest.raises(ValueError, match="float32"):
        TorchRecSparseArch(RankerConfig.from_size("tiny").replace(embedding_dtype="bfloat16"))


def test_cli_refuses_what_sharded_runs_do_not_do_yet(capsys):
    from importlib.metadata import entry_points

    main = entry_points(group="console_scripts")["loka"].load()  # the `loka` command, wherever it lives

    code = main(["train", "--size", "tiny", "--steps", "1", "--tables", "row-wise", "--compile"])
    assert code == 2
    assert "--compile is not supported with --tables yet" in capsys.readouterr().err


def test_each_rank_runs_the_command_without_nproc():
    from loka.models.sharded_cli import without_nproc

    argv = ["train", "--size", "tiny", "--nproc", "2", "--tables", "row-wise", "--nproc=3", "--steps", "5"]
    assert without_nproc(argv) == ["train", "--size", "tiny", "--tables", "row-wise", "--steps", "5"]
