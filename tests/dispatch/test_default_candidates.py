"""loka's Triton GEMM is out of the default candidates, for its measured reason (H200, 2026-11-30)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dispatch_report_fixtures import report, site

from loka.dispatch import plan
from loka.kernels import KERNELS
from loka.kernels.kernel import default_candidates
from loka.probe.timing import time_site
from loka.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
CAL = json.loads((ROOT / "bench" / "results" / "gemm_calibration.json").read_text())["h200_2026-11-30"]


def test_the_reason_is_the_measured_record():
    """The stated 0.21-0.25x is what the committed H200 record says (bf16 / triton_fused, rounded)."""
    cols = CAL["columns"]
    ratios = [row[cols.index("bf16")] / row[cols.index("triton_fused")] for row in CAL["median_ms"]]
    assert round(min(ratios), 2) == 0.21 and round(max(ratios), 2) == 0.25
    for name in ("triton", "triton_fast_accum"):
        why = KERNELS.get(name).not_default
        assert "0.21-0.25x of bf16" in why and "h200_2026-11-30_gemm_triton.md" in why
        assert (ROOT / "bench" / "results" / "h200_2026-11-30_gemm_triton.md").exists()


def test_default_candidates_leave_triton_out():
    names = default_candidates()
    assert "scaled_mm" in names and "triton" not in names and "triton_fast_accum" not in names
    assert "emulated" not in names and "bf16" not in names
    t = time_site((256, 64, 64), ["rowwise"], gemms=("fprop",), dtype=torch.float32, warmup=0, iters=1)
    assert not any(e.kernel.startswith("triton") for e in t.entries) and "fprop" in t.bf16_ms


def test_plan_never_picks_triton_unless_named():
    fast = [("fprop", "triton", "rowwise", 0.1), ("dgrad", "triton", "rowwise", 0.1), ("wgrad", "triton", "rowwise", 0.1)]
    rep = report(site("a", 256, 512, bf16_ms=1.0, entries=fast))
    p = plan(rep, progress=False)
    for g in ("fprop", "dgrad", "wgrad"):
        c = p.site("a").gemms[g]
        assert not c.is_fp8 and "not a default candidate" in c.reason and "0.21-0.25x" in c.reason
    if KERNELS.get("scaled_mm").supports(Recipe.from_name("rowwise").fprop, (256, 256, 512), torch.float32, "cpu"):
        both = fast + [(g, "scaled_mm", "rowwise", 0.5) for g in ("fprop", "dgrad", "wgrad")]
        p = plan(report(site("a", 256, 512, bf16_ms=1.0, entries=both)), progress=False)
        assert all(p.site("a").gemms[g].kernel == "scaled_mm" for g in ("fprop", "dgrad", "wgrad"))
