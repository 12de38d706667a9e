"""Training: learns, resumes exactly, writes metrics, moves checkpoints across precisions, runs DDP."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import loka
from loka.models import (Ranker, RankerConfig, SyntheticStream, TrainConfig, evaluate, load_checkpoint,
                         load_model, train)
from loka.models.checkpoint import save_checkpoint

# A constant schedule: a run of N steps then a resume to 2N equals 2N straight (a cosine
# schedule spans `steps`, so a shorter first run would follow a different one).
FAST = dict(size="tiny", batch_size=64, progress=False, warmup_steps=2, lr_schedule="constant")


def _seed():
    return int(torch.randint(0, 1 << 30, ()))


def test_resume_continues_exactly(tmp_path):
    seed = _seed()
    full = train(TrainConfig(steps=8, data_seed=seed, seed=seed, **FAST))
    first = train(TrainConfig(steps=4, data_seed=seed, seed=seed, out_dir=str(tmp_path), **FAST))
    resumed = train(TrainConfig(steps=8, data_seed=seed, seed=seed, **FAST),
                    resume=first.checkpoint)
    assert resumed.first_step == 4
    assert first.losses + resumed.losses == full.losses
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_metrics_log_and_checkpoint_contents(tmp_path):
    result = train(TrainConfig(steps=6, log_every=2, checkpoint_every=3, out_dir=str(tmp_path), **FAST))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert {"loss", "loss_ctr", "loss_cvr", "examples_per_s"} <= set(lines[0])
    assert (tmp_path / "checkpoint_0000003.pt").exists()
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 6 and state["stream"]["position"] == 6
    assert set(state["optimizers"]) == {"dense", "sparse"}
    model, trained = load_model(result.checkpoint).state_dict(), result.model.state_dict()
    assert model.keys() == trained.keys() and all(torch.equal(model[k], trained[k]) for k in model)


def test_training_lowers_held_out_ctr_ne_on_tiny():
    cfg = RankerConfig.from_size("tiny")
    held_out = SyntheticStream(cfg, 4096, seed=_seed())
    untrained = Ranker(cfg)
    untrained.over.init_bias(held_out.base_rates())
    result = train(TrainConfig(steps=60, data_seed=_seed(), **FAST).replace(batch_size=256))
    before = evaluate(untrained, held_out, n_examples=4096).tasks["ctr"].ne
    after = evaluate(result.model, held_out, n_examples=4096).tasks["ctr"].ne
    assert after < 0.99 and after < before


def test_bad_precision_and_missing_plan_are_clear():
    with pytest.raises(ValueError, match="plan"):
        TrainConfig(precision="fp4")
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig(precision="/nonexistent/plan.json")


def test_bf16_checkpoint_loads_into_fp8_model_and_back(tmp_path):
    cfg = RankerConfig.from_size("tiny")
    hp = Ranker(cfg).eval()
    path = save_checkpoint(tmp_path / "hp.pt", hp)
    fp8 = Ranker(cfg).eval()  # its own random initialisation, overwritten by the checkpoint
    result = loka.convert(fp8, recipe="tensorwise", kernels="emulated")
    assert result.converted
    fp8.load_state_dict(load_checkpoint(path)["model"])
    assert fp8.state_dict().keys() == hp.state_dict().keys()  # the same names: no renamed or extra tensors
    for fqn in result.converted:
        assert isinstance(fp8.get_submodule(fqn), loka.Float8Linear)
        assert torch.equal(fp8.get_submodule(fqn).weight, hp.get_submodule(fqn).weight), fqn
    # The weights landed where they compute: FP8 predictions are bf16's up to FP8 error, not another model's.
    batch = SyntheticStream(cfg, 256, seed=_seed()).batch(0)
    with torch.no_grad():
        y_hp, y_fp8 = hp(batch), fp8(batch)
        y_other = Ranker(cfg).eval()(batch)
    # Every Linear in FP8 moves untrained logits by 2-40% (relative); another model's are 3.5x+ farther
    # (seeds 0-259: the smallest ratio 3.5).
    for task, y in y_hp.items():
        err = float((y_fp8[task] - y).norm() / y.norm())
        other = float((y_other[task] - y).norm() / y.norm())
        assert 0 < err < 0.6 and other > 2 * err, (task, err, other)
    back = Ranker(cfg).eval()
    back.load_state_dict(fp8.state_dict())
    with torch.no_grad():
        y_back = back(batch)
    assert all(torch.equal(y_back[t], y_hp[t]) for t in y_hp)


def test_fp8_training_runs_and_converts_every_linear():
    result = train(TrainConfig(steps=3, precision="fp8", **FAST))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in Ranker(RankerConfig.from_size("tiny")).modules())
    res = result.convert_result
    assert res.converted and len(res.converted) + len(res.skipped) == n_linear
    assert all(isinstance(m, loka.Float8Linear) for fqn, m in result.model.named_modules() if fqn in res.converted)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)


def _ddp_worker(rank, world, port, out_dir, seed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(TrainConfig(steps=3, device="cpu", data_seed=seed, seed=seed,
                               out_dir=out_dir if rank == 0 else None, **FAST))
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), _seed()), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def _plan_file(tmp_path):
    from loka.dispatch import GemmChoice, Plan, SitePlan
    from loka.recipe import GEMMS

    model = Ranker(RankerConfig.from_size("tiny"))
    sites = [SitePlan(fqn, m.in_features, m.out_features, 64,
                      {g: GemmChoice(kernel="emulated", recipe="tensorwise") if "dense" in fqn else GemmChoice()
                       for g in GEMMS})
             for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return str(Plan(sites=sites, budget={}).save(tmp_path / "plan.json"))


def test_plan_file_precision_converts_the_planned_sites(tmp_path):
    result = train(TrainConfig(steps=2, precision=_plan_file(tmp_path), **FAST))
    fp8_sites = [fqn for fqn, m in result.model.named_modules() if isinstance(m, loka.Float8Linear)
                 and any(not k.hp for k in m.kernels.values())]
    assert fp8_sites and all("dense" in fqn for fqn in fp8_sites)
    assert all(x == x for x in result.losses)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from loka.models.train import lr_scale

    cfg = TrainConfig(size="tiny", steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    scales = [lr_scale(s, cfg) for s in range(110)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(scales[10:], scales[11:]))
    assert scales[60] == pytest.approx(0.55, abs=0.01) and scales[-1] == pytest.approx(0.1, abs=0.001)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_task_weights_scale_each_task_in_the_total_loss():
    from loka.models.train import DEFAULT_TASK_WEIGHTS, total_loss

    losses = {"ctr": torch.tensor(0.2), "cvr": torch.tensor(0.5)}
    assert DEFAULT_TASK_WEIGHTS == (("cvr", 0.1),) and TrainConfig().task_weights is None
    assert float(total_loss(losses)) == pytest.approx(0.2 + 0.1 * 0.5)  # None: the defaults
    assert float(total_loss(losses, ())) == pytest.approx(0.7)  # explicit: equal weights
    assert float(total_loss(losses, (("ctr", 2.0),))) == pytest.approx(0.9)
    assert float(total_loss({"ctr": torch.tensor(0.2)})) == pytest.approx(0.2)  # CTR-only (Criteo) model
    with pytest.raises(ValueError, match="weight >= 0"):
        TrainConfig(task_weights=(("cvr", -1.0),))
    with pytest.raises(ValueError, match="does not have"):
        total_loss(losses, (("ctcvr", 1.0),))


def test_unknown_task_weight_fails_before_training():
    with pytest.raises(ValueError, match=r"\['clicks'\].*does not have"):
        train(TrainConfig(size="tiny", steps=1, device="cpu", progress=False, task_weights=(("clicks", 1.0),)))


def test_cli_parses_task_weights():
    from loka.models.cli import parse_task_weights

    assert parse_task_weights(None) is None
    assert parse_task_weights("") == ()
    assert parse_task_weights("cvr=0.1, ctr=2") == (("cvr", 0.1), ("ctr", 2.0))
    with pytest.raises(SystemExit, match="TASK=WEIGHT"):
        parse_task_weights("cvr:0.1")
