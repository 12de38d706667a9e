"""Mod 1: move per-channel scales from a norm's output into the next Linears' weights.

Outlier channels in an activation force a large FP8 scale on the whole tensor
(or row), so every other channel loses precision. When the activation is the
output of a norm with a per-channel affine ``y = w ⊙ n + b``, dividing channel
j by ``s_j`` costs nothing: ``w' = w / s``, ``b' = b / s``, and each consuming
Linear takes the scale into its weight columns ``W'[:, j] = W[:, j] · s_j``, so

    W' y' = W diag(s) diag(1/s) y = W y        (exact in real arithmetic)

This is SmoothQuant's migration, done through the norm instead of a separate
multiply. ``s_j = amax_x_j^α / amax_w_j^(1-α)``; α is chosen per block by a
grid search minimizing the emulated FP8 fprop error of the consuming Linears
on the calibration batch. With ``pow2=True`` (default) every ``s_j`` is a
power of two, so the reparametrization is bit-exact in any float dtype (barring
under/overflow); otherwise it is exact in fp64 and within rounding in fp32.

With probe statistics, blocks whose consuming site shows no outlier channels
(``col_amax_spread`` below ``min_spread``) are skipped, and the per-channel
``col_amax`` of the input (kept by a live ``Probe``; the saved JSON report has
only the spread and the outlier channel indices) supplies ``amax_x``: the
maximum over every probed step, not just the calibration batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loka.metrics import rel_error
from loka.mods.graph import Dataflow, record, run_sample
from loka.mods.norms import norm_info
from loka.mods.result import ModResult, SiteChange, get_module
from loka.quantize import fake_quantize, round_up_pow2
from loka.recipe import Recipe, as_recipe
from loka.mods.spec import ModSpec

NAME = "scale_migration"
EXACT = True
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SCALE_RANGE = (2.0**-20, 2.0**20)


def migration_scales(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float, pow2: bool = True) -> torch.Tensor:
    """s[C] = act_amax^α / w_amax^(1-α), 1 where either amax is 0; clamped to SCALE_RANGE."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (0 keeps activations, 1 moves everything into weights)")
    a, w = act_amax.double(), w_amax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(*SCALE_RANGE)
    return round_up_pow2(s) if pow2 else s


def fprop_error(x: torch.Tensor, w: torch.Tensor, recipe: Recipe) -> float:
    """Relative error of the emulated FP8 fprop x[M,K] · w[N,K]ᵀ against fp64."""
    ref = x.double() @ w.double().t()
    g = recipe.fprop
    out = fake_quantize(x.float(), g.a).double() @ fake_quantize(w.float(), g.b).double().t()
    return rel_error(ref, out)


def _report_channels(report, fqn: str) -> dict:
    """Input statistics of site ``fqn``: from a live ``loka.probe.Probe`` (with the per-channel
    ``col_amax`` vector), a ``ProbeReport`` (summary: spread, outlier channels) or a plain
    ``{fqn: {...}}`` dict; {} when absent."""
    if report is None:
        return {}
    if isinstance(report, dict):
        return report.get(fqn, {})
    state = getattr(report, "state", None)
    if isinstance(state, dict):  # a live Probe keeps the merged per-channel statistics
        op = getattr(state.get(fqn), "operands", {}).get("input")
        if op is None or "col_amax" not in op.state:
            return {}
        return {**op.summary(), "col_amax": op.state["col_amax"]}
    try:
        return report.site(fqn).get("operands", {}).get("input", {})
    except KeyError:
        return {}


