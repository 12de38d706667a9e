"""Mod 5: Norm -> FP8 Linear blocks compute the norm and the FP8 activation in one pass (training and serving).

Unfused, a Norm -> Float8Linear block writes the normalized ``y`` in hp, then
the FP8 GEMM path reads ``y`` for its amax, reads it again to cast, and writes
``y_fp8``. A normalized row is complete in registers when the norm kernel has
it, so ``loka.kernels.triton_norm_quant.fused_norm_quant`` writes only
``y_fp8`` and one scale per row (bytes per element: 9 unfused vs 3 fused).

The block keeps its modules and ``state_dict`` keys:

- the norm becomes :class:`NormQuantize` (same ``weight`` / ``bias``
  Parameters). It runs the fused kernel (Triton on CUDA or the Triton
  interpreter, the PyTorch reference elsewhere), hands ``(y_fp8, scale)`` to
  the Linear, and returns a *placeholder* of ``y``'s shape that holds no data
  (a NaN expanded with stride 0);
- the Linear becomes :class:`PrequantFloat8Linear`, which recognizes the
  placeholder (by storage) and runs its fprop on the pre-quantized operand:
  no amax pass, no cast pass.

With grad enabled (training) the placeholder is the output of an autograd
function (loka.mods.norm_quant_autograd), so the gradient of the norm's
output reaches the norm through it: dgrad as in Float8Linear, wgrad on ``y``
recomputed from the norm's input, the norm's backward by PyTorch's norm
(costs and savings in that module). The placeholder is only safe because the mod
checks on the recorded dataflow that the Linear is the norm's only consumer;
if anything else ever read it, it would read NaN, not a plausible number.
Exactness: same FP8 bytes as rowwise quantization of the float32 norm output
(an fp32 model's unfused path is identical, forward and backward; a bf16
model's rounds ``y`` to bf16 first, so the fused one is if anything closer to exact).
Every kernel but ``scaled_mm`` runs the pre-quantized fprop as ``emulated`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from loka.kernels.backend_scaled_mm import ScaledMMKernel
from loka.kernels.kernel import Quantized
from loka.kernels.triton_gemm import triton_available
from loka.kernels.triton_norm_quant import fused_norm_quant, norm_quant_reference
from loka.mods.graph import Dataflow, record, run_sample
from loka.mods.norm_quant_autograd import NormQuantFn, PrequantLinearFn, Produced, autocast_state, hp_norm
from loka.mods.norms import norm_info
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.nn import Float8Linear, _compute_dtype
from loka.quantize import dequantize, operand_block, quantize_operand
from loka.recipe import Recipe, as_recipe

NAME = "fused_norm_quant"
EXACT = True


class _Handoff:
    """The pre-quantized activation passed from a NormQuantize to its Linear (plain object)."""

    def __init__(self) -> None:
        self.placeholder: torch.Tensor | None = None
        self.produced: Produced | None = None

    def put(self, placeholder: torch.Tensor, produced: Produced) -> None:
        self.placeholder, self.produced = placeholder, produced

    def take(self, x: torch.Tensor) -> Produced | None:
        """What the norm produced when ``x`` is (a view of) its placeholder, else None."""
        p = self.placeholder
        if p is None or x.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() or x.shape[-1] != p.shape[-1]:
            return None
        out = self.produced
        self.placeholder = self.produced = None
        return out


def norm_quant(x, weight, bias, *, kind: str, eps: float, fmt: str, backend: str = "auto", pow2_scale: bool = False):
    """(y_fp8[..., N], scale[..., 1]) by the fused Triton kernel or the PyTorch reference."""

    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r} is not valid; use 'auto', 'triton' or 'reference'")
    use_triton = backend == "triton" or (backend == "auto" and triton_available(x.device)[0])
    if use_triton:
        return fused_norm_quant(x, weight, bias, kind=kind, eps=eps, fmt=fmt, pow2_scale=pow2_scale)
    y_fp8, scale, _ = norm_quant_reference(x, weight, bias, kind=kind, eps=eps, fmt=fmt, pow2_scale=pow2_scale)
    return y_fp8, scale


class NormQuantize(nn.Module):
    """A LayerNorm/RMSNorm that emits FP8 + row scales for the next FP8 Linear (with or without grad)."""

    def __init__(self, norm: nn.Module, fmt: str = "e4m3", backend: str = "auto", pow2_scale: bool = False) -> None:
        super().__init__()
        info, why = norm_info(norm)
        if info is None:
            raise ValueError(f"NormQuantize needs a norm over the last dim: {why}")
        self.kind, self.eps, self.normalized_shape = info.kind, info.eps, (info.channels,)
        self.hp_eps = getattr(norm, "eps", info.eps)  # as the unfused norm passes it (RMSNorm: maybe None)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        self.fmt, self.backend, self.pow2_scale = fmt, backend, pow2_scale
        self.handoff = _Handoff()
        self.fused_calls = 0
        self._dtypes: dict[tuple, torch.dtype] = {}

    def _hp(self, x: torch.Tensor) -> torch.Tensor:
        return hp_norm(x, self.weight, self.bias, self.kind, self.normalized_shape, self.hp_eps)

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the unfused norm would output here (autocast may change it): asked of PyTorch once."""
        key = (x.dtype, None if self.weight is None else self.weight.dtype, *autocast_state(x.device.type))
        if key not in self._dtypes:
            with torch.no_grad():
                self._dtypes[key] = self._hp(x.reshape(-1, x.shape[-1])[:0]).dtype
        return self._dtypes[key]

    def _quantize(self, x, weight, bias):
        return norm_quant(x, weight, bias, kind=self.kind, eps=self.eps, fmt=self.fmt, backend=self.backend,
                          pow2_scale=self.pow2_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        placeholder = NormQuantFn.apply(x, self.weight, self.bias, self, self._quantize, self._out_dtype(x))
        self.fused_calls += 1
        return placeholder

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.normalized_shape}, eps={self.eps}, fmt={self.fmt}, backend={self.backend}"


