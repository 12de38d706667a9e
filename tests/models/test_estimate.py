"""The step estimate (fake tensors) against brute force on a real CPU step, and the sizes' budgets."""

from __future__ import annotations

import json

import pytest
import torch

from loka.app.cli import main as loka_main
from loka.models import Ranker, RankerConfig
from loka.models.estimate import ARCHES, estimate_step, shape_batch
from loka.models.layers import BatchMatmul
from loka.models.train import task_losses, total_loss

GIB = 2**30


def _reference_flops(cfg: RankerConfig, batch_size: int, seed: int) -> dict[str, float]:
    """Training-step GEMM FLOPs per arch, counted by hand on a real CPU step: every Linear and
    BatchMatmul as it ran (2·M·K·N forward, the same for each gradient it needed), and
    attention from the history lengths (4·s²·d forward per layer, twice that backward)."""
    model = Ranker(cfg)
    batch = shape_batch(cfg, batch_size, seed)
    flops = dict.fromkeys(ARCHES, 0.0)

    def hook(name):
        def count(module, args, out):
            arch = name.split(".")[0]
            if isinstance(module, torch.nn.Linear):
                m, k, n = args[0].numel() // module.in_features, module.in_features, module.out_features
                grads = 1 + int(args[0].requires_grad)  # wgrad, and dgrad if the input needs it
            else:
                a, b = args
                m, k, n = a.numel() // a.shape[-1], a.shape[-1], b.shape[-1]
                grads = int(a.requires_grad) + int(b.requires_grad)
            flops[arch] += 2 * m * k * n * (1 + grads)
        return count

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, BatchMatmul)):
            module.register_forward_hook(hook(name))
    total_loss(task_losses(model(batch), batch)).backward()
    s = cfg.seq_summary_tokens + batch.hist_mask.sum(1).double()  # tokens of each example
    flops["sequence"] += 3 * float(4 * (s * s).sum()) * cfg.seq_dim * cfg.seq_layers
    return {arch: v / batch_size for arch, v in flops.items()}


@pytest.mark.parametrize("size,batch_size", [("tiny", 97), ("small", 300)])
def test_useful_flops_per_arch_match_a_hand_count_on_a_real_step(size, batch_size):
    seed = int(torch.randint(0, 1 << 30, ()))
    print("seed", seed)
    cfg = RankerConfig.from_size(size)
    est = estimate_step(cfg, batch_size, seed=seed, memory=False)
    ref = _reference_flops(cfg, batch_size, seed)
    for arch in ARCHES:
        assert est.flops_per_example[arch]["useful"] == pytest.approx(ref[arch], rel=1e-9), arch
        assert est.flops_per_example[arch]["executed"] >= est.flops_per_example[arch]["useful"]
    assert est.tokens["executed"] < est.tokens["real"] + 16 <= est.tokens["padded"] + 16


def test_memory_holds_parameters_and_optimizer_states():
    cfg = RankerConfig.from_size("small")
    est = estimate_step(cfg, 256, flops=False)
    model = Ranker(cfg)
    dense = sum(p.numel() for p in model.dense_parameters())
    rows = model.sparse.table.weight.shape[0]
    assert est.params == sum(p.numel() for p in model.parameters())
    assert est.memory_gib["param"] == pytest.approx(4 * est.params / GIB, rel=1e-3)
    # AdamW: two float32 states per element (+ a step count per tensor); row-wise Adagrad: one
    # float32 per row, tracked as "other"
    assert est.memory_gib["opt"] == pytest.approx(8 * dense / GIB, rel=0.01)
    assert est.memory_gib["oth"] >= 4 * rows / GIB
    assert est.peak_memory_gib > est.memory_gib["param"] + est.memory_gib["opt"]


def test_checkpointing_and_bf16_tables_lower_the_estimated_peak():
    cfg = RankerConfig.from_size("small")
    plain = estimate_step(cfg, 2048, flops=False).peak_memory_gib
    assert estimate_step(cfg.replace(checkpoint_blocks=True), 2048, flops=False).peak_memory_gib < plain
    bf16 = estimate_step(cfg.replace(embedding_dtype="bfloat16"), 2048, flops=False)
    assert bf16.memory_gib["param"] < 0.75 * estimate_step(cfg, 64, flops=False).memory_gib["param"]


@pytest.mark.slow
@pytest.mark.parametrize("size,max_gib,min_share", [("base", 30, 0.5), ("large", 70, 0.6)])
def test_named_sizes_fit_one_80gb_gpu_at_batch_8192_and_interaction_dominates(size, max_gib, min_share):
    cfg = RankerConfig.from_size(size)
    est = estimate_step(cfg, 8192)
    print(est.table())
    assert est.peak_memory_gib <= max_gib
    assert est.interaction_share >= min_share
    assert est.tokens["executed"] <= 1.1 * est.tokens["real"] < 0.5 * est.tokens["padded"]
    if size == "large":
        assert est.big_gemm_share > 0.5  # most interaction + over FLOPs at K, N >= 2048


def test_loka_info_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "info.json"
    assert loka_main(["info", "--size", "tiny", "--batch-size", "64", "--json", str(path)]) == 0
    assert "estimated peak memory" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["params"] == Ranker(RankerConfig.from_size("tiny")).num_parameters()
    assert set(data["flops_per_example"]) == set(ARCHES) and data["peak_memory_gib"] > 0
    assert loka_main(["info", "--size", "tiny", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_count_step_flops_of_real_batches_matches_the_hand_count():
    """What bench/ranker.py reports MFU on: the timed batches' own FLOPs, here two batches."""
    from loka.models.estimate import count_step_flops

    cfg = RankerConfig.from_size("tiny")
    seeds = [int(s) for s in torch.randint(0, 1 << 30, (2,))]
    print("seeds", seeds)
    batches = [shape_batch(cfg, n, seed) for n, seed in zip((50, 30), seeds)]
    refs = [sum(_reference_flops(cfg, b.size, seed).values()) for b, seed in zip(batches, seeds)]
    step = count_step_flops(cfg, batches)
    assert step["useful"] == pytest.approx((50 * refs[0] + 30 * refs[1]) / 80, rel=1e-9)
    assert step["executed"] >= step["useful"]


def test_peak_line_shows_what_holds_memory_at_the_peak_and_says_why_gradients_are_zero():
    """`loka info` showed "grad 0.00 temp 0.00": true at the peak (the forward, before gradients exist),
    but unexplained, and a small model's every part read 0.00 GiB (issue 29, item 21)."""
    est = estimate_step(RankerConfig.from_size("tiny"), 64)
    line = est.peak_line()
    assert " 0.00" not in line and "MiB" in line  # tiny: below 1 GiB, in MiB
    held = [k for k, v in est.memory_gib.items() if v * 1024 >= 0.005]
    assert all(f"{k} " in line for k in held)
    assert est.memory_gib["grad"] == 0.0  # the peak is in the forward: no gradient allocated yet
    assert "before backward allocates gradients" in line and "grad" in line.split("gradients)")[1]
