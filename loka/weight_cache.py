"""FP8 weights quantized once per optimizer step, not once per GEMM call.

A Linear's weight enters two GEMMs as an FP8 operand: fprop's ``b`` is ``W[N, K]``
and dgrad's ``b`` is ``Wᵀ[K, N]`` (each with its own recipe: rowwise scales of
``Wᵀ`` are per column of ``W``). Between two optimizer steps the weight does not
change, yet a per-call cast reads it (hp, 2-4 bytes/element) and writes it again
(1 byte) for every forward and every backward, plus gradient-accumulation
micro-batches and every serving request. This cache keeps the FP8 operand and its
scale per GEMM and hands the kernel a :class:`~loka.kernels.kernel.Quantized`
operand instead, so the cast runs once per weight *version*.

When is an entry stale? An entry remembers the weight *object* (a weak reference:
a new tensor at a reused address never hits), its autograd version counter, which
in-place updates bump (``load_state_dict``, ``copy_``/``mul_`` under ``no_grad``,
torch.optim's for-loop and foreach steps), and the *optimizer step count*: fused
optimizer kernels (``AdamW(fused=True)``, seen on torch 2.13 CPU) update weights
without bumping their version counter, so every ``optimizer.step()`` of any
``torch.optim`` optimizer drops every entry, through torch's global step post-hook
registered when the first cache is made. Writes outside an optimizer that bypass the
counter (``weight.data.copy_(...)``) need :func:`invalidate_weight_caches`.

Only dynamically scaled weights are cached: a delayed scale is a function of the
amax history, which must see every call, and static scales can be re-set.
Cost: one FP8 copy of the weight per cached GEMM (1 byte/element each).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.optim.optimizer as torch_optimizer  # the global step hook (torch.optim does not re-export it)
from torch import nn

from loka.kernels.kernel import Quantized
from loka.quantize import quantize_operand
from loka.recipe import OperandRecipe


@dataclass
class _Entry:
    ref: weakref.ref
    version: int
    step: int
    operand: Quantized
    op: OperandRecipe
    transposed: bool

    def valid_for(self, weight: torch.Tensor, version: int) -> bool:
        return self.ref() is weight and self.version == version and self.step == _STEPS[0]


def _transposable(op: OperandRecipe) -> bool:
    """Whether quantize(Wᵀ) == quantize(W)ᵀ: one scale, or square scale blocks (transposed with it)."""
    return op.granularity == "tensorwise" or (op.granularity == "blockwise" and op.block[0] == op.block[1])


_STEPS = [0]  # optimizer steps taken in this process (any optimizer)
_HOOK: list = []


def _count_step(*_args) -> None:
    _STEPS[0] += 1


def _hook_optimizer_steps() -> None:
    """Count every torch.optim step (once per process); feature-checked, not version-checked."""
    if _HOOK:
        return
    register = getattr(torch_optimizer, "register_optimizer_step_post_hook", None)
    if register is None:
        raise RuntimeError("this torch has no torch.optim.optimizer.register_optimizer_step_post_hook; "
                           "set weight_cache.enabled = False on each Float8Linear")
    _HOOK.append(register(_count_step))


def weight_version(w: torch.Tensor) -> int | None:
    """``w``'s autograd version counter, or None where it has none (inference tensors)."""
    try:
        return int(w._version)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