class PrequantFloat8Linear(Float8Linear):
    """Float8Linear whose fprop takes the FP8 activation a preceding NormQuantize produced."""

    def _configure(self, recipe, kernels, fallback) -> None:
        super()._configure(recipe, kernels, fallback)
        why = _fits(self.recipe)
        if why:
            raise ValueError(f"PrequantFloat8Linear: {why}")
        self.handoff: _Handoff | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.handoff.take(x) if self.handoff is not None else None
        if pre is None:
            return super().forward(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dim is {x.shape[-1]}, this layer takes in_features={self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        detached = [None if t is None else t.detach() for t in (pre.x, pre.weight, pre.bias)]
        y2d = PrequantLinearFn.apply(x2d, self.weight, *detached, self, pre, _compute_dtype(x))
        y = y2d.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def fprop_prequantized(self, a_fp8: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor,
                           out_dtype: torch.dtype, *, weight_param: torch.Tensor | None = None) -> torch.Tensor | None:
        """a_fp8 [M, K] · Wᵀ with rowwise dequant ``scale_a`` [M, 1] -> [M, N], as ``run_gemm("fprop")``
        would compute it on the same activation; None when the kernel cannot take the shape.

        ``scaled_mm`` kernels run ``torch._scaled_mm`` as ScaledMMKernel does; every other kernel
        gets the emulated GEMM (dequantize, float32 matmul), which is ``emulated`` itself.
        """
        kernel, g = self.kernels["fprop"], self.recipe.fprop
        shape = (a_fp8.shape[0], a_fp8.shape[1], weight.shape[0])
        if not kernel.supports(g, shape, out_dtype, a_fp8.device).ok:
            return None
        q = None
        if weight_param is not None and kernel.takes_quantized_b:
            q = self.weight_cache.get("fprop", weight_param, g.b, transpose=False)
        if q is None:
            q = Quantized(*quantize_operand(weight.contiguous(), g.b, self.scale_state.scale_for("fprop", "weight", weight)))
        if isinstance(kernel, ScaledMMKernel):
            return _scaled_mm(kernel, a_fp8, scale_a, q, g, out_dtype)
        with torch.autocast(a_fp8.device.type, enabled=False):
            a_dq = dequantize(a_fp8, scale_a)
            w_dq = dequantize(q.data, q.scale, block=operand_block(g.b, q.data.shape))
            return (a_dq @ w_dq.t()).to(out_dtype)


def _scaled_mm(kernel, a_fp8, scale_a, q: Quantized, g, out_dtype):
    """ScaledMMKernel.mm's call on an activation quantized beforehand (rowwise: both operands)."""
    n = q.data.shape[0]
    sb = q.scale.expand(n, 1) if q.scale.dim() == 0 else q.scale
    mm_dtype = torch.bfloat16 if a_fp8.is_cuda and out_dtype == torch.float32 else out_dtype
    out = torch._scaled_mm(a_fp8.contiguous(), q.data.contiguous().t(), scale_a=scale_a.float().contiguous(),
                           scale_b=sb.float().reshape(1, n).contiguous(), out_dtype=mm_dtype,
                           use_fast_accum=kernel.fast_accum)
    return out.to(out_dtype)


def _fits(recipe: Recipe) -> str:
    a = recipe.fprop.a
    if recipe.fprop.is_hp or a.granularity != "rowwise" or a.scaling != "dynamic":
        return f"the Linear's fprop is {recipe.fprop.describe()}; the fused kernel feeds a dynamic rowwise FP8 fprop"
    if a.nonfinite != "skip":
        return "the fprop input's recipe raises on NaN/Inf (nonfinite='raise'); the fused kernel skips them in its amax"
    return ""


def apply(model: nn.Module, report=None, *, sample, recipe: Recipe | str = "rowwise", kernels="auto",
          backend: str = "auto", flow: Dataflow | None = None, only_fp8: bool = False,
          only: set[str] | None = None) -> ModResult:
    """Fuse every Norm -> Linear block where the Linear is the norm's only consumer (training and serving).

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
        fallback = lin.fallback if isinstance(lin, Float8Linear) else "error"
        new_lin = PrequantFloat8Linear.from_linear(lin, recipe=site_recipe, kernels=site_kernels, fallback=fallback)
        a = site_recipe.fprop.a
        new_norm = NormQuantize(norm, a.format, backend, pow2_scale=a.pow2)
        new_lin.handoff = new_norm.handoff
        set_module(model, block.norm, new_norm)
        set_module(model, lin_fqn, new_lin)
        done.append((block, norm, lin, new_norm, info))
    changes = _verify(model, sample, done, shapes, skipped)
    return ModResult(NAME, EXACT, "norm and FP8 cast of the next Linear's input fused into one pass (training and serving)",
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
                                  "fused norm+quantize (fp8 + row scale out) + FP8 GEMM on it; backward recomputes the hp norm"))
    return changes
