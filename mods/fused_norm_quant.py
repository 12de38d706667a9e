"""Mod 5: Norm -> FP8 Linear blocks compute the norm and the FP8 activation in one pass (serving).

Unfused, a Norm -> Float8Linear block writes the normalized ``y`` in hp, then
the FP8 GEMM path reads ``y`` for its amax, reads it again to cast, and writes
``y_fp8``. A normalized row is complete in registers when the norm kernel has
it, so ``loka.kernels.triton_norm_quant.fused_norm_quant`` writes only
``y_fp8`` and one scale per row (bytes per element: 9 unfused vs 3 fused).

The block keeps its modules and ``state_dict`` keys:

- the norm becomes :class:`NormQuantize` (same ``weight`` / ``bias``
  Parameters). Without grad it runs the fused kernel (Triton on CUDA or the
  Triton interpreter, the PyTorch reference elsewhere), hands ``(y_fp8,
  scale)`` to the Linear, and returns a *placeholder* of ``y``'s shape that
  holds no data (a NaN expanded with stride 0);
- the Linear becomes :class:`PrequantFloat8Linear`, which recognizes the
  placeholder (by storage) and runs its fprop on the pre-quantized operand:
  no amax pass, no cast pass.

With grad enabled (training) both behave exactly like the originals: the
fused kernel is forward-only. The placeholder is only safe because the mod
checks on the recorded dataflow that the Linear is the norm's only consumer;
if anything else ever read it, it would read NaN, not a plausible number.
Exactness: same FP8 bytes as rowwise quantization of the float32 norm output
(an fp32 model's unfused path is identical; a bf16 model's rounds ``y`` to
bf16 first, so the fused one is if anything closer to exact).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loka.kernels.triton_gemm import triton_available
from loka.kernels.triton_norm_quant import fused_norm_quant, norm_quant_reference
from loka.mods.graph import Dataflow, record, run_sample
from loka.mods.norms import norm_info
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.nn import Float8Linear
from loka.quantize import dequantize, operand_block, quantize_operand
from loka.recipe import Recipe, as_recipe

NAME = "fused_norm_quant"
EXACT = True


class _Handoff:
    """The pre-quantized activation passed from a NormQuantize to its Linear (plain object)."""

    def __init__(self) -> None:
        self.placeholder: torch.Tensor | None = None
        self.y_fp8: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def take(self, x: torch.Tensor):
        """(y_fp8 [M, K], scale [M, 1]) when ``x`` is (a view of) the placeholder, else None."""
        p = self.placeholder
        if p is None or x.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() or x.shape[-1] != p.shape[-1]:
            return None
        out = (self.y_fp8.reshape(-1, x.shape[-1]), self.scale.reshape(-1, 1))
        self.placeholder = self.y_fp8 = self.scale = None
        return out


def norm_quant(x, weight, bias, *, kind: str, eps: float, fmt: str, backend: str = "auto"):
    """(y_fp8[..., N], scale[..., 1]) by the fused Triton kernel or the PyTorch reference."""

    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r} is not valid; use 'auto', 'triton' or 'reference'")
    use_triton = backend == "triton" or (backend == "auto" and triton_available(x.device)[0])
    if use_triton:
        return fused_norm_quant(x, weight, bias, kind=kind, eps=eps, fmt=fmt)
    y_fp8, scale, _ = norm_quant_reference(x, weight, bias, kind=kind, eps=eps, fmt=fmt)
    return y_fp8, scale


class NormQuantize(nn.Module):
    """A LayerNorm/RMSNorm that, without grad, emits FP8 + row scales for the next FP8 Linear."""

    def __init__(self, norm: nn.Module, fmt: str = "e4m3", backend: str = "auto") -> None:
        super().__init__()
        info, why = norm_info(norm)
        if info is None:
            raise ValueError(f"NormQuantize needs a norm over the last dim: {why}")
        self.kind, self.eps, self.normalized_shape = info.kind, info.eps, (info.channels,)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        self.fmt, self.backend = fmt, backend
        self.handoff = _Handoff()
        self.fused_calls = 0

    def _hp(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._hp(x)
        y_fp8, scale = norm_quant(x, self.weight, self.bias, kind=self.kind, eps=self.eps, fmt=self.fmt, backend=self.backend)
        placeholder = torch.full((), float("nan"), dtype=x.dtype, device=x.device).expand(x.shape)
        self.handoff.placeholder, self.handoff.y_fp8, self.handoff.scale = placeholder, y_fp8, scale
        self.fused_calls += 1
        return placeholder

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.normalized_shape}, eps={self.eps}, fmt={self.fmt}, backend={self.backend}"


class PrequantFloat8Linear(Float8Linear):
    """Float8Linear whose fprop takes the FP8 activation a preceding NormQuantize produced."""

    def _configure(self, recipe, kernels, fallback) -> None:
        super()._configure(recipe, kernels, fallback)
        a = self.recipe.fprop.a
        if self.recipe.fprop.is_hp or a.granularity != "rowwise" or a.scaling != "dynamic":
            raise ValueError(f"a fused norm+quantize feeds a dynamic rowwise fprop; got {self.recipe.fprop.describe()}")
        self.handoff: _Handoff | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.handoff.take(x) if self.handoff is not None and not torch.is_grad_enabled() else None
        if pre is None:
            return super().forward(x)
        y2d = self.fprop_prequantized(*pre, out_dtype=x.dtype)
        y = y2d.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def fprop_prequantized(self, a_fp8: torch.Tensor, scale_a: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """a_fp8 [M, K] · Wᵀ with rowwise dequant ``scale_a`` [M, 1] -> [M, N]."""
        g, w = self.recipe.fprop, self.weight
        b = self._cached_weight("fprop", w)
        w_fp8, s_w = (b.data, b.scale) if not isinstance(b, torch.Tensor) else quantize_operand(w, g.b)
        if self.kernels["fprop"].backend == "scaled_mm" and a_fp8.is_cuda and g.b.granularity == "rowwise":
            out = torch._scaled_mm(a_fp8.contiguous(), w_fp8.t(), scale_a=scale_a.float().contiguous(),
                                   scale_b=s_w.float().reshape(1, -1).contiguous(), out_dtype=torch.bfloat16)
            return out.to(out_dtype)
        a_dq = dequantize(a_fp8, scale_a)
        w_dq = dequantize(w_fp8, s_w, block=operand_block(g.b, w.shape))
        return (a_dq @ w_dq.t()).to(out_dtype)


def _fits(recipe: Recipe) -> str:
    a = recipe.fprop.a
    if recipe.fprop.is_hp or a.granularity != "rowwise" or a.scaling != "dynamic":
        return f"the Linear's fprop is {recipe.fprop.describe()}; the fused kernel feeds a dynamic rowwise FP8 fprop"
    return ""


def apply(model: nn.Module, report=None, *, sample, recipe: Recipe | str = "rowwise", kernels="auto",
          backend: str = "auto", flow: Dataflow | None = None, only_fp8: bool = False,
          only: set[str] | None = None) -> ModResult:
    """Fuse every Norm -> Linear block where the Linear is the norm's only consumer (serving path).

    ``only_fp8``: take only Linears that are already Float8Linear (a plan's FP8 sites), so a
    site the plan keeps in bf16 stays bf16. After the rewrite the model runs ``sample`` once without grad; a block whose
    Linear did not receive the norm's output directly (e.g. a copy was made in
    between) is put back and reported as skipped.
    """
    recipe = as_recipe(recipe)
    flow = flow or record(model, sample)
    shapes = {c.fqn: c for c in flow.calls}
    done, skipped = [], []
    for block in flow.norm_to_linear():
        norm = get_module(model, block.norm)
        info, why = norm_info(norm)
        lin_fqn = block.linears[0]
        if only is not None and lin_fqn not in only:
            continue
        if info is None or not block.exclusive or len(block.linears) != 1:
            skipped.append((block.norm, why or "the norm's output has other consumers than one Linear"))
            continue
        lin = get_module(model, lin_fqn)
        if type(lin) not in (nn.Linear, Float8Linear):
            skipped.append((block.norm, f"{lin_fqn} is a {type(lin).__name__}, not a Linear this mod can take"))
            continue
        if only_fp8 and not isinstance(lin, Float8Linear):
            skipped.append((block.norm, f"{lin_fqn} is kept in high precision (not an FP8 site)"))
            continue
        site_recipe = lin.recipe if isinstance(lin, Float8Linear) else recipe
        why = _fits(site_recipe)
        if why:
            skipped.append((block.norm, why))
            continue
        site_kernels = {g: k.name for g, k in lin.kernels.items()} if isinstance(lin, Float8Linear) else kernels
        new_lin = PrequantFloat8Linear.from_linear(lin, recipe=site_recipe, kernels=site_kernels)
        new_norm = NormQuantize(norm, site_recipe.fprop.a.format, backend)
        new_lin.handoff = new_norm.handoff
        set_module(model, block.norm, new_norm)
        set_module(model, lin_fqn, new_lin)
        done.append((block, norm, lin, new_norm, info))
    changes = _verify(model, sample, done, shapes, skipped)
    return ModResult(NAME, EXACT, "norm and FP8 cast of the next Linear's input fused into one pass (serving, no grad)",
                     tuple(changes), tuple(skipped))


def _verify(model, sample, done, shapes, skipped) -> list[SiteChange]:
    """Run ``sample`` without grad; put back blocks whose hand-off was not taken."""

    with torch.no_grad():
        run_sample(model, sample)
    changes = []
    for block, norm, lin, new_norm, info in done:
        lin_fqn = block.linears[0]
        if new_norm.fused_calls == 0 or new_norm.handoff.placeholder is not None:
            set_module(model, block.norm, norm)
            set_module(model, lin_fqn, lin)
            skipped.append((block.norm, f"{lin_fqn} did not receive the norm's output directly (a copy in between)"))
            continue
        new_norm.fused_calls = 0
        m = shapes[lin_fqn].in_shape
        changes.append(SiteChange(f"{block.norm} -> {lin_fqn}", f"{info.kind} (hp out) + amax + cast + FP8 GEMM {m}",
                                  "fused norm+quantize (fp8 + row scale out) + FP8 GEMM on it (no grad only)"))
    return changes
