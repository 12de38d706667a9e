"""A GEMM speed model of a target GPU, for planning where that GPU is not at hand.

Timings measured on a CPU say nothing about a GPU, so a plan made on a CPU
(CI, a laptop, the CPU demo) would otherwise rest on noise. This model
predicts, per GEMM, the time of ``bf16`` and of each FP8 kernel *including its
quantization*, from a device's peak rates and per-call latencies:

    gemm   = fp8_setup? + max(launch, FLOPs / (peak · K/(K + k_half)), bytes / bandwidth)
    quant  = compiled: an amax pass and a cast pass, each max(launch, bytes / bandwidth)
             eager:    max(eager_ops · launch, eager_bytes · elements / bandwidth)

Why these terms. A call timed on its own with CUDA events costs at least its launch,
and the launch overlaps the GPU work (``max``, not a sum: a bf16 8192x1024x1024
GEMM took 27 µs on the H200 where 15-20 µs is the floor of a tiny one). Tensor
cores reach their peak only over a long reduction: efficiency ``K/(K + k_half)``
with a larger ``k_half`` for FP8 (its K tile is twice as deep), which is why the
pre-quantized FP8/bf16 ratio is flat at 1.0x for K,N <= 512 and climbs to 1.3x at
1024 and 1.5-1.6x at >= 2048 for every M (the H100 record), instead of depending
on M as a FLOPs-plus-latency sum did. A kernel that ``fuses_a_cast`` (``triton``, loka's fused-quantization GEMM)
reads ``a`` in hp and re-quantizes it in every N tile: ``M·K·ceil(N/block_n)``
elements at ``triton_requant_gelems`` G elements/s, plus its launch overhead, plus
``b`` cast eagerly.

Calibration (bench/results/gemm_calibration.json, checked by
tests/dispatch/test_costmodel.py): ``H100_SXM`` has the measured ceilings of one
H100 80GB HBM3 (torch 2.11, 2026-11-22: bf16 735 and FP8 1252 TFLOP/s at 8192³,
copy 3.0 TB/s) and ``k_half_*`` fitted to its pre-quantized ratios. ``H200_SXM``
is fitted to the one H200 run of 2026-11-30 (``bench/gemm_triton.py``, five
shapes, every column: bf16, scaled_mm with eager and compiled casts, its
pre-quantized ceiling, the Triton kernel): its worst time is within a factor 1.5
of the measured one, the mean |log| error 0.15 (about 15%); its peaks and ``k_half_*`` are set so
that the two compute-bound shapes (8192x4096x4096 and 32768x1024x1024) land within 2% in bf16 and
in pre-quantized FP8, hence their measured FP8/bf16 ratios (1.69x, 1.44x). The H100 has no
eager-cast or Triton measurement: it borrows those constants from the H200 fit.
Known miss, a strict xfail in the test: the H100 statement that per-call
quantized FP8 loses at M=8192 K=N=4096 while it wins at M=32768 K=N>=2048 (same
FLOPs, more bytes to cast) cannot both hold in this model.

``B200`` and ``MI300X`` (and ``MI350X``) are not fitted to anything: their peaks are the vendors'
published dense figures (NVIDIA HGX B200: bf16 2.25, FP8 4.5, FP4 9 PFLOP/s, HBM3e 8 TB/s; AMD
Instinct MI300X: bf16 1307, FP8 2615 TFLOP/s, HBM3 5.3 TB/s; MI350X: bf16 2.3, FP8 4.6, MXFP4 9.2
PFLOP/s, 8 TB/s), the other constants the H100's. Their names say "spec, not measured", and so does
every table that shows them, until a measured calibration replaces them. FP4 GEMMs (``e2m1``
operands) run at ``fp4_tflops`` and read half a byte per element.

A site's timings from this model come from ``loka.probe.timing.time_site(..., model=dev)``,
labelled ``source: model`` and ``representative: false``: it ranks kernels sensibly, it does not replace measuring on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loka.kernels.padded import kernel_by_name
from loka.recipe import as_recipe


@dataclass(frozen=True)
class DeviceModel:
    """Peak rates (TFLOP/s, TB/s), per-call latencies (µs) and the efficiency terms of one GPU."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_tbps: float
    launch_us: float = 4.0
    fp8_setup_us: float = 0.0
    k_half_bf16: float = 125.0
    k_half_fp8: float = 480.0
    quant_launch_us: float = 4.0
    eager_quant_ops: int = 4
    eager_quant_bytes: float = 60.0
    triton_overhead_us: float = 20.0
    triton_requant_gelems: float = 500.0
    triton_block_n: int = 256
    fused_efficiency: float = 1.0
    fp4_tflops: float = 0.0  # 0: no FP4 tensor cores (an FP4 GEMM is priced at the FP8 rate)

    def __post_init__(self) -> None:
        for f in ("bf16_tflops", "fp8_tflops", "hbm_tbps", "triton_requant_gelems"):
            if not getattr(self, f) > 0:
                raise ValueError(f"DeviceModel.{f} must be > 0, got {getattr(self, f)}")
        for f in ("fp4_tflops", "launch_us", "fp8_setup_us", "k_half_bf16", "k_half_fp8", "quant_launch_us", "eager_quant_bytes",
                  "triton_overhead_us"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"DeviceModel.{f} must be >= 0, got {getattr(self, f)}")
        if self.eager_quant_ops < 1 or self.triton_block_n < 1:
            raise ValueError("DeviceModel.eager_quant_ops and triton_block_n must be >= 1")
        if not 0 < self.fused_efficiency <= 1:
            raise ValueError(f"fused_efficiency={self.fused_efficiency} must be in (0, 1]")


