"""loka.mods (layer 3): reusable rewrites of GEMM-plus-normalization blocks for FP8 stability and speed.

Each mod is ``apply(model, report=None, **options) -> ModResult`` and finds its
sites by dataflow pattern on a recorded forward pass (``loka.mods.graph``),
not by class names, so it works on user models with the same patterns. Every mod declares itself once in its own file (``MOD = ModSpec(...)``, see
``loka.mods.spec``); ``loka mods list`` and docs/mods.md show them all.

Apply mods to a model whose weights are already loaded (checkpoints are
loaded *before* the mods; see docs/mods.md), then ``loka.convert``.
"""

from loka.mods.fused_norm_quant import DeferredNorm, NormQuantFloat8Linear
from loka.mods.graph import Dataflow, LinearNorm, NormLinear, record
from loka.mods.grouped import GroupedLinear, find_groups, grouped_linear, scaled_grouped_linear
from loka.mods.horizontal_fusion import FusedLinearMember, fuse_linears
from loka.mods.keep_hp import keep_in_hp, module_filter_fn
from loka.mods.norms import register_norm
from loka.mods.padding import PaddedLinear
from loka.mods.pipeline import DEFAULT_ORDER, MODS, SPECS, apply_all, get_mod
from loka.mods.result import ModResult, SiteChange
from loka.mods.row_scale_free import RowScaleInvariantLinear
from loka.mods.spec import ModSpec

__all__ = [
    "DEFAULT_ORDER",
    "MODS",
    "ModSpec",
    "SPECS",
    "Dataflow",
    "DeferredNorm",
    "apply_all",
    "FusedLinearMember",
    "GroupedLinear",
    "LinearNorm",
    "ModResult",
    "NormLinear",
    "NormQuantFloat8Linear",
    "PaddedLinear",
    "RowScaleInvariantLinear",
    "SiteChange",
    "find_groups",
    "fuse_linears",
    "get_mod",
    "grouped_linear",
    "keep_in_hp",
    "module_filter_fn",
    "record",
    "register_norm",
    "scaled_grouped_linear",
]
