"""loka: FP8 that pays off on recommendation models.

probe -> plan -> convert (then train / serve / gate). This module holds the
small public API; the packages ``loka.probe``, ``loka.mods``,
``loka.dispatch``, ``loka.models`` and ``loka.gate`` hold the rest.
"""

from loka.formats import E4M3, E5M2, FORMATS, Float8Format, get_format
from loka.metrics import cosine, max_abs_error, rel_error, sqnr
from loka.quantize import NonFiniteError, dequantize, fake_quantize, quantize, quantize_operand
from loka.recipe import GemmRecipe, OperandRecipe, Recipe, as_recipe
from loka.nn import Float8Linear
from loka.convert import ConvertResult, convert
from loka.dispatch import Budget, Plan, apply_plan, load_plan, plan
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.report import ProbeReport
from loka.mods import ModResult, keep_in_hp
from loka.mods.pipeline import apply_all as apply_mods
from loka.gate import EvalOutputs, GateBudget

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "EvalOutputs",
    "GateBudget",
    "ModResult",
    "Plan",
    "Probe",
    "ProbeConfig",
    "ProbeReport",
    "SamplingSchedule",
    "apply_mods",
    "apply_plan",
    "keep_in_hp",
    "load_plan",
    "plan",
    "E4M3",
    "E5M2",
    "FORMATS",
    "ConvertResult",
    "Float8Format",
    "Float8Linear",
    "GemmRecipe",
    "NonFiniteError",
    "OperandRecipe",
    "Recipe",
    "as_recipe",
    "convert",
    "cosine",
    "dequantize",
    "fake_quantize",
    "get_format",
    "max_abs_error",
    "quantize",
    "quantize_operand",
    "rel_error",
    "sqnr",
]