H100_SXM = DeviceModel("H100 SXM (speed model)", bf16_tflops=735.0, fp8_tflops=1252.0, hbm_tbps=3.0)
# Fitted to bench/results/h200_2026-11-30_gemm_triton.md (per-call CUDA-event timing: launch-bound floors);
# peaks are asymptotic (K -> inf): the measured 8192x4096x4096 throughputs are 800 (bf16) and 1353 (FP8) TFLOP/s.
H200_SXM = DeviceModel("H200 SXM (speed model)", bf16_tflops=834.0, fp8_tflops=1512.0, hbm_tbps=4.3,
                       launch_us=18.0, fp8_setup_us=10.0, quant_launch_us=10.0, k_half_bf16=176.0, k_half_fp8=256.0)
# Published peaks only (module doc): spec, not measured.
B200_SPEC = DeviceModel("B200 (spec, not measured)", bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_tbps=8.0,
                        fp4_tflops=9000.0)
MI300X_SPEC = DeviceModel("MI300X (spec, not measured)", bf16_tflops=1307.4, fp8_tflops=2614.9, hbm_tbps=5.3)
MI350X_SPEC = DeviceModel("MI350X (spec, not measured)", bf16_tflops=2300.0, fp8_tflops=4600.0, hbm_tbps=8.0,
                          fp4_tflops=9200.0)
DEVICE_MODELS = {"h100": H100_SXM, "h200": H200_SXM, "b200": B200_SPEC, "mi300x": MI300X_SPEC,
                 "mi350x": MI350X_SPEC}

HP_BYTES, FP8_BYTES, OUT_BYTES = 2, 1, 2


def _work_us(flops: float, bytes_: float, tflops: float, tbps: float) -> float:
    """The longer of compute and memory time (they overlap inside one kernel)."""
    return max(flops / (tflops * 1e6), bytes_ / (tbps * 1e6))


def bf16_us(m: int, k: int, n: int, dev: DeviceModel = H100_SXM) -> float:
    """bf16 GEMM [M,K]·[N,K]ᵀ."""
    flops = 2 * m * k * n * (k + dev.k_half_bf16) / k
    return max(dev.launch_us, _work_us(flops, HP_BYTES * (m * k + n * k + m * n), dev.bf16_tflops, dev.hbm_tbps))


