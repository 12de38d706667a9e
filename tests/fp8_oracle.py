"""An FP8 Linear built without loka's quantizer: the independent "real conversion" of the tests.

The probe predicts a site's FP8 error with ``loka.quantize``; checking it against a conversion
that runs ``loka.quantize`` too would compare the quantizer with itself. Here each GEMM's
operands are quantized in numpy from the recipe's stated rules (loka/quantize.py's module doc:
dequantization scale ``max(amax * fl32(1/fmax), 2**-126)``, 1 for an all-zero group, groups along the
reduction dim, saturate finite values, round to nearest-even) and cast by ``ml_dtypes``, an
independent float8 implementation; the GEMMs run in float64. Only what the tests need:
tensorwise and rowwise dynamic scaling, optionally power-of-two scales, and hp GEMMs.
"""

from __future__ import annotations

import copy
import warnings

import ml_dtypes
import numpy as np
import torch
from torch import nn

from loka.recipe import as_recipe

ML_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}


def oracle_fake_quantize(x: torch.Tensor, op) -> torch.Tensor:
    """``x[R, C]`` quantized to ``op`` (an OperandRecipe) and back, in float32, by numpy and ml_dtypes."""
    if op.is_hp:
        return x.float()
    if op.granularity not in ("tensorwise", "rowwise") or op.scaling != "dynamic":
        raise ValueError(f"the oracle covers dynamic tensorwise/rowwise scaling, not {op.granularity}/{op.scaling}")
    v = x.detach().cpu().numpy().astype(np.float32)
    ax = np.where(np.isfinite(v), np.abs(v), np.float32(0))
    amax = ax.max(axis=-1, keepdims=True) if op.granularity == "rowwise" else np.array(ax.max(), np.float32)
    fmax = np.float32(FMAX[op.format])
    rcp_fmax = np.float32(1.0 / float(fmax))  # the documented rule: one float32 multiply by fl32(1/fmax)
    scale = np.where(amax > 0, amax * rcp_fmax, np.float32(1)).astype(np.float32)
    scale = np.maximum(scale, np.float32(2.0**-126))
    if op.pow2:
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    q = (v / scale).astype(np.float32)
    q = np.where(np.isfinite(q), np.clip(q, -fmax, fmax), q if op.format == "e5m2" else np.nan).astype(np.float32)
    deq = q.astype(ML_DTYPES[op.format]).astype(np.float32) * scale
    return torch.from_numpy(deq.astype(np.float32)).to(x.device)


def oracle_gemm(a: torch.Tensor, b: torch.Tensor, g) -> torch.Tensor:
    """``a[M,K] · b[N,K]ᵀ`` of GEMM recipe ``g``, operands through the oracle, accumulated in float64."""
    return oracle_fake_quantize(a, g.a).double() @ oracle_fake_quantize(b, g.b).double().t()


class _OracleLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, recipe):
        ctx.save_for_backward(x, weight)
        ctx.recipe = recipe
        x2d = x.reshape(-1, x.shape[-1])
        return oracle_gemm(x2d, weight, recipe.gemm("fprop")).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = oracle_gemm(dy2d, weight.t(), ctx.recipe.gemm("dgrad")).to(x.dtype).reshape(x.shape)
        dw = oracle_gemm(dy2d.t(), x2d.t(), ctx.recipe.gemm("wgrad")).to(weight.dtype)
        return dx, dw, None


class OracleFP8Linear(nn.Module):
    """``y = x Wᵀ + b`` with fprop, dgrad and wgrad each quantized by the oracle (dynamic scaling)."""

    def __init__(self, linear: nn.Linear, recipe) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.recipe = as_recipe(recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _OracleLinearFn.apply(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias


def oracle_convert(model: nn.Module, fqn: str, recipe) -> nn.Module:
    """A copy of ``model`` with the Linear at ``fqn`` replaced by :class:`OracleFP8Linear`."""
    m = copy.deepcopy(model)
    parent_name, _, child = fqn.rpartition(".")
    parent = m.get_submodule(parent_name) if parent_name else m
    linear = getattr(parent, child)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{fqn!r} is a {type(linear).__name__}, not an nn.Linear")
    setattr(parent, child, OracleFP8Linear(linear, recipe))
    return m


def _loss(m: nn.Module, loss_fn) -> float:
    """The loss with the same random stream for every model (dropout-like layers see the same draws)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return float(loss_fn(m))


def oracle_loss_delta(model: nn.Module, fqn: str, recipe, loss_fn) -> dict[str, float]:
    """Loss on one batch before and after converting site ``fqn`` (alone) with the oracle."""
    ref, fp8 = _loss(model, loss_fn), _loss(oracle_convert(model, fqn, recipe), loss_fn)
    return {"loss_ref": ref, "loss_fp8": fp8, "loss_delta": fp8 - ref, "rel_loss_delta": (fp8 - ref) / abs(ref)}


def _rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (written out here, not loka.metrics)."""
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def oracle_conversion_errors(model: nn.Module, fqn: str, recipe, loss_fn) -> dict[str, float]:
    """``{gemm: relative error}`` of site ``fqn`` after the oracle conversion, vs float64 GEMMs of its operands."""
    m = oracle_convert(model, fqn, recipe)
    site = m.get_submodule(fqn)
    seen: dict[str, torch.Tensor] = {}
    def fwd(module, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()

    def bwd(module, grad_input, grad_output):
        seen["dy"] = grad_output[0].detach()
        if grad_input[0] is not None:
            seen["dx"] = grad_input[0].detach()

    hooks = [site.register_forward_hook(fwd), site.register_full_backward_hook(bwd)]
    try:
        m.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "no inputs require gradients" on a first layer is expected
            warnings.simplefilter("ignore", UserWarning)
            loss_fn(m).backward()
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"].reshape(-1, site.in_features).double()
    w = site.weight.detach().double()
    dy = seen["dy"].reshape(-1, site.out_features).double()
    y = seen["y"].reshape(-1, site.out_features).double()
    if site.bias is not None:
        y = y - site.bias.detach().double()
    out = {"fprop": _rel_error(x @ w.T, y), "wgrad": _rel_error(dy.T @ x, site.weight.grad)}
    if "dx" in seen:
        out["dgrad"] = _rel_error(dy @ w, seen["dx"].reshape(-1, site.in_features))
    return out
