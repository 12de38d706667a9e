"""apply_plan / loka.convert(model, plan=...): mismatches listed in full, bf16 fallback, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loka
from loka.dispatch import GemmChoice, Plan, PlanMismatchError, SitePlan, apply_plan
from loka.nn import Float8Linear


def _model():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 48)), nn.Linear(48, 1))


def _site(fqn, k, n, kernel="scaled_mm", recipe="tensorwise", wgrad_bf16=True):  # CPU _scaled_mm: tensorwise on every torch
    fp8 = GemmChoice(kernel, recipe, reason="test")
    gemms = {"fprop": fp8, "dgrad": fp8, "wgrad": GemmChoice(reason="kept bf16: test") if wgrad_bf16 else fp8}
    return SitePlan(fqn, k, n, 32, gemms)


def _plan(*sites):
    return Plan(sites=list(sites), budget={})


def test_apply_converts_planned_sites_with_mixed_kernels():
    model = _model()
    p = _plan(_site("0", 64, 32), _site("2.0", 32, 48, kernel="emulated", recipe="tensorwise"),
              SitePlan("3", 48, 1, 32, {g: GemmChoice(reason="kept bf16: N=1") for g in ("fprop", "dgrad", "wgrad")}))
    res = loka.convert(model, plan=p)
    assert res.converted == ["0", "2.0"]
    assert res.skipped["3"].startswith("plan keeps bf16")
    # counted by GEMM: wgrad is kept bf16 by the plan, so it is not counted as FP8
    assert res.fp8_gemms("0") == ["fprop", "dgrad"] and "kept bf16: test" in res.hp_gemms["0"]["wgrad"]
    assert res.n_fp8_gemms == 4
    m0 = model[0]
    assert isinstance(m0, Float8Linear)
    assert {g: m0.kernels[g].name for g in ("fprop", "dgrad", "wgrad")} == {"fprop": "scaled_mm", "dgrad": "scaled_mm", "wgrad": "bf16"}
    assert m0.recipe.wgrad.is_hp and not m0.recipe.fprop.is_hp
    assert type(model[3]) is nn.Linear
    # Trains: loss goes down with the planned kernels.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    losses = []
    for _ in range(8):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_every_mismatch_is_listed():
    model = _model()
    p = _plan(
        _site("0", 64, 16),  # shape mismatch (out 32)
        _site("2.0", 32, 48, kernel="te"),  # kernel unavailable here
        _site("9", 8, 8),  # not in the model
        _site("3", 48, 1, kernel="nonexistent"),
    )
    with pytest.raises(PlanMismatchError) as exc:
        apply_plan(model, p)
    diffs = exc.value.differences
    text = "\n".join(diffs)
    assert "0: shape mismatch" in text
    assert "te: not installed" in text
    assert "9: in the plan but not a Linear" in text
    assert "'nonexistent' is not registered" in text
    # one per site, or per FP8 GEMM (fprop and dgrad) for kernel problems
    assert len(diffs) == 6 and "2.0: dgrad kernel 'te'" in text
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # untouched


def test_uncovered_linear_and_unsupported_shape_are_differences():
    model = _model()
    p = _plan(_site("0", 64, 32), _site("2.0", 32, 48))  # "3" not covered
    with pytest.raises(PlanMismatchError, match="3: a Linear of the model that the plan does not cover"):
        apply_plan(model, p)
    odd = nn.Sequential(nn.Linear(40, 24))
    with pytest.raises(PlanMismatchError, match="K=40 is not a multiple of 16"):
        apply_plan(odd, _plan(_site("0", 40, 24)))


def test_on_mismatch_bf16_keeps_those_sites_and_converts_the_rest():
    model = _model()
    p = _plan(_site("0", 64, 32), _site("2.0", 32, 48, kernel="te"), _site("9", 8, 8))
    res = apply_plan(model, p, on_mismatch="bf16")
    assert res.converted == ["0"]
    assert "te: not installed" in res.skipped["2.0"]
    assert "not a Linear" in res.skipped["9"]
    assert "does not cover" in res.skipped["3"]
    assert type(model[2][0]) is nn.Linear
    with pytest.raises(ValueError, match="on_mismatch"):
        apply_plan(model, p, on_mismatch="ignore")


def test_apply_from_a_saved_plan(tmp_path):
    path = _plan(_site("0", 64, 32), _site("2.0", 32, 48), _site("3", 48, 1, kernel="emulated")).save(tmp_path / "p.json")
    res = loka.convert(_model(), plan=path)
    assert res.converted == ["0", "2.0", "3"]
