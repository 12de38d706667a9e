"""Every registered kernel against ``emulated``, for every recipe and GEMM it supports.

Parametrized from the registry, so a new backend is tested by registering it.
A kernel that cannot run on this machine is skipped with its own reason (never
silently dropped); a shape a kernel does not support must raise, not return
garbage. Inputs are fresh random tensors each run with edge values injected:
subnormals, saturation (a precomputed scale too small for the data), NaN/Inf,
rows of zeros, and shapes that are not multiples of 16.

Comparison: kernels whose cast is loka.quantize's bit for bit
(``exact_quantization``) must match ``emulated`` up to float32 accumulation
order; others (torchao, te: slightly different scale arithmetic) must be within
30 dB SQNR of it and no less accurate than it against an fp64 reference.
``emulated`` itself is checked against tests/fp8_oracle.py (numpy + ml_dtypes
quantization, float64 GEMM), so the reference is not loka's quantizer checking itself.
Random inputs come from the seed tests/conftest.py sets and prints on failure.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from loka.kernels import KERNELS
from loka.metrics import rel_error, sqnr
from loka.quantize import fake_quantize, group_amax, scale_from_amax
from loka.recipe import GEMMS, Recipe

from fp8_oracle import oracle_gemm
from triton_interp_driver import INTERPRETING, ROOT

RECIPES = {
    "tensorwise": Recipe.from_name("tensorwise"),
    "rowwise": Recipe.from_name("rowwise"),
    "rowwise_pow2": Recipe.from_name("rowwise", pow2_scale=True),
    "blockwise": Recipe.from_name("blockwise"),
    "mx": Recipe.from_name("mx"),
}
KINDS = ("gauss", "subnormal", "zero_rows", "saturation", "nonfinite")
ALIGNED = (64, 256, 128)  # (M, K, N): whole 128-blocks, multiples of 16 and 32
NON_FP8 = ("emulated", "bf16")


def _cases():
    """(kernel, recipe, gemm) triples a kernel declares it supports at an aligned shape."""
    out = []
    for kernel in KERNELS:
        if kernel.name in NON_FP8:
            continue
        for rname, recipe in RECIPES.items():
            for gemm in GEMMS:
                g = recipe.gemm(gemm)
                if not g.is_hp and kernel.supports(g, ALIGNED, torch.float32, "cpu"):
                    out.append(pytest.param(kernel.name, rname, gemm, id=f"{kernel.name}-{rname}-{gemm}"))
    return out


def _operands(kind: str, shape, device):
    """Fresh a[M,K], b[N,K] with per-row magnitudes spanning 1e-3..1e3 and the edge values of ``kind``."""
    m, k, n = shape
    a = torch.randn(m, k, device=device) * torch.exp(torch.randn(m, 1, device=device) * 2)
    b = torch.randn(n, k, device=device) * torch.exp(torch.randn(n, 1, device=device))
    if kind == "subnormal":
        a[0] = torch.randn(k, device=device) * 1e-39  # a whole row of float32 subnormals
        mask = torch.rand(m, k, device=device) < 0.1
        a[mask] = 1e-40
    elif kind == "zero_rows":
        a[torch.randperm(m)[: max(1, m // 4)]] = 0
        b[torch.randperm(n)[: max(1, n // 4)]] = 0
    elif kind == "nonfinite":
        a[min(1, m - 1), 0] = float("nan")
        a[m // 2, k - 1] = float("inf")
    return a, b


def _static(recipe_gemm):
    """The GEMM recipe with both operands statically scaled (scales passed to mm)."""
    return dataclasses.replace(
        recipe_gemm,
        a=dataclasses.replace(recipe_gemm.a, scaling="static"),
        b=dataclasses.replace(recipe_gemm.b, scaling="static"),
    )


def _saturating_scales(a, b, g):
    """Per-tensor dequant scales 8x too small for the data: the largest values saturate."""
    sa = scale_from_amax(group_amax(a, "tensorwise"), g.a.format) / 8
    sb = scale_from_amax(group_amax(b, "tensorwise"), g.b.format) / 8
    return sa, sb


def _check_close(out, ref_emulated, ref_fp64, a_dq, b_dq, kernel, device):
    finite_ref = torch.isfinite(ref_emulated)
    finite_out = torch.isfinite(out)
    if kernel.nonfinite_amax == "skip":
        assert torch.equal(finite_ref, finite_out), "non-finite entries differ from emulated"
    else:
        assert not (finite_out & ~finite_ref).any(), "kernel hid a NaN/Inf that emulated propagates"
    both = finite_ref & finite_out
    if not both.any():
        return
    out_f, ref_f = out[both].double(), ref_emulated[both].double()
    if kernel.exact_quantization:
        bound = (a_dq.abs().double() @ b_dq.abs().double().t())[both]
        tol = 1e-5 if device.type == "cpu" else 1e-2  # CUDA rowwise writes bf16
        excess = ((out_f - ref_f).abs() - tol * bound - 1e-30).max().item()
        assert excess <= 0, f"differs from emulated by more than fp32 accumulation order allows ({excess:.3g})"
    else:
        assert sqnr(ref_f, out_f) >= 30, f"SQNR vs emulated {sqnr(ref_f, out_f):.1f} dB < 30 dB"
        e_kernel = rel_error(ref_fp64[both], out_f)
        e_emul = rel_error(ref_fp64[both], ref_f)
        assert e_kernel <= 1.5 * e_emul + 1e-3, f"error vs fp64 {e_kernel:.3g} > 1.5x emulated's {e_emul:.3g}"


def _random_odd_shape():
    m, k, n = (int(torch.randint(lo, hi, (1,))) for lo, hi in ((1, 70), (17, 300), (17, 200)))
    return m, k, n


# Odd shapes are checked on the kinds where alignment matters (padding, partial blocks).
SHAPE_KINDS = [("aligned", kind) for kind in KINDS] + [("odd", kind) for kind in ("gauss", "zero_rows", "nonfinite")]


@pytest.mark.parametrize("kernel_name, recipe_name, gemm", _cases())
@pytest.mark.parametrize("shape_kind, kind", SHAPE_KINDS, ids=[f"{s}-{k}" for s, k in SHAPE_KINDS])
def test_kernel_matches_emulated(kernel_name, recipe_name, gemm, kind, shape_kind, device):
    kernel, emulated = KERNELS.get(kernel_name), KERNELS.get("emulated")
    ok, why = kernel.available(device)
    if not ok:
        pytest.skip(why if why.startswith(kernel.backend) else f"{kernel_name}: {why}")
    g = RECIPES[recipe_name].gemm(gemm)
    shape = ALIGNED if shape_kind == "aligned" else _random_odd_shape()
    a, b = _operands(kind, shape, device)
    scales = {}
    if kind == "saturation":
        g = _static(g)
        scales = dict(zip(("scale_a", "scale_b"), _saturating_scales(a, b, g)))
    support = kernel.supports(g, shape, a.dtype, device)
    if not support:
        if kind == "saturation" and kernel.supports(RECIPES[recipe_name].gemm(gemm), shape, a.dtype, device):
            pytest.skip(f"{kernel_name} takes no precomputed scales for {recipe_name}: {support.reason}")
        with pytest.raises(ValueError):
            kernel.mm(a, b, g, out_dtype=torch.float32, **scales)
        return
    out = kernel.mm(a, b, g, out_dtype=torch.float32, **scales)
    assert out.shape == (shape[0], shape[2]) and out.dtype == torch.float32
    ref = emulated.mm(a, b, g, out_dtype=torch.float32, **scales)
    a_dq = fake_quantize(a, g.a, scales.get("scale_a"))
    b_dq = fake_quantize(b, g.b, scales.get("scale_b"))
    ref64 = a.double() @ b.double().t()
    _check_close(out, ref, ref64, a_dq, b_dq, kernel, device)
    if kind == "saturation":
        assert a_dq.abs().max() < a.abs().max(), (
            "the saturation case did not saturate"
        )


def test_every_kernel_is_listed_with_a_reason_when_unavailable():
    for kernel in KERNELS:
        ok, why = kernel.available("cpu")
        assert ok or why, f"{kernel.name} is unavailable without a reason"


def test_bf16_kernel_matches_fp64(device):
    hp = Recipe.from_name("bf16").fprop
    a, b = torch.randn(33, 70, device=device), torch.randn(21, 70, device=device)
    out = KERNELS.get("bf16").mm(a, b, hp, out_dtype=torch.float32)
    assert rel_error(a.double() @ b.double().t(), out) < 1e-5
    assert not KERNELS.get("bf16").supports(Recipe.from_name("tensorwise").fprop, (16, 16, 16), torch.float32, device)


def test_cases_cover_every_available_fp8_kernel():
    """Each FP8 kernel that runs here is exercised by at least one case (none silently dropped)."""
    covered = {p.values[0] for p in _cases()}
    for kernel in KERNELS:
        if kernel.name not in NON_FP8 and kernel.available("cpu"):
            assert kernel.name in covered, f"{kernel.name} runs here but supports none of {list(RECIPES)}"


ORACLE_RECIPES = ("tensorwise", "rowwise", "rowwise_pow2")  # the dynamic scalings tests/fp8_oracle.py covers
ORACLE_KINDS = [sk for sk in SHAPE_KINDS if sk[1] != "saturation"]  # saturation passes static scales


@pytest.mark.parametrize("recipe_name", ORACLE_RECIPES)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("shape_kind, kind", ORACLE_KINDS, ids=[f"{s}-{k}" for s, k in ORACLE_KINDS])
def test_emulated_matches_independent_oracle(recipe_name, gemm, shape_kind, kind):
    """The reference every kernel is held to, against numpy + ml_dtypes quantization and a float64 GEMM."""
    g = RECIPES[recipe_name].gemm(gemm)
    shape = ALIGNED if shape_kind == "aligned" else _random_odd_shape()
    a, b = _operands(kind, shape, torch.device("cpu"))
    out = KERNELS.get("emulated").mm(a, b, g, out_dtype=torch.float32)
    ref = oracle_gemm(a, b, g)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "non-finite entries differ from the oracle"
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    # Same FP8 operands: float32 accumulation of K products, each within K * 2**-24 of the sum of |products|.
    bound = (a.double().abs().nan_to_num(posinf=0) @ b.double().abs().t())[fin] * shape[1] * 2.0**-23
    excess = ((out.double()[fin] - ref[fin]).abs() - bound - 1e-30).max().item() if fin.any() else 0.0
    assert excess <= 0, f"emulated differs from the oracle by more than float32 accumulation allows ({excess:.3g})"
    if kind == "gauss":  # and the FP8 error is there at all (not both in high precision)
        assert rel_error(a.double() @ b.double().t(), ref) > 1e-3


# Triton kernels run on CPU only under TRITON_INTERPRET=1, which must be set before they are
# imported; this re-runs the triton cases of this file in such a process (a subset: the
# interpreter is slow; tests/dispatch/test_triton_gemm.py covers the kernel in depth).
TRITON_SUBSET = "triton-rowwise-"


@pytest.mark.skipif(INTERPRETING, reason="this is the driver of the interpreter run")
def test_triton_kernels_match_emulated_under_interpreter():
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark", __file__,
           "-k", f"test_kernel_matches_emulated and ({TRITON_SUBSET})"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)  # hang guard only
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "24 passed" in proc.stdout, tail


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("kernel_name", ["scaled_mm", "torchao"])
def test_cpu_support_per_granularity_matches_what_runs(kernel_name, granularity):
    # CPU rowwise _scaled_mm exists only from torch 2.13 (2.11 raises): a kernel must say it can run
    # a granularity exactly where the op runs, found here by calling it (issue 24).
    kernel = KERNELS.get(kernel_name)
    if not kernel.available("cpu"):
        pytest.skip(f"{kernel_name}: {kernel.available('cpu').reason}")
    a = torch.randn(32, 16).to(torch.float8_e4m3fn)  # [M, K]
    b = torch.randn(48, 16).to(torch.float8_e4m3fn)  # [N, K]
    rowwise = granularity == "rowwise"
    sa, sb = (torch.rand(32, 1) + 0.5, torch.rand(1, 48) + 0.5) if rowwise else (torch.tensor(0.5), torch.tensor(2.0))
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        ref64 = (a.double() * sa.double()) @ (b.double().t() * sb.double())  # [M, N]
        torch.testing.assert_close(out, ref64.float(), rtol=1e-5, atol=1e-4)
        runs = True
    except (RuntimeError, NotImplementedError):
        runs = False
    g = Recipe.from_name(granularity).fprop
    support = kernel.supports(g, (32, 16, 48), torch.float32, "cpu")
    assert bool(support) == runs, support.reason
    if not runs:
        assert granularity in support.reason and "_scaled_mm" in support.reason
