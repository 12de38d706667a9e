"""Shared fixtures of the pytest-benchmark suites in bench/ (not part of the CI test run).

    .venv/bin/pytest bench/ --benchmark-only -q

CPU-safe by default: tiny shapes and few rounds on CPU, where the figures only show the
suites run. With a CUDA device the suites switch to GPU shapes and every timed call ends
with ``torch.cuda.synchronize()`` (pytest-benchmark times with perf_counter, so without the
sync it would time the kernel launch only). CUDA is queried when a fixture is first used,
never at import. On CPU the suites run on one thread: on a shared machine more threads than
free cores make every figure erratic.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(1)
    return torch.device("cpu")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="session")
def hp_dtype(on_gpu) -> torch.dtype:
    """The operands' high-precision dtype: bf16 on GPU, fp32 on CPU (bf16 matmul is slow there)."""
    return torch.bfloat16 if on_gpu else torch.float32


@pytest.fixture
def timed(benchmark, device, on_gpu) -> Callable[[Callable[[], object]], object]:
    """``timed(fn)``: benchmark ``fn`` with a bounded number of rounds, synchronized on GPU."""

    def run(fn: Callable[[], object]):
        if on_gpu:
            def call():
                out = fn()
                torch.cuda.synchronize(device)
                return out
        else:
            call = fn
        benchmark.extra_info["device"] = (torch.cuda.get_device_name(device) if on_gpu
                                          else "cpu (NOT representative of GPU speed)")
        return benchmark.pedantic(call, warmup_rounds=3, rounds=100 if on_gpu else 10, iterations=1)

    return run
