"""Micro-benchmark cache and the dispatch CLI (doctor, plan, bench-kernels)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from loka.kernels import KERNELS
from loka.dispatch.cli import doctor_text, register
from loka.dispatch.microbench import open_cache, time_serving_buckets
from loka.probe.timing import time_site

from dispatch_report_fixtures import GEMMS, report, site

FAST = dict(warmup=0, iters=2, progress=False)


def test_microbench_times_every_supporting_kernel_and_caches(tmp_path):
    t = time_site((16, 32, 16), ["tensorwise"], kernels=["scaled_mm", "te"], dtype=torch.float32,
                         cache=open_cache(tmp_path, "cpu"), **FAST).to_dict()
    assert set(t["bf16_ms"]) == set(GEMMS) and not t["representative"]
    assert {(e["gemm"], e["kernel"]) for e in t["entries"]} == {(g, "scaled_mm") for g in GEMMS}
    assert all(e["median_ms"] > 0 and not e["cached"] for e in t["entries"])
    assert t["skipped"]["te"].startswith("te: not installed")
    again = time_site((16, 32, 16), ["tensorwise"], kernels=["scaled_mm"], dtype=torch.float32,
                             cache=open_cache(tmp_path, "cpu"), **FAST).to_dict()
    assert all(e["cached"] for e in again["entries"])
    assert [e["median_ms"] for e in again["entries"]] == [e["median_ms"] for e in t["entries"]]
    fresh = time_site((16, 32, 16), ["tensorwise"], kernels=["scaled_mm"], dtype=torch.float32,
                             cache=open_cache(tmp_path, "cpu"), refresh=True, **FAST).to_dict()
    assert not any(e["cached"] for e in fresh["entries"])
    other_dtype = time_site((16, 32, 16), ["tensorwise"], kernels=["scaled_mm"], dtype=torch.bfloat16,
                                   cache=open_cache(tmp_path, "cpu"), **FAST).to_dict()
    assert not any(e["cached"] for e in other_dtype["entries"])


def test_microbench_uses_fits_and_reports_unsupported_shapes(tmp_path):
    fits = {"input": {"family": "laplace", "params": [0.0, 2.0], "ks": 0.01, "n": 100},
            "weight": {"family": "normal", "params": [0.0, 0.02], "ks": 0.01, "n": 100}}
    t = time_site((8, 40, 16), ["rowwise"], kernels=["scaled_mm"], gemms=("fprop",), dtype=torch.float32,
                         fits=fits, cache=open_cache(tmp_path, "cpu"), **FAST).to_dict()
    assert t["entries"] == [] and "K=40" in t["skipped"]["fprop/scaled_mm/rowwise"]
    b = time_serving_buckets(32, 16, [4, 8, 4], ["rowwise"], kernels=["scaled_mm"], dtype=torch.float32,
                             cache=open_cache(tmp_path, "cpu"), fits=fits, **FAST)
    assert sorted(b) == [4, 8] and all(set(v.bf16_ms) == {"fprop"} for v in b.values())
    with pytest.raises(ValueError, match="m_buckets"):
        time_serving_buckets(32, 16, [], ["rowwise"])


def test_doctor_lists_every_kernel_with_a_status():
    text = doctor_text(torch.device("cpu"))
    for kernel in KERNELS:
        assert kernel.name in text
    assert "te: not installed" in text and "torch" in text and "device: cpu" in text
    assert "target: none detected" in text and "--device b200" in text


def _run(argv) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_cli_writes_a_plan_and_prints_the_table(tmp_path, capsys):
    entries = [(g, "scaled_mm", "rowwise", 0.4) for g in GEMMS]
    rep = tmp_path / "probe.json"
    rep.write_text(json.dumps(report(site("enc.proj", 256, 512, bf16_ms=1.0, entries=entries))))
    out = tmp_path / "plan.json"
    assert _run(["plan", "--report", str(rep), "--budget", "wgrad=0.01", "--out", str(out.parent)]) == 0
    printed = capsys.readouterr().out
    assert "| enc.proj | 256×256×512 | scaled_mm/rowwise | scaled_mm/rowwise | bf16 |" in printed
    assert json.loads(out.read_text())["kind"] == "loka.dispatch.plan"
    assert _run(["plan", "--report", str(rep), "--budget", "wgrad", "--out", str(out.parent)]) == 2
    assert _run(["doctor", "--device", "cpu"]) == 0


def test_commands_are_wired_into_the_loka_cli(capsys):
    from loka.app.cli import main

    assert main(["doctor", "--device", "cpu"]) == 0
    assert "scaled_mm" in capsys.readouterr().out
