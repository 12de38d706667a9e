"""Mod 3: pad Linears to the K and N alignment FP8 kernels need (multiples of 16).

``torch._scaled_mm`` (cuBLASLt) takes K and N only in multiples of 16, so a
ranker's odd widths (13 dense features, 22 embeddings, 1-logit heads) either
stay in bf16 or fail. :class:`PaddedLinear` holds an ``nn.Linear`` of the
padded shape ``[N16, K16]`` whose extra rows and columns are zeros, pads the
input with zero columns and slices the output:

    y = [x, 0] · [[W, 0], [0, 0]]ᵀ [:, :N] + b = x Wᵀ + b         (exact)

The zeros change no dot product, no amax and therefore no FP8 scale: the
padded GEMM equals the unpadded one in fp64 and in every FP8 recipe whose
scale groups run along K from the left (tensorwise, rowwise, blockwise, mx).
Under training the padding stays zero: its weight gradient is ``dyᵀ · 0`` or
``0ᵀ · x``, and Adam/SGD/weight decay map a zero with zero gradient to zero.

The inner Linear is a child named ``linear``, so ``loka.convert`` turns the
padded GEMM (site ``<fqn>.linear``) into a Float8Linear afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loka.mods.result import ModResult, SiteChange, set_module
from loka.mods.spec import ModSpec

NAME = "padding"
EXACT = True


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PaddedLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` computed as a zero-padded aligned GEMM.

    x [..., in_features] -> [..., out_features]; ``self.linear`` is [N16, K16].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, multiple: int = 16,
                 device=None, dtype=None) -> None:
        super().__init__()
        if multiple < 1:
            raise ValueError(f"multiple={multiple} must be a positive int (16 for FP8 kernels)")
        self.in_features, self.out_features, self.multiple = in_features, out_features, multiple
        self.linear = nn.Linear(round_up(in_features, multiple), round_up(out_features, multiple), bias,
                                device=device, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.zero_()
            if bias:
                self.linear.bias.zero_()

    @classmethod
    def from_linear(cls, linear: nn.Linear, multiple: int = 16) -> "PaddedLinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, multiple,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.linear.weight[: linear.out_features, : linear.in_features].copy_(w)
            if linear.bias is not None:
                new.linear.bias[: linear.out_features].copy_(linear.bias)
        new.train(linear.training)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The logical [N, K] weight (a view of the padded one)."""
        return self.linear.weight[: self.out_features, : self.in_features]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.linear.bias
        return None if b is None else b[: self.out_features]

    def to_linear(self) -> nn.Linear:
        """An ordinary Linear with the logical weights (to undo the mod, e.g. for export)."""
        w = self.linear.weight
        out = nn.Linear(self.in_features, self.out_features, self.linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if out.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dim is {x.shape[-1]}, this layer takes in_features={self.in_features}")
        pad_k = self.linear.in_features - self.in_features
        x_padded = F.pad(x, (0, pad_k)) if pad_k else x  # [..., K16], zero columns
        y = self.linear(x_padded)  # [..., N16]
        return y[..., : self.out_features] if self.linear.out_features != self.out_features else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, padded_to={self.multiple}"


def apply(model: nn.Module, report=None, *, sample=None, multiple: int = 16, module_filter_fn=None) -> ModResult:
    """Replace every plain ``nn.Linear`` whose K or N is not a multiple of ``multiple`` (``sample`` unused).

    ``module_filter_fn(module, fqn) -> bool`` narrows the sites (e.g. skip the
    keep-in-hp ones: padding a Linear that stays bf16 only costs time).
    """
    changes, skipped = [], []
    for fqn, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        k, n = module.in_features, module.out_features
        if k % multiple == 0 and n % multiple == 0:
            continue
        if module_filter_fn is not None and not module_filter_fn(module, fqn):
            skipped.append((fqn, "excluded by module_filter_fn"))
            continue
        new = PaddedLinear.from_linear(module, multiple)
        set_module(model, fqn, new)
        changes.append(SiteChange(fqn, f"GEMM K={k} N={n}", f"GEMM K={new.linear.in_features} N={new.linear.out_features} (site {fqn}.linear)"))
    return ModResult(NAME, EXACT, f"Linears zero-padded to K, N multiples of {multiple}; output sliced",
                     tuple(changes), tuple(skipped))


MOD = ModSpec(
    name=NAME,
    order=30,
    exact="exact",
    pattern="K, N zero-padded to multiples of 16, output sliced",
    apply=apply,
)
