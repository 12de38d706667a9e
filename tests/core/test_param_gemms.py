"""Every GEMM on a parameter, whatever its Python form, runs in FP8 after ``loka.convert`` and says so.

For each form of ``ctr_forms`` (with and without autocast bf16): an independent count (a
``TorchDispatchMode`` in this file, summing 2·M·K·N of ``mm/addmm/bmm/baddbmm/convolution``
and of ``_scaled_mm``) shows the step's parameter GEMM FLOPs in FP8; the converted list is
the form's parameter sites and each ran all its GEMMs in FP8; the loss and every parameter
gradient match the same forward with each parameter GEMM replaced by an ml_dtypes FP8 GEMM
(``tests/fp8_oracle.py``, fprop/dgrad/wgrad each quantized).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loka
from ctr_forms import FORMS
from fp8_oracle import _OracleLinearFn
from loka.convert import gemm_counts
from loka.probe.census import gemm_census
from loka.recipe import as_recipe

_aten = torch.ops.aten
_HP = {_aten.mm.default: 0, _aten.addmm.default: 1, _aten.bmm.default: 0, _aten.baddbmm.default: 1}


class FlopCount(TorchDispatchMode):
    """2·M·K·N of every hp GEMM op and of every ``_scaled_mm`` (independent of loka's own counting)."""

    def __init__(self) -> None:
        super().__init__()
        self.hp = self.fp8 = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _HP:
            self.hp += 2.0 * out.numel() * args[_HP[func]].shape[-1]
        elif func is _aten._scaled_mm.default:
            self.fp8 += 2.0 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif func is _aten.convolution.default:
            self.hp += 2.0 * out.numel() * args[1][0].numel()
        elif func is _aten.convolution_backward.default:
            grad, w = args[0], args[2]
            self.hp += sum(args[10][:2]) * 2.0 * grad.numel() * w[0].numel()
        return out


def _autocast(on: bool):
    return torch.autocast("cpu", torch.bfloat16) if on else contextlib.nullcontext()


def _step(model, x, r, autocast: bool):
    """One forward and backward; returns the loss (float64) and the count of the step's GEMMs."""
    count = FlopCount()
    with count:
        with _autocast(autocast):
            out = model(x)
        loss = (out.float() * r).sum()
        loss.backward()
    return loss.double(), count


def _oracle_step(model, x, r, autocast: bool):
    recipe, dt = as_recipe("rowwise"), torch.bfloat16 if autocast else torch.float32

    def mm(x2d, w_nk):  # x[M, K] · w[N, K]ᵀ, each of fprop/dgrad/wgrad through the ml_dtypes oracle
        return _OracleLinearFn.apply(x2d.to(dt).float(), w_nk.to(dt).float(), recipe).to(dt)

    with _autocast(autocast):
        out = model.oracle(x, mm)
    loss = (out.float() * r).sum()
    loss.backward()
    return loss.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_parameter_gemm_runs_fp8(form, autocast):
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    torch.manual_seed(seed)
    make, shape, sites = FORMS[form]
    hp_model = make()
    census_model = copy.deepcopy(hp_model)
    oracle_model = copy.deepcopy(hp_model)
    fp8_model = copy.deepcopy(hp_model)
    x = torch.randn(*shape)
    needs_dx = form == "shared_param"  # one form also checks dgrad of the model's first GEMM
    r = torch.randn_like(hp_model(x).float())
    _, hp_count = _step(hp_model, x.clone().requires_grad_(needs_dx), r, autocast)
    act = getattr(hp_model, "act_flops", lambda: 0.0)()
    param_flops = hp_count.hp - act

    res = loka.convert(fp8_model, "rowwise")
    x_grad = x.clone().requires_grad_(needs_dx)
    loss, count = _step(fp8_model, x_grad, r, autocast)
    # the independent count: the step's parameter GEMM FLOPs ran in FP8 (all of them, here)
    assert count.fp8 >= 0.9 * param_flops, (count.fp8, param_flops)
    assert count.fp8 == pytest.approx(param_flops, rel=1e-12)
    assert count.hp == pytest.approx(act, rel=1e-12, abs=0.0)
    # the census (of the unconverted model's step) says the same share before conversion
    with _autocast(autocast):
        census = gemm_census(census_model, x.clone().requires_grad_(needs_dx), backward=True).summary()
    assert census["convertible_share"] == pytest.approx(count.fp8 / (count.fp8 + count.hp), rel=1e-9, abs=1e-12)
    assert census["step_gemm_flops"] == pytest.approx(count.fp8 + count.hp, rel=1e-9)
    # what convert says is what ran: the form's sites, every expected GEMM in FP8
    assert res.verified and set(res.converted) == sites, res.table()
    counts = gemm_counts(fp8_model)
    for site in sites:
        assert counts[site]["fp8_gemms_observed"] == counts[site]["expected"], (site, counts[site])
        assert counts[site]["expected"]["wgrad"] >= 1
    # numerics: loss and gradients against the ml_dtypes FP8 oracle, GEMM by GEMM
    x_oracle = x.clone().requires_grad_(needs_dx)
    loss_oracle = _oracle_step(oracle_model, x_oracle, r, autocast)
    # fp32: the same FP8 values; a chain of GEMMs may flip an FP8 rounding where float32 and float64
    # accumulation differ in the last bit (seen: 8e-4 on a stack of two). bf16 rounds between GEMMs.
    tol = 2e-2 if autocast else 5e-3
    assert _rel(loss, loss_oracle) < tol
    grads, hp_grads = dict(fp8_model.named_parameters()), dict(hp_model.named_parameters())
    for name, p in oracle_model.named_parameters():
        assert _rel(grads[name].grad, p.grad) < tol, name
    # the bound tells FP8 from hp: the unconverted model's gradients miss the oracle by more
    assert max(_rel(hp_grads[n].grad, p.grad) for n, p in oracle_model.named_parameters()) > 2 * tol
    if needs_dx:
        assert _rel(x_grad.grad, x_oracle.grad) < tol


_PROBE_SITES = {"shared_param": {"W", "W#1"}, "dcn_m_matmul": {"kernels", "kernels#1"},
                "stack_bmm": {"kernels", "kernels#1"}}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_probe_measures_every_parameter_gemm(form, autocast):
    """The probe has a site, with errors of its three GEMMs, for every parameter GEMM that ran; its
    coverage line equals the independent count's FP8 share after convert."""
    from loka.probe import Probe, ProbeConfig, SamplingSchedule

    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    make, shape, sites = FORMS[form]
    model = make()
    fp8_model = copy.deepcopy(model)
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), candidates=("rowwise",),
                                     stop_when_decided=False, background=False))
    for step in range(2):
        with probe.step(step):
            with _autocast(autocast):
                out = model(torch.randn(*shape))
            out.float().square().mean().backward()
        model.zero_grad()
    report = probe.report()
    expect = _PROBE_SITES.get(form, sites)
    assert {s["fqn"] for s in report.sites} == expect
    for s in report.sites:
        assert all(s["errors"]["rowwise"][g]["n"] == 2 for g in ("fprop", "dgrad", "wgrad")), (s["fqn"], s["errors"])
    loka.convert(fp8_model, "rowwise")
    _, count = _step(fp8_model, torch.randn(*shape), torch.randn_like(out.float()), autocast)
    cov = report.doc["coverage"]
    assert cov["probed_share"] == pytest.approx(count.fp8 / (count.fp8 + count.hp), rel=1e-9)
    assert cov["convertible_share"] == pytest.approx(cov["probed_share"], rel=1e-9)


