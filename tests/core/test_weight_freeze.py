"""Frozen FP8 weights for serving: cast once, kept inside torch.compile graphs, refreshed if changed.

A compiled graph cannot follow version counters, so an ordinary cached weight is cast again in
every compiled call; a frozen one is a tensor of the graph. Checked on the graph dynamo captures
(its amax calls: one per FP8 GEMM for the activation only) and on the outputs (CPU, bitwise).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8_oracle import oracle_fake_quantize
from loka import Float8Linear
from loka.kernels import KERNELS
from loka.recipe import Recipe
from loka.weight_cache import freeze_fp8_weights, invalidate_weight_caches

pytestmark = pytest.mark.slow  # dynamo traces (a few seconds)


def _model(recipe: str, kernel: str) -> nn.Sequential:
    m = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), Float8Linear(64, 48, recipe=recipe, kernels=kernel),
                      nn.ReLU(), Float8Linear(48, 32, recipe=recipe, kernels=kernel)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _captured_amax_calls(model, x) -> tuple[int, int]:
    """(amax calls, graphs) in what dynamo hands its backend."""
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    return sum("amax" in str(n.target) for g in graphs for n in g.graph.nodes), len(graphs)


def _kernel(name: str) -> str:
    ok = KERNELS.get(name).available("cpu")
    if not ok:
        pytest.skip(ok.reason)
    return name


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("kernel", ["emulated", "scaled_mm"])
def test_frozen_weights_leave_the_compiled_graph_one_amax_per_gemm(recipe, kernel):
    m, x = _model(recipe, _kernel(kernel)), torch.randn(40, 64)
    x[7] = 0.0
    with torch.no_grad():
        eager = m(x)
    cast_in_graph, graphs = _captured_amax_calls(m, x)
    assert graphs == 1 and cast_in_graph == 4  # activation + weight, two GEMMs
    assert freeze_fp8_weights(m) == 2
    frozen_in_graph, graphs = _captured_amax_calls(m, x)
    assert graphs == 1 and frozen_in_graph == 2  # the activations only
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(m)(x)
    assert torch.equal(compiled, eager)


def test_frozen_weight_is_the_weights_cast_and_follows_an_update():
    """The frozen operand equals the oracle's cast of W; after an in-place update the next eager
    call recasts it into the same storage, so a graph compiled before reads the new weight."""
    m = _model("rowwise", "emulated")
    lin = m[2]
    freeze_fp8_weights(m)
    x = torch.randn(16, 64)
    op = Recipe.from_name("rowwise").fprop.b
    with torch.no_grad():
        q = lin.weight_cache.get("fprop", lin.weight, op, transpose=False)
        torch.testing.assert_close(q.data.float() * q.scale, oracle_fake_quantize(lin.weight, op), rtol=0, atol=0)
        storage = q.data.untyped_storage().data_ptr()
        torch._dynamo.reset()
        compiled = torch.compile(m)
        compiled(x)
        lin.weight.mul_(-3.0)
        eager = m(x)  # sees the new version, recasts in place
        assert lin.weight_cache.get("fprop", lin.weight, op, transpose=False).data.untyped_storage().data_ptr() == storage
        fresh = _model("rowwise", "emulated")
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(eager, fresh(x))
        assert torch.equal(compiled(x), eager)


def test_invalidate_unfreezes_and_hp_or_delayed_weights_are_not_frozen():
    m = _model("rowwise", "emulated")
    assert freeze_fp8_weights(m) == 2
    assert invalidate_weight_caches(m) >= 2
    assert _captured_amax_calls(m, torch.randn(8, 64))[0] == 4  # cast in the graph again
    hp = nn.Sequential(Float8Linear(64, 32, recipe="rowwise", kernels="bf16"))
    delayed = nn.Sequential(Float8Linear(64, 32, recipe="tensorwise-delayed", kernels="emulated"))
    assert freeze_fp8_weights(hp) == 0 and freeze_fp8_weights(delayed) == 0
