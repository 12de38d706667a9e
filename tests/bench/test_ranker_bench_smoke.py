"""bench/ranker.py runs end to end on CPU at tiny size and its table has a row for every variant.

The loka-plan variant gets a plan made from a hand-built report (no probe, no micro-benchmarks),
which converts the sites torch._scaled_mm takes (it runs on CPU too), so the row exercises loka's Float8Linear.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GEMMS = ("fprop", "dgrad", "wgrad")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_ranker", ROOT / "bench" / "ranker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site(fqn: str, k: int, n: int, m: int, recipe: str = "tensorwise", device: str = "test",
          fp8_ms: float = 0.5, bf16_ms: float = 1.0) -> dict:
    err = {"mean": 0.01, "ci_lo": 0.008, "ci_hi": 0.012, "sqnr_db": 38.0, "n": 3, "threshold": 0.1, "verdict": "safe"}
    entries = [{"gemm": g, "kernel": "scaled_mm", "recipe": recipe, "median_ms": fp8_ms, "p10_ms": fp8_ms,
                "p90_ms": fp8_ms, "iters": 3} for g in GEMMS]
    return {"fqn": fqn, "in_features": k, "out_features": n, "m_values": [m],
            "errors": {recipe: {g: err for g in GEMMS}},
            "sensitivity": {recipe: {"loss_ref": 1.0, "loss_fp8": 1.0, "loss_delta": 0.0, "rel_loss_delta": 1e-7}},
            "timings": {"device_name": device, "representative": False, "m": m,
                        "bf16_ms": {g: bf16_ms for g in GEMMS}, "entries": entries}}


def _tiny_plan(path: Path, producers: bool = False) -> Path:
    """Every Linear FP8 (tensorwise); ``producers``: rowwise, timed here as fast as bf16, so only the
    sites fed by their own norm (priced without the input's cast) go FP8, with ``producer: norm_quant``."""
    from loka.dispatch import Budget, plan
    from loka.dispatch.producers import producer_sites
    from loka.models import Ranker, RankerConfig, SyntheticStream
    from loka.timer import device_name

    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg)
    kw = dict(recipe="rowwise", device=device_name(torch.device("cpu")), fp8_ms=0.01, bf16_ms=0.01) if producers else {}
    sites = [_site(fqn, m.in_features, m.out_features, 64, **kw) for fqn, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    fed = producer_sites(model, SyntheticStream(cfg, 8, seed=1).batch(0)) if producers else None
    p = plan({"kind": "loka.probe.report", "schema_version": 1, "sites": sites}, Budget(), progress=False,
             device="cpu", producers=fed)
    return p.save(path)


def _rows(text: str, section: str) -> dict[str, list[str]]:
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_cpu_smoke_table_has_every_variant(tmp_path):
    bench = _load_bench()
    plan_path = _tiny_plan(tmp_path / "plan.json")
    out = tmp_path / "out"
    rc = bench.main(["--size", "tiny", "--cpu-smoke", "--plan", str(plan_path), "--out", str(out), "--steps", "2",
                     "--eval-examples", "512", "--infer-batch-sizes", "1,8", "--infer-iters", "3", "--no-progress"])
    assert rc == 0
    md = list(out.glob("cpu-*.md"))
    assert len(md) == 1, "one Markdown file named after the device and date"
    text = md[0].read_text()
    assert "NOT representative" in text and "python bench/ranker.py --size tiny --cpu-smoke" in text
    assert re.search(r"versions: torch \S+, triton \S+, torchao \S+, transformer_engine ", text)
    train, quality, latency = (_rows(text, s) for s in ("Training step", "Quality", "Inference latency"))
    for table in (train, quality, latency):
        assert list(table) == ["bf16", "torchao-tensorwise", "torchao-rowwise", "te", "loka-plan"]
    for name in ("bf16", "torchao-tensorwise", "torchao-rowwise", "loka-plan"):
        assert float(train[name][2].split()[0]) > 0, f"{name} did not run: {train[name]}"
        assert train[name][5] == "n/a", "no MFU on CPU"
        assert all(math.isfinite(float(v)) for v in quality[name][:2])
    assert int(train["torchao-rowwise"][0].split("/")[0]) > 0, "torchao converted no Linear"
    assert int(train["loka-plan"][0].split("/")[0]) > 0, "the plan's FP8 sites were not converted"
    from loka.kernels.backend_te import te_import

    support = te_import()
    if not support.ok:
        assert train["te"][0] == support.reason and support.reason.startswith("te: ")
    assert quality["loka-plan"][2].endswith("]"), "paired NE interval vs bf16"
    doc = json.loads(md[0].with_suffix(".json").read_text())
    assert [v["name"] for v in doc["variants"]] == list(train)
    ratios = _rows(text, "Speed vs bf16")
    assert list(ratios) == ["torchao-tensorwise", "torchao-rowwise", "te", "loka-plan"]
    step = {v["name"]: v["step_ms"][0] for v in doc["variants"] if v["step_ms"]}
    mine = next(v for v in doc["variants"] if v["name"] == "loka-plan")
    assert ratios["loka-plan"][0] == f"{step['bf16'] / step['loka-plan']:.2f}x"
    if mine["predicted_speedup"] is None:  # the hand-made timings save more than a CPU step: said, not hidden
        assert any("no predicted step speed-up" in n for n in mine["notes"]), mine["notes"]
    else:
        assert ratios["loka-plan"][1] == f"{mine['predicted_speedup']:.2f}x"


def test_loka_plan_row_fuses_the_plans_norm_quant_producers(tmp_path):
    bench = _load_bench()
    plan_path = _tiny_plan(tmp_path / "plan.json", producers=True)
    fed = [s["fqn"] for s in json.loads(plan_path.read_text())["sites"] if s.get("producer") == "norm_quant"]
    assert fed, "the producer sites were not priced without their cast"
    out = tmp_path / "out"
    rc = bench.main(["--size", "tiny", "--cpu-smoke", "--variants", "bf16,loka-plan", "--plan", str(plan_path),
                     "--out", str(out), "--steps", "1", "--eval-examples", "512", "--infer-batch-sizes", "8",
                     "--infer-iters", "2", "--no-progress"])
    assert rc == 0
    doc = json.loads(next(out.glob("cpu-*.json")).read_text())
    mine = next(v for v in doc["variants"] if v["name"] == "loka-plan")
    assert mine["status"] == "ok", mine
    assert f"{len(fed)} norm+quantize producers fused" in " ".join(mine["notes"]), mine["notes"]
    assert all(math.isfinite(v) for v in mine["ne"].values())


def test_cpu_results_never_default_to_bench_results():
    bench = _load_bench()
    args = bench.parse_args(["--size", "tiny", "--cpu-smoke"])
    out = bench.results_dir(args, torch.device("cpu"))
    try:
        assert (ROOT / "bench" / "results") not in out.resolve().parents and out.resolve() != ROOT / "bench" / "results"
    finally:
        out.rmdir()


def test_bad_variant_is_refused(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "bf16,fp4"])
    assert "unknown variants ['fp4']" in capsys.readouterr().err
    assert sys.modules.get("ranker_variants") is not None


