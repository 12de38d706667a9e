"""The one FP8 scale rule, ``max(amax * fl32(1 / fmax), 2**-126)``, against independent computations.

Why these tests exist: on an H200 (2026-11-30) loka's scales differed by one
float32 ulp between CPU and CUDA for about half of all amax values, because
CUDA eager evaluates ``tensor / python_scalar`` as a reciprocal multiply while
the CPU divided. Every test here compares loka's scales with a computation that
does not call loka (numpy float64 rounded once to float32, or a simulation of
what a backend computes), on fresh random amax values across the whole float32
range: subnormals, 0, huge values and exact powers of two included.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from loka.formats import FORMATS, get_format
from loka.quantize import quantize, scale_from_amax
from loka.recipe import Recipe
from loka.scaling import ScaleState
from test_quantize_oracle import BLOCKS, oracle_scale


def random_amax(n: int, fmt: str) -> tuple[np.ndarray, int]:
    """Fresh random finite amax values >= 0 over every float32 binade, plus edge values. (float32, seed)"""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 0x7F800000, size=n, dtype=np.uint32)  # every finite float32 >= 0, equally likely per bit
    uniform = (rng.random(n) * 1e4).astype(np.float32)  # ordinary magnitudes, where most scales live
    fmax, tiny = get_format(fmt).max, np.float32(2.0**-126)
    threshold = np.float32(fmax * 2.0**-126)  # around here amax * rcp crosses the 2**-126 floor
    edges = [0.0, 2.0**-149, float(np.nextafter(tiny, np.float32(0))), float(tiny), float(threshold),
             float(np.nextafter(threshold, np.float32(0))), float(np.nextafter(threshold, np.float32(1e30))),
             float(np.finfo(np.float32).max), 1.0, fmax]
    edges += [fmax * 2.0**k for k in range(-140, 110, 7)]  # quotients that are powers of two
    return np.concatenate([bits.view(np.float32), uniform, np.array(edges, dtype=np.float32)]), seed


def test_rcp_max_traces_under_torch_compile_as_a_constant():
    """A compiled quantization reads fl32(1/fmax) as a constant: dynamo must not trace struct.pack, whose
    polyfill recursed until the limit with dynamic shapes on torch 2.13 (InferenceEngine(compile=True)
    compiles with dynamic=True and crashed on every FP8 plan before 2026-12-01)."""
    from dataclasses import replace

    for f in FORMATS.values():
        for n in (64, 96):  # two sizes: the dynamic-shape graph is used
            x = torch.randn(n, 32) * 1000
            q, s = torch.compile(lambda t, f=f: quantize(t, f.name, "rowwise"), dynamic=True, backend="eager")(x)
            q_ref, s_ref = quantize(x, f.name, "rowwise")
            assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    made = replace(FORMATS["e4m3"], max=240.0)  # a format made at run time: its constant is made eagerly
    assert made.rcp_max == float(np.float32(1 / 240.0))
    torch._dynamo.reset()


def test_rcp_max_is_the_float32_nearest_to_one_over_fmax():
    for f in FORMATS.values():
        r = f.rcp_max
        assert float(np.float32(r)) == r, "rcp_max must be exactly a float32"
        exact = Fraction(1) / Fraction(f.max)
        below = float(np.nextafter(np.float32(r), np.float32(0)))
        above = float(np.nextafter(np.float32(r), np.float32(1)))
        assert abs(Fraction(r) - exact) < abs(Fraction(below) - exact)
        assert abs(Fraction(r) - exact) < abs(Fraction(above) - exact)
        assert Fraction(r) > exact, "rounded up: why amax / scale never exceeds fmax (quantize's docstring)"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [False, True])
def test_scale_from_amax_matches_float64_rounded_once(fmt, pow2):
    amax, seed = random_amax(20000, fmt)
    ours = scale_from_amax(torch.from_numpy(amax), fmt, pow2).numpy()
    ref = oracle_scale(amax, fmt, pow2)
    bad = np.flatnonzero(ours != ref)
    assert bad.size == 0, f"seed={seed}: amax {amax[bad[:5]]} -> {ours[bad[:5]]}, expected {ref[bad[:5]]}"
    assert np.isfinite(ours).all() and (ours >= 2.0**-126).all()
    assert (ours[amax == 0] == 1).all()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quotient_of_amax_never_exceeds_fmax(fmt):
    """``fl32(amax / scale) <= fmax`` for every amax: the cast never needs to clamp the group's amax."""
    amax, seed = random_amax(20000, fmt)
    scale = scale_from_amax(torch.from_numpy(amax), fmt).numpy()
    quotient = amax / scale  # float32 IEEE division, as the cast does it
    assert quotient.max() <= np.float32(get_format(fmt).max), f"seed={seed}"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_scale_is_what_cuda_eager_and_triton_compute(fmt):
    """The test that would have caught the 2026-11-30 bug, on CPU.

    Simulated in numpy float32: CUDA eager's ``amax / fmax`` with a Python scalar is
    ``amax * (1.0f / fmax)`` (the reciprocal taken in float32, then one multiply), and the
    Triton kernels multiply by the constexpr ``RCP_FMAX``: the same float32 multiply. loka's
    scale must equal it; a correctly rounded division (what the CPU computed before) does not.
    """
    amax, seed = random_amax(20000, fmt)
    fmax32 = np.float32(get_format(fmt).max)
    cuda_scalar_div = amax * (np.float32(1.0) / fmax32)  # float32 throughout
    keep = cuda_scalar_div > 2.0**-125  # away from the 2**-126 floor and amax == 0, which the rule adds
    amax, cuda_scalar_div = amax[keep], cuda_scalar_div[keep]
    ours = scale_from_amax(torch.from_numpy(amax), fmt).numpy()
    assert np.array_equal(ours, cuda_scalar_div), f"seed={seed}"
    divided = amax / fmax32  # the old CPU rule: one ulp away for a large share of amax values
    assert (divided != cuda_scalar_div).mean() > 0.2, "the inputs must tell the two rules apart"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
