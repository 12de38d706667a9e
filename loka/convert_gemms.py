"""FP8 for GEMMs that are not ``nn.Linear``: 1x1 convolutions and ``x @ W`` on a parameter.

Models written by others run much of their GEMM work outside Linears (a cross network's
``x @ self.W``, AutoInt's ``torch.einsum("bfe,ed->bfd", x, self.W_q)``, CIN's 1x1
``Conv1d``). ``loka.probe.census`` finds them; :func:`convert_gemms` converts them with
the same three-GEMM machinery as ``Float8Linear`` (one kernel per fprop/dgrad/wgrad,
the same recipes, fallbacks and scale state), and keeps every Parameter object, so an
optimizer, an EMA or a state_dict made before conversion stays valid.

- A 1x1 ``Conv1d`` (stride 1, no padding, one group) is the GEMM
  ``y[B*L, Cout] = x[B*L, Cin] · W[Cout, Cin]ᵀ``: :class:`Float8Conv1x1` is a ``Conv1d``
  (same Parameters, same state_dict keys) whose forward runs that GEMM.
- ``x @ W`` / ``torch.matmul(x, W)`` / ``torch.mm`` / two-operand
  ``einsum("...k,kn->...n")`` with a 2-D parameter ``W[K, N]`` on the right: the model's
  code cannot be swapped, so a ``TorchFunctionMode`` is entered around the model's forward
  (forward hooks) and routes exactly those calls through :class:`ParamMatmul`
  (``y = x · (Wᵀ)ᵀ``, Wᵀ a view: the gradient reaches ``W`` itself). Other calls pass
  through untouched. Under ``torch.compile`` the mode may cause graph breaks.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from loka.convert import ConvertResult, _hp_gemms, convert
from loka.nn import Fallback, Float8Linear, _compute_dtype, _Float8LinearFn, resolve_kernels
from loka.recipe import GEMMS, Recipe, as_recipe


class _Float8Gemms:
    """Float8Linear's per-GEMM machinery (kernels, fallbacks, scale state), shared not copied."""

    _configure = Float8Linear._configure
    run_gemm = Float8Linear.run_gemm
    kernels_hp = Float8Linear.kernels_hp
    _cached_weight = Float8Linear._cached_weight

    def gemm(self, x2d: torch.Tensor, w_nk: torch.Tensor) -> torch.Tensor:
        """``x2d[M, K] · w_nk[N, K]ᵀ -> [M, N]`` through the three kernels (autograd included)."""
        return _Float8LinearFn.apply(x2d, w_nk, self, _compute_dtype(x2d))


class Float8Conv1x1(_Float8Gemms, nn.Conv1d):
    """A 1x1 ``Conv1d`` whose GEMM runs in FP8; x [B, Cin, L] -> [B, Cout, L]."""

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, *, recipe: Recipe | str = "tensorwise",
                  kernels: str | Mapping[str, str] = "auto", fallback: Fallback = "hp") -> "Float8Conv1x1":
        why = conv1x1_problem(conv)
        if why:
            raise ValueError(f"Float8Conv1x1 needs a plain 1x1 Conv1d: {why}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        new.in_features, new.out_features = conv.in_channels, conv.out_channels
        new.weight, new.bias = conv.weight, conv.bias  # the same Parameter objects
        new.train(conv.training)
        new._configure(recipe, kernels, fallback)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(f"input {tuple(x.shape)} is not [B, {self.in_channels}, L] or [{self.in_channels}, L]")
        x_t = x.transpose(-1, -2)  # [..., L, Cin]
        y2d = self.gemm(x_t.reshape(-1, self.in_channels), self.weight.view(self.out_channels, self.in_channels))
        y = y2d.reshape(*x_t.shape[:-1], self.out_channels).transpose(-1, -2)  # [..., Cout, L]
        return y if self.bias is None else y + self.bias.to(y.dtype)[:, None]

    def train(self, mode: bool = True):
        self._weight_cache = None
        return super().train(mode)


def conv1x1_problem(conv: nn.Module) -> str | None:
    """Why ``conv`` is not a plain GEMM (None when it is)."""
    if type(conv) is not nn.Conv1d:
        return f"{type(conv).__name__} is not an nn.Conv1d"
    if conv.kernel_size != (1,) or conv.stride != (1,) or conv.groups != 1:
        return f"kernel {conv.kernel_size}, stride {conv.stride}, groups {conv.groups} (need 1, 1, 1)"
    if conv.padding not in ((0,), "valid"):
        return f"padding {conv.padding} adds zero positions (need 0)"
    return None


def conv1x1_sites(model: nn.Module) -> list[tuple[str, nn.Conv1d, nn.Module, str]]:
    """``(fqn, conv, parent, attribute)`` of every plain 1x1 Conv1d (converted or not), children first."""
    found = []
    for fqn, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, Float8Conv1x1) or conv1x1_problem(child) is None:
                found.append((f"{fqn}.{name}" if fqn else name, child, parent, name))
    return found


