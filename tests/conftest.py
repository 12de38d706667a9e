"""Shared test configuration: GPU markers and fresh randomness.

GPU tests are marked once here; on a machine without CUDA (CI) they are skipped
with the reason. CUDA is queried when tests are collected, never at import of loka.

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
    for item in items:
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
