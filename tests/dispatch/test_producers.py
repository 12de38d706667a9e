"""Producer choices in the plan (norm_quant), chosen on the model's dataflow and applied for serving."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from loka.dispatch import apply_plan, load_plan
from loka.dispatch.plans import GemmChoice, Plan, PlanError, SitePlan
from loka.dispatch.producers import apply_producers, norm_fed_linears, with_producers
from loka.kernels.costmodel import H200_SXM, quantize_us
from loka.mods.fused_norm_quant import DeferredNorm, NormQuantFloat8Linear


class Toy(nn.Module):
    """norm_a -> fed (exclusive), norm_b -> (shared_1, shared_2), act -> after_act, norm_c -> kept (bf16 site)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.norm_a, self.fed = nn.LayerNorm(d), nn.Linear(d, d)
        self.norm_b, self.shared_1, self.shared_2 = nn.RMSNorm(d), nn.Linear(d, d), nn.Linear(d, d)
        self.after_act = nn.Linear(d, d)
        self.norm_c, self.kept = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fed(self.norm_a(x))
        nb = self.norm_b(h)
        h = self.shared_1(nb) + self.shared_2(nb)
        h = self.after_act(F.silu(h))
        return self.kept(self.norm_c(h))


def _plan(model: Toy, m: int = 32, recipe: str = "rowwise") -> Plan:
    sites = []
    for fqn in ("fed", "shared_1", "shared_2", "after_act", "kept"):
        fp8 = fqn != "kept"
        fprop = GemmChoice("emulated", recipe, "test", 0.03, 25.0, 1.0, 0.5) if fp8 else GemmChoice(reason="kept", bf16_ms=1.0)
        gemms = {"fprop": fprop, "dgrad": GemmChoice(reason="serving"), "wgrad": GemmChoice(reason="serving")}
        sites.append(SitePlan(fqn, 64, 64, m, gemms))
    return Plan(sites=sites, budget={}, device={"name": "H200 SXM (speed model)", "source": "model"})


def test_only_exclusive_norm_fed_fp8_rowwise_sites_are_chosen():
    model = Toy()
    x = torch.randn(8, 64)
    assert norm_fed_linears(model, x) == {"fed": "norm_a", "kept": "norm_c"}
    p = with_producers(_plan(model), model, x, H200_SXM)
    assert {s.fqn: s.producer for s in p.sites} == {"fed": "norm_quant", "shared_1": None, "shared_2": None,
                                                  "after_act": None, "kept": None}  # kept: the plan keeps it bf16
    fed = p.site("fed").gemms["fprop"]
    assert fed.planned_ms == pytest.approx(0.5 - quantize_us(32, 64, H200_SXM) / 1e3)  # the cast is not paid
    assert "norm_a" in fed.reason and any("norm_quant" in n for n in p.notes)
    tensorwise = with_producers(_plan(model, recipe="tensorwise"), model, x, H200_SXM)
    assert all(s.producer is None for s in tensorwise.sites)  # the fused kernel emits row scales only


def test_producer_survives_the_plan_file_and_bad_values_are_refused(tmp_path):
    model = Toy()
    p = with_producers(_plan(model), model, torch.randn(8, 64), H200_SXM)
    back = load_plan(p.save(tmp_path / "plan.json"))
    assert back.site("fed").producer == "norm_quant" and back.site("after_act").producer is None
    assert "producer" not in json.loads(_plan(model).to_json())["sites"][0]  # plans without it are unchanged
    doc = json.loads(p.to_json())
    doc["sites"][1]["producer"] = "epilogue"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="producer"):
        load_plan(tmp_path / "bad.json")


def test_applied_producer_matches_the_emulated_plan():
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    model, reference = Toy(), Toy()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 64) * 3
    p = with_producers(_plan(model), model, x, H200_SXM)
    apply_plan(model, p)
    apply_plan(reference, p)
    result = apply_producers(model, p, x)
    assert [c.fqn for c in result.changes] == ["norm_a -> fed"]
    lin = model.fed
    assert isinstance(model.norm_a, DeferredNorm) and isinstance(lin, NormQuantFloat8Linear)
    assert lin.norm is model.norm_a
    lin.fused_calls = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert lin.fused_calls == 1
    y = model(x.clone().requires_grad_())  # with grad the fused path runs too, same numbers in fp32
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)
    assert lin.fused_calls == 2


def _training_plan(m: int = 32) -> Plan:
    """Every GEMM of every site FP8 rowwise on the emulated kernel (a training plan)."""
    sites = [SitePlan(fqn, 64, 64, m, {g: GemmChoice("emulated", "rowwise", "test", 0.03, 25.0, 1.0, 0.5)
                                      for g in ("fprop", "dgrad", "wgrad")})
             for fqn in ("fed", "shared_1", "shared_2", "after_act", "kept")]
    return Plan(sites=sites, budget={}, device={"name": "H200 SXM (speed model)", "source": "model"})


def test_applied_producers_train_like_the_plan_without_them():
    """apply_producers on a model that is then trained: a grad-mode run takes the fused path at
    every chosen site, and the output and every gradient equal the plan without producers."""
    model, reference = Toy(), Toy()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 64) * 3
    p = with_producers(_training_plan(), model, x, H200_SXM)
    assert sorted(s.fqn for s in p.sites if s.producer == "norm_quant") == ["fed", "kept"]
    apply_plan(model, p)
    apply_plan(reference, p)
    result = apply_producers(model, p, x)
    assert sorted(c.fqn for c in result.changes) == ["norm_a -> fed", "norm_c -> kept"]
    lins = [model.fed, model.kept]
    assert [lin.norm for lin in lins] == [model.norm_a, model.norm_c]
    for lin in lins:
        lin.fused_calls = 0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = model(xa), reference(xb)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert all(lin.fused_calls == 1 for lin in lins)  # grad mode ran the fused path
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
