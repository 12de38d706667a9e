"""Checkpoints load with weights_only: a pickle that would run code is refused on every path
that reads one (API loaders, `loka eval`, `loka train --resume`, the serving engine)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from loka.models import Ranker, RankerConfig, load_checkpoint, load_model
from loka.models.checkpoint import FORMAT, UnsafeCheckpointError, save_checkpoint
from loka.models.cli import register
from loka.models.engine import InferenceEngine


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff code ran on load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(tmp_path, name="evil.pt"):
    marker = tmp_path / f"{name}.ran"
    good = Ranker(RankerConfig.from_size("tiny"))
    state = {"format": FORMAT, "ranker_config": good.config.to_dict(), "model": good.state_dict(),
             "optimizers": {}, "stream": None, "step": 0, "train_config": {}, "precision": "bf16",
             "payload": _Payload(str(marker))}
    path = tmp_path / name
    torch.save(state, path)
    return path, marker


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The oracle for the tests below: a full unpickle does create the marker."""
    path, marker = _malicious(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", [load_checkpoint, load_model, InferenceEngine.from_checkpoint])
def test_api_loaders_refuse_a_code_carrying_pickle(tmp_path, loader):
    path, marker = _malicious(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as info:
        loader(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{path}", "--eval-examples", "64"],
    ["train", "--size", "tiny", "--steps", "2", "--batch-size", "16", "--eval-examples", "0",
     "--no-progress", "--resume", "{path}"],
    ["serve", "--checkpoint", "{path}", "--port", "0"],
])
def test_cli_paths_refuse_it_with_one_line_and_exit_2(tmp_path, capsys, argv):
    path, marker = _malicious(tmp_path)
    code = _cli([a.format(path=path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and "refused to load" in err


def test_real_checkpoints_still_load_and_garbage_is_a_clear_error(tmp_path):
    model = Ranker(RankerConfig.from_size("tiny"))
    opt = torch.optim.AdamW(model.dense_parameters(), lr=1e-3, fused=False)
    model(__import__("loka.models", fromlist=["SyntheticStream"]).SyntheticStream(
        model.config, 4, seed=int(torch.randint(0, 1 << 30, ()))).batch(0))["ctr"].sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ok.pt", model, {"dense": opt}, {"position": 3}, step=3,
                           train_config={"task_weights": (("cvr", 0.1),)})
    state = load_checkpoint(path)
    assert state["step"] == 3 and state["optimizers"]["dense"]["state"]
    assert all(torch.equal(a, b) for a, b in zip(load_model(path).state_dict().values(),
                                                 model.state_dict().values()))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(junk)
    assert not list(tmp_path.glob("*.tmp"))


def _saved(tmp_path, size: str, name: str):
    model = Ranker(RankerConfig.from_size(size))
    return save_checkpoint(tmp_path / name, model, step=1), model


def test_a_checkpoint_of_another_size_is_one_line_naming_both_sizes(tmp_path, capsys):
    small, _ = _saved(tmp_path, "small", "small.pt")
    tiny, _ = _saved(tmp_path, "tiny", "tiny.pt")
    train_argv = ["train", "--size", "tiny", "--steps", "2", "--batch-size", "16", "--eval-examples", "0",
                  "--no-progress", "--resume", str(small), "--out", str(tmp_path / "run")]
    for argv in (train_argv, ["eval", "--checkpoint", str(tiny), "--compare", str(small), "--eval-examples", "64"]):
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'small'" in err and "'tiny'" in err, err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run started


@pytest.mark.parametrize("keep", [0, 0.5])
def test_an_incomplete_model_state_is_one_line_on_resume(tmp_path, capsys, keep):
    good = Ranker(RankerConfig.from_size("tiny"))
    names = list(good.state_dict())
    kept = int(keep * len(names))
    model = dict(list(good.state_dict().items())[:kept])
    path = tmp_path / "partial.pt"
    torch.save({"format": FORMAT, "ranker_config": good.config.to_dict(), "model": model, "optimizers": {},
                "stream": None, "step": 1, "train_config": {}, "precision": "bf16"}, path)
    argv = ["train", "--size", "tiny", "--steps", "2", "--batch-size", "16", "--eval-examples", "0",
            "--no-progress", "--resume", str(path)]
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{len(names) - kept} of {len(names)} model tensors missing" in err, err


def test_a_flipped_byte_inside_a_tensor_is_refused_naming_it(tmp_path, capsys):
    path, model = _saved(tmp_path, "tiny", "ok.pt")
    load_checkpoint(path)  # intact: loads
    table = model.sparse.table.weight.detach()
    raw = path.read_bytes()
    needle = table.contiguous().view(torch.uint8).flatten()[:64].numpy().tobytes()  # random init: unique
    at = raw.index(needle) + int(torch.randint(0, 64, ()))
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:])
    with pytest.raises(ValueError, match="sparse.table.weight fails its checksum"):
        load_checkpoint(path)
    assert _cli(["eval", "--checkpoint", str(path), "--eval-examples", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum" in err
