"""GPU paths of the ranker: on-device data, bf16 autocast training, FP8 training and serving.

Skipped without CUDA (see tests/conftest.py). Run on a GPU machine with
``pytest tests/models/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from loka.models import Ranker, RankerConfig, SyntheticStream, TrainConfig, save_checkpoint, train
from loka.models.engine import InferenceEngine


@pytest.mark.requires_cuda
def test_stream_generates_on_the_gpu_with_the_same_teacher():
    cfg = RankerConfig.from_size("small")
    gpu = SyntheticStream(cfg, 4096, seed=3, device="cuda")
    cpu = SyntheticStream(cfg, 4096, seed=3)
    batch = gpu.batch(0)
    assert batch.sparse.is_cuda and batch.true_probs.is_cuda
    torch.testing.assert_close(gpu.teacher.q_item.cpu(), cpu.teacher.q_item)
    assert abs(batch.labels[:, 0].mean().item() - 0.03) < 0.015


@pytest.mark.requires_cuda
def test_bf16_autocast_training_on_gpu():
    result = train(TrainConfig(size="small", steps=20, batch_size=1024, device="cuda", progress=False))
    assert next(result.model.parameters()).is_cuda
    assert all(x == x for x in result.losses)


@pytest.mark.requires_sm89
def test_fp8_training_and_serving_on_gpu(tmp_path):
    result = train(TrainConfig(size="small", steps=10, batch_size=1024, device="cuda", precision="fp8",
                               progress=False, out_dir=str(tmp_path)))
    assert result.convert_result.converted
    engine = InferenceEngine.from_checkpoint(result.checkpoint, plan="fp8", device="cuda")
    scores = engine.score(SyntheticStream(engine.config, 256, seed=1, device="cuda").batch(0))
    assert all(torch.isfinite(v).all() for v in scores.values())


@pytest.mark.requires_cuda
def test_base_forward_backward_fits_on_the_gpu():
    cfg = RankerConfig.from_size("base")
    model = Ranker(cfg).cuda()
    batch = SyntheticStream(cfg, 4096, seed=0, device="cuda").batch(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    sum(v.float().mean() for v in out.values()).backward()
    assert all(torch.isfinite(v).all() for v in out.values())