def test_quantize_scales_for_groups_of_every_granularity(fmt, granularity):
    """Group amaxes set to random edge values (one element per group holds it exactly)."""
    rows, cols = 16, 96
    block = (1, 32)  # blockwise and mx groups; ignored by tensorwise and rowwise
    bc = cols if granularity in ("tensorwise", "rowwise") else block[1]
    groups = (1 if granularity == "tensorwise" else rows) * (cols // bc)
    pool, seed = random_amax(4 * groups, fmt)
    pool = pool[pool < np.float32(1e37)]  # x / scale must stay finite in the oracle below
    target = np.random.default_rng(seed).choice(pool, groups).astype(np.float32)
    frac = np.random.default_rng(seed + 1).uniform(-1, 1, (rows, cols)).astype(np.float32)
    per_elem = np.repeat(target.reshape(-1, cols // bc), bc, axis=1) if granularity != "tensorwise" else target[0]
    x = (frac * per_elem).astype(np.float32)
    x[:, ::bc] = per_elem[:, ::bc] if granularity != "tensorwise" else target[0]  # one exact amax per group
    _, scale = quantize(torch.from_numpy(x), fmt, granularity, block=block)
    amax = np.abs(x).reshape(rows, -1, bc).max(axis=2) if granularity != "tensorwise" else np.abs(x).max()
    ref = oracle_scale(amax.reshape(scale.shape), fmt, granularity == "mx")
    assert np.array_equal(scale.numpy(), ref), f"seed={seed}"


def test_delayed_scaling_uses_the_same_rule():
    """ScaleState's delayed scale is the rule applied to the history's max amax."""
    state = ScaleState(Recipe.from_name("tensorwise", scaling="delayed", history_len=4))
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    amaxes = []
    for _ in range(5):
        x = torch.randn(8, 32, generator=gen) * float(torch.rand((), generator=gen) * 1e3)
        s = state.scale_for("fprop", "input", x)
        amaxes.append(float(x.abs().max()))
        past = max(amaxes[-5:-1]) if len(amaxes) > 1 else amaxes[-1]
        assert s.item() == float(oracle_scale(np.float32(past), "e4m3", False))


@pytest.mark.slow
def test_scale_rule_survives_torch_compile_on_cpu():
    """Inductor (CPU) computes the same scales and FP8 bytes as eager."""
    amax, seed = random_amax(4096, "e4m3")
    amax_t = torch.from_numpy(amax)
    compiled = torch.compile(lambda a: scale_from_amax(a, "e4m3"), dynamic=False)
    assert torch.equal(compiled(amax_t), scale_from_amax(amax_t, "e4m3")), f"seed={seed}"
    x = torch.randn(64, 256) * torch.exp2(torch.randint(-20, 20, (64, 1)).float())
    quant = torch.compile(lambda t: quantize(t, "e4m3", "rowwise"), dynamic=False)
    (q_c, s_c), (q_e, s_e) = quant(x), quantize(x, "e4m3", "rowwise")
    assert torch.equal(s_c, s_e) and torch.equal(q_c.view(torch.uint8), q_e.view(torch.uint8))


# ---- GPU: the same rule on CUDA, eager and compiled --------------------------------------------


@pytest.mark.requires_cuda
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_scales_equal_the_float64_oracle(fmt, pow2):
    amax, seed = random_amax(20000, fmt)
    ours = scale_from_amax(torch.from_numpy(amax).cuda(), fmt, pow2).cpu().numpy()
    assert np.array_equal(ours, oracle_scale(amax, fmt, pow2)), f"seed={seed}"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise", "mx"])
def test_gpu_quantize_equals_cpu_quantize(granularity):
    """Scales and FP8 bytes identical on CUDA and CPU (the cast divides tensor by tensor on both)."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(333, 200, generator=gen) * torch.exp2(torch.randint(-30, 30, (333, 1), generator=gen).float())
    kw = dict(block=BLOCKS[granularity])
    q_cpu, s_cpu = quantize(x, "e4m3", granularity, **kw)
    q_gpu, s_gpu = quantize(x.cuda(), "e4m3", granularity, **kw)
    assert torch.equal(s_gpu.cpu(), s_cpu), f"seed={gen.initial_seed()}"
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)), f"seed={gen.initial_seed()}"


@pytest.mark.requires_cuda
def test_gpu_compiled_scales_equal_eager():
    """Inductor's Triton code computes the same scales (its division would not be IEEE: the rule multiplies)."""
    amax, seed = random_amax(4096, "e4m3")
    amax_t = torch.from_numpy(amax).cuda()
    compiled = torch.compile(lambda a: scale_from_amax(a, "e4m3"), dynamic=False)
    assert np.array_equal(compiled(amax_t).cpu().numpy(), oracle_scale(amax, "e4m3", False)), f"seed={seed}"
