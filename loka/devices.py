"""Which FP8/FP4 recipes and kernels each GPU runs natively: the one capability table of loka.

The probe measures the recipes of a target device, the planner plans only those, and a plan
records the device it was made for, so that it is not applied on another (an MXFP8/NVFP4 plan
for a B200 means nothing on an H100; MI300's FP8 is the fnuz encoding, which NVIDIA GPUs lack).

    arch    devices                     formats (elements)              granularities
    sm89    l4, l40s, rtx4090           e4m3, e5m2                      tensorwise, rowwise
    sm90    h100, h200, gh200           e4m3, e5m2                      tensorwise, rowwise, blockwise
    sm100   b200, gb200, b100           e4m3, e5m2, e2m1                tensorwise, rowwise, mx, nvfp4
    gfx942  mi300x, mi300a, mi325x      e4m3fnuz, e5m2fnuz              tensorwise, rowwise
    gfx950  mi350x, mi355x              e4m3, e5m2, e2m1 (MX only)      tensorwise, rowwise, mx

Sources: NVIDIA's Hopper/Blackwell architecture documents (sm100 adds block-scaled MXFP8, MXFP4
and NVFP4 tensor-core MMA), AMD's CDNA3 ISA (gfx942: FP8/BF8 in the fnuz encoding) and CDNA4
(gfx950: OCP FP8 and MXFP8/MXFP6/MXFP4; no NVFP4). ``kernels`` names loka's registered kernels
that run each device's recipes natively: each kernel says so itself (``GemmKernel.archs``);
whether one is installed on this machine is still asked of the kernel (``available``).
``emulated`` runs everything everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loka.kernels.kernel import arch_kernels
from loka.recipe import GEMMS, RECIPE_NAMES, Recipe
from loka.recipe_json import needs_fields


@dataclass(frozen=True)
class DeviceCaps:
    """What one GPU architecture runs natively (see the module table)."""

    arch: str
    names: tuple[str, ...]  # device names that select this entry (the first is the usual one)
    formats: tuple[str, ...]
    granularities: tuple[str, ...]
    recipes: tuple[str, ...]  # named recipes (loka.recipe.RECIPE_NAMES) the probe measures and plans
    speed_model: str  # key of loka.kernels.costmodel.DEVICE_MODELS used when planning away from the device

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPE_NAMES]
        if unknown:
            raise ValueError(f"DeviceCaps({self.arch}): unknown recipes {unknown}; use names from {list(RECIPE_NAMES)}")

    @property
    def kernels(self) -> tuple[str, ...]:
        """Registered kernel names that run this arch's recipes natively (``GemmKernel.archs``)."""
        return arch_kernels(self.arch)

    def runs(self, recipe_name: str) -> bool:
        """Whether the named recipe (``"rowwise"``, ``"rowwise-delayed"``) runs natively here."""
        return recipe_name.partition("-")[0] in self.recipes

    def runs_recipe(self, recipe: Recipe) -> bool:
        """Whether a Recipe runs natively here: a named one as :meth:`runs`; a hand-built one when
        every quantized operand's format and granularity is in this device's table."""
        if not needs_fields(recipe):
            return self.runs(recipe.name)
        ops = [op for g in GEMMS for op in (recipe.gemm(g).a, recipe.gemm(g).b) if not op.is_hp]
        return all(op.format in self.formats and op.granularity in self.granularities for op in ops)


DEVICES: tuple[DeviceCaps, ...] = (
    DeviceCaps("sm89", ("l40s", "l4", "rtx4090", "sm89"), ("e4m3", "e5m2"), ("tensorwise", "rowwise"),
               ("tensorwise", "rowwise", "rowwise_with_gw_hp"), "h100"),
    DeviceCaps("sm90", ("h100", "h200", "gh200", "sm90"), ("e4m3", "e5m2"), ("tensorwise", "rowwise", "blockwise"),
               ("tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise"), "h100"),
    DeviceCaps("sm100", ("b200", "gb200", "b100", "sm100"), ("e4m3", "e5m2", "e2m1"),
               ("tensorwise", "rowwise", "mx", "nvfp4"),
               ("tensorwise", "rowwise", "rowwise_with_gw_hp", "mx", "mxfp8", "mxfp8_floor", "nvfp4", "nvfp4_sr"),
               "b200"),
    DeviceCaps("gfx942", ("mi300x", "mi300a", "mi325x", "gfx942"), ("e4m3fnuz", "e5m2fnuz"), ("tensorwise", "rowwise"),
               ("tensorwise_fnuz", "rowwise_fnuz"), "mi300x"),
    DeviceCaps("gfx950", ("mi350x", "mi355x", "gfx950"), ("e4m3", "e5m2", "e2m1"), ("tensorwise", "rowwise", "mx"),
               ("tensorwise", "rowwise", "rowwise_with_gw_hp", "mx", "mxfp8", "mxfp8_floor"),
               "mi350x"),
)
_BY_NAME = {n: d for d in DEVICES for n in d.names}


@dataclass(frozen=True)
class Target:
    """A device a probe or plan is for: its name as the user gave it and its capabilities."""

    name: str
    caps: DeviceCaps

    @property
    def arch(self) -> str:
        return self.caps.arch

    def describe(self) -> str:
        return self.name if self.name == self.arch else f"{self.name} ({self.arch})"


def target_names() -> list[str]:
    return sorted(_BY_NAME)


def get_target(name: str) -> Target:
    """The target called ``name`` (``"b200"``, ``"mi300x"``, ``"sm90"`` ...)."""
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(target_names())}")
    return Target(key, _BY_NAME[key])


def is_target_name(name: str | None) -> bool:
    return isinstance(name, str) and name.strip().lower() in _BY_NAME


def detect_target(device: torch.device | str | None) -> Target | None:
    """The target ``device`` is (a CUDA or ROCm GPU in the table), or None (CPU, or a GPU not listed)."""
    device = torch.device(device or "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
    else:
        major, minor = torch.cuda.get_device_capability(device)
        arch = {(8, 9): "sm89", (9, 0): "sm90", (10, 0): "sm100", (10, 3): "sm100"}.get((major, minor), "")
    return get_target(arch) if arch in _BY_NAME else None


def device_and_target(arg: str | None) -> tuple[torch.device, Target | None]:
    """``--device`` of the CLI: ``auto`` (cuda if present, else cpu), a torch device (``cpu``, ``cuda``: its target detected) or a target
    name (``b200``): then the torch device is this machine's GPU if it is that target, else the CPU,
    where the target's recipes are emulated."""
    if is_target_name(arg):
        target = get_target(arg)
        here = detect_target("cuda") if torch.cuda.is_available() else None
        on_it = here is not None and here.arch == target.arch
        return torch.device("cuda" if on_it else "cpu"), target
    auto = arg in (None, "", "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if auto else torch.device(arg)
    return device, detect_target(device)


def plan_target_problem(plan_device: dict, target: Target | None) -> str | None:
    """One line naming both devices when a plan made for one architecture is applied on another.

    Plans without a recorded target (made before targets existed, or for a CPU) apply anywhere,
    and so does any plan where the target is unknown (a CPU).
    """
    planned_arch = (plan_device or {}).get("arch")
    if target is None or not planned_arch or planned_arch == target.arch:
        return None
    planned = plan_device.get("target") or planned_arch
    planned = planned if planned == planned_arch else f"{planned} ({planned_arch})"
    return (f"this plan was made for {planned} and cannot run on {target.describe()}: "
            f"re-plan for it with `loka plan --device {target.name}`")