def test_variant_past_its_time_limit_is_a_row_with_the_reason(tmp_path):
    bench = _load_bench()
    out = tmp_path / "out"
    rc = bench.main(["--size", "tiny", "--cpu-smoke", "--variants", "bf16", "--out", str(out), "--steps", "1",
                     "--eval-examples", "64", "--infer-batch-sizes", "1", "--infer-iters", "1", "--no-progress",
                     "--variant-timeout", "0.001"])
    assert rc == 0
    text = next(out.glob("cpu-*.md")).read_text()
    assert "time limit per variant: 0.001 s" in text
    row = _rows(text, "Training step")["bf16"]
    assert row[0] == "error: VariantTimeout: bf16 did not finish within 0.001 s (--variant-timeout)"


def test_making_the_plan_past_its_time_limit_is_the_loka_plan_row(tmp_path):
    # bench/gpu_check.py's ranker stage adds the plan's limit to the variants' (issue 24): making the
    # plan must stop at --plan-timeout, not run on outside every limit.
    bench = _load_bench()
    out = tmp_path / "out"
    rc = bench.main(["--size", "tiny", "--cpu-smoke", "--variants", "loka-plan", "--out", str(out), "--steps", "1",
                     "--eval-examples", "64", "--infer-batch-sizes", "1", "--infer-iters", "1", "--no-progress",
                     "--plan-timeout", "0.001"])
    assert rc == 0
    row = _rows(next(out.glob("cpu-*.md")).read_text(), "Training step")["loka-plan"]
    assert row[0] == "error: VariantTimeout: making the loka plan did not finish within 0.001 s (--plan-timeout)"


def test_compiled_casts_needs_compile_and_a_plan_made_here(capsys):
    bench = _load_bench()
    for argv in (["--cpu-smoke", "--compiled-casts"], ["--compile", "on", "--compiled-casts", "--plan", "p.json"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert "--compiled-casts" in capsys.readouterr().err
    assert bench.parse_args(["--cpu-smoke", "--compile", "on", "--compiled-casts"]).compiled_casts
