"""Recipes: how each operand of each GEMM of a site is cast to FP8.

Config is layered like the thing it describes:

    OperandRecipe  (format, granularity, scaling of one operand)
      -> GemmRecipe  (the two operands of one GEMM: fprop, dgrad or wgrad)
        -> Recipe      (the three GEMMs of a Linear site)

A Linear site ``y = x Wᵀ`` runs three GEMMs, each written here in "NT" form
``out = a · bᵀ`` with both operands reduction-last (the layout torch._scaled_mm wants):

    fprop  y[M,N]  = x[M,K]      · W[N,K]ᵀ        a=input        b=weight
    dgrad  dx[M,K] = dy[M,N]     · (Wᵀ)[K,N]ᵀ     a=grad_output  b=weight
    wgrad  dW[N,K] = (dyᵀ)[N,M]  · (xᵀ)[K,M]ᵀ     a=grad_output  b=input

Named recipes (``Recipe.from_name``) cover the common choices; every field can
also be set by hand. All configs are frozen and validated on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from loka.formats import FORMATS
from loka.fp4 import NVFP4_BLOCK

Granularity = Literal["tensorwise", "rowwise", "blockwise", "mx", "nvfp4"]
Scaling = Literal["dynamic", "delayed", "static"]
Role = Literal["input", "weight", "grad_output"]
GemmName = Literal["fprop", "dgrad", "wgrad"]
NonFinitePolicy = Literal["skip", "raise"]

GRANULARITIES: tuple[str, ...] = ("tensorwise", "rowwise", "blockwise", "mx")  # the FP8 ones
FP4_GRANULARITIES: tuple[str, ...] = ("nvfp4",)  # e2m1 in 1x16 blocks, e4m3 block scales + fp32 tensor scale
ALL_GRANULARITIES: tuple[str, ...] = GRANULARITIES + FP4_GRANULARITIES
# How an MX block's e8m0 scale comes from its amax (loka/quantize.py, mx_scale):
#   "round_up": the smallest power of two >= amax / fmax: no element saturates (NVIDIA's MXFP8
#               training recipe and Blackwell's cvt.rp rounding; torchao's RCEIL up to one ulp).
#   "floor":    2**(floor(log2 amax) - emax_elem), the OCP MX v1.0 rule and torchao 0.18's to_mx
#               default: the block's largest elements may saturate (e4m3: amax mantissa > 1.75).
# The default is round_up: for Gaussian-like blocks about 19% of e4m3 blocks clip their largest
# element under floor (by up to 12.5%), while round_up costs only the block's smallest values one
# binade of subnormal room; and it keeps loka's invariant that a dynamic scale never saturates.
MX_SCALE_RULES: tuple[str, ...] = ("round_up", "floor")
DEFAULT_MX_SCALE_RULE = "round_up"
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
SCALINGS: tuple[str, ...] = ("dynamic", "delayed", "static")
ROLES: tuple[str, ...] = ("input", "weight", "grad_output")
GEMMS: tuple[str, ...] = ("fprop", "dgrad", "wgrad")
HP = "hp"

# Which operand roles feed each GEMM, as (a, b) of out = a · bᵀ.
GEMM_ROLES: dict[str, tuple[str, str]] = {
    "fprop": ("input", "weight"),
    "dgrad": ("grad_output", "weight"),
    "wgrad": ("grad_output", "input"),
}


def gemm_shape(gemm: str, m: int, k: int, n: int) -> tuple[int, int, int]:
    """(rows of a, reduction, rows of b) of ``gemm`` for a site ``y[M,N] = x[M,K] · W[N,K]ᵀ``."""
    if gemm not in GEMM_ROLES:
        raise ValueError(f"unknown GEMM {gemm!r}; use one of {list(GEMMS)}")
    return {"fprop": (m, k, n), "dgrad": (m, n, k), "wgrad": (n, m, k)}[gemm]

ACTIVATION_BLOCK = (1, 128)
WEIGHT_BLOCK = (128, 128)
MX_BLOCK = (1, 32)


def default_block(granularity: str) -> tuple[int, int]:
    """The scale block a granularity uses unless told otherwise (the named recipes' activation blocks)."""
    return {"mx": MX_BLOCK, "nvfp4": NVFP4_BLOCK}.get(granularity, ACTIVATION_BLOCK)


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not valid; use one of {list(choices)}")


@dataclass(frozen=True)
class OperandRecipe:
    """How one operand of one GEMM is quantized.

    ``format`` is an element format of loka/formats.py (``"e4m3"``, ``"e5m2"``, ``"e4m3fnuz"``,
    ``"e5m2fnuz"``, ``"e2m1"``) or ``"hp"`` (not quantized); ``e2m1`` (FP4) takes granularity
    ``nvfp4`` (1x16 blocks, e4m3 block scales under an fp32 tensor scale: loka/fp4.py, dynamic
    scaling only) or ``mx`` (MXFP4), and ``nvfp4`` takes only ``e2m1``.
    ``block`` is the (rows, cols) scale group for ``blockwise``, ``mx`` and ``nvfp4`` (1x16); cols
    run along the reduction dim. ``delayed`` keeps a per-tensor amax history of
    ``history_len`` entries reduced by ``history_reduce``; ``static`` uses a
    calibrated per-tensor scale set on the module. ``pow2_scale`` rounds scales
    up to powers of two (always on for ``mx``, whose scales are e8m0).
    ``nonfinite``: ``"skip"`` ignores NaN/Inf when computing amax (they pass
    through as NaN/Inf and are counted by the caller); ``"raise"`` raises.
    ``mx_scale_rule``: ``"round_up"`` (default) or ``"floor"`` (OCP MX v1.0), see ``MX_SCALE_RULES``.
    ``rounding``: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased; for gradients in FP4).
    """

    format: str = "e4m3"
    granularity: Granularity = "tensorwise"
    scaling: Scaling = "dynamic"
    pow2_scale: bool = False
    block: tuple[int, int] = ACTIVATION_BLOCK
    history_len: int = 16
    history_reduce: Literal["max", "most_recent"] = "max"
    nonfinite: NonFinitePolicy = "skip"
    mx_scale_rule: Literal["round_up", "floor"] = DEFAULT_MX_SCALE_RULE
    rounding: Literal["nearest", "stochastic"] = "nearest"

    def __post_init__(self) -> None:
        _check_choice("format", self.format, (*FORMATS, HP))
        _check_choice("granularity", self.granularity, ALL_GRANULARITIES)
        _check_choice("mx_scale_rule", self.mx_scale_rule, MX_SCALE_RULES)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("history_reduce", self.history_reduce, ("max", "most_recent"))
        _check_choice("nonfinite", self.nonfinite, ("skip", "raise"))
        if self.history_len < 1:
            raise ValueError(f"history_len={self.history_len} must be >= 1")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"block={self.block} must be two positive ints (rows, cols)")
        self._check_fp4()

    def _check_fp4(self) -> None:
        if self.granularity == "nvfp4" and self.format not in ("e2m1", HP):
            raise ValueError(f"granularity='nvfp4' quantizes to FP4: set format='e2m1', not {self.format!r}")
        if self.format == "e2m1" and self.granularity not in ("nvfp4", "mx"):
            raise ValueError(f"format='e2m1' (FP4) takes granularity 'nvfp4' or 'mx', not {self.granularity!r}")
        if self.granularity == "nvfp4" and tuple(self.block) != NVFP4_BLOCK:
            raise ValueError(f"nvfp4 blocks are {NVFP4_BLOCK[0]}x{NVFP4_BLOCK[1]}; pass block={NVFP4_BLOCK}")
        if self.granularity == "nvfp4" and self.scaling != "dynamic":
            raise ValueError(f"nvfp4 scales are dynamic (its fp32 tensor scale comes from the tensor); "
                             f"use scaling='dynamic', not {self.scaling!r}")

    @property
    def is_hp(self) -> bool:
        return self.format == HP

    @property
    def pow2(self) -> bool:
        """Whether scales are powers of two (``mx`` scales are e8m0, so always)."""
        return self.pow2_scale or self.granularity == "mx"

    @property
    def group(self) -> tuple[int, int] | None:
        """Scale group shape (rows, cols); None means one scale for the tensor."""
        if self.granularity == "tensorwise":
            return None
        if self.granularity == "rowwise":
            return (1, -1)
        return self.block


