"""Sensitivity: how much one site's FP8 error moves the model's loss.

For each site in turn, a forward hook replaces the site's output with the output of
the recipe's emulated fprop GEMM (``fake_quantize(x) · fake_quantize(W)ᵀ + b``, in
float32 like the ``emulated`` kernel) and the loss is recomputed on the same batch; the
difference to the unmodified loss is the site's sensitivity. Only the forward GEMM is
injected: dgrad/wgrad errors change the *update*, not this batch's loss. Every
evaluation runs under ``no_grad`` with the same RNG state, so dropout-like randomness
does not show up as sensitivity. Summing per-site deltas is a first-order estimate
of converting several sites at once (interactions are ignored; docs/probe.md).

FP8 noise moves a batch's loss up or down (first order, random sign) and raises the
expected loss only at second order. With several batches the report therefore gives
both the mean magnitude (how much the site moves the loss: a ranking for a budget) and
the signed mean with a t-interval (a systematic increase, which makes a site unsafe).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from loka.progress import progress_bar
from loka.probe.error import t_interval
from loka.probe.sites import channels_first
from loka.quantize import fake_quantize
from loka.recipe import GemmRecipe, Recipe, as_recipe


def emulated_fprop(module: nn.Module, x: torch.Tensor, recipe: GemmRecipe) -> torch.Tensor:
    """``y[..., N] = fq(x)[..., K] · fq(W)[N, K]ᵀ + b`` computed like the ``emulated`` kernel.

    A 1x1 Conv1d site takes and returns channels first (``[B, K, L] -> [B, N, L]``).
    """
    conv = channels_first(module)
    x = x.transpose(-1, -2) if conv else x
    x2d = x.reshape(-1, x.shape[-1])
    a = fake_quantize(x2d.float(), recipe.a)
    w = module.weight.detach()
    b = fake_quantize(w.reshape(w.shape[0], -1).float(), recipe.b)
    y = (a @ b.t()).to(x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type))
    y = y.reshape(*x.shape[:-1], b.shape[0])
    bias = getattr(module, "bias", None)
    y = y + bias.to(y.dtype) if bias is not None else y
    return y.transpose(-1, -2) if conv else y


def _inject_hook(recipe: GemmRecipe):
    def hook(module: nn.Module, args: tuple, output):
        return emulated_fprop(module, args[0], recipe)

    return hook


def _loss(loss_fn: Callable[[], torch.Tensor], seed: int) -> float:
    with torch.random.fork_rng(devices=rng_devices()), torch.no_grad():
        torch.manual_seed(seed)
        return float(loss_fn())


def site_sensitivity(
    modules: dict[str, nn.Module], loss_fn: Callable[[], torch.Tensor] | list[Callable[[], torch.Tensor]],
    recipe: Recipe | str, *, seed: int = 0, confidence: float = 0.95, progress: bool = False,
) -> dict[str, dict]:
    """Inject one site at a time; per site ``{loss_ref, loss_fp8, loss_delta, rel_loss_delta,
    abs_rel_loss_delta, ci_lo, ci_hi, n}``.

    ``loss_fn`` is a list of closures, one per batch, each computing the model's loss on its
    fixed batch (at least 2: one batch gives no interval). ``rel_loss_delta`` is the mean over
    batches of the signed relative change, with a t-interval ``[ci_lo, ci_hi]``;
    ``abs_rel_loss_delta`` the mean magnitude, i.e. how much the site's FP8 error moves the loss
    on a batch.
    """

    recipe = as_recipe(recipe)
    fns = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
    if len(fns) < 2:
        raise ValueError(
            f"sensitivity needs the loss on at least 2 batches for an interval, got {len(fns)}: call "
            "probe.measure_sensitivity(lambda batch: loss_fn(model, batch), batches=[batch_1, batch_2, ...])"
        )
    refs = [_loss(f, seed) for f in fns]
    out = {}
    items = list(modules.items())
    if progress:
        items = progress_bar(items, desc=f"sensitivity ({recipe.name})", leave=False)
    for fqn, module in items:
        handle = module.register_forward_hook(_inject_hook(recipe.fprop))
        try:
            losses = [_loss(f, seed) for f in fns]
        finally:
            handle.remove()
        rel = [(l - r) / abs(r) if r != 0 else (math.inf if l != r else 0.0) for l, r in zip(losses, refs)]
        mean, lo, hi = t_interval(rel, confidence)
        n = len(fns)
        out[fqn] = {"loss_ref": sum(refs) / n, "loss_fp8": sum(losses) / n,
                    "loss_delta": sum(l - r for l, r in zip(losses, refs)) / n, "rel_loss_delta": mean,
                    "abs_rel_loss_delta": sum(abs(v) for v in rel) / n, "ci_lo": lo, "ci_hi": hi, "n": n}
    return out


def rng_devices() -> list[int]:
    """CUDA devices whose RNG state is saved and restored around a loss evaluation."""
    return [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