def fp8_gemm_us(m: int, k: int, n: int, dev: DeviceModel = H100_SXM, *, a_bytes: float = FP8_BYTES, efficiency: float = 1.0,
                fp4: bool = False) -> float:
    """FP8 GEMM on already-quantized operands (``a_bytes=2``: ``a`` read in hp and cast in-kernel);
    ``fp4``: both operands FP4, at ``fp4_tflops`` where the device has it."""
    flops = 2 * m * k * n * (k + dev.k_half_fp8) / k
    b_bytes = FP8_BYTES / 2 if fp4 else FP8_BYTES
    bytes_ = a_bytes * m * k + b_bytes * n * k + OUT_BYTES * m * n
    peak = dev.fp4_tflops if fp4 and dev.fp4_tflops else dev.fp8_tflops
    return dev.fp8_setup_us + max(dev.launch_us, _work_us(flops, bytes_, peak * efficiency, dev.hbm_tbps))


def quantize_us(rows: int, cols: int, dev: DeviceModel = H100_SXM, *, amax_pass: bool = True, compiled: bool = True) -> float:
    """Quantize an hp [rows, cols] tensor per call.

    ``compiled``: torch.compile's amax pass (dynamic scaling only) and cast pass. Eager
    (loka.quantize op by op): ``eager_quant_ops`` launches and ``eager_quant_bytes`` per
    element, half of each without the amax (delayed/static scaling).
    """
    elems = rows * cols
    if not compiled:
        share = 1.0 if amax_pass else 0.5
        return max(share * dev.eager_quant_ops * dev.quant_launch_us,
                   share * dev.eager_quant_bytes * elems / (dev.hbm_tbps * 1e6))
    cast = max(dev.quant_launch_us, (HP_BYTES + FP8_BYTES) * elems / (dev.hbm_tbps * 1e6))
    amax = max(dev.quant_launch_us, HP_BYTES * elems / (dev.hbm_tbps * 1e6)) if amax_pass else 0.0
    return cast + amax


def triton_us(m: int, k: int, n: int, dev: DeviceModel = H100_SXM) -> float:
    """loka's Triton GEMM without ``b``'s cast: hp ``a`` re-quantized by every N tile."""
    requant = m * k * math.ceil(n / dev.triton_block_n) / (dev.triton_requant_gelems * 1e3)
    return dev.triton_overhead_us + fp8_gemm_us(m, k, n, dev, a_bytes=HP_BYTES, efficiency=dev.fused_efficiency) + requant


def kernel_us(kernel: str, recipe, gemm: str, m: int, k: int, n: int, dev: DeviceModel = H100_SXM, *,
              compiled: bool = True, a_in_producer: bool = False, b_cached: bool = False) -> float:
    """Predicted time of ``kernel`` running ``gemm`` of ``recipe`` at [M,K]·[N,K]ᵀ, quantization included.

    ``compiled``: the per-call casts are compiled by torch.compile (False: eager). The
    Triton kernel always casts ``b`` eagerly (loka.quantize) and ``a`` inside the kernel.
    ``a_in_producer``: ``a`` arrives in FP8 from the op that produced it (a fused norm+quantize
    kernel, or a cast torch.compile fused into the producer, tests/dispatch/test_producer_fusion.py),
    so no pass over ``a`` is charged. ``b_cached``: ``b`` is a weight whose FP8 copy is cached
    (loka/weight_cache.py: serving, or later micro-batches of a step).
    """
    g = as_recipe(recipe).gemm(gemm)
    if g.is_hp:
        return bf16_us(m, k, n, dev)
    if kernel_by_name(kernel).fuses_a_cast:
        return triton_us(m, k, n, dev) + quantize_us(n, k, dev, amax_pass=g.b.scaling == "dynamic", compiled=False)
    quant_a = 0.0 if a_in_producer else quantize_us(m, k, dev, amax_pass=g.a.scaling == "dynamic", compiled=compiled)
    quant_b = 0.0 if b_cached else quantize_us(n, k, dev, amax_pass=g.b.scaling == "dynamic", compiled=compiled)
    fp4 = g.a.format == "e2m1" and g.b.format == "e2m1"
    gemm_us = fp8_gemm_us(m, k, n, dev, a_bytes=FP8_BYTES / 2, fp4=True) if fp4 else fp8_gemm_us(m, k, n, dev)
    return gemm_us + quant_a + quant_b


