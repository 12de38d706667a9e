"""Apply several mods in the recommended order, re-recording the dataflow between them.

Each mod changes modules the next one looks at (fusion turns Linears into
members, padding wraps Linears), so every mod records its own dataflow on the
sample batch. The order matters: migration and row-scale-free need the plain
Norm/Linear modules, fusion must run before padding (so the fused width is
padded once), and ``fused_norm_quant`` runs on the converted model for serving.
"""

from __future__ import annotations

from torch import nn

from loka.mods import fused_norm_quant, grouped_rewrite, horizontal, keep_hp, padding, row_scale, scale_migration
from loka.mods.result import ModResult

# Every mod by name, in the order ``loka mods list`` shows them.
MODS = {
    m.NAME: m.apply
    for m in (scale_migration, row_scale, padding, horizontal, grouped_rewrite, fused_norm_quant, keep_hp)
}


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