HP_OPERAND = OperandRecipe(format=HP)


@dataclass(frozen=True)
class GemmRecipe:
    """The two operands of one GEMM ``out = a · bᵀ`` (see module docstring)."""

    a: OperandRecipe = field(default_factory=OperandRecipe)
    b: OperandRecipe = field(default_factory=OperandRecipe)

    def __post_init__(self) -> None:
        if self.a.is_hp != self.b.is_hp:
            raise ValueError(
                "a GEMM quantizes both operands or neither; got a.format="
                f"{self.a.format!r}, b.format={self.b.format!r}"
            )

    @property
    def is_hp(self) -> bool:
        return self.a.is_hp

    def describe(self) -> str:
        if self.is_hp:
            return "hp"
        return f"{_operand_str(self.a)} x {_operand_str(self.b)}"


def _operand_str(op: OperandRecipe) -> str:
    s = f"{op.format}/{op.granularity}"
    if op.granularity in ("blockwise", "mx"):
        s += f"{op.block[0]}x{op.block[1]}"
    if op.granularity == "mx" and op.mx_scale_rule != DEFAULT_MX_SCALE_RULE:
        s += f"/{op.mx_scale_rule}"
    if op.rounding == "stochastic":
        s += "/sr"
    if op.scaling != "dynamic":
        s += f"/{op.scaling}"
    if op.pow2_scale and op.granularity != "mx":
        s += "/pow2"
    return s