# --- Where the model is calibrated: the measured extent of each (device, kernel) region ----------
# A prediction inside a region interpolates between shapes that were timed on that device; outside it
# the model extrapolates (a small-width GEMM over a million rows, or K=64), and a figure resting on it
# is shown as a band, never as a point. Extents are the bounding boxes of the shapes in
# bench/results/gemm_calibration.json (tests/dispatch/test_costmodel_range.py checks them against it),
# K and N up to the 8192³ ceiling shape measured on the same device.


@dataclass(frozen=True)
class CalibratedRegion:
    """The measured extent (inclusive) of ``kernel``'s timings on one device: GEMM [M,K]·[N,K]ᵀ."""

    kernel: str  # "bf16" or an FP8 kernel name ("scaled_mm", "triton")
    m: tuple[int, int]
    k: tuple[int, int]
    n: tuple[int, int]
    source: str  # the calibration entry the extent comes from

    def __post_init__(self) -> None:
        for f in ("m", "k", "n"):
            lo, hi = getattr(self, f)
            if not 1 <= lo <= hi:
                raise ValueError(f"CalibratedRegion.{f}={getattr(self, f)} must be (low, high) with 1 <= low <= high")

    def contains(self, m: int, k: int, n: int) -> bool:
        return all(lo <= v <= hi for v, (lo, hi) in zip((m, k, n), (self.m, self.k, self.n)))

    def describe(self) -> str:
        return (f"{self.kernel} measured at M {self.m[0]}-{self.m[1]}, K {self.k[0]}-{self.k[1]}, "
                f"N {self.n[0]}-{self.n[1]} ({self.source})")


def _regions(source: str, m, kn, ceiling_kn: int) -> tuple[CalibratedRegion, ...]:
    return tuple(CalibratedRegion(kernel, m, (kn[0], ceiling_kn), (kn[0], ceiling_kn), source)
                 for kernel in ("bf16", "scaled_mm", "triton"))


# keyed by DeviceModel.name: h200_2026-11-30 timed M 8192-32768 at K=N 256-4096 (+ the 8192³ ceiling);
# the H100 record states M 2048-32768 at K,N 256-4096 (+ 8192³); it has no Triton timing.
CALIBRATED_REGIONS = {
    H200_SXM.name: _regions("gemm_calibration.json h200_2026-11-30", (8192, 32768), (256, 4096), 8192),
    H100_SXM.name: _regions("gemm_calibration.json h100_2026-11-22", (2048, 32768), (256, 4096), 8192)[:2],
}


def calibrated_region(dev: DeviceModel, kernel: str, m: int, k: int, n: int) -> CalibratedRegion | None:
    """The region of ``dev`` that covers ``kernel`` at (M, K, N), or None: the prediction is extrapolated."""
    k_ = kernel_by_name(kernel)
    family = "triton" if k_.fuses_a_cast else ("bf16" if k_.hp else "scaled_mm")  # the calibrated cost classes
    return next((r for r in CALIBRATED_REGIONS.get(dev.name, ()) if r.kernel == family and r.contains(m, k, n)), None)


def is_extrapolated(dev: DeviceModel, kernel: str, m: int, k: int, n: int) -> bool:
    """Whether the model's time of ``kernel`` at (M, K, N) lies outside every measured region of ``dev``."""
    return calibrated_region(dev, kernel, m, k, n) is None
