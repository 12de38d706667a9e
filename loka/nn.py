"""``Float8Linear``: an ``nn.Linear`` whose three GEMMs each run through a chosen kernel.

It *is* an ``nn.Linear`` (same Parameters, same ``state_dict`` keys), so
checkpoints load in both directions and code that looks for Linears still finds
it. What changes is the autograd function: for ``y = x Wᵀ + b``

    fprop  y[M,N]  = x[M,K]    · W[N,K]ᵀ      kernels["fprop"]
    dgrad  dx[M,K] = dy[M,N]   · Wᵀ[K,N]ᵀ     kernels["dgrad"]
    wgrad  dW[N,K] = dyᵀ[N,M]  · xᵀ[K,M]ᵀ     kernels["wgrad"]

each GEMM is one ``GemmKernel.mm`` call with the recipe's operand casts, so a
plan can choose a different kernel (or hp) per GEMM. When a kernel cannot take
a shape seen at run time (e.g. wgrad's K = batch size not a multiple of 16),
the module either raises (``fallback="error"``) or runs that GEMM in hp and
records why in ``fallbacks`` (``fallback="hp"``).

The weight is cast to FP8 once per weight version, not per call: fprop's ``W``
and dgrad's ``Wᵀ`` (with their scales) live in ``weight_cache``
(loka/weight_cache.py) until an optimizer step (or any in-place update) bumps
the weight's version counter, in training and serving alike.
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import nn

from loka.aten_gemms import engine_scope, observing, report
from loka.kernels import KERNELS
from loka.kernels.kernel import GemmKernel, Quantized, auto_preference
from loka.kernels.padded import kernel_by_name
from loka.quantize import quantize_operand
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, Recipe, as_recipe
from loka.scaling import ScaleState
from loka.weight_cache import WeightCache, function_output

Fallback = Literal["error", "hp"]


def resolve_kernels(recipe: Recipe, kernels: str | Mapping[str, str], device: torch.device | str = "cpu") -> tuple[Recipe, dict[str, GemmKernel]]:
    """Kernel per GEMM from a name, ``"auto"`` or a ``{gemm: name}`` map.

    A GEMM given the ``bf16`` kernel runs in hp, so its recipe becomes hp.
    ``"auto"`` takes the first kernel by ``auto_rank`` that is available and
    takes the recipe (``emulated`` always does).
    """

    names = {g: kernels for g in GEMMS} if isinstance(kernels, str) else dict(kernels)
    unknown = set(names) - set(GEMMS)
    if unknown:
        raise ValueError(f"kernels has unknown GEMM names {sorted(unknown)}; use {list(GEMMS)}")
    chosen: dict[str, GemmKernel] = {}
    for gemm in GEMMS:
        g = recipe.gemm(gemm)
        name = names.get(gemm, "auto")
        if g.is_hp or (name != "auto" and kernel_by_name(name).hp):
            recipe = recipe.with_gemm(gemm, HP_GEMM)
            chosen[gemm] = KERNELS.get("bf16")
            continue
        if name == "auto":
            name = next(n for n in auto_preference() if _fits_recipe(KERNELS.get(n), g, device))
        kernel = kernel_by_name(name)  # "<kernel>+pad" pads K and N inside the call (loka.kernels.padded)
        ok, why = kernel.available(device)
        if not ok:
            raise ValueError(f"kernel {name!r} for {gemm} is not available here: {why}")
        chosen[gemm] = kernel
    return recipe, chosen


def _fits_recipe(kernel: GemmKernel, g, device) -> bool:
    """Whether ``kernel`` runs here and takes the recipe at an aligned shape."""
    return bool(kernel.available(device)) and bool(kernel.supports(g, (16, 16, 16), torch.float32, device))


class Float8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` with FP8 GEMMs.

    >>> m = Float8Linear(64, 32, recipe="rowwise", kernels="emulated")
    >>> m(torch.randn(8, 64)).shape
    torch.Size([8, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        recipe: Recipe | str = "tensorwise",
        kernels: str | Mapping[str, str] = "auto",
        fallback: Fallback = "error",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._configure(recipe, kernels, fallback)

    def _configure(self, recipe, kernels, fallback) -> None:
        if fallback not in ("error", "hp"):
            raise ValueError(f"fallback={fallback!r} is not valid; use 'error' or 'hp'")
        device = self.weight.device
        self.recipe, self.kernels = resolve_kernels(as_recipe(recipe), kernels, device)
        self.fallback = fallback
        self.fallbacks: dict[str, str] = {}  # gemm -> why it ran in hp
        self.ran = {g: {"fp8": 0, "hp": 0} for g in GEMMS}  # GEMMs run, by how (loka.aten_gemms)
        self.expected = {g: 0 for g in GEMMS}  # GEMMs the forwards so far imply
        self.loka_site = getattr(self, "loka_site", None)  # the fqn, set by loka.convert
        self.scale_state = ScaleState(self.recipe)
        self.weight_cache = WeightCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recipe: Recipe | str = "tensorwise", kernels: str | Mapping[str, str] = "auto", fallback: Fallback = "error") -> "Float8Linear":
        """Wrap an existing Linear, reusing its Parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new._configure(recipe, kernels, fallback)
        return new

    def set_static_scale(self, role: str, scale: float, gemm: str | None = None) -> list[str]:
        """Calibrated dequant scale for a statically-scaled operand (see loka.scaling)."""
        return self.scale_state.set_static_scale(role, scale, gemm)

    def extra_repr(self) -> str:
        ks = ", ".join(f"{g}={self.kernels[g].name}" for g in GEMMS)
        return f"{super().extra_repr()}, recipe={self.recipe.name}, {ks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dim is {x.shape[-1]}, this layer takes in_features={self.in_features}")
        compute_dtype = _compute_dtype(x)
        x2d = x.reshape(-1, self.in_features)
        y2d = _Float8LinearFn.apply(x2d, self.weight, self, compute_dtype)
        y = y2d.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # --- the three GEMMs, each through its kernel -------------------------------------
    def run_gemm(self, gemm: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, *,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        """``a · bᵀ`` of ``gemm``; ``weight`` is the Parameter ``b`` derives from (fprop: ``W``,
        dgrad: ``Wᵀ``), which lets the kernel take its cached FP8 copy."""
        kernel, g = self.kernels[gemm], self.recipe.gemm(gemm)
        shape = (a.shape[0], a.shape[1], b.shape[0])
        if not kernel.hp:
            ok, why = kernel.supports(g, shape, a.dtype, a.device)
            if not ok:
                if self.fallback == "error":
                    raise ValueError(
                        f"{gemm} of Float8Linear({self.in_features}, {self.out_features}) with kernel "
                        f"{kernel.name!r} cannot run [M={shape[0]}, K={shape[1]}, N={shape[2]}]: {why}; pad the "
                        "shape (loka.mods padding) or pass fallback='hp'"
                    )
                self.fallbacks[gemm] = f"{kernel.name}: {why}"
                kernel, g = self.kernels_hp(), HP_GEMM
        if torch.compiler.is_compiling():  # counts are Python state a traced graph cannot update
            return self._mm(gemm, kernel, g, a, b, out_dtype, weight)
        self.ran[gemm]["hp" if kernel.hp else "fp8"] += 1
        if not observing():
            return self._mm(gemm, kernel, g, a, b, out_dtype, weight)
        with engine_scope():  # the kernel's own ops are not the model's GEMMs
            out = self._mm(gemm, kernel, g, a, b, out_dtype, weight)
        report(self.loka_site, gemm, 2.0 * shape[0] * shape[1] * shape[2], not kernel.hp, "Float8Linear",
               self.fallbacks.get(gemm, "") if kernel.hp else "", shape, param=self.weight)
        return out

    def _mm(self, gemm, kernel, g, a, b, out_dtype, weight):
        if kernel.hp:
            return kernel.mm(a.to(out_dtype), b.to(out_dtype), g, out_dtype=out_dtype)
        a_role, b_role = GEMM_ROLES[gemm]
        scale_a = self.scale_state.scale_for(gemm, a_role, a)
        b_in = None
        if b_role == "weight" and weight is not None and kernel.takes_quantized_b:
            b_in = self.weight_cache.get(gemm, weight, g.b, transpose=gemm == "dgrad")
        if b_in is None:
            b_in = b.contiguous()
        scale_b = self.scale_state.scale_for(gemm, b_role, b) if not isinstance(b_in, Quantized) else None
        return kernel.mm(a, b_in, g, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    def kernels_hp(self) -> GemmKernel:
        return KERNELS.get("bf16")

    def _cached_weight(self, gemm: str, w: torch.Tensor) -> torch.Tensor | Quantized:
        """``gemm``'s FP8 weight from the cache, or ``w`` itself where it is not cached."""
        q = self.weight_cache.get(gemm, w, self.recipe.gemm(gemm).b, transpose=gemm == "dgrad")
        return w if q is None else q

    def invalidate_weight_cache(self) -> None:
        """Forget the FP8 weights (after an update the version counter cannot see, e.g. via ``.data``)."""
        self.weight_cache.invalidate()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _Float8LinearFn(torch.autograd.Function):
    """y = x Wᵀ with fprop, dgrad and wgrad each through the module's kernels."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, module: Float8Linear, compute_dtype: torch.dtype):
        ctx.module, ctx.compute_dtype = module, compute_dtype
        ctx.weight_is_param = weight is module.weight  # then backward may use the weight cache
        ctx.save_for_backward(x2d, weight)
        if not torch.compiler.is_compiling():
            module.expected["fprop"] += 1
            module.expected["dgrad"] += int(ctx.needs_input_grad[0])
            module.expected["wgrad"] += int(ctx.needs_input_grad[1])
        # [M, K] · [N, K]ᵀ -> [M, N]
        y = module.run_gemm("fprop", x2d, weight, compute_dtype, weight=weight if ctx.weight_is_param else None)
        return function_output(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        module, dt = ctx.module, ctx.compute_dtype
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dgrad: [M, N] · ([K, N])ᵀ -> [M, K]
            w_param = module.weight if ctx.weight_is_param else None
            dx = module.run_gemm("dgrad", dy, weight.t(), dt, weight=w_param).to(x2d.dtype)
        if ctx.needs_input_grad[1]:
            # wgrad: [N, M] · ([K, M])ᵀ -> [N, K]
            dw = module.run_gemm("wgrad", dy.t().contiguous(), x2d.t().contiguous(), dt).to(weight.dtype)
        return dx, dw, None, None
