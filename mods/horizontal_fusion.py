"""Mod 4: horizontal fusion of Linears that share an input into one wider GEMM.

Rankers run many narrow GEMMs on the same activation (task heads on the
trunk, Wukong's FM projection, compression and residual on the same
embeddings, q/k/v-like projections): each is too small for FP8 to win
(measured on an H100, bench/results/h100_2026-11-22_gemm.md: FP8 pays off
from K, N ≳ 1024). Concatenating their weights along N turns k GEMMs
``[M,K]·[N_i,K]ᵀ`` into one ``[M,K]·[ΣN_i,K]ᵀ``, with the outputs split back;
the result is the same numbers (exact: each output column is the same dot product).

Module calls happen wherever the model's code makes them, so each original
Linear is replaced by a :class:`FusedLinearMember`; the first member called
runs the fused GEMM and caches the split outputs, and the others return their
slice when called with the same input (the same tensor object, or an equal
tensor: a ``torch.equal`` check, one read of both tensors). If a member is
called with a different input, the fused GEMM simply runs again on it, so
the rewrite is exact in every case and fast when the input is shared.

Only Linears with the same dtype and device are grouped. When every member
has a bias it lives in the fused Linear (the GEMM epilogue adds it); when only
some have one, each keeps its own ``bias`` Parameter, added to its slice (a
zero bias slice in the fused Linear would be trainable and change the model). The fused Linear is
the child ``fused`` of the first member, so ``loka.convert`` can turn it into
one Float8Linear (site ``<first member fqn>.fused``).
"""

from __future__ import annotations

import torch
from torch import nn

from loka.mods.graph import Dataflow, record
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.mods.spec import ModSpec

NAME = "horizontal_fusion"
EXACT = True


class _FusedGroup:
    """Shared state of one fused group (a plain object: not a module, holds no parameters)."""

    def __init__(self, owner: "FusedLinearMember", sizes: list[int]) -> None:
        self.owner, self.sizes = owner, sizes
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._served: set[int] = set()
        self.gemm_calls = 0  # fused GEMMs run (for tests and reports)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if not self._hit(x, index):
            y = self.owner.fused(x)  # [..., ΣN]
            self._x, self._version = x, x._version
            self._outputs, self._served = tuple(y.split(self.sizes, dim=-1)), set()
            self.gemm_calls += 1
        self._served.add(index)
        out = self._outputs[index]
        if len(self._served) == len(self.sizes):
            self.clear()  # every member has its slice: release the activations
        return out

    def _hit(self, x: torch.Tensor, index: int) -> bool:
        c = self._x
        if c is None or index in self._served:
            return False
        if c is x:
            return x._version == self._version
        if not (c.shape == x.shape and c.dtype == x.dtype and c.device == x.device and torch.equal(c, x)):
            return False
        if torch.is_grad_enabled() and (c.requires_grad or x.requires_grad):
            # equal values are not enough under autograd: the slice's gradient flows into c's
            # graph, which is only right when c and x are the same views of the same source.
            return _same_autograd_source(c, x)
        return True

    def clear(self) -> None:
        self._x, self._outputs, self._served = None, (), set()


# Backward nodes of view/copy ops: a chain of them maps a gradient to the source unchanged in value.
_VIEW_GRAD_FNS = frozenset({
    "CloneBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "TBackward0", "AliasBackward0", "ToCopyBackward0",
})


def _saved_ints(fn) -> tuple:
    out = []
    for k in dir(fn):
        if k.startswith("_saved_"):
            try:
                v = getattr(fn, k)
            except RuntimeError:  # freed by an earlier backward
                continue
            if isinstance(v, (int, tuple, list, torch.Size)):
                out.append((k, tuple(v) if isinstance(v, (list, torch.Size)) else v))
    return tuple(out)


