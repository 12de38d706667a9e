"""The plan's inference path: FP8 weights stored once, activations quantized in their producer.

An engine built from a plan file with ``fuse_norm_quant=True`` must score like the same plan
without the fused norm (the emulated reference), quantize each weight once across requests,
actually take the fused path at the ranker's Norm -> Linear sites, and serve the same numbers
over HTTP.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace

import pytest
import torch
from torch import nn

from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.models import Ranker, RankerConfig, SyntheticStream, save_checkpoint
from loka.models.engine import InferenceEngine
pytest.importorskip("uvicorn", reason="serving is the loka[serve] extra")
pytest.importorskip("pydantic", reason="serving is the loka[serve] extra")
from loka.models.serve import ScoringServer
from loka.models.serving_schema import batch_to_request
from loka.mods.fused_norm_quant import DeferredNorm, NormQuantFloat8Linear
from loka.nn import Float8Linear


def _serving_plan(model: nn.Module, path, kernel: str = "emulated") -> str:
    """fprop rowwise FP8 on every Linear, backward GEMMs bf16 (a serving plan)."""
    sites = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            gemms = {"fprop": GemmChoice(kernel, "rowwise", "test plan", 0.03, 25.0),
                     "dgrad": GemmChoice(reason="serving"), "wgrad": GemmChoice(reason="serving")}
            sites.append(SitePlan(fqn, mod.in_features, mod.out_features, 32, gemms))
    Plan(sites=sites, budget={}).save(path)
    return str(path)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cfg = RankerConfig.from_size("tiny")
    tmp = tmp_path_factory.mktemp("fp8serve")
    model = Ranker(cfg)
    ckpt = save_checkpoint(tmp / "model.pt", model)
    plan = _serving_plan(model, tmp / "plan.json")
    reference = InferenceEngine.from_checkpoint(ckpt, plan=plan, device="cpu")
    fused = InferenceEngine.from_checkpoint(ckpt, plan=plan, device="cpu", fuse_norm_quant=True)
    return cfg, reference, fused


def _batch(cfg, n: int):
    return SyntheticStream(cfg, n, seed=int(torch.randint(0, 1 << 30, ()))).batch(0)


def test_fused_norm_quant_scores_like_the_emulated_plan(engines):
    cfg, reference, fused = engines
    assert fused.norm_quant is not None and len(fused.norm_quant.changes) >= 1
    lins = [m for m in fused.model.modules() if isinstance(m, NormQuantFloat8Linear)]
    assert len(lins) == len(fused.norm_quant.changes) and all(isinstance(m.norm, DeferredNorm) for m in lins)
    for m in lins:
        m.fused_calls = 0
    for n in (1, 17, 64):
        batch = _batch(cfg, n)
        got, want = fused.score(batch), reference.score(batch)
        for task in cfg.tasks:
            # Same FP8 bytes up to the norm's float32 rounding (the fused kernel computes the norm itself).
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=2e-3)
    assert lins and all(m.fused_calls == 3 for m in lins)  # the fast path ran on every request


def test_weights_are_quantized_once_across_requests(engines):
    cfg, _, fused = engines
    for n in (3, 9):
        fused.score(_batch(cfg, n))
    fp8 = [m for m in fused.model.modules() if isinstance(m, Float8Linear)]
    assert fp8 and any(isinstance(m, NormQuantFloat8Linear) for m in fp8)
    assert all(m.weight_cache.misses == 1 for m in fp8), [(type(m).__name__, m.weight_cache.misses) for m in fp8]


def test_engine_follows_the_plans_producer_choices(tmp_path):
    from loka.dispatch import load_plan
    from loka.dispatch.producers import with_producers

    cfg = RankerConfig.from_size("tiny")
    model = Ranker(cfg)
    ckpt = save_checkpoint(tmp_path / "model.pt", model)
    batch = _batch(cfg, 16)
    plan = load_plan(_serving_plan(model, tmp_path / "plan.json"))
    marked = with_producers(plan, model.eval(), batch)
    chosen = sorted(s.fqn for s in marked.sites if s.producer == "norm_quant")
    assert chosen
    # Keep one choice only: the engine must fuse exactly what the plan says, not every eligible site.
    only_one = replace(marked, sites=[s if s.fqn == chosen[0] else replace(s, producer=None) for s in marked.sites])
    engine = InferenceEngine.from_checkpoint(ckpt, plan=str(only_one.save(tmp_path / "marked.json")), device="cpu")
    assert [c.fqn.split(" -> ")[1] for c in engine.norm_quant.changes] == [chosen[0]]
    plain = InferenceEngine.from_checkpoint(ckpt, plan=str(tmp_path / "plan.json"), device="cpu")
    assert plain.norm_quant is None  # no producer choices in the plan, not requested
    for task in cfg.tasks:
        torch.testing.assert_close(engine.score(batch)[task], plain.score(batch)[task], rtol=0, atol=2e-3)


def test_bf16_precision_refuses_fuse_norm_quant():
    with pytest.raises(ValueError, match="fuse_norm_quant needs FP8 sites"):
        InferenceEngine(Ranker(RankerConfig.from_size("tiny")), device="cpu", fuse_norm_quant=True)


def _one_user(batch):
    """Every candidate shares example 0's user (what one HTTP request carries; see test_serve.py)."""
    for name in ("hist_items", "hist_actions", "hist_gaps", "hist_mask", "multi_hot", "multi_hot_mask"):
        value = getattr(batch, name)
        setattr(batch, name, value[:1].expand_as(value).clone())
    for j in (0, 4, 5, 6, 7):
        batch.sparse[:, j] = batch.sparse[0, j]
    return batch


def test_http_service_serves_the_fused_path(engines):
    cfg, reference, fused = engines
    batch = _one_user(_batch(cfg, 5))
    with ScoringServer(fused, port=0, max_batch=64, max_wait_ms=5) as server:
        req = urllib.request.Request(server.url + "/score", data=json.dumps(batch_to_request(batch)).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
    direct = reference.score(batch)
    for task in cfg.tasks:
        torch.testing.assert_close(torch.tensor(body["scores"][task]), direct[task], rtol=0, atol=2e-3)


@pytest.mark.slow
def test_compiled_engine_scores_like_the_eager_fused_engine(engines, tmp_path):
    """compile=True on the plan's fused path: frozen FP8 weights in the graph, the fused norm inside it,
    the same scores as eager up to inductor's float rounding."""
    cfg, _, fused = engines
    model = Ranker(cfg)
    model.load_state_dict(fused.model.state_dict())
    plan = _serving_plan(model, tmp_path / "plan.json")
    compiled = InferenceEngine(model, precision=plan, device="cpu", compile=True, fuse_norm_quant=True)
    assert compiled.frozen_fp8_weights > 0 and compiled.norm_quant is not None
    torch._dynamo.reset()
    for n in (5, 33):
        batch = _batch(cfg, n)
        got, want = compiled.score(batch), fused.score(batch)
        for task in cfg.tasks:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=2e-3)
