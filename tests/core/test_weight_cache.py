"""FP8 weights quantized once per weight version (loka/weight_cache.py) inside Float8Linear.

The cached path must give the same bits as the per-call cast (fwd and bwd, every recipe),
quantize once per optimizer step, and never serve a stale weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8_oracle import OracleFP8Linear
from loka import Float8Linear
from loka.kernels import KERNELS
from loka.metrics import rel_error
from loka.recipe import RECIPE_NAMES, Recipe
from loka.quantize import quantize_operand
from loka.weight_cache import WeightCache, invalidate_weight_caches

FP8_RECIPES = [n for n in RECIPE_NAMES if n != "bf16"]
SCALED_MM_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def _kernels():
    out = ["emulated"]
    if KERNELS.get("scaled_mm").available("cpu"):
        out.append("scaled_mm")
    return out


def _pair(recipe: str, kernel: str, k: int = 96, n: int = 48):
    """Two Float8Linears sharing nothing but equal weights: one cached, one casting per call."""
    cached = Float8Linear(k, n, recipe=recipe, kernels=kernel)
    plain = Float8Linear(k, n, recipe=recipe, kernels=kernel)
    plain.load_state_dict(cached.state_dict())
    plain.weight_cache.enabled = False
    return cached, plain


def _weight_with_edges(w: torch.Tensor) -> None:
    """A zero row, a saturating outlier column and subnormal-sized entries in the weight."""
    with torch.no_grad():
        w[0].zero_()
        w[:, 1] *= 1e4
        w[2, :8] = 1e-40


def _fwd_bwd(lin, x, dy):
    x = x.clone().requires_grad_()
    y = lin(x)
    y.backward(dy)
    return y.detach(), x.grad, lin.weight.grad.clone()


def _seeded(seed: int, fn, *args):
    """``fn(*args)`` on a forked generator seeded with ``seed`` (the global stream goes on untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_cached_path_is_bit_identical_fwd_and_bwd(recipe, kernel):
    if kernel == "scaled_mm" and recipe not in SCALED_MM_RECIPES:
        pytest.skip(f"scaled_mm does not take {recipe}")
    cached, plain = _pair(recipe, kernel)
    _weight_with_edges(cached.weight)
    _weight_with_edges(plain.weight)
    for step in range(3):  # the first call fills the cache, the next ones read it
        x = torch.randn(3, 16, 96) * torch.exp(torch.randn(96))
        dy = torch.randn(3, 16, 48)
        draws = int(torch.randint(0, 2**31, ()))  # stochastically rounded gradients (nvfp4_sr): same draws for both
        for got, want in zip(_seeded(draws, _fwd_bwd, cached, x, dy), _seeded(draws, _fwd_bwd, plain, x, dy)):
            _same(got, want)
        cached.zero_grad(), plain.zero_grad()
    fp8_weight_gemms = sum(not cached.recipe.gemm(g).is_hp for g in ("fprop", "dgrad"))
    wc = cached.weight_cache
    assert wc.misses + wc.derived == fp8_weight_gemms and wc.hits == 2 * fp8_weight_gemms
    if recipe in ("tensorwise", "blockwise"):  # Wᵀ's FP8 is W's transposed: one cast of the hp weight
        assert (wc.misses, wc.derived) == (1, 1)
    assert plain.weight_cache.misses == plain.weight_cache.hits == 0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cached_training_matches_independent_oracle(recipe):
    """Across optimizer steps, the cached Float8Linear tracks a numpy/ml_dtypes FP8 Linear.

    Power-of-two scales: the oracle divides amax by fmax where loka multiplies by its reciprocal,
    so their plain scales may differ by an ulp and flip an element sitting on a rounding tie.
    """
    recipe = Recipe.from_name(recipe, pow2_scale=True)
    lin = Float8Linear(64, 32, recipe=recipe, kernels="emulated")
    ref_lin = nn.Linear(64, 32)
    ref_lin.load_state_dict(lin.state_dict())
    oracle = OracleFP8Linear(ref_lin, recipe)
    opt, opt_ref = torch.optim.SGD(lin.parameters(), lr=0.1), torch.optim.SGD(ref_lin.parameters(), lr=0.1)
    for _ in range(3):
        x, dy = torch.randn(16, 64, requires_grad=True), torch.randn(16, 32)  # dgrad runs too
        for m, o in ((lin, opt), (oracle, opt_ref)):
            o.zero_grad()
            m(x).backward(dy)
            o.step()
        assert rel_error(ref_lin.weight.detach().double(), lin.weight.detach()) < 1e-5
    wc = lin.weight_cache
    assert wc.misses + wc.derived == 6  # fprop + dgrad, re-quantized after each of 3 steps
    assert wc.derived == (3 if recipe.fprop.b.granularity == "tensorwise" else 0)


@pytest.mark.parametrize("optim", ["sgd", "sgd_foreach", "adam_foreach", "adamw_fused"])
def test_optimizer_step_invalidates(optim):
    cached, plain = _pair("rowwise", "emulated", 64, 32)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5, foreach=False),
            "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.5, foreach=True),
            "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
            "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)}[optim]  # no version bump: the step count
    opts = [make(cached.parameters()), make(plain.parameters())]
    for _ in range(3):
        x, dy = torch.randn(8, 64), torch.randn(8, 32)
        outs = []
        for lin, opt in zip((cached, plain), opts):
            opt.zero_grad()
            outs.append(_fwd_bwd(lin, x, dy))
            opt.step()
        for got, want in zip(*outs):
            _same(got, want)
    assert cached.weight_cache.misses == 6 and cached.weight_cache.hits == 0  # every step changed W


