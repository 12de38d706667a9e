"""Mod 5: Norm -> FP8 Linear blocks compute the norm and the FP8 activation in one pass (training and serving).

Unfused, a Norm -> Float8Linear block writes the normalized ``y`` in hp, then
the FP8 GEMM path reads ``y`` for its amax, reads it again to cast, and writes
``y_fp8``. A normalized row is complete in registers when the norm kernel has
it, so ``loka.kernels.triton_norm_quant.fused_norm_quant`` writes only
``y_fp8`` and one scale per row (bytes per element: 9 unfused vs 3 fused).

The mod only takes blocks where the Linear is the norm's *only* consumer (checked on
the recorded dataflow), so the norm can be *deferred into the Linear's call*. The
block keeps its modules and ``state_dict`` keys:

- the norm becomes :class:`DeferredNorm` (same ``weight`` / ``bias`` Parameters),
  a pass-through that returns its input unchanged;
- the Linear becomes :class:`NormQuantFloat8Linear` (same Parameters), which holds
  the DeferredNorm outside the module tree and, on the raw norm input, runs one
  autograd function (loka.mods.norm_quant_autograd): the fused norm + rowwise
  cast (Triton on CUDA or the Triton interpreter, the PyTorch reference
  elsewhere), then fprop on the pre-quantized operand (no amax pass, no cast
  pass); backward: dgrad as in Float8Linear, wgrad on ``y`` recomputed from the
  norm's input, the norm's backward by PyTorch's norm (costs in that module).

No Python state passes between the two modules on the hot path, so torch.compile
traces the block without a graph break (one graph for LayerNorm -> fused Linear ->
SiLU -> Linear, with grad and without). Whether the Linear really receives the
norm's output unchanged (no copy, cast, other op or in-place write in between) is
checked once, when the mod is applied: a flag-guarded probe during one sample run
(``_verify``), which costs nothing afterwards; a block that fails is put back and
reported as skipped. A forward hook on the DeferredNorm sees the norm's input,
not its output.

Exactness: same FP8 bytes as rowwise quantization of the float32 norm output
(an fp32 model's unfused path is identical, forward and backward; a bf16
model's rounds ``y`` to bf16 first, so the fused one is if anything closer to exact).
Every kernel but ``scaled_mm`` runs the pre-quantized fprop as ``emulated`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from loka.kernels.kernel import Quantized, reference_kernel
from loka.kernels.triton_gemm import triton_available
from loka.kernels.triton_norm_quant import fused_norm_quant, fused_norm_quant_op, norm_quant_reference
from loka.mods.graph import Dataflow, record, run_sample
from loka.mods.norm_quant_autograd import NormQuantLinearFn, autocast_state, hp_norm
from loka.mods.norms import norm_info
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.nn import Float8Linear
from loka.weight_cache import compiling
from loka.quantize import quantize_operand
from loka.recipe import Recipe, as_recipe
from loka.mods.spec import ModSpec

NAME = "fused_norm_quant"
EXACT = True


_TRITON_RUNS: dict[str, bool] = {}  # device -> triton_available, asked once (not from inside every compiled call)


def _triton_runs_on(device: torch.device) -> bool:
    key = str(device)
    ok = _TRITON_RUNS.get(key)
    if ok is None:
        ok = _TRITON_RUNS[key] = triton_available(device)[0]
    return ok


def norm_quant(x, weight, bias, *, kind: str, eps: float, fmt: str, backend: str = "auto", pow2_scale: bool = False):
    """(y_fp8[..., N], scale[..., 1]) by the fused Triton kernel or the PyTorch reference."""

    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r} is not valid; use 'auto', 'triton' or 'reference'")
    use_triton = backend == "triton" or (backend == "auto" and _triton_runs_on(x.device))
    if use_triton:
        op = fused_norm_quant_op()  # opaque to torch.compile: one graph node, not a traced launcher
        if op is not None:
            return op(x, weight, bias, kind, float(eps), fmt, bool(pow2_scale))
        return fused_norm_quant(x, weight, bias, kind=kind, eps=eps, fmt=fmt, pow2_scale=pow2_scale)
    y_fp8, scale, _ = norm_quant_reference(x, weight, bias, kind=kind, eps=eps, fmt=fmt, pow2_scale=pow2_scale)
    return y_fp8, scale


class DeferredNorm(nn.Module):
    """A LayerNorm/RMSNorm whose work runs inside the next Linear's call: returns its input.

    It keeps the norm's ``weight`` / ``bias`` Parameters (same ``state_dict`` keys) and what the
    fused kernel and the exact backward need; the :class:`NormQuantFloat8Linear` it feeds reads
    them. ``probe`` is None except while ``apply`` checks the block (see ``_verify``).
    """

    def __init__(self, norm: nn.Module, fmt: str = "e4m3", backend: str = "auto", pow2_scale: bool = False) -> None:
        super().__init__()
        info, why = norm_info(norm)
        if info is None:
            raise ValueError(f"DeferredNorm needs a norm over the last dim: {why}")
        self.kind, self.eps, self.normalized_shape = info.kind, info.eps, (info.channels,)
        self.hp_eps = getattr(norm, "eps", info.eps)  # as the unfused norm passes it (RMSNorm: maybe None)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        self.fmt, self.backend, self.pow2_scale = fmt, backend, pow2_scale
        self.probe: list | None = None
        self._dtypes: dict[tuple, torch.dtype] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is not None:  # only during apply's check run
            self.probe.append(("norm", x, x._version))
        return x

    def quantize(self, x, weight, bias):
        """(y_fp8, row scale) of the norm of ``x`` (detached inputs)."""
        return norm_quant(x, weight, bias, kind=self.kind, eps=self.eps, fmt=self.fmt, backend=self.backend,
                          pow2_scale=self.pow2_scale)

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the unfused norm outputs here without autocast: asked of PyTorch on zero rows
        (cached in eager; under torch.compile the zero-row call is traced and its dtype is static)."""
        key = (x.dtype, None if self.weight is None else self.weight.dtype)
        if compiling() or key not in self._dtypes:
            with torch.no_grad():
                dtype = hp_norm(x.reshape(-1, x.shape[-1])[:0], self.weight, self.bias, self.kind,
                                self.normalized_shape, self.hp_eps).dtype
            if compiling():
                return dtype
            self._dtypes[key] = dtype
        return self._dtypes[key]

    def extra_repr(self) -> str:
        return (f"{self.kind}, {self.normalized_shape}, eps={self.eps}, fmt={self.fmt}, backend={self.backend}, "
                "deferred into the next Linear")


