"""A GEMM speed model of a target GPU, for planning where that GPU is not at hand.

Timings measured on a CPU say nothing about a GPU, so a plan made on a CPU
(CI, a laptop, the CPU demo) would otherwise rest on noise. This model
predicts, per GEMM, the time of ``bf16`` and of each FP8 kernel *including its
quantization*, from a device's peak rates and a per-launch latency:

    gemm   = launch + fp8_setup? + FLOPs / peak + bytes / bandwidth
    quant  = per pass: launch + bytes / bandwidth   (separate amax and cast passes)

Kernels that quantize ``a`` inside the GEMM (``triton``) pay no separate pass for
it but read ``a`` in high precision and run at ``fused_efficiency`` of cuBLAS's
FP8 rate. The H100 constants are the measured ceilings of
bench/results/h100_2026-11-22_gemm.md (one H100 80GB HBM3, torch 2.11, 2026-11-22: bf16
735 and FP8 1252 TFLOP/s at 8192³, copy 3.0 TB/s); ``launch_us`` and
``fp8_setup_us`` are fitted so that the model reproduces the measured
pre-quantized FP8 / bf16 ratios at ranker shapes (1.0x at K,N <= 512, 1.3x at
1024, 1.5-1.9x at >= 2048) and the measured slowdown with per-call
quantization. tests/dispatch/test_costmodel.py checks it against the
machine-readable copy (bench/results/gemm_calibration.json), and against the
H200 run of 2026-11-30 it was not fitted to (which kernel is fastest); it
records where it misses by more than 10%: its spread over M is wider than measured (0.66x at M=2048 to 1.33x at
M=32768 for K=N=512), and it expects the fused Triton kernel at 0.44-1.18x of
bf16 at the H200 run's five shapes, which measured 0.21-0.25x.

Everything it returns is labelled ``source: model`` and ``representative:
false``: it ranks kernels sensibly, it does not replace measuring on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from loka.recipe import GEMMS, as_recipe, gemm_shape


@dataclass(frozen=True)
class DeviceModel:
    """Peak rates and latencies of one GPU (TFLOP/s, TB/s, microseconds)."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_tbps: float
    launch_us: float = 4.0
    fp8_setup_us: float = 3.0
    fused_efficiency: float = 0.8

    def __post_init__(self) -> None:
        for f in ("bf16_tflops", "fp8_tflops", "hbm_tbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"DeviceModel.{f} must be > 0, got {getattr(self, f)}")
        if not 0 < self.fused_efficiency <= 1:
            raise ValueError(f"fused_efficiency={self.fused_efficiency} must be in (0, 1]")


H100_SXM = DeviceModel("H100 SXM (speed model)", bf16_tflops=735.0, fp8_tflops=1252.0, hbm_tbps=3.0)
# H200 SXM: ceilings measured on one H200 (torch 2.11, CUDA 13.0, 2026-11-30, bench/gemm_triton.py
# with CUDA events): bf16 8192³ 770-800 TFLOP/s (785 taken), FP8 scaled_mm 1353 TFLOP/s at
# 8192x4096x4096 (0.2032 ms), device copy 4.3 TB/s. Latencies are the H100 fit, not refitted: the
# model gives pre-quantized FP8/bf16 0.79x, 1.03x, 1.32x, 1.66x, 1.51x at M=8192 K=N=256, 512,
# 1024, 4096 and M=32768 K=N=1024 where that run measured 0.89x, 0.85x, 0.85x, 1.69x, 1.44x: it
# is too optimistic about FP8 at K, N 512-1024 (tests/dispatch/test_costmodel.py pins both).
H200_SXM = DeviceModel("H200 SXM (speed model)", bf16_tflops=785.0, fp8_tflops=1353.0, hbm_tbps=4.3)
DEVICE_MODELS = {"h100": H100_SXM, "h200": H200_SXM}

HP_BYTES, FP8_BYTES, OUT_BYTES = 2, 1, 2


def _us(flops: float, bytes_: float, tflops: float, tbps: float) -> float:
    return flops / (tflops * 1e6) + bytes_ / (tbps * 1e6)


def bf16_us(m: int, k: int, n: int, dev: DeviceModel = H100_SXM) -> float:
    """bf16 GEMM [M,K]·[N,K]ᵀ."""
    return dev.launch_us + _us(2 * m * k * n, HP_BYTES * (m * k + n * k + m * n), dev.bf16_tflops, dev.hbm_tbps)


def fp8_gemm_us(m: int, k: int, n: int, dev: DeviceModel = H100_SXM, *, a_bytes: int = FP8_BYTES, efficiency: float = 1.0) -> float:
    """FP8 GEMM on already-quantized operands (``a_bytes=2``: ``a`` read in hp and cast in-kernel)."""
    bytes_ = a_bytes * m * k + FP8_BYTES * n * k + OUT_BYTES * m * n
    return dev.launch_us + dev.fp8_setup_us + _us(2 * m * k * n, bytes_, dev.fp8_tflops * efficiency, dev.hbm_tbps)


def quantize_us(rows: int, cols: int, dev: DeviceModel = H100_SXM, *, amax_pass: bool = True) -> float:
    """Quantize an hp [rows, cols] tensor: an amax pass (dynamic scaling) and a cast pass."""
    cast = dev.launch_us + _us(0, (HP_BYTES + FP8_BYTES) * rows * cols, 1.0, dev.hbm_tbps)
    amax = dev.launch_us + _us(0, HP_BYTES * rows * cols, 1.0, dev.hbm_tbps) if amax_pass else 0.0
    return cast + amax


def kernel_us(kernel: str, recipe, gemm: str, m: int, k: int, n: int, dev: DeviceModel = H100_SXM) -> float:
    """Predicted time of ``kernel`` running ``gemm`` of ``recipe`` at [M,K]·[N,K]ᵀ, quantization included."""
    g = as_recipe(recipe).gemm(gemm)
    if g.is_hp:
        return bf16_us(m, k, n, dev)
    quant_b = quantize_us(n, k, dev, amax_pass=g.b.scaling == "dynamic")
    if kernel.startswith("triton"):
        return fp8_gemm_us(m, k, n, dev, a_bytes=HP_BYTES, efficiency=dev.fused_efficiency) + quant_b
    quant_a = quantize_us(m, k, dev, amax_pass=g.a.scaling == "dynamic")
    return fp8_gemm_us(m, k, n, dev) + quant_a + quant_b


def model_site_timings(shape: tuple[int, int, int], recipes, kernels: list[str], dev: DeviceModel = H100_SXM) -> dict:
    """A probe-report ``timings`` entry for site ``(M, K, N)`` from the model (see probe/timing.py)."""
    m, k, n = shape
    out = {"device_name": dev.name, "representative": False, "source": "model", "m": int(m), "dtype": "bfloat16",
           "bf16_ms": {}, "entries": [], "skipped": {}}
    for gemm in GEMMS:
        gm, gk, gn = gemm_shape(gemm, m, k, n)
        out["bf16_ms"][gemm] = bf16_us(gm, gk, gn, dev) / 1e3
        for recipe in recipes:
            for name in kernels:
                t = kernel_us(name, recipe, gemm, gm, gk, gn, dev) / 1e3
                out["entries"].append({"gemm": gemm, "kernel": name, "recipe": as_recipe(recipe).name,
                                       "median_ms": t, "p10_ms": t, "p90_ms": t, "iters": 0})
    return out