HP_GEMM = GemmRecipe(HP_OPERAND, HP_OPERAND)


@dataclass(frozen=True)
class Recipe:
    """The recipes of a Linear site's three GEMMs, with a name for reports."""

    name: str = "custom"
    fprop: GemmRecipe = field(default_factory=GemmRecipe)
    dgrad: GemmRecipe = field(default_factory=GemmRecipe)
    wgrad: GemmRecipe = field(default_factory=GemmRecipe)

    def gemm(self, name: str) -> GemmRecipe:
        _check_choice("gemm", name, GEMMS)
        return getattr(self, name)

    def operand(self, gemm: str, role: str) -> OperandRecipe:
        """The recipe of ``role`` in ``gemm`` (e.g. ``("wgrad", "input")``)."""
        a_role, b_role = GEMM_ROLES[gemm]
        g = self.gemm(gemm)
        if role == a_role:
            return g.a
        if role == b_role:
            return g.b
        raise ValueError(f"role {role!r} does not take part in {gemm}; it uses {a_role}, {b_role}")

    @property
    def is_hp(self) -> bool:
        return all(self.gemm(g).is_hp for g in GEMMS)

    def with_gemm(self, gemm: str, recipe: GemmRecipe, name: str | None = None) -> "Recipe":
        _check_choice("gemm", gemm, GEMMS)
        return replace(self, **{gemm: recipe}, name=name or self.name)

    @classmethod
    def from_name(cls, name: str, *, scaling: Scaling = "dynamic", **operand_overrides) -> "Recipe":
        """A named recipe (``RECIPE_NAMES``): ``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``,
        ``blockwise``, ``mx`` (e4m3, e5m2 gradients), ``mxfp8`` / ``mxfp8_floor`` (e4m3 for every
        operand; round-up or OCP floor scale rule), ``nvfp4`` / ``nvfp4_sr`` (FP4; ``_sr``: stochastic
        rounding of gradients), ``tensorwise_fnuz`` / ``rowwise_fnuz`` (MI300's encodings) or
        ``bf16`` (no FP8), with ``scaling`` applied to every FP8 operand. ``operand_overrides`` (e.g. ``pow2_scale=True``,
        ``history_len=32``) are applied to every FP8 operand.

        >>> Recipe.from_name("rowwise").fprop.describe()
        'e4m3/rowwise x e4m3/rowwise'
        """
        return named_recipe(name, scaling=scaling, **operand_overrides)


