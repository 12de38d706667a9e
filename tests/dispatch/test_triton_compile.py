"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check the kernels' logic, not what the GPU runs. This
compiles the real (native-cast) kernels ahead of time for sm_90 with triton's
bundled ptxas and checks the PTX: FP8 tensor-core MMAs (wgmma e4m3 x e4m3) in
both accumulation modes, never the float16 fallback triton picks for
``max_num_imprecise_acc=0``, and the hardware's saturating round-to-nearest-even
cast to e4m3. Launch specializations (unit strides, 16-divisible pointers) are
declared as triton would infer them at a real launch.
"""

from __future__ import annotations

import re

import pytest

from triton_interp_driver import INTERPRETING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(INTERPRETING, reason="compiles the native kernels; the interpreter replaces them"),
]


def _compile_ptx(fn, types: dict[str, str], constexprs: dict[str, object], divisible: list[str], num_warps: int,
                 num_stages: int = 3) -> str:
    return _compile(fn, types, constexprs, divisible, num_warps, num_stages)["ptx"]


def _compile(fn, types: dict[str, str], constexprs: dict[str, object], divisible: list[str], num_warps: int,
             num_stages: int = 3) -> dict[str, str]:
    """Every stage's text (``ttir``, ``ttgir``, ``ptx``, ...) of ``fn`` compiled for sm_90."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton cannot compile ahead of time: {exc}")
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(index[k],): v for k, v in constexprs.items()},
        attrs={(index[k],): [["tt.divisibility", 16]] for k in divisible},
    )
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                       num_stages=num_stages))
    except FileNotFoundError as exc:  # no ptxas in this triton install
        pytest.skip(f"triton's CUDA toolchain is missing here: {exc}")
    return compiled.asm


def _gemm_ptx(fast_accum: bool, k: int, tile: tuple[int, int, int, int], num_warps: int) -> str:
    return _gemm_asm(fast_accum, k, tile, num_warps)["ptx"]


def _gemm_asm(fast_accum: bool, k: int, tile: tuple[int, int, int, int], num_warps: int,
              a_is_fp8: bool = False) -> dict[str, str]:
    from loka.kernels import triton_gemm_kernel as mod
    from loka.kernels.triton_fp8_jit import fp8_constexprs

    fmt = fp8_constexprs("e4m3")
    bm, bn, bk, nt = tile
    types = {"a_ptr": "*fp8e4nv" if a_is_fp8 else "*bf16", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16",
             "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*fp32", "M": "i32", "N": "i32", "M_BUCKET": "i32", "stride_am": "i32", "stride_bn": "i32",
             "stride_om": "i32"}
    a_mode = mod.A_ROWWISE_GIVEN if a_is_fp8 else mod.A_ROWWISE_DYNAMIC
    constexprs = dict(K=k, stride_ak=1, stride_bk=1, stride_on=1, A_SCALE_MODE=a_mode, B_ROWWISE=True,
                      HAS_BIAS=True, POW2=False, FAST_ACCUM=fast_accum, EMULATE=False, A_IS_FP8=a_is_fp8,
                      FMAX=fmt["FMAX"], RCP_FMAX=fmt["RCP_FMAX"], MBITS=fmt["MBITS"], EMIN=fmt["EMIN"],
                      FP8_DTYPE=fmt["FP8_DTYPE"],
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, N_TILES=nt, GROUP_M=mod.GROUP_M)
    divisible = ["a_ptr", "b_ptr", "out_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr", "N", "stride_am", "stride_bn",
                 "stride_om"]
    return _compile(mod.fp8_gemm_fused_quant_kernel, types, constexprs, divisible, num_warps)


@pytest.mark.parametrize("fast_accum,k,tile", [(False, 256, (64, 128, 256, 4)), (True, 1024, (128, 128, 128, 1))],
                         ids=["precise-one-pass", "fast-K-loop"])
def test_gemm_compiles_to_fp8_wgmma_for_sm90(fast_accum, k, tile):
    ptx = _gemm_ptx(fast_accum, k, tile, num_warps=8)
    mmas = set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx))
    assert mmas and all("e4m3.e4m3" in m and m.startswith("wgmma") for m in mmas), mmas
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # the activation cast, in registers
    assert "div.rn.f32" in ptx  # IEEE division, as loka.quantize divides
    assert ".ftz" not in ptx  # subnormal activations are kept, not flushed to zero


@pytest.mark.parametrize("a_is_fp8", [False, True], ids=["fused-quant", "fp8_mm"])
def test_precise_mode_adds_every_k_tile_in_float32(a_is_fp8):
    """Two-level accumulation survives triton's pipeliner: in precise mode no MMA runs with
    promotion disabled (``maxNumImpreciseAcc = 2**30``) and each K tile's partial is added to
    the running sum with float32 adds (one per accumulator element and thread). triton 3.6
    and 3.9 split the former single dot on the running sum into such MMAs when A comes from
    registers (the fused path; fp8_mm's A from shared memory was not split), so the K loop
    accumulated in the tensor cores' reduced precision (found on an H200, 2026-11-30)."""
    bm, bn, warps = 128, 128, 8
    precise = _gemm_asm(False, 1024, (bm, bn, 128, 1), warps, a_is_fp8)
    promotions = set(re.findall(r"maxNumImpreciseAcc = (\d+)", precise["ttgir"]))
    assert promotions and all(int(p) <= 128 for p in promotions), promotions
    adds = len(re.findall(r"^\s*add(?:\.rn)?\.f32\b", precise["ptx"], flags=re.M))
    assert adds >= bm * bn // (32 * warps), f"{adds} float32 adds: the K tiles are not summed in float32"
    fast = _gemm_asm(True, 1024, (bm, bn, 128, 1), warps, a_is_fp8)
    assert "maxNumImpreciseAcc = 1073741824" in fast["ttgir"], "fast mode must not promote (the test tells them apart)"


def test_norm_quant_compiles_with_the_native_cast_for_sm90():
    from loka.kernels import triton_norm_quant_kernel as mod
    from loka.kernels.triton_fp8_jit import fp8_constexprs

    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
             "y_hp_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_om": "i32", "eps": "fp32"}
    constexprs = dict(IS_RMS=False, HAS_W=True, HAS_B=True, STORE_HP=False, POW2=False, EMULATE=False,
                      BLOCK_M=4, BLOCK_N=1024, **fp8_constexprs("e4m3"))
    ptx = _compile_ptx(mod.norm_quant_kernel, types, constexprs, ["x_ptr", "out_ptr", "stride_xm", "stride_om"], 4)
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
