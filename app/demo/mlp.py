"""A one-minute look at FP8 on a small MLP with LayerNorm: per-layer error of each recipe.

This is the smallest honest picture of what loka measures: convert every Linear
(the naive baseline), run the same batch, and compare each layer's output with
the high-precision model's, per recipe. The full workflow on the bundled ranker
is ``loka demo``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from loka.convert import convert
from loka.metrics import rel_error, sqnr
from loka.recipe import as_recipe

DEMO_RECIPES = ("tensorwise", "rowwise", "blockwise", "mx")


def small_mlp(width: int = 256, depth: int = 3, in_features: int = 64) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU blocks, the pattern rankers are made of."""
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.SiLU()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, fqn=fqn: outs.__setitem__(fqn, out.detach()))
        for fqn, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def per_layer_errors(model: nn.Module, x: torch.Tensor, recipes=DEMO_RECIPES, kernels: str = "auto") -> list[dict]:
    """Rows of (site, recipe, kernel, rel. error, SQNR) of each converted layer's output vs hp."""

    ref = _layer_outputs(model, x)
    rows = []
    for name in recipes:
        fp8 = copy.deepcopy(model)
        result = convert(fp8, as_recipe(name), kernels=kernels)
        outs = _layer_outputs(fp8, x)
        for fqn in ref:
            kernel = fp8.get_submodule(fqn).kernels["fprop"].name if fqn in result.converted else "-"
            rows.append(
                {
                    "site": fqn,
                    "recipe": name,
                    "kernel": kernel,
                    "rel_error": rel_error(ref[fqn], outs[fqn]),
                    "sqnr_db": sqnr(ref[fqn], outs[fqn]),
                    "note": result.skipped.get(fqn, ""),
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'site':<6} {'recipe':<11} {'kernel':<10} {'rel.err':>9} {'SQNR dB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['site']:<6} {r['recipe']:<11} {r['kernel']:<10} {r['rel_error']:>9.2e} {r['sqnr_db']:>8.1f}  {r['note']}"
        )
    return "\n".join(lines)


def run(seed: int = 0) -> str:
    """Build the MLP, feed heavy-tailed inputs, and return the per-layer error table."""
    torch.manual_seed(seed)
    model = small_mlp()
    x = torch.distributions.StudentT(3.0).sample((2048, 64))  # heavy-tailed, like dense features
    return format_table(per_layer_errors(model, x))