# name -> (granularity, format of input and weight, format of grad_output, options of every FP8 operand);
# options with a "grad_" prefix apply to grad_output operands only.
_NAMED: dict[str, tuple[str, str, str, dict]] = {
    "tensorwise": ("tensorwise", "e4m3", "e5m2", {}),
    "rowwise": ("rowwise", "e4m3", "e5m2", {}),
    "rowwise_with_gw_hp": ("rowwise", "e4m3", "e5m2", {}),
    "blockwise": ("blockwise", "e4m3", "e5m2", {}),
    "mx": ("mx", "e4m3", "e5m2", {}),
    # MXFP8 as NVIDIA trains with it: e4m3 for every operand (the 1x32 blocks give gradients range)
    "mxfp8": ("mx", "e4m3", "e4m3", {}),
    "mxfp8_floor": ("mx", "e4m3", "e4m3", {"mx_scale_rule": "floor"}),
    "nvfp4": ("nvfp4", "e2m1", "e2m1", {}),
    "nvfp4_sr": ("nvfp4", "e2m1", "e2m1", {"grad_rounding": "stochastic"}),
    # MI300 (gfx942) runs the fnuz encodings
    "tensorwise_fnuz": ("tensorwise", "e4m3fnuz", "e5m2fnuz", {}),
    "rowwise_fnuz": ("rowwise", "e4m3fnuz", "e5m2fnuz", {}),
}
RECIPE_NAMES: tuple[str, ...] = (*_NAMED, "bf16")


def named_recipe(name: str, *, scaling: Scaling = "dynamic", **overrides) -> Recipe:
    """See :meth:`Recipe.from_name`."""
    _check_choice("recipe name", name, RECIPE_NAMES)
    _check_choice("scaling", scaling, SCALINGS)
    if name == "bf16":
        return Recipe(name="bf16", fprop=HP_GEMM, dgrad=HP_GEMM, wgrad=HP_GEMM)
    granularity, fmt, grad_fmt, options = _NAMED[name]

    def op(role: str) -> OperandRecipe:
        block = default_block(granularity)
        if granularity == "blockwise" and role == "weight":
            block = WEIGHT_BLOCK
        kw = dict(format=grad_fmt if role == "grad_output" else fmt, granularity=granularity, scaling=scaling,
                  block=block)
        for key, value in options.items():
            if not key.startswith("grad_"):
                kw[key] = value
            elif role == "grad_output":
                kw[key[len("grad_"):]] = value
        kw.update(overrides)
        return OperandRecipe(**kw)

    def gemm(g: str) -> GemmRecipe:
        a_role, b_role = GEMM_ROLES[g]
        return GemmRecipe(op(a_role), op(b_role))

    wgrad = HP_GEMM if name == "rowwise_with_gw_hp" else gemm("wgrad")
    suffix = "" if scaling == "dynamic" else f"-{scaling}"
    return Recipe(name=name + suffix, fprop=gemm("fprop"), dgrad=gemm("dgrad"), wgrad=wgrad)


def as_recipe(recipe: "Recipe | str") -> Recipe:
    """Accept a Recipe or a name like ``"rowwise"`` / ``"tensorwise-delayed"``."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a loka.Recipe or a name, got {type(recipe).__name__}")
    base, _, scaling = recipe.partition("-")
    return named_recipe(base, scaling=scaling or "dynamic")
