"""NaN/Inf guard and input checks: training stops (or skips the step) before a bad checkpoint
is written and names where the first non-finite value appeared; bad labels and bad limits are
clear errors (exit 2 on the command line)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch

from loka.models import Ranker, RankerConfig, SyntheticStream, TrainConfig, load_checkpoint, load_model, train
from loka.models.cli import register
from loka.models.guards import NonFiniteError, check_before_save

FAST = dict(size="tiny", batch_size=32, progress=False, warmup_steps=0, lr_schedule="constant",
            checkpoint_every=0, checkpoint_minutes=0)


def _seed() -> int:
    seed = int(torch.randint(0, 1 << 30, ()))
    print("seed", seed)
    return seed


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


class _Poisoned:
    """The synthetic stream with batch ``at`` (0-based; or each of a tuple) edited by ``edit(batch)``."""

    def __init__(self, seed: int, at: int | tuple[int, ...], edit) -> None:
        self.stream = SyntheticStream(RankerConfig.from_size("tiny"), 32, seed=seed)
        self.at, self.edit = ((at,) if isinstance(at, int) else at), edit

    def __iter__(self):
        return self

    def __next__(self):
        i, batch = self.stream.position, next(self.stream)
        if i in self.at:
            self.edit(batch)
        return batch

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture
def good_run(tmp_path):
    result = train(TrainConfig(steps=2, out_dir=str(tmp_path), seed=_seed(), **FAST))
    return tmp_path, result.checkpoint.read_bytes()


def test_cli_lr_inf_and_negative_max_seconds_exit_2_and_keep_the_checkpoint(good_run, capsys):
    out, before = good_run
    common = ["train", "--size", "tiny", "--steps", "4", "--batch-size", "32", "--out", str(out),
              "--resume", str(out / "checkpoint.pt"), "--eval-examples", "0", "--no-progress"]
    assert _cli(common + ["--lr-dense", "inf"]) == 2
    assert "lr_dense=inf" in capsys.readouterr().err
    assert _cli(common + ["--max-seconds", "-1"]) == 2
    assert "max_seconds" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_diverging_update_stops_naming_the_parameter_and_writes_nothing(good_run):
    out, before = good_run
    with pytest.raises(NonFiniteError, match=r"step 4: parameter \S+ is already NaN/Inf") as info:
        train(TrainConfig(steps=6, out_dir=str(out), **FAST).replace(lr_dense=1e38),
              resume=out / "checkpoint.pt")
    assert str(out / "checkpoint.pt") in str(info.value)  # the last good one is named
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("checkpoint_*.pt"))


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_an_overflowing_weight_stops_at_step_1_naming_the_module():
    """One Linear's weights finite but huge: the weights pass, a module's output does not."""
    torch.manual_seed(_seed())
    model = Ranker(RankerConfig.from_size("tiny"))
    names = _linear_names(model)
    name = names[int(torch.randint(len(names), ()))]
    dict(model.named_modules())[name].weight.data.fill_(3e38)
    with pytest.raises(NonFiniteError, match=r"step 1: the loss is non-finite .* output with NaN/Inf is \S+;"):
        train(TrainConfig(steps=3, **FAST), model=model)  # `name` or a module its output overflows in


def _run_with_a_nan_at_step_3(seed: int, nonfinite: str):
    """Train 5 steps; a forward hook turns one Linear's output NaN while batch 2 (step 3) runs."""
    poison = {"on": False}

    def edit(batch):
        poison["on"] = True

    class Flagging(_Poisoned):
        def __next__(self):
            poison["on"] = False
            return super().__next__()

    torch.manual_seed(seed)
    model = Ranker(RankerConfig.from_size("tiny"))
    names = _linear_names(model)
    name = names[seed % len(names)]
    dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, out: out * math.nan if poison["on"] else out)
    return name, lambda: train(TrainConfig(steps=5, nonfinite=nonfinite, **FAST), model=model,
                               data=Flagging(seed, 2, edit))


def test_a_transient_nan_stops_by_default_naming_the_module():
    name, run = _run_with_a_nan_at_step_3(_seed(), "stop")
    with pytest.raises(NonFiniteError, match=rf"step 3: the loss is non-finite .* output with NaN/Inf is {name}"):
        run()


