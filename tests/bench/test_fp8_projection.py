"""bench/fp8_projection.py: the speed-model bound of FP8's step speed-up, on fake tensors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from loka.kernels.costmodel import H200_SXM, bf16_us, kernel_us
from loka.models import Ranker, RankerConfig, SyntheticStream
from loka.recipe import GEMMS, gemm_shape

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("fp8_projection", ROOT / "bench" / "fp8_projection.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_sites_are_the_linears_the_real_forward_runs():
    proj = _load()
    cfg = RankerConfig.from_size("tiny")
    sites, attention = proj.record_sites(cfg, 32)
    real = []
    model = Ranker(cfg)
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, a, _o: real.append((names[mod], mod.in_features, mod.out_features)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(SyntheticStream(cfg, 32, seed=0).batch(0))
    for h in hooks:
        h.remove()
    assert sorted((s.fqn, s.k, s.n) for s in sites) == sorted(real)
    assert all(s.m >= 1 for s in sites) and attention >= 0


def test_regimes_price_each_gemm_as_the_speed_model_does():
    proj = _load()
    m, k, n = 8192, 4096, 4096
    for gemm in GEMMS:
        shape = gemm_shape(gemm, m, k, n)
        b = bf16_us(*shape, H200_SXM)
        per_call = min(kernel_us("scaled_mm", r, gemm, *shape, H200_SXM) for r in proj.RECIPES)
        assert proj.gemm_us(gemm, m, k, n, H200_SXM, "per_call") == (b, min(b, per_call))
        ceiling = min(kernel_us("scaled_mm", r, gemm, *shape, H200_SXM, a_in_producer=True, b_cached=True)
                      for r in proj.RECIPES)
        assert proj.gemm_us(gemm, m, k, n, H200_SXM, "ceiling") == (b, min(b, ceiling))
    sites = [proj.Site("a", 32768, 1024, 1024), proj.Site("b", 8192, 256, 256)]
    p = proj.project(sites, 0.0, H200_SXM)["regimes"]
    assert p["per_call"]["gemm_best_ms"] >= p["producers"]["gemm_best_ms"] >= p["ceiling"]["gemm_best_ms"]
    assert p["per_call"]["gemm_bf16_ms"] == p["ceiling"]["gemm_bf16_ms"]
    assert all(r["gemm_best_ms"] <= r["gemm_bf16_ms"] for r in p.values())


@pytest.mark.parametrize("target", [1.1, 1.25, 1.5])
def test_rest_allowance_gives_the_target_exactly(target):
    proj = _load()
    r = {"gemm_bf16_ms": 40.0, "gemm_best_ms": 28.0}
    rest = proj.rest_allowance_ms(r, 3.0, target)
    bf16_step = 40.0 + 3.0 + rest
    assert bf16_step / (bf16_step - 12.0) == pytest.approx(target)


def test_cli_tiny_and_bad_arguments(tmp_path, capsys):
    proj = _load()
    out = tmp_path / "p.json"
    assert proj.main(["--size", "tiny", "--batch", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(not measured)" in text and "| per_call |" in text and "| ceiling |" in text and "Serving at batch 4096" in text
    doc = json.loads(out.read_text())
    assert doc["size"] == "tiny" and set(doc["regimes"]) == set(proj.REGIMES)
    assert proj.main(["--size", "tiny", "--target", "0.9"]) == 2
    assert proj.main(["--size", "tiny", "--batch", "0"]) == 2
    assert proj.main(["--size", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--target" in err and "--batch" in err


def test_serving_bound_prices_fprop_with_frozen_weights():
    proj = _load()
    sites = [proj.Site("a", 4096, 4096, 4096), proj.Site("b", 4096, 256, 256)]
    sv = proj.project_serving(sites, 0.0, H200_SXM)
    bf16 = sum(bf16_us(s.m, s.k, s.n, H200_SXM) for s in sites)
    fed = sum(min(bf16_us(s.m, s.k, s.n, H200_SXM),
                  min(kernel_us("scaled_mm", r, "fprop", s.m, s.k, s.n, H200_SXM, a_in_producer=True, b_cached=True)
                      for r in proj.RECIPES)) for s in sites)
    assert sv["producers"]["speedup"] == pytest.approx(bf16 / fed)
    assert sv["producers"]["speedup"] >= sv["per_call"]["speedup"] >= 1.0