class ParamMatmul(_Float8Gemms, nn.Module):
    """The FP8 GEMMs of ``x @ W`` for one 2-D parameter ``W[K, N]`` (holds no Parameter of its own)."""

    def __init__(self, param: nn.Parameter, recipe, kernels, fallback) -> None:
        super().__init__()
        if param.dim() != 2:
            raise ValueError(f"ParamMatmul needs a 2-D parameter [K, N], got shape {tuple(param.shape)}")
        self._param = [param]  # a list, so nn.Module does not register it a second time
        self.in_features, self.out_features = param.shape
        self._configure(recipe, kernels, fallback)

    @property
    def weight(self) -> nn.Parameter:
        return self._param[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., K] @ W[K, N] -> [..., N]``."""
        y2d = self.gemm(x.reshape(-1, self.in_features), self.weight.t())  # Wᵀ [N, K], a view of W
        return y2d.reshape(*x.shape[:-1], self.out_features)


_EINSUM = re.compile(r"^([a-zA-Z.]*)([a-zA-Z]),([a-zA-Z])([a-zA-Z])->([a-zA-Z.]*)$")


def _einsum_right(eq: str) -> bool:
    """Whether ``eq`` is ``"<lead>k,kn-><lead>n"`` (x times a [K, N] matrix on its last dim)."""
    m = _EINSUM.match(eq.replace(" ", ""))
    return bool(m) and m.group(2) == m.group(3) and m.group(5) == m.group(1) + m.group(4) and m.group(4) not in m.group(1)


_MATMULS = (torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.matmul, torch.Tensor.mm)


def param_matmul_operands(func, args, kwargs, params: Mapping[int, object]):
    """``(x, W, key)`` when this torch call is ``x @ W`` (or ``einsum("...k,kn->...n", x, W)``) with
    ``W`` a 2-D ``nn.Parameter`` whose ``id`` is in ``params``; else None. Shared by conversion
    and the probe, so both see exactly the same calls."""
    if kwargs:
        return None
    if func in _MATMULS and len(args) == 2:
        x, w = args
    elif func is torch.einsum and len(args) >= 2 and isinstance(args[0], str) and _einsum_right(args[0]):
        ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if len(ops) != 2:
            return None
        x, w = ops
    else:
        return None
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) not in params:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != w.shape[0]:
        return None
    return x, w, params[id(w)]


class _MatmulMode(TorchFunctionMode):
    """Routes ``x @ W`` for registered parameters ``W`` through their :class:`ParamMatmul`."""

    def __init__(self, engines: dict[int, ParamMatmul]) -> None:
        super().__init__()
        self.engines = engines

    def __torch_function__(self, func, types, args=(), kwargs=None):
        hit = param_matmul_operands(func, args, kwargs, self.engines)
        if hit is not None:
            x, _, engine = hit
            return engine.matmul(x)
        return func(*args, **(kwargs or {}))


def _install_mode(model: nn.Module, engines: dict[int, ParamMatmul]) -> None:
    mode = _MatmulMode(engines)

    def enter(module, args) -> None:  # a pre-hook's return value would replace the inputs
        mode.__enter__()

    def leave(module, args, out) -> None:
        mode.__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def convert_gemms(
    model: nn.Module,
    census,
    recipe: Recipe | str = "tensorwise",
    *,
    kernels: str | Mapping[str, str] = "auto",
    fallback: Fallback = "hp",
    only_worth: bool = True,
) -> ConvertResult:
    """Convert every convertible site of ``census`` (a ``loka.probe.census.GemmCensus`` of ``model``).

    Linears go through ``loka.convert``; 1x1 convolutions become :class:`Float8Conv1x1`;
    ``x @ W`` sites get a :class:`ParamMatmul` (held in ``model.fp8_matmuls``, no
    Parameter). With ``only_worth`` sites below the census' ``min_share`` are skipped
    with the reason. Counted by GEMM as in ``ConvertResult``.
    """
    recipe = as_recipe(recipe)
    rows = {r["site"]: r for r in census.summary()["sites"]}
    todo, result = {}, ConvertResult()
    for site, r in rows.items():
        if r["kind"] in ("attention", "activation"):
            continue
        if not r["convertible"]:
            result.skipped[site] = r["reason"]
        elif only_worth and not r["worth_converting"]:
            result.skipped[site] = r["reason"]
        else:
            todo[site] = r
    linears = {s for s, r in todo.items() if r["kind"] == "linear"}
    if linears:
        sub = convert(model, recipe, kernels=kernels, fallback=fallback, module_filter_fn=lambda m, fqn: fqn in linears)
        result.converted += [f for f in sub.converted if f in linears]
        result.hp_gemms.update(sub.hp_gemms)
        result.skipped.update({f: why for f, why in sub.skipped.items() if f in linears})
    params = dict(model.named_parameters())
    engines: dict[str, ParamMatmul] = {}
    for site, r in todo.items():
        if r["kind"] == "conv1x1":
            _convert_conv(model, site, recipe, kernels, fallback, result)
        elif r["kind"] == "matmul":
            _convert_matmul(model, site, params[r["param"]], recipe, kernels, fallback, result, engines)
    attach_matmuls(model, engines)
    return result


def attach_matmuls(model: nn.Module, engines: Mapping[str, ParamMatmul]) -> None:
    """Route ``x @ W`` for each ``{site: ParamMatmul}`` through it during ``model``'s forwards."""
    if not engines:
        return
    holder = nn.ModuleDict({site.replace(".", "__"): e for site, e in engines.items()})
    model.add_module("fp8_matmuls", holder)  # scale state moves with model.to(); no Parameter inside
    _install_mode(model, {id(e.weight): e for e in engines.values()})