def _autograd_source(t: torch.Tensor) -> tuple[tuple, object]:
    """(signature of the view/copy chain above ``t``, the node it starts from, or ``t`` for a leaf).

    The node itself, not its ``id()``: autograd makes a Python object for a node when asked and
    frees it when the last reference goes, so an ``id`` taken from it can be handed to the next
    node asked for, and two different sources would look the same. Holding the object keeps the
    node alive, and autograd hands back that same object while it lives, so ``is`` is exact.
    """
    fn, chain = t.grad_fn, []
    while fn is not None and type(fn).__name__ in _VIEW_GRAD_FNS and fn.next_functions:
        chain.append((type(fn).__name__, _saved_ints(fn)))
        fn = fn.next_functions[0][0]
    return tuple(chain), (fn if fn is not None else t)


def _same_autograd_source(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same view/copy chain of the same autograd node (or leaf)."""
    chain_a, node_a = _autograd_source(a)
    chain_b, node_b = _autograd_source(b)
    return chain_a == chain_b and node_a is node_b


class FusedLinearMember(nn.Module):
    """Stands in for one Linear of a fused group: x [..., K] -> its slice [..., N_i]."""

    def __init__(self, group: _FusedGroup, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self._group, self.index = group, index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._group.output(x, self.index)
        bias = self.__dict__.get("_parameters", {}).get("bias")
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slice {self.index} of {self._group.sizes}"


def fuse_linears(model: nn.Module, fqns: tuple[str, ...]) -> nn.Linear:
    """Replace the Linears ``fqns`` (same K, bias-ness, dtype, device) by members of one fused GEMM."""
    linears = [get_module(model, f) for f in fqns]
    w0 = linears[0].weight
    sizes = [lin.out_features for lin in linears]
    has_bias = all(lin.bias is not None for lin in linears)  # else members keep their own bias
    fused = nn.Linear(linears[0].in_features, sum(sizes), has_bias, device=w0.device, dtype=w0.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears], dim=0))  # [ΣN, K]
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    fused.train(linears[0].training)
    members = []
    group = None
    for i, (fqn, lin) in enumerate(zip(fqns, linears)):
        member = FusedLinearMember(group, i, lin.in_features, lin.out_features)  # group set below
        if i == 0:
            member.fused = fused
            group = _FusedGroup(member, sizes)
        member._group = group
        if not has_bias and lin.bias is not None:
            member.bias = lin.bias  # the same Parameter
        member.train(lin.training)
        set_module(model, fqn, member)
        members.append(member)
    return fused


def _compatible(linears: list[nn.Module]) -> str:
    if any(type(lin) is not nn.Linear for lin in linears):
        return "only plain nn.Linear modules are fused (apply fusion before convert)"
    keys = {(lin.weight.dtype, lin.weight.device) for lin in linears}
    if len(keys) > 1:
        return "members differ in dtype or device"
    return ""


def apply(model: nn.Module, report=None, *, sample, min_members: int = 2, flow: Dataflow | None = None) -> ModResult:
    """Fuse every group of >= ``min_members`` Linears reading the same input (recorded on ``sample``)."""
    flow = flow or record(model, sample)
    changes, skipped, data = [], [], {"gemms_before": 0, "gemms_after": 0}
    for fqns in flow.shared_input():
        linears = [get_module(model, f) for f in fqns]
        why = _compatible(linears) or ("" if len(fqns) >= min_members else f"fewer than {min_members} members")
        if why:
            skipped.extend((f, why) for f in fqns)
            continue
        k = linears[0].in_features
        before = " + ".join(f"[K={k},N={lin.out_features}]" for lin in linears)
        fused = fuse_linears(model, fqns)
        changes.append(SiteChange(", ".join(fqns), f"{len(fqns)} GEMMs {before}",
                                  f"1 GEMM [K={k},N={fused.out_features}] (site {fqns[0]}.fused)"))
        data["gemms_before"] += len(fqns)
        data["gemms_after"] += 1
    return ModResult(NAME, EXACT, "Linears sharing an input run as one wider GEMM; outputs split",
                     tuple(changes), tuple(skipped), data)


MOD = ModSpec(
    name=NAME,
    order=40,
    exact="exact",
    pattern="Linears sharing an input -> one wider GEMM, outputs split",
    apply=apply,
)