class NormQuantFloat8Linear(Float8Linear):
    """Float8Linear that takes the raw input of the norm before it (a :class:`DeferredNorm`) and runs
    norm + rowwise FP8 cast in one pass, then its fprop on that FP8 activation (one autograd function).

    The norm is held outside the module tree (in a tuple), so its Parameters are not listed twice.
    ``fused_calls`` counts eager calls (it does not change inside a torch.compile graph).
    """

    def _configure(self, recipe, kernels, fallback) -> None:
        super()._configure(recipe, kernels, fallback)
        why = _fits(self.recipe)
        if why:
            raise ValueError(f"NormQuantFloat8Linear: {why}")
        self._deferred: tuple[DeferredNorm, ...] = ()
        self.fused_calls = 0

    def attach(self, norm: DeferredNorm) -> None:
        """Take ``norm``'s work into this Linear's call."""
        if not isinstance(norm, DeferredNorm) or norm.normalized_shape != (self.in_features,):
            raise ValueError(f"NormQuantFloat8Linear({self.in_features}, ...) needs a DeferredNorm over "
                             f"{self.in_features} channels, got {norm!r}")
        self._deferred = (norm,)

    @property
    def norm(self) -> DeferredNorm:
        if not self._deferred:
            raise ValueError("this NormQuantFloat8Linear has no DeferredNorm attached; "
                             "build the block with loka.mods.fused_norm_quant.apply")
        return self._deferred[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if norm.probe is not None:  # only during apply's check run
            norm.probe.append(("linear", x, x._version))
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dim is {x.shape[-1]}, this layer takes in_features={self.in_features}")
        device = x.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else norm.out_dtype(x)
        x2d = x.reshape(-1, self.in_features)
        y2d = NormQuantLinearFn.apply(x2d, norm.weight, norm.bias, self.weight, norm, self, compute_dtype,
                                      autocast_state(device))
        if not compiling():
            self.fused_calls += 1
        y = y2d.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = self._deferred[0].kind if self._deferred else "no norm attached"
        return f"{super().extra_repr()}, norm+quantize of its input fused in ({kind})"

    def fprop_prequantized(self, a_fp8: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor,
                           out_dtype: torch.dtype, *, weight_param: torch.Tensor | None = None) -> torch.Tensor | None:
        """a_fp8 [M, K] · Wᵀ with rowwise dequant ``scale_a`` [M, 1] -> [M, N], as ``run_gemm("fprop")``
        would compute it on the same activation; None when the kernel cannot take the shape.

        Kernels that take a pre-quantized ``a`` (``scaled_mm``, ``emulated``) run it themselves;
        every other kernel gets the emulated GEMM (dequantize, float32 matmul).
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
        run = kernel if kernel.takes_quantized_a else reference_kernel()
        return run.mm(Quantized(a_fp8, scale_a), q, g, out_dtype=out_dtype)


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
    Linear did not receive the norm's output unchanged (e.g. a copy, a cast or an in-place write in
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
        new_lin = NormQuantFloat8Linear.from_linear(lin, recipe=site_recipe, kernels=site_kernels, fallback=fallback)
        a = site_recipe.fprop.a
        new_norm = DeferredNorm(norm, a.format, backend, pow2_scale=a.pow2)
        new_lin.attach(new_norm)
        set_module(model, block.norm, new_norm)
        set_module(model, lin_fqn, new_lin)
        done.append((block, norm, lin, new_norm, info))
    skipped += _op_between(model, flow, only, only_fp8)
    changes = _verify(model, sample, done, shapes, skipped)
    return ModResult(NAME, EXACT, "norm and FP8 cast of the next Linear's input fused into one pass (training and serving)",
                     tuple(changes), tuple(skipped))


def _op_between(model, flow: Dataflow, only, only_fp8: bool) -> list[tuple[str, str]]:
    """Why a norm one op away from a Linear (``norm -> *2 -> Linear``, dropout, ...) is not
    fused: the Linear does not read the norm's output, so the norm cannot be deferred into it."""
    blocks = {b.norm for b in flow.norm_to_linear()}
    linears = flow._single("linear")
    out = []
    for fqn, norm in flow._single("norm").items():
        made = flow.edges.get(norm.output, set())
        for lin_fqn, lin in linears.items():
            if fqn in blocks or lin.input not in made or (only is not None and lin_fqn not in only):
                continue
            if only_fp8 and not isinstance(get_module(model, lin_fqn), Float8Linear):
                continue
            ops = sorted({c[3:] for c in flow.consumers[norm.output] if c.startswith("op:")}) or ["another op"]
            out.append((fqn, f"{lin_fqn} reads the norm's output through {', '.join(ops)}, not the output itself"))
    return out


def _verify(model, sample, done, shapes, skipped) -> list[SiteChange]:
    """Run ``sample`` once without grad with each DeferredNorm's probe on; put back blocks whose
    Linear did not get the norm's input rows unchanged (same tensor or a same-rows view, no write
    since). The probes are off again afterwards, so the check costs nothing in later calls."""

    for _, _, _, new_norm, _ in done:
        new_norm.probe = []
    try:
        with torch.no_grad():
            run_sample(model, sample)
        seen = [list(new_norm.probe) for _, _, _, new_norm, _ in done]
    finally:
        for _, _, _, new_norm, _ in done:
            new_norm.probe = None
    changes = []
    for (block, norm, lin, new_norm, info), probe in zip(done, seen):
        lin_fqn = block.linears[0]
        new_lin = get_module(model, lin_fqn)
        if not _received_unchanged(probe):
            set_module(model, block.norm, norm)
            set_module(model, lin_fqn, lin)
            why = f"{lin_fqn} did not receive the norm's output directly (a copy, cast or write in between)"
            skipped.append((block.norm, why))
            continue
        new_lin.fused_calls = 0
        m = shapes[lin_fqn].in_shape
        changes.append(SiteChange(f"{block.norm} -> {lin_fqn}", f"{info.kind} (hp out) + amax + cast + FP8 GEMM {m}",
                                  "norm deferred into the Linear: fused norm+quantize (fp8 + row scale) + FP8 GEMM on it; "
                                  "backward recomputes the hp norm"))
    return changes


def _received_unchanged(probe: list) -> bool:
    """Whether the probe saw the norm called once, then the Linear on the same rows, unwritten."""
    if [kind for kind, _, _ in probe] != ["norm", "linear"]:
        return False
    (_, src, version), (_, got, got_version) = probe
    if got is src:
        return got_version == version
    same_rows = (got.dtype == src.dtype and got.shape[-1] == src.shape[-1] and got.numel() == src.numel()
                 and got.is_contiguous() and src.is_contiguous() and got.storage_offset() == src.storage_offset()
                 and got.untyped_storage().data_ptr() == src.untyped_storage().data_ptr())
    return same_rows and got_version == version


MOD = ModSpec(
    name=NAME,
    order=60,
    exact="exact (training and serving)",
    pattern="Norm -> FP8 Linear: norm and FP8 cast in one pass",
    apply=apply,
    show_options=(("kernels", "emulated"),),
    files=("norm_quant_autograd.py",),
)