def _count(result: ConvertResult, site: str, engine, recipe, kernels, fallback) -> bool:
    """Record the site by GEMM; False (and skipped) when no GEMM would run in FP8 or the shape is refused."""
    site_recipe, site_kernels = resolve_kernels(recipe, kernels, engine.weight.device)
    hp, shape_problem = _hp_gemms(site_recipe, site_kernels, engine)
    if (shape_problem and fallback == "error") or len(hp) == len(GEMMS):
        result.skipped[site] = "no GEMM would run in FP8: " + "; ".join(f"{g}: {w}" for g, w in hp.items())
        return False
    result.converted.append(site)
    if hp:
        result.hp_gemms[site] = hp
    return True


def _convert_conv(model, site, recipe, kernels, fallback, result) -> None:
    conv = model.get_submodule(site)
    why = conv1x1_problem(conv)
    if why:
        result.skipped[site] = why
        return
    new = Float8Conv1x1.from_conv(conv, recipe=recipe, kernels=kernels, fallback=fallback)
    if _count(result, site, new, recipe, kernels, fallback):
        parent, _, name = site.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)


def _convert_matmul(model, site, param, recipe, kernels, fallback, result, engines) -> None:
    engine = ParamMatmul(param, recipe, kernels, fallback)
    if _count(result, site, engine, recipe, kernels, fallback):
        engines[site] = engine


__all__ = ["Float8Conv1x1", "ParamMatmul", "attach_matmuls", "conv1x1_problem", "conv1x1_sites", "convert_gemms", "param_matmul_operands"]
