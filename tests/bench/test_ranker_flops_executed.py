"""bench/ranker_flops.py: executed FLOPs (padded histories, as on a CUDA device) vs useful FLOPs (packed)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ranker_flops import count_gemm_flops  # noqa: E402


def test_executed_flops_match_the_models_own_device_layout():
    from loka.models import Ranker, RankerConfig, SyntheticStream

    cfg = RankerConfig.from_size("tiny")
    torch.manual_seed(0)
    model = Ranker(cfg)
    batch = SyntheticStream(cfg, 6, seed=3, device="cpu").batch(0)
    useful = count_gemm_flops(model, batch, 6)
    executed = count_gemm_flops(model, batch, 6, padded=True)
    # Independent reference: on the meta device the model itself takes its non-CPU (padded) layout.
    with torch.device("meta"):
        meta_model = Ranker(cfg)
    reference = count_gemm_flops(meta_model, batch.to("meta"), 6)
    assert executed.fwd_per_example == reference.fwd_per_example
    assert (executed.linear_sites, executed.bmm_sites) == (reference.linear_sites, reference.bmm_sites)
    # Synthetic histories are shorter than history_len, so padding adds work; nothing else changes.
    assert executed.fwd_per_example > useful.fwd_per_example
    assert all(getattr(m, "pack_history", True) for m in model.modules()), "the packing flag is restored"
    assert count_gemm_flops(model, batch, 6).fwd_per_example == useful.fwd_per_example