def _capture_inputs(model: nn.Module, sample, fqns: list[str]) -> dict[str, torch.Tensor]:
    """Input of each Linear in ``fqns`` on ``sample``, flattened to [M, K]."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(fqn: str):
        def hook(module, args) -> None:  # returns None: the input is not replaced
            seen.setdefault(fqn, args[0].detach().reshape(-1, args[0].shape[-1]).double())

        return hook

    handles = [get_module(model, f).register_forward_pre_hook(hook_for(f)) for f in fqns]
    try:
        with torch.no_grad():
            run_sample(model, sample)
    finally:
        for h in handles:
            h.remove()
    return seen


def _choose(x: torch.Tensor, w: torch.Tensor, act_amax: torch.Tensor, alpha, recipe: Recipe, pow2: bool):
    """(alpha, scales, error_before, error_after) for one block."""
    w_amax = w.abs().amax(dim=0)
    before = fprop_error(x, w, recipe)
    grid = ALPHA_GRID if alpha == "auto" else (float(alpha),)
    best = None
    for a in grid:
        s = migration_scales(act_amax, w_amax, a, pow2)
        err = fprop_error(x / s, w * s, recipe)
        if best is None or err < best[3]:
            best = (a, s, before, err)
    return best


def _describe(err: float) -> str:
    return f"fprop err {err:.2e}"


@torch.no_grad()
def _migrate(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))


def apply(
    model: nn.Module,
    report=None,
    *,
    sample,
    alpha: float | str = "auto",
    recipe: Recipe | str = "tensorwise",
    pow2: bool = True,
    min_spread: float = 4.0,
    min_gain: float = 0.02,
    flow: Dataflow | None = None,
) -> ModResult:
    """Migrate per-channel scales Norm -> Linear(s) on every exclusive block; see the module doc.

    ``sample``: a batch the model takes (calibration and pattern discovery).
    ``alpha``: a float in [0, 1] or ``"auto"`` (grid search). ``recipe``: the FP8
    recipe whose fprop error is minimized. A block is changed only when its
    error drops by more than ``min_gain`` (relative, e.g. 0.1 = 10%).
    """
    recipe = as_recipe(recipe)
    flow = flow or record(model, sample)
    changes, skipped, data = [], [], {}
    blocks = [b for b in flow.norm_to_linear()]
    inputs = _capture_inputs(model, sample, [b.linears[0] for b in blocks])
    for block in blocks:
        norm = get_module(model, block.norm)
        why = _why_not(block, norm, report, min_spread)
        if why:
            skipped.append((block.norm, why))
            continue
        linears = [get_module(model, f) for f in block.linears]
        x = inputs[block.linears[0]]
        w = torch.cat([lin.weight.detach().double() for lin in linears], dim=0)  # [sum N, K]
        summary = _report_channels(report, block.linears[0])
        act_amax = torch.as_tensor(summary["col_amax"], dtype=torch.float64) if "col_amax" in summary else x.abs().amax(dim=0)
        a, s, before, after = _choose(x, w, act_amax, alpha, recipe, pow2)
        if alpha == "auto" and not after < before * (1.0 - min_gain):
            skipped.append((block.norm, f"no alpha lowers the fprop error ({before:.2e}) by more than {min_gain:.0%}"))
            continue
        _migrate(norm, linears, s)
        site = f"{block.norm} -> {', '.join(block.linears)}"
        changes.append(SiteChange(site, _describe(before), f"{_describe(after)} (alpha={a}, s in [{s.min():.3g}, {s.max():.3g}])"))
        data[site] = {"alpha": a, "error_before": before, "error_after": after, "linears": list(block.linears)}
    return ModResult(
        NAME, EXACT,
        "per-channel scales moved from norm affine weight/bias into the following Linears' weight columns",
        tuple(changes), tuple(skipped), data,
    )


def _why_not(block, norm: nn.Module, report, min_spread: float) -> str:
    info, why = norm_info(norm)
    if info is None:
        return why
    if not info.affine:
        return "the norm has no affine weight to carry the scales"
    if not block.exclusive:
        return f"the norm's output is also used by {list(block.other_consumers)}; migration would change them"
    summary = _report_channels(report, block.linears[0])
    spread = summary.get("col_amax_spread")
    if spread is not None and math.isfinite(spread) and spread < min_spread:
        return f"probe report: channel amax spread {spread:.2f} < {min_spread}, no outlier channels to migrate"
    return ""


MOD = ModSpec(
    name=NAME,
    order=10,
    exact="exact (bit-exact with `pow2=True`)",
    pattern="Norm -> Linear(s): per-channel scales moved from the norm's affine into the Linears' weight columns",
    apply=apply,
)
