"""Typed keys of a plan in memory: one GEMM of one site, and one (kernel, recipe) choice for it.

The planner's knapsack groups options per GEMM and picks one per group; the keys are frozen,
ordered dataclasses (the exact solver sorts them), never ``"fqn|gemm"`` strings that a
``|`` in a module name could split wrongly. Files keep their schemas: a plan file stores
sites and GEMMs as nested objects, not these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from loka.recipe import GEMMS


@dataclass(frozen=True, order=True)
class GemmKey:
    """GEMM ``gemm`` (fprop, dgrad or wgrad) of the Linear site ``fqn``."""

    fqn: str
    gemm: str

    def __post_init__(self) -> None:
        if self.gemm not in GEMMS:
            raise ValueError(f"gemm={self.gemm!r} is not a GEMM; use one of {list(GEMMS)}")

    def __str__(self) -> str:
        return f"{self.fqn}/{self.gemm}"


@dataclass(frozen=True, order=True)
class ChoiceKey:
    """Kernel ``kernel`` running recipe ``recipe`` (its name) for one GEMM."""

    kernel: str
    recipe: str

    def __str__(self) -> str:
        return f"{self.kernel}/{self.recipe}"
