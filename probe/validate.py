"""Checking a verdict for real: convert one site and measure its GEMM errors after conversion.

The probe predicts a site's FP8 error by emulating the cast on captured operands.
:func:`conversion_errors` checks that against the real thing: a copy of the model has
the site swapped for ``loka.Float8Linear`` (via ``loka.convert``), one forward and
backward run, and the site's fprop output, dgrad (its own ``dx`` from a full backward
hook) and wgrad (``W.grad``) are compared with fp64 GEMMs of the operands it saw.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import nn

from loka.convert import convert
from loka.metrics import rel_error
from loka.probe.sensitivity import rng_devices


def _site(model: nn.Module, fqn: str) -> nn.Module:
    return model if fqn == "<root>" else model.get_submodule(fqn)


def conversion_errors(
    model: nn.Module, fqn: str, recipe, loss_fn: Callable[[nn.Module], torch.Tensor], *, kernels: str = "emulated"
) -> dict[str, float]:
    """``{gemm: rel_error}`` of site ``fqn`` after converting it (alone) to ``recipe`` in a copy of ``model``.

    ``loss_fn(model)`` returns a scalar loss on one batch. dgrad is missing when the site's
    input does not require grad (e.g. the first layer).
    """

    m = copy.deepcopy(model)
    res = convert(m, recipe, module_filter_fn=lambda mod, name: name == fqn, kernels=kernels, fallback="hp")
    if fqn not in res.converted:
        raise ValueError(f"site {fqn!r} was not converted: {res.skipped.get(fqn, 'not a Linear')}")
    site = _site(m, fqn)
    seen: dict[str, torch.Tensor] = {}

    def fwd(module, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()

    def bwd(module, grad_input, grad_output):
        seen["dy"] = grad_output[0].detach()
        if grad_input[0] is not None:
            seen["dx"] = grad_input[0].detach()

    handles = [site.register_forward_hook(fwd), site.register_full_backward_hook(bwd)]
    try:
        m.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "no inputs require gradients" on a first layer is expected
            warnings.simplefilter("ignore", UserWarning)
            loss_fn(m).backward()
    finally:
        for h in handles:
            h.remove()
    x = seen["x"].reshape(-1, site.in_features).double()
    w = site.weight.detach().double()
    dy = seen["dy"].reshape(-1, site.out_features).double()
    y = seen["y"].reshape(-1, site.out_features).double()
    if site.bias is not None:
        y = y - site.bias.detach().double()
    out = {"fprop": rel_error(x @ w.T, y), "wgrad": rel_error(dy.T @ x, site.weight.grad.double())}
    if "dx" in seen:
        out["dgrad"] = rel_error(dy @ w, seen["dx"].reshape(-1, site.in_features).double())
    return out


def conversion_loss_delta(
    model: nn.Module, fqn: str, recipe, loss_fn: Callable[[nn.Module], torch.Tensor], *, kernels: str = "emulated",
    seed: int = 0,
) -> dict[str, float]:
    """Loss on one batch before and after converting site ``fqn`` (alone) for real, in a copy of ``model``.

    Returns ``{loss_ref, loss_fp8, loss_delta, rel_loss_delta}`` like :mod:`loka.probe.sensitivity`.
    """

    def loss(m: nn.Module) -> float:
        with torch.random.fork_rng(devices=rng_devices()), torch.no_grad():
            torch.manual_seed(seed)
            return float(loss_fn(m))

    m = copy.deepcopy(model)
    ref = loss(m)
    res = convert(m, recipe, module_filter_fn=lambda mod, name: name == fqn, kernels=kernels, fallback="hp")
    if fqn not in res.converted:
        raise ValueError(f"site {fqn!r} was not converted: {res.skipped.get(fqn, 'not a Linear')}")
    fp8 = loss(m)
    return {"loss_ref": ref, "loss_fp8": fp8, "loss_delta": fp8 - ref, "rel_loss_delta": (fp8 - ref) / abs(ref)}

