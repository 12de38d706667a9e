"""Shared test configuration: GPU markers and fresh randomness.

GPU tests are marked once here; on a machine without CUDA (CI) they are skipped
with the reason. CUDA is queried when tests are collected, never at import of loka.
The GPU tests bench/gpu_check.py must run first (``GPU_MUST_RUN``) also get the ``gpu_must``
marker here; the check runs the other GPU tests only with the time that is left.

Every test starts from a fresh seed of torch's, numpy's and Python's global generators
(a test that fixes its own seed simply overrides it). A failing test prints its seed in a
"loka seed" section; ``LOKA_TEST_SEED=<seed> pytest <test id>`` reruns it on the same draws.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

SEED_ENV = "LOKA_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def _fresh_seed() -> int:
    fixed = os.environ.get(SEED_ENV)
    if fixed is None:
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    try:
        return int(fixed)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={fixed!r} is not an integer; set it to the seed a failing test printed") from None


@pytest.fixture(autouse=True)
def loka_seed(request) -> int:
    """Seed every global generator afresh for this test; the seed is printed if the test fails."""
    seed = _fresh_seed()
    request.node.stash[_SEED_KEY] = seed
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(("loka seed", f"{SEED_ENV}={seed} reproduces this test's random draws"))


# The GPU tests that decide whether loka is right on a device: the numerics of every kernel, the
# scale rule, the probe on the device, compile + FP8 gradients. bench/gpu_check.py runs them in
# its first test stage (-m gpu_must), the rest of the GPU tests later with what is left of its
# budget. A name that matches no test fails tests/bench/test_gpu_check.py.
GPU_MUST_RUN = (
    "tests/core/test_scale_rule.py::test_gpu_",  # the scale rule on the device (3 tests)
    "tests/core/test_float8_linear.py::test_compiled_fp8_gradients_on_gpu_match_eager",
    "tests/core/test_weight_cache.py::test_cached_path_is_bit_identical_on_gpu",
    "tests/dispatch/test_triton_gemm.py::test_gpu_native_matches_reference_and_emulated_cast",
    "tests/dispatch/test_triton_gemm.py::test_gpu_native_cast_is_bit_exact",
    "tests/dispatch/test_triton_norm_quant.py::test_gpu_native_cast_is_quantize_of_y",
    "tests/mods/test_row_scale_free.py::test_scaled_mm_path_on_gpu",
    "tests/mods/test_horizontal_fusion.py::test_scaled_grouped_linear_on_gpu_matches_emulated",
    "tests/mods/test_fused_norm_quant_training.py::test_triton_kernel_trains_on_gpu",
    "tests/mods/test_fused_norm_quant_compile.py::test_native_triton_kernel_path_is_one_graph_on_gpu",
    "tests/probe/test_probe_timing.py::test_time_site_on_fp8_gpu_has_scaled_mm",
    "tests/probe/test_probe_background.py::test_background_report_equals_foreground_report_on_cuda",
    "tests/models/test_gpu.py::test_fp8_training_and_serving_on_gpu",
)


# Tests that run rowwise torch._scaled_mm on CPU (plans of rowwise scaled_mm made and applied here, rowwise
# casts compiled here). CPU _scaled_mm runs rowwise only from torch 2.13 (loka probes it per granularity:
# loka.kernels.backend_scaled_mm.cpu_scaled_mm_support), so on an older torch they skip with that reason.
CPU_ROWWISE_SCALED_MM = (
    # loka.convert(model, "rowwise") counted against _scaled_mm: no FP8 GEMM runs where rowwise cannot
    "tests/core/test_param_gemms.py::test_every_parameter_gemm_runs_fp8",
    "tests/core/test_param_gemms.py::test_probe_measures_every_parameter_gemm",
    "tests/core/test_param_gemms.py::test_backward_gemms_that_fall_back_are_named_after_the_first_step",
    "tests/core/test_param_gemms.py::test_what_cannot_run_in_fp8_is_named_never_counted",
    "tests/dispatch/test_block_scaled_kernels.py::test_which_recipes_each_kernel_takes[torchao",
    "tests/dispatch/test_block_scaled_kernels.py::test_which_recipes_each_kernel_takes[scaled_mm",
    "tests/dispatch/test_block_scaled_kernels.py::test_scaled_mm_fnuz_on_cpu_matches_emulated[rowwise_fnuz]",
    "tests/bench/test_ranker_bench_smoke.py::test_cpu_smoke_table_has_every_variant",
    "tests/bench/test_ranker_bench_smoke.py::test_loka_plan_row_fuses_the_plans_norm_quant_producers",
    "tests/core/test_kernel_quantized_a.py::test_prequantized_a_equals_the_cast_inside[rowwise-scaled_mm]",
    "tests/core/test_padded_kernel.py::test_odd_tower_converts_every_gemm_and_an_earlier_optimizer_still_updates",
    "tests/core/test_padded_kernel.py::test_scaled_mm_pad_takes_429_and_557",
    "tests/core/test_weight_cache.py::test_cached_path_is_bit_identical_fwd_and_bwd[rowwise",
    "tests/core/test_weight_freeze.py::test_frozen_weights_leave_the_compiled_graph_one_amax_per_gemm[scaled_mm-rowwise]",
    "tests/dispatch/test_compiled_casts.py::test_training_proof_covers_the_gradient_cast",
    "tests/dispatch/test_compiled_casts.py::test_uncompiled_run_warns_once_naming_the_sites",
    "tests/dispatch/test_compiled_casts.py::test_plan_with_compiled_casts_turns_only_the_proven_site_fp8",
    "tests/dispatch/test_compiled_casts.py::test_serving_proof_attributes_each_site",
    "tests/dispatch/test_compiled_casts.py::test_compiled_output_equals_eager_bitwise",
    "tests/dispatch/test_compiled_casts.py::test_plan_choice_drops_the_cast_from_modelled_time",
    "tests/dispatch/test_compiled_casts.py::test_measured_plans_keep_their_timings_and_norm_quant_stays",
    "tests/dispatch/test_microbench_cli.py::test_plan_cli_writes_a_plan_and_prints_the_table",
    "tests/dispatch/test_plan.py::",
    "tests/dispatch/test_plan_keep.py::",
    "tests/dispatch/test_plan_padded.py::",
    "tests/dispatch/test_plan_producers.py::",
    "tests/dispatch/test_plan_speed_model.py::",
    "tests/dispatch/test_producer_fusion.py::test_float8_linear_input_cast_fuses_into_the_activation[rowwise]",
    "tests/dispatch/test_producer_fusion.py::test_gradient_cast_fuses_into_the_op_producing_the_gradient",
)


def _cpu_rowwise_scaled_mm_skip():
    """A skip marker with loka's reason where CPU _scaled_mm cannot run rowwise, else None."""
    from loka.kernels.backend_scaled_mm import cpu_scaled_mm_support  # at collection, never at import

    support = cpu_scaled_mm_support("rowwise")
    return None if support else pytest.mark.skip(reason=f"needs rowwise _scaled_mm on CPU: {support.reason}")


