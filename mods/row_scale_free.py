"""Mod 2: Linear -> Norm blocks skip the activation's row scale (bias-free GEMM -> Norm).

A LayerNorm or RMSNorm over the last dim is invariant to a positive per-row
factor: for c > 0, ``Norm(c·z) = Norm(z)`` up to eps (LayerNorm:
``(cz - cμ) / sqrt(c²σ² + eps) = (z - μ) / sqrt(σ² + eps/c²)``, RMSNorm alike).
With rowwise FP8, ``z = x Wᵀ = diag(s_a) (x_fp8 W_dqᵀ)``, so when z feeds
*only* such a norm the per-row dequant scale ``s_a`` of the activation need
never be applied: :class:`RowScaleInvariantLinear` returns ``z' = z / s_a``
and the norm output is the same. The block becomes insensitive to the per-row
quantization scale (any positive per-row scale gives the same output).

When this is exact (real arithmetic), and when it changes the model:

- Linear without bias (or bias all zeros) -> LayerNorm/RMSNorm: exact up to
  the norm's eps, which the norm effectively sees as ``eps · s_a²`` (a
  relative change of at most ``eps · s_a² / σ²(z)`` in the normalizer).
- Linear with a bias constant over its outputs -> LayerNorm: exact (same eps
  caveat); the constant is removed, since LayerNorm subtracts the mean.
- Any other bias: ``Norm(z + b)`` is not row-scale invariant, and moving
  ``b`` after the norm is not the same function. The site is skipped unless
  ``bias="drop"`` (remove it) or ``bias="move"`` (add it to the norm's affine
  bias: ``Norm(z)·w + β + b``); both CHANGE THE MODEL and the result says so.
  Useful when training from scratch, where the norm's own affine bias makes
  the Linear's redundant.
- The norm must be the Linear's only consumer (checked on the recorded
  dataflow); the norm's input must be the Linear's output channels.

Backward is the gradient of the real function: with ``z' = z / s_a`` and
``s_a`` treated as a constant (it is, for the norm), ``dz = dz' / s_a``
feeds the usual dgrad and wgrad GEMMs. A fused kernel folds ``1/s_a`` into
the grad_output row scale of dgrad; here it is one elementwise division.
"""

from __future__ import annotations

import torch
from torch import nn

from loka.mods.graph import Dataflow, record
from loka.mods.norms import norm_info
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.nn import Float8Linear
from loka.quantize import dequantize, operand_block, quantize_operand
from loka.recipe import Recipe, as_recipe
from loka.mods.spec import ModSpec

NAME = "row_scale_free"
EXACT = True  # with bias="drop" on a site with a non-removable bias the result says exact=False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM's dtype: autocast's when it is on (as in Float8Linear), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RowScaleInvariantLinear(Float8Linear):
    """Float8Linear whose fprop returns ``x Wᵀ / s_a`` (the activation's row scale not applied).

    Only valid when the output feeds a norm over the last dim and nothing
    else (see module doc); it has no bias. x [..., K] -> [..., N] scaled per row.
    """

    def _configure(self, recipe, kernels, fallback) -> None:
        super()._configure(recipe, kernels, fallback)
        a = self.recipe.fprop.a
        if self.recipe.fprop.is_hp or a.granularity not in ("rowwise", "tensorwise"):
            raise ValueError(
                "RowScaleInvariantLinear needs an FP8 fprop with a rowwise or tensorwise activation scale "
                f"(one scale per row); got fprop {self.recipe.fprop.describe()}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dim is {x.shape[-1]}, this layer takes in_features={self.in_features}")
        if self.bias is not None:
            raise ValueError("RowScaleInvariantLinear has no bias; a bias does not commute with the row scale")
        x2d = x.reshape(-1, self.in_features)
        y2d = _RowScaleFreeFn.apply(x2d, self.weight, self, _compute_dtype(x))
        return y2d.reshape(*x.shape[:-1], self.out_features)

    def fprop_unscaled(self, x2d: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype):
        """(x_fp8 · W_dqᵀ [M,N] without the row scale, s_a) — the GEMM with scale_a = 1."""
        g = self.recipe.fprop
        x_fp8, s_a = quantize_operand(x2d, g.a, self.scale_state.scale_for("fprop", "input", x2d))
        w_fp8, s_w = quantize_operand(weight, g.b, self.scale_state.scale_for("fprop", "weight", weight))
        kernel = self.kernels["fprop"]
        if kernel.torch_scaled_mm and x2d.is_cuda:
            m, n = x2d.shape[0], weight.shape[0]
            rowwise = g.a.granularity == "rowwise"
            one = torch.ones((m, 1) if rowwise else (), device=x2d.device)
            s_b = s_w.float().reshape(1, n) if rowwise else s_w.float()
            out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=one, scale_b=s_b.contiguous(),
                                   out_dtype=torch.bfloat16 if rowwise else out_dtype)
            return out.to(out_dtype), s_a
        w_dq = dequantize(w_fp8, s_w, block=operand_block(g.b, weight.shape))
        return (x_fp8.float() @ w_dq.t()).to(out_dtype), s_a


