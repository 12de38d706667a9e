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


@pytest.mark.requires_cuda
def test_jagged_history_on_cuda_matches_the_padded_reference():
    """The CUDA path (SDPA on nested jagged tensors) against the padded, masked reference."""
    cfg = RankerConfig.from_size("small")
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    model = Ranker(cfg).cuda()
    batch = SyntheticStream(cfg, 1024, seed=5, device="cuda").batch(0)
    layout = model.history_layout(batch)
    assert layout.jagged and layout.n_tokens < 1.1 * int(layout.offsets[-1]) + 16
    out = model(batch, layout)
    model.sequence.pack_history = False
    ref = model(batch)
    for task in out:
        torch.testing.assert_close(out[task], ref[task], rtol=2e-4, atol=2e-4)


@pytest.mark.requires_cuda
def test_estimated_peak_memory_against_the_gpus_own_peak():
    """`estimate_step` (fake CPU tensors) beside torch.cuda.max_memory_allocated of a real bf16
    step of `base` at batch 2048 (optimizer states already allocated, as in any later step)."""
    from loka.models import build_optimizers
    from loka.models.estimate import estimate_step, shape_batch
    from loka.models.train import task_losses, total_loss

    cfg = RankerConfig.from_size("base")
    est = estimate_step(cfg, 2048, flops=False)
    model = Ranker(cfg).cuda()
    batch = shape_batch(cfg, 2048).to("cuda")
    layout = model.history_layout(batch)
    opts = build_optimizers(model, 1e-3, 0.1, 0.0)
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = total_loss(task_losses(model(batch, layout), batch))
        loss.backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() / 2**30
    print(f"base, batch 2048: estimated {est.peak_memory_gib:.2f} GiB, measured {measured:.2f} GiB")
    assert 0.5 < measured / est.peak_memory_gib < 2.0