def test_a_transient_nan_is_skipped_on_request():
    _, run = _run_with_a_nan_at_step_3(_seed(), "skip")
    result = run()
    assert result.step == 5 and result.skipped_steps == 1
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_a_non_finite_gradient_with_a_finite_loss_is_named():
    seed = _seed()
    torch.manual_seed(seed)
    model = Ranker(RankerConfig.from_size("tiny"))
    sparse = {id(p) for p in model.embedding_parameters()}  # their gradients are sparse (no full_like)
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and id(p) not in sparse]
    name = names[int(torch.randint(len(names), ()))]
    calls = []

    def blow_up(grad):
        calls.append(1)
        return torch.full_like(grad, math.inf) if len(calls) == 2 else grad

    dict(model.named_parameters())[name].register_hook(blow_up)
    with pytest.raises(NonFiniteError, match=rf"step 2: the gradient of {name} is NaN/Inf"):
        train(TrainConfig(steps=4, **FAST), model=model)


@pytest.mark.parametrize("label, match", [(math.nan, "labels must be 0 or 1"), (2.0, "labels must be 0 or 1"),
                                          (0.5, "has 0.5")])
def test_bad_labels_are_a_clear_value_error(label, match):
    def edit(batch):
        batch.labels[7, 0] = label

    with pytest.raises(ValueError, match=match):
        train(TrainConfig(steps=3, **FAST), data=_Poisoned(_seed(), 1, edit))


def test_negative_label_weight_and_config_limits_are_refused():
    def edit(batch):
        batch.label_weights[0, 1] = -1.0

    with pytest.raises(ValueError, match="label_weights must be finite and >= 0"):
        train(TrainConfig(steps=2, **FAST), data=_Poisoned(_seed(), 0, edit))
    for bad in (dict(max_seconds=-1), dict(max_seconds=0), dict(lr_sparse=math.nan),
                dict(lr_dense=math.inf), dict(nonfinite="ignore"), dict(keep_checkpoints=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_no_checkpoint_is_written_with_nan_in_optimizer_state():
    model = Ranker(RankerConfig.from_size("tiny"))
    opt = torch.optim.AdamW(model.dense_parameters(), lr=1e-3)
    model(SyntheticStream(model.config, 4, seed=_seed()).batch(0))["ctr"].sum().backward()
    opt.step()
    check_before_save(model, {"dense": opt}, 1)  # finite: passes
    next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = math.inf
    with pytest.raises(NonFiniteError, match=r"dense\.state\[0\]\.exp_avg_sq holds NaN/Inf"):
        check_before_save(model, {"dense": opt}, 1)


def _forward_finite(path) -> bool:
    """The checkpoint's model, forward on the batch of the step that wrote it (data_seed 0)."""
    state = load_checkpoint(path)
    model = load_model(path)
    batch = SyntheticStream(model.config, FAST["batch_size"], seed=0).batch(state["step"] - 1)
    with torch.no_grad():
        return all(torch.isfinite(v).all() for v in model(batch).values())


def test_a_checkpoint_whose_forward_is_nan_is_not_written_and_the_good_one_is_named(good_run):
    """A huge learning rate leaves finite weights whose forward overflows: no checkpoint of them."""
    out, _ = good_run
    with pytest.raises(NonFiniteError) as info:
        train(TrainConfig(steps=8, out_dir=str(out), **FAST).replace(lr_dense=1e6, checkpoint_every=1),
              resume=out / "checkpoint.pt")
    written = sorted(out.glob("checkpoint*.pt"))
    assert all(_forward_finite(p) for p in written), [p.name for p in written]
    named = re.search(r"the last good checkpoint is (\S+\.pt)", str(info.value))
    assert named and Path(named.group(1)) in written, str(info.value)


def test_non_finite_dense_features_are_counted_warned_once_or_refused(capsys):
    seed = _seed()

    def edit(batch):
        batch.dense[3, 0], batch.dense[5, 1] = math.nan, -math.inf

    result = train(TrainConfig(steps=5, **FAST), data=_Poisoned(seed, (1, 3), edit))
    assert result.nonfinite_dense == 4 and result.step == 5
    err = capsys.readouterr().err
    assert err.count("NaN/Inf dense feature values") == 1 and "step 2's batch has 2 NaN/Inf dense" in err, err
    with pytest.raises(ValueError, match="step 2's batch has 2 NaN/Inf dense feature values; fix the data"):
        train(TrainConfig(steps=5, nonfinite_dense="stop", **FAST), data=_Poisoned(seed, (1, 3), edit))
    with pytest.raises(ValueError, match="nonfinite_dense"):
        TrainConfig(nonfinite_dense="ignore")
