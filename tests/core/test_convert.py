"""loka.convert: the plain swap of Linear sites, with reasons for every skip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loka import Float8Linear, convert


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.LayerNorm(128),
        nn.SiLU(),
        nn.Sequential(nn.Linear(128, 40), nn.ReLU()),
        nn.Linear(40, 16),
    )


def test_convert_all_reports_converted_and_skipped():
    model = mlp()
    params_before = {n: p for n, p in model.named_parameters()}
    result = convert(model, "tensorwise", kernels="scaled_mm")  # on CPU from torch 2.11 (rowwise from 2.13)
    assert result.converted == ["0"]
    assert "N=40 is not a multiple of 16" in result.skipped["3.0"]
    assert "K=40 is not a multiple of 16" in result.skipped["4"]
    assert isinstance(model[0], Float8Linear) and type(model[4]) is nn.Linear
    # Parameters are reused, not copied: an optimizer built before conversion still works.
    for n, p in model.named_parameters():
        assert p is params_before[n]


def test_filter_fn_and_fallback():
    model = mlp()
    result = convert(model, "tensorwise", kernels="scaled_mm", fallback="hp", module_filter_fn=lambda m, fqn: fqn != "0")
    assert result.skipped["0"] == "excluded by module_filter_fn"
    # 128 -> 40: fprop (N=40) and dgrad (K=40) cannot run on scaled_mm; wgrad [K=M, N=128] can
    assert result.converted == ["3.0"]
    assert result.fp8_gemms("3.0") == ["wgrad"]
    assert set(result.hp_gemms["3.0"]) == {"fprop", "dgrad"} and "N=40" in result.hp_gemms["3.0"]["fprop"]
    assert "partly converted (wgrad in FP8" in result.table()
    # 40 -> 16: every GEMM has 40 on K or N, so nothing would run in FP8: not counted, not swapped
    assert result.skipped["4"].startswith("no GEMM would run in FP8") and type(model[4]) is nn.Linear
    assert result.n_fp8_gemms == 1
    y = model(torch.randn(16, 64))
    assert y.shape == (16, 16) and torch.isfinite(y).all()
    assert "N=40" in model[3][0].fallbacks["fprop"]
    # wgrad's K is the batch size: 16 runs in FP8, a ragged batch of 13 falls back at run time
    assert "wgrad" not in result.observed(model)["3.0"]
    model(torch.randn(13, 64)).sum().backward()
    assert "K=13" in result.observed(model)["3.0"]["wgrad"] and "run time" in result.observed(model)["3.0"]["wgrad"]
    again = convert(model, "tensorwise")
    assert again.skipped["3.0"] == "already a Float8Linear"


def test_kernel_chosen_hp_is_not_counted_as_fp8():
    model = mlp()
    result = convert(model, "tensorwise", kernels={"fprop": "emulated", "dgrad": "emulated", "wgrad": "bf16"})
    assert sorted(result.converted) == ["0", "3.0", "4"]
    for fqn in result.converted:
        assert result.fp8_gemms(fqn) == ["fprop", "dgrad"]
        assert "bf16" in result.hp_gemms[fqn]["wgrad"]
    assert result.n_fp8_gemms == 6


def test_emulated_converts_every_shape_and_trains():
    model = mlp()
    result = convert(model, "blockwise", kernels="emulated")
    assert len(result.converted) == 3 and not result.skipped
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(32, 64), torch.randn(32, 16)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="bare Linear"):
        convert(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="recipe name"):
        convert(mlp(), "int4")
    with pytest.raises(ValueError, match="unknown kernel"):
        convert(mlp(), "rowwise", kernels="cutlass9")



def _one_site_plan(model: nn.Module, fqn: str):
    """A plan that puts every GEMM of ``fqn`` on scaled_mm/tensorwise (hand-built report, as a probe writes it;
    tensorwise: the granularity CPU ``_scaled_mm`` runs on every supported torch)."""
    from loka.dispatch import Budget, plan

    lin = model.get_submodule(fqn)
    err = {"mean": 0.03, "ci_lo": 0.02, "ci_hi": 0.04, "sqnr_db": 30.0, "n": 5}
    timings = {"device_name": "test", "representative": False, "m": 32, "dtype": "bfloat16",
               "bf16_ms": {g: 1.0 for g in ("fprop", "dgrad", "wgrad")},
               "entries": [{"gemm": g, "kernel": "scaled_mm", "recipe": "tensorwise", "median_ms": 0.5}
                           for g in ("fprop", "dgrad", "wgrad")]}
    site = {"fqn": fqn, "in_features": lin.in_features, "out_features": lin.out_features, "m_values": [32],
            "errors": {"tensorwise": {g: dict(err) for g in ("fprop", "dgrad", "wgrad")}}, "timings": timings}
    return plan({"kind": "loka.probe.report", "schema_version": 1, "sites": [site]}, Budget(), progress=False)


def test_plan_given_in_place_of_recipe(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32))
    p = _one_site_plan(model, "0")
    path = p.save(tmp_path / "plan.json")
    result = convert(model, str(path))  # positional plan path
    assert result.converted == ["0"]
    assert model[0].kernels["fprop"].name == "scaled_mm"
    with pytest.raises(ValueError, match="come from the plan"):
        convert(nn.Sequential(nn.Linear(64, 32)), p, kernels="emulated")