def is_gpu_must_run(nodeid: str) -> bool:
    """Whether the test ``nodeid`` (as pytest names it from the repo root) is in ``GPU_MUST_RUN``."""
    return any(nodeid.startswith(name) for name in GPU_MUST_RUN)


def _cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def _gpu_arch() -> str:
    """``sm90``-style (NVIDIA) or ``gfx942``-style (ROCm) name of this machine's GPU; ``none`` without one."""
    if not torch.cuda.is_available():
        return "none"
    if torch.version.hip:
        return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


# marker -> (GPU architectures it needs, what they are)
ARCH_MARKERS = {
    "requires_sm100": (("sm100", "sm103"), "a Blackwell GPU (sm_100: MXFP8/NVFP4 tensor cores)"),
    "requires_gfx942": (("gfx942",), "an MI300-class GPU (gfx942: fnuz FP8 through hipBLASLt)"),
    "requires_gfx950": (("gfx950",), "an MI350-class GPU (gfx950: OCP FP8 and MX through hipBLASLt)"),
}


def pytest_collection_modifyitems(config, items):
    cap = _cuda_capability()
    arch = _gpu_arch() if cap is not None else "none"
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    skip_sm89 = pytest.mark.skip(
        reason=f"needs an FP8 GPU (sm_89+); this machine has {'none' if cap is None else f'sm_{cap[0]}{cap[1]}'}"
    )
    rowwise_skip = _cpu_rowwise_scaled_mm_skip()
    for item in items:
        if rowwise_skip is not None and any(item.nodeid.startswith(n) for n in CPU_ROWWISE_SCALED_MM):
            item.add_marker(rowwise_skip)
        if is_gpu_must_run(item.nodeid):
            item.add_marker(pytest.mark.gpu_must)
        if "requires_cuda" in item.keywords and cap is None:
            item.add_marker(skip_cuda)
        if "requires_sm89" in item.keywords and (cap is None or cap < (8, 9) or torch.version.hip):
            item.add_marker(skip_sm89)
        for marker, (archs, what) in ARCH_MARKERS.items():
            if marker in item.keywords and arch not in archs:
                item.add_marker(pytest.mark.skip(reason=f"needs {what}; this machine has {arch}"))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