def test_gradient_accumulation_quantizes_once_per_step():
    lin = Float8Linear(64, 32, recipe="tensorwise", kernels="emulated")
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(2):
        for _micro in range(4):
            lin(torch.randn(8, 64, requires_grad=True)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert lin.weight_cache.misses == 2 and lin.weight_cache.derived == 2  # W cast once a step, Wᵀ derived
    assert lin.weight_cache.hits == 2 * 2 * 3  # the 3 later micro-batches of each step


def test_no_grad_serving_reuses_and_sees_inplace_updates():
    recipe = Recipe.from_name("rowwise", pow2_scale=True)  # exact scales on both sides (see above)
    lin = Float8Linear(64, 32, recipe=recipe, kernels="emulated").eval()
    ref = OracleFP8Linear(lin, recipe)
    x = torch.randn(16, 64)
    with torch.no_grad():
        y1, y2 = lin(x), lin(x)
        _same(y1, y2)
        assert (lin.weight_cache.misses, lin.weight_cache.hits) == (1, 1)  # fprop only
        assert rel_error(ref(x).double(), y1) < 1e-5
        lin.weight.mul_(-3)  # in place: the version counter moves
        y3 = lin(x)
        assert rel_error(ref(x).double(), y3) < 1e-5
    assert lin.weight_cache.misses == 2
    with torch.inference_mode():
        _same(lin(x), y3)


def test_load_state_dict_invalidates():
    a = Float8Linear(32, 16, recipe="tensorwise", kernels="emulated")
    b = Float8Linear(32, 16, recipe="tensorwise", kernels="emulated")
    x = torch.randn(4, 32)
    with torch.no_grad():
        a(x)
        a.load_state_dict(b.state_dict())
        _same(a(x), b(x))


def test_data_writes_are_seen_after_a_step_or_an_explicit_invalidate():
    """``.data`` writes bypass the version counter: an optimizer step or invalidate_weight_caches drops the cache."""
    model = nn.Sequential(Float8Linear(32, 16, recipe="tensorwise", kernels="emulated"))
    lin = model[0]
    x = torch.randn(4, 32)

    class DataSGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-group["lr"])  # old-style update, no version bump

    def fresh_out():
        fresh = Float8Linear(32, 16, recipe="tensorwise", kernels="emulated")
        fresh.load_state_dict(lin.state_dict())
        return fresh(x)

    opt = DataSGD(model.parameters(), lr=1.0)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        _same(model(x), fresh_out())
        lin.weight.data.mul_(2)  # outside any optimizer: only the explicit call sees it
        assert invalidate_weight_caches(model) == 1 and len(lin.weight_cache) == 0
        _same(model(x), fresh_out())


def test_delayed_weights_are_not_cached():
    lin = Float8Linear(32, 16, recipe="tensorwise-delayed", kernels="emulated")
    for _ in range(2):
        lin(torch.randn(4, 32)).sum().backward()
    assert lin.weight_cache.misses == lin.weight_cache.hits == 0 and len(lin.weight_cache) == 0


def test_a_new_weight_object_never_hits_a_stale_entry():
    lin = Float8Linear(32, 16, recipe="tensorwise", kernels="emulated")
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin(x)
        lin.weight = nn.Parameter(torch.randn(16, 32))  # same version (0), new object
        ref = Float8Linear(32, 16, recipe="tensorwise", kernels="emulated")
        ref.load_state_dict(lin.state_dict())
        _same(lin(x), ref(x))


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_derived_transpose_is_the_cast_of_the_transpose(recipe):
    """Odd shapes (partial 128x128 blocks): Wᵀ from W's FP8 equals casting Wᵀ, bits and scales."""
    w = nn.Parameter(torch.randn(200, 300) * torch.exp(torch.randn(300)))
    op = Recipe.from_name(recipe).fprop.b
    cache = WeightCache()
    cache.get("fprop", w, op, transpose=False)
    q_t = cache.get("dgrad", w, op, transpose=True)
    assert (cache.misses, cache.derived) == (1, 1)
    data, scale = quantize_operand(w.detach().t().contiguous(), op)
    assert torch.equal(q_t.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(q_t.scale, scale)


@pytest.mark.requires_sm89
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cached_path_is_bit_identical_on_gpu(recipe):
    """scaled_mm on the GPU takes the cached FP8 weight: same bits as the per-call cast, fwd and bwd."""
    cached = Float8Linear(256, 128, recipe=recipe, kernels="scaled_mm", device="cuda")
    plain = Float8Linear(256, 128, recipe=recipe, kernels="scaled_mm", device="cuda")
    plain.load_state_dict(cached.state_dict())
    plain.weight_cache.enabled = False
    for _ in range(2):
        x, dy = torch.randn(64, 256, device="cuda"), torch.randn(64, 128, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = [_fwd_bwd(m, x, dy) for m in (cached, plain)]
        for got, want in zip(*outs):
            _same(got, want)
        cached.zero_grad(), plain.zero_grad()
    assert cached.weight_cache.hits == 2
