"""Shared test configuration: GPU markers and fresh randomness.

GPU tests are marked once here; on a machine without CUDA (CI) they are skipped
with the reason. CUDA is queried when tests are collected, never at import of loka.
"""

from __future__ import annotations

import pytest
import torch


def _cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def pytest_collection_modifyitems(config, items):
    cap = _cuda_capability()
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    skip_sm89 = pytest.mark.skip(
        reason=f"needs an FP8 GPU (sm_89+); this machine has {'none' if cap is None else f'sm_{cap[0]}{cap[1]}'}"
    )
    for item in items:
        if "requires_cuda" in item.keywords and cap is None:
            item.add_marker(skip_cuda)
        if "requires_sm89" in item.keywords and (cap is None or cap < (8, 9)):
            item.add_marker(skip_sm89)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
