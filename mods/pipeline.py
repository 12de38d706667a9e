"""Apply several mods in the recommended order, re-recording the dataflow between them.

Each mod changes modules the next one looks at (fusion turns Linears into
members, padding wraps Linears), so every mod records its own dataflow on the
sample batch. The order matters: migration and row-scale-free need the plain
Norm/Linear modules, fusion must run before padding (so the fused width is
padded once), and ``fused_norm_quant`` runs on the converted model for serving.
"""

from __future__ import annotations

from torch import nn

from loka.mods.result import ModResult
from loka.mods.spec import ModSpec, discover

# Every mod's declaration by name (each file's ``MOD``), in the order ``loka mods list`` shows them.
SPECS: dict[str, ModSpec] = discover()
MODS = {name: spec.apply for name, spec in SPECS.items()}


def get_mod(name: str):
    """The ``apply`` function of the mod called ``name``."""
    try:
        return MODS[name]
    except KeyError:
        raise ValueError(f"unknown mod {name!r}; mods: {sorted(MODS)}") from None


DEFAULT_ORDER: tuple[str, ...] = ("scale_migration", "row_scale_free", "horizontal_fusion", "padding")


def apply_all(model: nn.Module, report=None, *, sample, names: tuple[str, ...] = DEFAULT_ORDER,
              options: dict[str, dict] | None = None) -> list[ModResult]:
    """Run the mods ``names`` in order on ``model``; ``options[name]`` are passed to that mod."""
    options = dict(options or {})
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"options given for mods that are not run: {sorted(unknown)}; add them to names")
    return [get_mod(name)(model, report, sample=sample, **options.get(name, {})) for name in names]