def test_compiled_parameter_sites_say_they_run_in_hp():
    """Under torch.compile the ATen-level routing does not run: a warning names the sites, their counts
    stay put, and nothing is claimed in FP8 for the compiled steps (Float8Linear sites compile in FP8)."""
    make, shape, sites = FORMS["tensordot"]
    model = make()
    loka.convert(model, "rowwise", example=(torch.randn(*shape),))
    before = gemm_counts(model)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="run in hp inside torch.compile"):
        compiled(torch.randn(*shape)).sum().backward()
    assert gemm_counts(model) == before


class _Unconvertible(torch.nn.Module):
    """GEMMs on parameters that cannot run in FP8 here: a product of two parameters, a K=20 GEMM
    (not a multiple of 16 for _scaled_mm), a 3x3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.A, self.B = torch.nn.Parameter(torch.randn(32, 32)), torch.nn.Parameter(torch.randn(32, 32))
        self.odd = torch.nn.Parameter(torch.randn(20, 32))
        self.conv = torch.nn.Conv2d(2, 16, 3)
        self.W = torch.nn.Parameter(torch.randn(32, 32))

    def forward(self, x):  # x [32, 32]
        y = x @ (self.A @ self.B) + x[:, :20] @ self.odd + x @ self.W
        return y.sum() + self.conv(x.reshape(32, 2, 4, 4)).sum()


def test_what_cannot_run_in_fp8_is_named_never_counted():
    model = _Unconvertible()
    census = gemm_census(copy.deepcopy(model), torch.randn(32, 32), backward=True)
    rows = {r["site"]: r for r in census.summary()["sites"]}
    assert not rows["B"]["convertible"] and "both operands are parameters" in rows["B"]["reason"]  # A @ B, once
    assert not rows["conv"]["convertible"] and "wider than 1x1" in rows["conv"]["reason"]
    assert rows["W"]["convertible"] and rows["odd"]["convertible"]  # its form is; the kernel decides at run time
    with pytest.warns(UserWarning, match="not converted"):
        res = loka.convert(model, "rowwise", example=(torch.randn(32, 32),))
    assert res.converted == ["W"], res.table()
    assert "A" in res.skipped and "both operands are parameters" in res.skipped["B"]
    assert "K=20 is not a multiple of 16" in res.skipped["odd"] and "wider than 1x1" in res.skipped["conv"]
    count = FlopCount()
    with count:
        model(torch.randn(32, 32)).backward()
    w_flops = 2 * 2.0 * 32 * 32 * 32  # fprop and wgrad (x needs no gradient)
    assert count.fp8 == pytest.approx(w_flops, rel=1e-12)  # only W's GEMMs, as converted says


def test_backward_gemms_that_fall_back_are_named_after_the_first_step():
    """Without example=, the first forward is observed and the backward counted; at the next forward a
    wgrad that ran in hp (K = batch 24, not a multiple of 16) is named with its site and form."""
    make, _, _ = FORMS["einsum_transposed"]
    model = make()
    res = loka.convert(model, "rowwise")
    model(torch.randn(24, 32)).sum().backward()
    assert res.verified and res.converted == ["weight"] and "weight" not in res.hp_gemms
    with pytest.warns(UserWarning, match=r"weight \(bmm\): wgrad ran in hp"):
        model(torch.randn(24, 32))
    assert "K=24 is not a multiple of 16" in res.hp_gemms["weight"]["wgrad"]
    assert res.fp8_gemms("weight") == ["fprop", "dgrad"]