class WeightCache:
    """Per-GEMM FP8 copies of one weight, valid while the weight's version is unchanged.

    ``hits`` count lookups served from the cache, ``misses`` casts from the hp weight, and
    ``derived`` operands made by transposing the other GEMM's FP8 weight (tensorwise and
    square-block scales: the same bits as casting ``Wᵀ``, one pass over the hp weight per step).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.hits = 0
        self.misses = 0
        self.derived = 0
        self.enabled = True
        self._frozen: dict[str, _Entry] = {}  # serving: kept while compiling (see freeze)
        _hook_optimizer_steps()

    def freeze(self, gemm: str, weight: torch.Tensor, op: OperandRecipe, transpose: bool) -> bool:
        """Keep ``gemm``'s FP8 weight for serving, also inside torch.compile graphs.

        A cached weight is normally left out of a compiled graph (the graph casts it on every
        call, because a trace cannot follow version counters). A frozen one is a tensor of the
        graph's, so a compiled serving model casts no weight at all. Outside a trace the weight's
        version is still checked and the frozen copy refreshed in place (same storage, so
        graphs compiled earlier read the new values); inside one it is trusted: freeze only
        weights nothing updates (``requires_grad=False``, as ``loka.models.InferenceEngine``
        does). Returns False where the weight cannot be cached (not dynamic, hp).
        """
        if op.is_hp or op.scaling != "dynamic" or weight_version(weight) is None:
            return False
        self._frozen.pop(gemm, None)
        q = self.get(gemm, weight, op, transpose)
        if q is None:
            return False
        self._frozen[gemm] = self._entries[gemm]
        return True

    def _frozen_operand(self, gemm: str, weight: torch.Tensor) -> Quantized | None:
        e = self._frozen.get(gemm)
        if e is None:
            return None
        if compiling():  # no weakref or version to follow in a trace: frozen means trusted
            return e.operand
        if e.ref() is not weight:
            return None
        version = weight_version(weight)
        if version != e.version:  # updated since frozen: recast into the same storage
            q = _cast(weight, e.op, e.transposed)
            e.operand.data.copy_(q.data)
            e.operand.scale.copy_(q.scale)
            e.version = version
        self.hits += 1
        return e.operand

    def get(self, gemm: str, weight: torch.Tensor, op: OperandRecipe, transpose: bool) -> Quantized | None:
        """The FP8 operand of ``gemm`` (``Wᵀ`` when ``transpose``), quantizing on a miss.

        None when this weight cannot be cached (disabled, not dynamic, no version counter,
        or inside a torch.compile trace, where the cast belongs to the compiled graph).
        """
        frozen = self._frozen_operand(gemm, weight) if self._frozen else None
        if frozen is not None:
            return frozen
        if not self.enabled or op.is_hp or op.scaling != "dynamic" or compiling():
            return None
        version = weight_version(weight)
        if version is None:
            return None
        e = self._entries.get(gemm)
        if e is not None and e.valid_for(weight, version):
            self.hits += 1
            return e.operand
        q = self._from_transpose(weight, version, op, transpose)
        if q is None:
            self.misses += 1
            q = _cast(weight, op, transpose)
        self._entries[gemm] = _Entry(weakref.ref(weight), version, _STEPS[0], q, op, transpose)
        return q

    def _from_transpose(self, weight, version: int, op: OperandRecipe, transpose: bool) -> Quantized | None:
        """The other orientation's cached FP8 weight, transposed, where that is exact."""
        if not _transposable(op):
            return None
        for e in self._entries.values():
            if e.transposed != transpose and e.op == op and e.valid_for(weight, version):
                self.derived += 1
                scale = e.operand.scale if e.operand.scale.dim() == 0 else e.operand.scale.t().contiguous()
                return Quantized(e.operand.data.t().contiguous(), scale)
        return None

    def invalidate(self) -> None:
        """Drop every entry, frozen ones included (the next lookup quantizes again)."""
        self._entries.clear()
        self._frozen.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _cast(weight: torch.Tensor, op: OperandRecipe, transpose: bool) -> Quantized:
    """The FP8 copy of ``weight`` (``Wᵀ`` when ``transpose``), row-major."""
    with torch.no_grad():
        w = weight.detach()
        data, scale = quantize_operand((w.t() if transpose else w).contiguous(), op)
    return Quantized(data.contiguous(), scale)


def compiling() -> bool:
    """Whether torch.compile is tracing the code that calls this (False where torch has no compiler)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def function_output(y: torch.Tensor) -> torch.Tensor:
    """What a ``torch.autograd.Function``'s forward returns: ``y``, or a view of it under torch.compile.

    torch 2.11's dynamo loses the gradient when the forward returns the very tensor an op inside it
    handed back unchanged (a no-op ``.to(dtype)`` or ``.contiguous()``, as the kernels' casts to the
    output dtype are): backward then gets zeros, so every weight gradient before it is zero
    (2.13 is right; tests/core/test_float8_linear.py::test_torch_compile_matches_eager). A view is a
    new tensor over the same storage: no copy, and the same result on every version.
    """
    return y.view_as(y) if compiling() else y


def _caches(model: nn.Module):
    for m in model.modules():
        cache = getattr(m, "weight_cache", None)
        if isinstance(cache, WeightCache):
            yield cache


def invalidate_weight_caches(model: nn.Module) -> int:
    """Drop the FP8 weight caches of every module of ``model``; returns how many were dropped."""
    n = 0
    for cache in _caches(model):
        cache.invalidate()
        n += 1
    return n


def freeze_fp8_weights(model: nn.Module) -> int:
    """Freeze fprop's FP8 weight of every FP8 module of ``model`` for serving (see
    ``WeightCache.freeze``); returns how many were frozen. Call it after the model's last
    weight update and before compiling; ``invalidate_weight_caches`` undoes it."""
    n = 0
    for m in model.modules():
        cache = getattr(m, "weight_cache", None)
        recipe, weight = getattr(m, "recipe", None), getattr(m, "weight", None)
        if isinstance(cache, WeightCache) and recipe is not None and isinstance(weight, torch.Tensor):
            g = recipe.gemm("fprop")
            kernel = getattr(m, "kernels", {}).get("fprop")
            if not g.is_hp and kernel is not None and kernel.takes_quantized_b:
                n += cache.freeze("fprop", weight, g.b, transpose=False)
    return n