class _RowScaleFreeFn(torch.autograd.Function):
    """z' = (x Wᵀ) / s_a with s_a constant; backward feeds dz = dz' / s_a to dgrad and wgrad."""

    @staticmethod
    def forward(ctx, x2d, weight, module: RowScaleInvariantLinear, compute_dtype):
        ctx.module, ctx.compute_dtype = module, compute_dtype
        z_unscaled, s_a = module.fprop_unscaled(x2d, weight, compute_dtype)  # [M, N]
        ctx.save_for_backward(x2d, weight, s_a.float())
        return z_unscaled

    @staticmethod
    def backward(ctx, dz_unscaled):
        x2d, weight, s_a = ctx.saved_tensors
        module, dt = ctx.module, ctx.compute_dtype
        dz = (dz_unscaled.float() / s_a).to(dz_unscaled.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = module.run_gemm("dgrad", dz, weight.t().contiguous(), dt).to(x2d.dtype)
        if ctx.needs_input_grad[1]:
            dw = module.run_gemm("wgrad", dz.t().contiguous(), x2d.t().contiguous(), dt).to(weight.dtype)
        return dx, dw, None, None


def _bias_verdict(lin: nn.Linear, kind: str, bias: str) -> tuple[str, bool, str]:
    """(action, exact, note): action is 'none', 'remove' or 'skip'."""
    if lin.bias is None:
        return "none", True, "no bias"
    b = lin.bias.detach()
    if bool((b == 0).all()):
        return "remove", True, "zero bias removed"
    if kind == "layernorm" and bool((b == b[0]).all()):
        return "remove", True, "constant bias removed (LayerNorm subtracts the mean)"
    if bias == "drop":
        return "remove", False, "bias DROPPED (model changed)"
    if bias == "move":
        return "move", False, "bias MOVED after the norm, added to its affine bias (model changed)"
    return "skip", True, ("has a bias that does not cancel in the norm; pass bias='drop' or bias='move' "
                          "(both change the model)")


def apply(
    model: nn.Module,
    report=None,
    *,
    sample,
    recipe: Recipe | str = "rowwise",
    kernels="auto",
    bias: str = "keep",
    flow: Dataflow | None = None,
) -> ModResult:
    """Swap each exclusive Linear -> Norm Linear for a :class:`RowScaleInvariantLinear`.

    ``bias``: ``"keep"`` (skip sites whose bias does not cancel), ``"drop"`` (remove
    it) or ``"move"`` (add it to the norm's affine bias); the last two change the
    model (opt-in; ``ModResult.exact`` is then False). Parameters are reused.
    """
    if bias not in ("keep", "drop", "move"):
        raise ValueError(f"bias={bias!r} is not valid; use 'keep' (exact only), 'drop' or 'move' (both change the model)")
    recipe = as_recipe(recipe)
    flow = flow or record(model, sample)
    changes, skipped, exact = [], [], True
    for block in flow.linear_to_norm():
        lin, norm = get_module(model, block.linear), get_module(model, block.norm)
        info, why = norm_info(norm)
        if info is None or not block.exclusive or type(lin) not in (nn.Linear, Float8Linear):
            why = why or (f"its output also feeds {list(block.other_consumers)}" if not block.exclusive
                          else f"{type(lin).__name__} is already rewritten")
            skipped.append((block.linear, why))
            continue
        action, site_exact, note = _bias_verdict(lin, info.kind, bias)
        if action == "move" and getattr(norm, "bias", None) is None:
            action, note = "skip", "bias='move' needs a norm with an affine bias to carry it"
        if action == "skip":
            skipped.append((block.linear, note))
            continue
        if action == "move":
            with torch.no_grad():
                norm.bias.add_(lin.bias.to(norm.bias.dtype))
        if action in ("remove", "move"):
            lin.bias = None
        if isinstance(lin, Float8Linear):  # keep a converted site's recipe and kernels
            site_recipe, site_kernels = lin.recipe, {g: k.name for g, k in lin.kernels.items()}
        else:
            site_recipe, site_kernels = recipe, kernels
        new = RowScaleInvariantLinear.from_linear(lin, recipe=site_recipe, kernels=site_kernels)
        set_module(model, block.linear, new)
        exact = exact and site_exact
        changes.append(SiteChange(block.linear, f"{type(lin).__name__} -> {info.kind}",
                                  f"RowScaleInvariantLinear ({site_recipe.name}, row scale of input not applied; {note})"))
    what = "Linears feeding a norm skip the activation row scale (exact up to the norm's eps)"
    if not exact:
        what += "; some biases were dropped or moved after the norm, which changes the model"
    return ModResult(NAME, exact, what, tuple(changes), tuple(skipped))


MOD = ModSpec(
    name=NAME,
    order=20,
    exact='exact up to the norm\'s eps; `bias="drop"` is model-changing',
    pattern="Linear -> Norm: the activation's row scale is never applied",
    apply=apply,
    show_options=(("kernels", "emulated"),),
)
