"""FP8 for every ATen GEMM on a parameter, whatever Python spelled it.

A ``Float8Linear`` replaces a module; a product written in the model's own code
(``torch.tensordot(x, W, ...)``, ``torch.matmul(self.kernels[i], x)``, any ``einsum``,
``F.linear``, ``nn.MultiheadAttention``'s packed projection, a 1x1 convolution) has no
module to replace. It does reach ATen as ``mm``/``addmm``/``bmm``/``baddbmm``/``convolution``
with the parameter (or a view or autocast copy of it, see :class:`~loka.aten_gemms.ParamIndex`)
as an operand, so this is where loka takes it, for each of the three GEMMs:

- **fprop**: while the model's forward runs, a ``TorchFunctionMode`` looks at each call for an
  operand that is a converted parameter (one dict lookup per tensor); only around such a call
  it enters a ``TorchDispatchMode`` that runs the call's GEMMs on that parameter through the
  site's :class:`ParamEngine` (the kernels, recipe and scale state of ``Float8Linear``).
- **dgrad, wgrad**: autograd saves the GEMM's operands for its backward formula. A
  ``saved_tensors_hooks`` pair marks the parameter operand and the operand the fprop paired
  with it; when the backward unpacks a marked operand, the hook pushes :class:`_Bprop`, a
  dispatch mode that lives for that one autograd node (autograd restores the mode stack after
  each node) and runs the node's ``mm``/``bmm``/``convolution_backward`` through the engine:
  against the parameter it is dgrad, against the fprop's other operand wgrad. Being pushed
  last, it sits above any mode the caller runs the backward under, so their counts see
  loka's FP8 kernels.

The model keeps its ``nn.Parameter`` objects: optimizers, ``state_dict`` and checkpoints do not
change. Every GEMM an engine runs is counted (:attr:`ParamEngine.ran`) and reported to active
observers (:mod:`loka.aten_gemms`), so what is claimed converted is what ran in FP8.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _push_mode

from loka.aten_gemms import (CONV, CONV_BACKWARD, MAX_BATCH_LOOP, MM_OPS, ParamIndex, batch_problem, broadcast,
                             conv_gemm_problem, engine_scope, report)
from loka.kernels import KERNELS
from loka.nn import resolve_kernels
from loka.recipe import GEMM_ROLES, GEMMS, HP_GEMM, as_recipe
from loka.scaling import ScaleState

_aten = torch.ops.aten


class ParamEngine(nn.Module):
    """The FP8 GEMMs of one parameter site: a kernel and recipe per GEMM, scale state, counts.

    Holds no Parameter (the site's parameter stays where the model keeps it); its scale
    state is non-persistent buffers, so ``state_dict`` is unchanged.
    """

    def __init__(self, site: str, param: nn.Parameter, recipe, kernels: str | Mapping[str, str] = "auto",
                 fallback: str = "hp") -> None:
        super().__init__()
        if fallback not in ("error", "hp"):
            raise ValueError(f"fallback={fallback!r} is not valid; use 'error' or 'hp'")
        self.site, self._param, self.fallback, self.last_why = site, [param], fallback, ""
        self.current_pair = None
        self.recipe, self.kernels = resolve_kernels(as_recipe(recipe), kernels, param.device)
        self.scale_state = ScaleState(self.recipe)
        self.ran = {g: {"fp8": 0, "hp": 0} for g in GEMMS}  # GEMMs run, by how
        self.expected = {g: 0 for g in GEMMS}  # GEMMs the fprops so far imply (dgrad/wgrad need grads)
        self.why_hp: dict[str, str] = {}  # gemm -> why it ran in hp
        self.forms: set[str] = set()

    @property
    def param(self) -> nn.Parameter:
        return self._param[0]

    def pair_key(self) -> int:
        """Which fprop a saved operand belongs to (an FP8 engine needs no pairing: 0)."""
        return 0

    def mm(self, gemm: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, form: str,
           count: bool = True) -> torch.Tensor:
        """``a[M, R] · b[Q, R]ᵀ -> [M, Q]`` of ``gemm`` (operand roles as ``loka.recipe.GEMM_ROLES``)."""
        kernel, g = self.kernels[gemm], self.recipe.gemm(gemm)
        shape = (a.shape[0], a.shape[1], b.shape[0])
        why = f"kernel {kernel.name!r} chosen for {gemm}" if kernel.hp else ""
        if not kernel.hp:
            ok, reason = kernel.supports(g, shape, a.dtype, a.device)
            if not ok:
                if self.fallback == "error":
                    raise ValueError(f"{gemm} of {self.site} ({form}) with kernel {kernel.name!r} cannot run "
                                     f"[M={shape[0]}, K={shape[1]}, N={shape[2]}]: {reason}; pad the shape or pass "
                                     "fallback='hp'")
                why = f"{kernel.name}: {reason}"
        if self.scale_state.keys() and any(b.device != a.device for b in self.scale_state.buffers()):
            self.scale_state.to(a.device)  # the model moved; this engine is not one of its submodules
        with engine_scope():
            if why:
                out = KERNELS.get("bf16").mm(a.to(out_dtype), b.to(out_dtype), HP_GEMM, out_dtype=out_dtype)
            else:
                a_role, b_role = GEMM_ROLES[gemm]
                scale_a = self.scale_state.scale_for(gemm, a_role, a)
                scale_b = self.scale_state.scale_for(gemm, b_role, b)
                out = kernel.mm(a, b.contiguous(), g, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
        self.last_why = why
        if count:
            self.count(gemm, why, form, 2.0 * shape[0] * shape[1] * shape[2], shape)
        return out

    def count(self, gemm: str, why: str, form: str, flops: float, shape) -> None:
        self.ran[gemm]["hp" if why else "fp8"] += 1
        self.forms.add(form)
        if why:
            self.why_hp[gemm] = why
        report(self.site, gemm, flops, not why, form, why, shape)


def run_mm(engine: ParamEngine, gemm: str, a_op: torch.Tensor, b_op: torch.Tensor, b_side: int,
           form: str, *, side_bcast: bool | None = None, sum_batches: bool = False, count: bool = True) -> torch.Tensor:
    """``a_op @ b_op`` (2-D or batched) with operand ``(a_op, b_op)[b_side]`` in role b of ``gemm``.

    ``side_bcast``: that operand is one matrix for every batch (None: read from its strides; an
    autocast copy of an expanded parameter has lost them). ``sum_batches``: the batched result is
    only ever summed over the batch (the gradient of a matrix expanded over the batch, one
    memory for every batch), so it is one GEMM over all batches, returned in batch 0 with
    zeros elsewhere (the same sum).
    """
    if sum_batches and a_op.dim() == 3:
        p, r, q = a_op.shape[1], a_op.shape[2], b_op.shape[2]
        a2 = a_op.expand(b_op.shape[0], p, r).transpose(0, 1).reshape(p, -1)  # [P, Bt*R]
        total = run_mm(engine, gemm, a2, b_op.expand(a_op.shape[0], r, q).reshape(-1, q), b_side, form)
        out = total.new_zeros(max(a_op.shape[0], b_op.shape[0]), p, q)
        out[0] = total
        return out
    if a_op.dim() == 2:
        if b_side == 1:
            return engine.mm(gemm, a_op, b_op.t(), a_op.dtype, form, count)
        return engine.mm(gemm, b_op.t(), a_op, a_op.dtype, form, count).t()
    side = (a_op, b_op)[b_side]
    bcast = broadcast(side) if side_bcast is None else side_bcast
    if bcast and gemm != "wgrad":  # one matrix for every batch: fold the batch into M
        if b_side == 1:
            out = engine.mm(gemm, a_op.reshape(-1, a_op.shape[-1]), b_op[0].t(), a_op.dtype, form)
            return out.reshape(a_op.shape[0], a_op.shape[1], b_op.shape[-1])
        rows = b_op.transpose(1, 2).reshape(-1, b_op.shape[1])  # [B*Q, R]
        out = engine.mm(gemm, rows, a_op[0], a_op.dtype, form)  # [B*Q, P]
        return out.reshape(b_op.shape[0], b_op.shape[2], a_op.shape[1]).transpose(1, 2)
    n = max(a_op.shape[0], b_op.shape[0])
    flops = 2.0 * n * a_op.shape[1] * a_op.shape[2] * b_op.shape[2]
    problem = batch_problem(side) if not bcast else None
    if problem is None and n > MAX_BATCH_LOOP:
        problem = f"{gemm} of a shared matrix over {n} batches (a sum of GEMMs)"
    if problem:
        with engine_scope():
            out = torch.bmm(a_op, b_op)
        engine.count(gemm, problem, form, flops, None)
        return out
    pick = lambda t, i: t[0] if t.shape[0] == 1 else t[i]  # noqa: E731
    out = torch.stack([run_mm(engine, gemm, pick(a_op, i), pick(b_op, i), b_side, form, count=False)
                       for i in range(n)])
    engine.count(gemm, engine.last_why, form, flops, None)  # one batched GEMM, as the model wrote it
    return out


def _with_bias(func, args, kwargs, out: torch.Tensor) -> torch.Tensor:
    """``beta·bias + alpha·out`` for addmm/baddbmm (``out`` as is for mm/bmm)."""
    alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
    out = out * alpha if alpha != 1 else out
    if func in (_aten.addmm.default, _aten.baddbmm.default) and beta != 0:
        out = out + (args[0] * beta if beta != 1 else args[0])
    return out


def conv_fprop(engine: ParamEngine, args) -> torch.Tensor:
    """A 1x1 convolution ``x[B, Cin, *S]`` as the GEMM ``x[B*S, Cin] · W[Cout, Cin]ᵀ``, plus bias."""
    x, w, bias = args[0], args[1], args[2]
    cout, cin = w.shape[0], w.shape[1]
    rows = x.movedim(1, -1)  # [B, *S, Cin]
    out = engine.mm("fprop", rows.reshape(-1, cin), w.reshape(cout, cin), x.dtype, "convolution")
    out = out.reshape(*rows.shape[:-1], cout).movedim(-1, 1)
    return out if bias is None else out + bias.reshape(cout, *([1] * (x.dim() - 2)))


def conv_backward(engine: ParamEngine, args) -> tuple:
    """``convolution_backward`` of a 1x1 convolution: dgrad and wgrad as GEMMs, the bias grad a sum."""
    dy, x, w, mask = args[0], args[1], args[2], args[10]
    cout, cin = w.shape[0], w.shape[1]
    dy_rows = dy.movedim(1, -1).reshape(-1, cout)  # [M, Cout]
    dx = dw = db = None
    if mask[0]:
        dx = engine.mm("dgrad", dy_rows, w.reshape(cout, cin).t(), dy.dtype, "convolution_backward")
        dx = dx.reshape(*x.movedim(1, -1).shape).movedim(-1, 1)
    if mask[1]:
        x_rows = x.movedim(1, -1).reshape(-1, cin)  # [M, Cin]
        dw = engine.mm("wgrad", dy_rows.t(), x_rows.t(), dy.dtype, "convolution_backward").reshape(w.shape)
    if mask[2]:
        db = dy.sum(dim=[d for d in range(dy.dim()) if d != 1])
    return dx, dw, db


class _Bprop(TorchDispatchMode):
    """During one autograd node whose saved operands belong to a converted GEMM: its GEMMs go to the engine.

    Pushed by the unpack hook, so it is on top of any mode the caller's backward runs under
    (their counts see loka's FP8 kernels, not the GEMM it replaced); autograd restores the
    thread's mode stack after each node, which pops it.
    """

    def __init__(self, router: "ParamGemms") -> None:
        super().__init__()
        self.router = router
        self.saved: dict[int, _Saved] = {}  # storage pointer -> the marked operand

    def _hit(self, t) -> "_Saved | None":
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.numel() == 0:
            return None
        return self.saved.get(t.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MM_OPS:
            ia, ib = MM_OPS[func]
            hits = [(i, h) for i, h in ((0, self._hit(args[ia])), (1, self._hit(args[ib]))) if h is not None]
            if len(hits) == 1:
                side, rec = hits[0]
                gemm = "dgrad" if rec.role == "weight" else "wgrad"
                self.router.engines[rec.site].current_pair = rec.pair
                out = run_mm(self.router.engines[rec.site], gemm, args[ia], args[ib], side,
                             func.overloadpacket.__name__, side_bcast=rec.bcast or None,
                             sum_batches=gemm == "wgrad" and rec.bcast)
                return _with_bias(func, args, kwargs, out)
        elif func is CONV_BACKWARD:
            rec = self._hit(args[2])
            conv_args = (args[1], args[2], None, args[4], args[5], args[6], args[7], args[8], args[9])
            if rec is not None and rec.role == "weight" and conv_gemm_problem(conv_args) is None:
                self.router.engines[rec.site].current_pair = rec.pair
                return conv_backward(self.router.engines[rec.site], args)
        return func(*args, **kwargs)


class _Saved:
    __slots__ = ("t", "site", "role", "bcast", "pair")

    def __init__(self, t: torch.Tensor, site: str | None, role: str | None) -> None:
        self.t, self.site, self.role, self.bcast, self.pair = t, site, role, False, None


class _Fprop(TorchDispatchMode):
    """Inside one call on a converted parameter: its GEMMs go to the engines."""

    def __init__(self, router: "ParamGemms") -> None:
        super().__init__()
        self.router = router

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = self.router
        if func in MM_OPS:
            ia, ib = MM_OPS[func]
            sites = (r.engine_site(args[ia]), r.engine_site(args[ib]))
            if (sites[0] is None) != (sites[1] is None):
                side = 1 if sites[1] is not None else 0
                engine = r.engines[sites[side]]
                w = (args[ia], args[ib])[side]
                bcast = w.dim() == 3 and w.shape[0] > 1 and r.index.broadcast(w)
                r.fprop_seen(engine, args[(ia, ib)[1 - side]], bcast, w)
                out = run_mm(engine, "fprop", args[ia], args[ib], side, func.overloadpacket.__name__,
                             side_bcast=bcast or None)
                return _with_bias(func, args, kwargs, out)
            r.unmark(args[ia], args[ib])  # an hp GEMM (two parameters): its backward stays hp too
        elif func is CONV:
            site = r.engine_site(args[1])
            if site is not None and conv_gemm_problem(args) is None:
                r.fprop_seen(r.engines[site], args[0], weight=args[1])
                return conv_fprop(r.engines[site], args)
            r.unmark(args[1])
        out = func(*args, **kwargs)
        r.index.note(func, args, out)
        return out


class _Route(TorchFunctionMode):
    """During the model's forward: calls that touch a converted parameter run under :class:`_Fprop`."""

    def __init__(self, router: "ParamGemms") -> None:
        super().__init__()
        self.router = router

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.router.touches(args, kwargs):
            return func(*args, **kwargs)
        with self.router.scope():
            return func(*args, **kwargs)


# _warn_compiled, run outside any compiled graph: torch.compiler.disable is applied when a model is
# attached (it imports torch._dynamo, and with it triton: far too heavy for `import loka`)
_OUTSIDE_GRAPH: dict = {}


def _warn_compiled(sites: list[str]) -> None:
    warnings.warn(f"loka: the parameter GEMM sites {sites} run in hp inside torch.compile (their ATen-level "
                  "routing runs eagerly only; Float8Linear sites compile in FP8); their counts do not grow, so "
                  "loka.convert's gemm_counts shows it. Run them eagerly for FP8.", UserWarning, stacklevel=2)


class ParamGemms:
    """The converted parameter sites of a model, ``{site: ParamEngine}``, and their routing."""

    def __init__(self, engines: dict[str, ParamEngine]) -> None:
        self.engines = dict(engines)
        self.index = ParamIndex({s: e.param for s, e in engines.items()})
        self._packed: dict[int, _Saved] = {}
        self._route = _Route(self)

    def add(self, engines: dict[str, ParamEngine]) -> None:
        self.engines.update(engines)
        self.index = ParamIndex({s: e.param for s, e in self.engines.items()})

    def engine_site(self, t) -> str | None:
        site = self.index.site_of(t)
        return site if site in self.engines else None

    def touches(self, args, kwargs) -> bool:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if self.engine_site(a) is not None:
                    return True
            elif isinstance(a, (list, tuple)) and any(self.engine_site(t) is not None for t in a):
                return True
        return False

    @contextlib.contextmanager
    def scope(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), _Fprop(self):
                yield
        finally:
            self._packed.clear()

    def _pack(self, t: torch.Tensor) -> _Saved:
        site = self.engine_site(t)
        rec = _Saved(t, site, "weight" if site is not None else None)
        rec.bcast = site is not None and t.dim() == 3 and t.shape[0] > 1 and self.index.broadcast(t)
        self._packed[id(t)] = rec
        return rec

    def _unpack(self, rec: _Saved) -> torch.Tensor:
        if rec.role is not None and rec.t.numel():
            mode = _get_current_dispatch_mode()
            if not isinstance(mode, _Bprop) or mode.router is not self:
                mode = _Bprop(self)
                _push_mode(mode)  # popped when autograd restores the stack after this node
            mode.saved[rec.t.untyped_storage().data_ptr()] = rec
        return rec.t

    def unmark(self, *tensors) -> None:
        """Saved operands of a GEMM that runs in hp: their backward is not routed."""
        for t in tensors:
            rec = self._packed.get(id(t))
            if rec is not None:
                rec.role = None

    def fprop_seen(self, engine: ParamEngine, partner: torch.Tensor, bcast: bool = False,
                   weight: torch.Tensor | None = None) -> None:
        """An fprop of ``engine``: the GEMMs it implies, and its other operand marked for wgrad
        (``bcast``: the parameter side was one matrix expanded over the batch)."""
        engine.expected["fprop"] += 1
        if torch.is_grad_enabled():
            engine.expected["dgrad"] += int(partner.requires_grad)
            engine.expected["wgrad"] += int(engine.param.requires_grad)
        rec = self._packed.get(id(partner))
        if rec is not None and rec.role is None:
            rec.site, rec.role, rec.bcast = engine.site, "input", bcast
            rec.pair = engine.pair_key()
        rec_w = self._packed.get(id(weight)) if weight is not None else None
        if rec_w is not None and rec_w.role == "weight":
            rec_w.pair = engine.pair_key()

    # --- attached to the model's forward ----------------------------------------------------
    def _enter(self, module, args) -> None:  # a pre-hook's return value would replace the inputs
        if torch.compiler.is_compiling():
            _OUTSIDE_GRAPH["warn"](sorted(self.engines))
            return
        self.index.refresh()
        self._route.__enter__()

    def _leave(self, module, args, out) -> None:
        if not torch.compiler.is_compiling():
            self._route.__exit__(None, None, None)

    def attach(self, model: nn.Module) -> list:
        """Route during ``model``'s forwards; returns the hooks' handles."""
        if "warn" not in _OUTSIDE_GRAPH:
            _OUTSIDE_GRAPH["warn"] = torch.compiler.disable(_warn_compiled)
        return [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave, always_call=True)]


__all__ = ["ParamEngine", "ParamGemms", "run_mm"]
