"""loka.mods (layer 3): reusable rewrites of GEMM-plus-normalization blocks for FP8 stability and speed.

Each mod is ``apply(model, report=None, **options) -> ModResult`` and finds its
sites by dataflow pattern on a recorded forward pass (``loka.mods.graph``),
not by class names, so it works on user models with the same patterns:

=====================  ==================  ==============================================
mod                    exact?              pattern / effect
=====================  ==================  ==============================================
scale_migration        exact               Norm -> Linear(s): per-channel scales into W
row_scale_free         exact (eps; bias)   Linear -> Norm: skip the activation row scale
padding                exact               K, N padded to multiples of 16
horizontal_fusion      exact               Linears sharing an input -> one wider GEMM
grouped_gemm           exact               same-shape Linears, different inputs -> grouped
fused_norm_quant       exact               Norm -> FP8 Linear: norm + cast in one pass
keep_hp                no change           {fqn: reason} kept bf16 (heads, raw, tiny)
=====================  ==================  ==============================================

Apply mods to a model whose weights are already loaded (checkpoints are
loaded *before* the mods; see docs/mods.md), then ``loka.convert``.
"""

from loka.mods.fused_norm_quant import DeferredNorm, NormQuantFloat8Linear
from loka.mods.graph import Dataflow, LinearNorm, NormLinear, record
from loka.mods.grouped import GroupedLinear, find_groups, grouped_linear, scaled_grouped_linear
from loka.mods.horizontal import FusedLinearMember, fuse_linears
from loka.mods.keep_hp import keep_in_hp, module_filter_fn
from loka.mods.norms import register_norm
from loka.mods.padding import PaddedLinear
from loka.mods.pipeline import DEFAULT_ORDER, MODS, apply_all, get_mod
from loka.mods.result import ModResult, SiteChange
from loka.mods.row_scale import RowScaleInvariantLinear

__all__ = [
    "DEFAULT_ORDER",
    "MODS",
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
