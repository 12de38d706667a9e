"""Resume is exact from any step: a run cut at step k and resumed equals the uncut run bit for
bit (losses and weights), in and after warm-up, across a data-file boundary, in bf16 and FP8;
an FP8 checkpoint resumes in FP8 without being told."""

from __future__ import annotations

import random

import pytest
import torch

from loka.models import Ranker, TrainConfig, load_checkpoint, train
from loka.models.config import criteo_config
from loka.models.criteo import CriteoStream

# cosine over 8 steps after 3 warm-up steps: every step has its own learning rate
BASE = dict(size="tiny", steps=8, batch_size=32, warmup_steps=3, lr_schedule="cosine",
            progress=False, eval_examples=0, checkpoint_every=0, checkpoint_minutes=0)


def _seed() -> int:
    seed = int(torch.randint(0, 1 << 30, ()))
    print("seed", seed)
    return seed


class _Cut:
    """The first ``n`` batches of ``stream``; its position is the stream's, so the checkpoint
    written when it ends is where the uncut run was at step ``n``."""

    def __init__(self, stream, n: int) -> None:
        self.stream, self.n = stream, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return next(self.stream)

    def __getattr__(self, name):  # state_dict, base_rates: the stream's
        return getattr(self.stream, name)


def _assert_same(full, first, resumed, k):
    assert resumed.first_step == k and resumed.step == full.step
    assert first.losses + resumed.losses == full.losses  # exact floats
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("k", [2, 5])  # inside warm-up, inside the cosine decay
def test_synthetic_resume_is_bitwise_exact(tmp_path, precision, k):
    from loka.models import SyntheticStream
    from loka.models.config import RankerConfig

    seed = _seed()
    cfg = TrainConfig(seed=seed, data_seed=seed, precision=precision, autocast="on", **BASE)
    full = train(cfg)
    stream = SyntheticStream(RankerConfig.from_size("tiny"), 32, seed=seed)
    first = train(cfg.replace(out_dir=str(tmp_path)), data=_Cut(stream, k))
    assert first.step == k and load_checkpoint(first.checkpoint)["step"] == k
    resumed = train(cfg.replace(precision=None), resume=first.checkpoint)
    assert (resumed.convert_result is not None) == (precision == "fp8")  # FP8 resumes in FP8
    _assert_same(full, first, resumed, k)


def _criteo_files(tmp_path, seed: int) -> list:
    rng = random.Random(seed)
    paths = []
    for f in range(2):
        lines = []
        for _ in range(40):
            ints = [rng.choice(["", str(rng.randint(-2, 5000))]) for _ in range(13)]
            cats = [rng.choice(["", f"{rng.getrandbits(32):08x}"]) for _ in range(26)]
            lines.append("\t".join([rng.choice("01")] + ints + cats) + "\n")
        paths.append(tmp_path / f"day_{f}.tsv")
        paths[-1].write_text("".join(lines))
    return paths


def _criteo_model(seed: int) -> Ranker:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Ranker(criteo_config("tiny", 1000))


@pytest.mark.parametrize("k", [2, 3])  # the batch of step 3 spans the two files (40 lines each)
def test_criteo_resume_across_a_file_boundary_is_exact(tmp_path, k):
    seed = _seed()
    paths = _criteo_files(tmp_path, seed)
    cfg = TrainConfig(precision="fp8", **{**BASE, "batch_size": 16, "steps": 5})
    full = train(cfg, model=_criteo_model(seed), data=CriteoStream(paths, 16, 1000))
    first = train(cfg.replace(out_dir=str(tmp_path / "run")), model=_criteo_model(seed),
                  data=_Cut(CriteoStream(paths, 16, 1000), k))
    stream = CriteoStream(paths, 16, 1000)
    resumed = train(cfg.replace(precision=None), model=_criteo_model(seed + 1), data=stream,
                    resume=first.checkpoint)
    _assert_same(full, first, resumed, k)
    assert stream.file_index == 1


def test_resume_restores_the_rng_and_refuses_a_changed_plan(tmp_path):
    seed = _seed()
    torch.manual_seed(seed)
    first = train(TrainConfig(out_dir=str(tmp_path), **{**BASE, "steps": 2}))
    recorded = load_checkpoint(first.checkpoint)["rng"]
    torch.manual_seed(seed + 1)
    train(TrainConfig(**{**BASE, "steps": 2}), resume=first.checkpoint)
    assert torch.equal(torch.get_rng_state(), recorded)
    state = load_checkpoint(first.checkpoint)
    from loka.models.resume import resume_precision

    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    with pytest.raises(ValueError, match="no longer exists"):
        resume_precision(None, {**state, "precision": str(tmp_path / "gone.json")}, "ck.pt")
    with pytest.raises(ValueError, match="changed"):
        resume_precision(None, {**state, "precision": str(plan), "plan_text": "{ }"}, "ck.pt")
    assert resume_precision("bf16", {**state, "precision": "fp8"}) == "bf16"  # a deliberate switch
