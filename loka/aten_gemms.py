"""GEMMs where they are GEMMs: the ATen ops, the parameter behind an operand, and who observed what.

However a model's code spells a product with a parameter (``nn.Linear``, ``F.linear``,
``x @ W``, ``torch.matmul(W[i], x)``, ``torch.tensordot``, any ``einsum``, a 1x1
convolution, ``nn.MultiheadAttention``), it reaches ATen as one of ``mm``, ``addmm``,
``bmm``, ``baddbmm`` or ``convolution`` with the parameter, a view of it (``W[i]``,
``W.t()``, a reshape) or a copy of it (autocast's bf16 cast) as an operand. This module
is the one place that says so, for the census, the probe's capture and the conversion:

- :class:`ParamIndex`: which site an operand belongs to, by the storage it views; copies
  made from a parameter (``_to_copy``/``clone``, e.g. autocast's bf16 weight) are followed.
- :func:`gemm_flops`, :func:`conv_gemm_problem`, :func:`batch_problem`: the FLOPs of a GEMM
  op and why a product is not one plain 2-D GEMM.
- Observation: what ran in FP8 is *reported* by the code that ran it (loka's GEMM engines
  call :func:`report`); a :class:`GemmObserver` (a ``TorchDispatchMode``) adds every GEMM on
  a parameter that ran in hp, and every activation x activation GEMM, so the claims made
  from it (census shares, ``ConvertResult.converted``) are what ran, never what was hoped.

A site is named like the design's sites: a Linear's or convolution's weight by the owning
module's fqn, any other parameter by its own fqn.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

NO_PARAM = "(no parameter operand)"
_aten = torch.ops.aten
# GEMM op -> (index of the left operand, index of the right operand) of out = A @ B (+ bias)
MM_OPS = {_aten.mm.default: (0, 1), _aten.addmm.default: (1, 2), _aten.bmm.default: (0, 1),
          _aten.baddbmm.default: (1, 2)}
CONV = _aten.convolution.default
CONV_BACKWARD = _aten.convolution_backward.default
COPY_OPS = {_aten._to_copy.default, _aten.clone.default}
SDPA = {getattr(_aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                          "_scaled_dot_product_flash_attention",
                                          "_scaled_dot_product_efficient_attention",
                                          "_scaled_dot_product_cudnn_attention",
                                          "_scaled_dot_product_attention_math")} - {None}
MAX_BATCH_LOOP = 64  # a batched GEMM with distinct parameter slices runs as this many 2-D GEMMs at most


def param_sites(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """``{param fqn: (site name, parameter)}`` for every floating parameter with 2+ dims."""
    out, seen = {}, set()
    for mod_fqn, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or p.dim() < 2 or not p.is_floating_point():
                continue
            seen.add(id(p))
            full = f"{mod_fqn}.{name}" if mod_fqn else name
            owned = name == "weight" and isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd))
            out[full] = (mod_fqn if owned else full, p)
    return out


def storage_ptr(t: torch.Tensor) -> int | None:
    """The tensor's storage, or None for a wrapper without one (an FSDP2 DTensor shard, a torchrec
    sharded table): its GEMMs run on a gathered copy, which the index cannot name by storage."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # "invalid python storage": a tensor subclass that holds no storage itself
        return None


class ParamIndex:
    """Which site a tensor belongs to: a parameter's storage, or a copy made of one."""

    def __init__(self, sites: dict[str, nn.Parameter]) -> None:
        self.sites = dict(sites)  # site name -> parameter
        self._derived: dict[int, tuple[weakref.ref, str]] = {}
        self._bcast: set[int] = set()  # copies of a parameter expanded over a batch (one matrix per batch)
        self.refresh()

    def refresh(self) -> None:
        """Re-read storages (``model.to()`` moves them) and forget copies that died."""
        self._by_ptr = {}
        for site, p in self.sites.items():
            ptr = storage_ptr(p) if p.numel() else None
            if ptr is not None:
                self._by_ptr.setdefault(ptr, site)
        self._derived = {k: v for k, v in self._derived.items() if v[0]() is not None}
        self._bcast &= set(self._derived)

    def site_of(self, t) -> str | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.numel() == 0:
            return None
        ptr = storage_ptr(t)
        site = self._by_ptr.get(ptr) if ptr is not None else None
        if site is not None or ptr is None:
            return site
        hit = self._derived.get(ptr)
        if hit is not None:
            ref = hit[0]()
            if ref is not None and ref.untyped_storage().data_ptr() == ptr:
                return hit[1]
        return None

    def note(self, func, args, out) -> None:
        """Follow a copy of a parameter (autocast's cast, ``.to()``, ``clone``)."""
        if func in COPY_OPS and isinstance(out, torch.Tensor) and out.numel():
            site = self.site_of(args[0])
            if site is not None:
                ptr = out.untyped_storage().data_ptr()
                self._derived[ptr] = (weakref.ref(out), site)
                if args[0].dim() == 3 and self.broadcast(args[0]):
                    self._bcast.add(ptr)
                else:
                    self._bcast.discard(ptr)

    def broadcast(self, t: torch.Tensor) -> bool:
        """``t`` is one matrix for every batch: by its strides, or as a copy of such a view."""
        return broadcast(t) or (t.numel() > 0 and t.untyped_storage().data_ptr() in self._bcast)


def gemm_flops(func, args, out) -> float:
    """2·M·K·N of one GEMM op (a convolution: 2 · output elements · its reduction length)."""
    if func in MM_OPS:
        return 2.0 * out.numel() * args[MM_OPS[func][0]].shape[-1]
    if func is CONV:
        groups = args[8] if len(args) > 8 else 1
        return 2.0 * out.numel() * (args[0].shape[1] // groups) * math.prod(args[1].shape[2:])
    if func is _aten._scaled_mm.default:
        return 2.0 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
    return 0.0


def conv_gemm_problem(args) -> str | None:
    """Why ``aten.convolution(*args)`` is not one GEMM ``x[B*L, Cin] · W[Cout, Cin]ᵀ`` (None when it is)."""
    w = args[1]
    stride, padding, transposed, groups = args[3], args[4], args[6], args[8]
    if any(k != 1 for k in w.shape[2:]):
        return f"convolution kernel {tuple(w.shape[2:])} is wider than 1x1 (not a plain GEMM)"
    if transposed or groups != 1 or any(s != 1 for s in stride) or any(p != 0 for p in padding):
        return f"1x1 convolution with stride {list(stride)}, padding {list(padding)}, groups {groups}" \
               f"{', transposed' if transposed else ''} (need 1, 0, 1)"
    return None


def broadcast(t: torch.Tensor) -> bool:
    """A batched operand that is one matrix for every batch (expanded, or a batch of one)."""
    return t.dim() == 2 or t.shape[0] == 1 or t.stride(0) == 0


def batch_problem(t: torch.Tensor) -> str | None:
    """Why a batched GEMM with ``t`` as the parameter side cannot run as FP8 2-D GEMMs."""
    if broadcast(t) or t.shape[0] <= MAX_BATCH_LOOP:
        return None
    return f"batched GEMM with {t.shape[0]} distinct parameter slices (at most {MAX_BATCH_LOOP} run as 2-D GEMMs)"


# --- observation ---------------------------------------------------------------------------

@dataclass
class SiteCount:
    """What ran at one site: GEMM FLOPs and calls in FP8 and in hp, per GEMM, and why hp."""

    fp8: dict = field(default_factory=lambda: {"fprop": 0, "dgrad": 0, "wgrad": 0})
    hp: dict = field(default_factory=lambda: {"fprop": 0, "dgrad": 0, "wgrad": 0})
    fp8_flops: float = 0.0
    hp_flops: float = 0.0
    fprop_flops: float = 0.0
    convertible_flops: float = 0.0  # FLOPs of GEMMs in a form loka's engines take (FP8 or not yet converted)
    why_hp: dict = field(default_factory=dict)  # reason -> count
    why_not: dict = field(default_factory=dict)  # why a GEMM's form is not convertible -> count
    forms: set = field(default_factory=set)  # the ATen ops the site's GEMMs reached
    fprop_shapes: list = field(default_factory=list)  # [(M, K, N)] of the first fprop calls

    @property
    def flops(self) -> float:
        return self.fp8_flops + self.hp_flops


_TLS = threading.local()
# Active observers, process-wide: a backward on CUDA runs on autograd's device threads, which
# see the dispatch mode (autograd carries it over) but not this thread's Python locals.
_OBSERVERS: list = []


def _observers() -> list:
    return _OBSERVERS


def observing() -> bool:
    """Whether a :class:`GemmObserver` is active (engines report only then)."""
    return bool(_OBSERVERS)


def report(site: str | None, gemm: str, flops: float, fp8: bool, form: str, why: str = "", shape=None,
           param: torch.Tensor | None = None, convertible: bool | None = None) -> None:
    """Called by the code that ran a GEMM of ``site`` (or of ``param``'s site): in FP8 or not, and why not.

    ``convertible``: whether its form runs in FP8 (default: it does if it did, else ``why`` says not).
    """
    problem = None if (fp8 if convertible is None else convertible) else (why or "ran in hp")
    for obs in _observers():
        name = site if site is not None else (obs.index.site_of(param) or "(unnamed GEMM module)")
        obs.add(name, gemm, flops, fp8, form, why, shape, problem)


@contextlib.contextmanager
def engine_scope():
    """While loka's own kernels run: the ops they issue are not the model's GEMMs."""
    depth = getattr(_TLS, "engine_depth", 0)
    _TLS.engine_depth = depth + 1
    try:
        yield
    finally:
        _TLS.engine_depth = depth


def in_engine() -> bool:
    return getattr(_TLS, "engine_depth", 0) > 0


class GemmObserver(TorchDispatchMode):
    """Counts every GEMM of the region it is active in, by site (see module doc).

    Reports from loka's engines give the FP8 GEMMs (and the hp ones they chose); the mode
    itself sees hp GEMMs whose operand is a parameter (or a view/copy of one), which no
    engine ran, and GEMMs with no parameter operand (``NO_PARAM``). Backward GEMMs of an
    hp site are named by the autograd node that runs them (mapped from the forward op).
    """

    def __init__(self, index: ParamIndex) -> None:
        super().__init__()
        self.index = index
        self.counts: dict[str, SiteCount] = {}
        self._nodes: dict[int, tuple] = {}  # id(grad_fn) -> (site, grad_fn kept alive, form problem)
        self._pending: list[tuple] = []

    def add(self, site, gemm, flops, fp8, form, why="", shape=None, problem: str | None = None) -> None:
        """One GEMM of ``site``; ``problem``: why its form cannot run in FP8 (None: it can, or it did)."""
        c = self.counts.setdefault(site, SiteCount())
        (c.fp8 if fp8 else c.hp)[gemm] += 1
        c.fprop_flops += flops if gemm == "fprop" else 0.0
        if fp8:
            c.fp8_flops += flops
        else:
            c.hp_flops += flops
            if why:
                c.why_hp[why] = c.why_hp.get(why, 0) + 1
        if problem is None and site != NO_PARAM:
            c.convertible_flops += flops
        elif problem is not None:
            c.why_not[problem] = c.why_not.get(problem, 0) + 1
        c.forms.add(form)
        if gemm == "fprop" and shape is not None and len(c.fprop_shapes) < 4:
            c.fprop_shapes.append(tuple(int(s) for s in shape))

    def __enter__(self):
        _OBSERVERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._resolve()
        _OBSERVERS[:] = [o for o in _OBSERVERS if o is not self]
        return super().__exit__(*exc)

    def _resolve(self) -> None:
        for out, site, problem in self._pending:
            node = out.grad_fn
            if node is not None:
                self._nodes[id(node)] = (site, node, problem)
        self._pending.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if in_engine():
            return out
        if self._pending and torch._C._current_graph_task_id() != -1:
            self._resolve()  # backward started: forward outputs have their autograd nodes now
        self.index.note(func, args, out)
        if func in MM_OPS or func is CONV:
            self._hp_gemm(func, args, out)
        elif func is CONV_BACKWARD:
            self._hp_conv_backward(args)
        elif func.overloadpacket in SDPA:
            q, k_, v = args[0], args[1], args[2]
            flops = 2.0 * math.prod(q.shape[:-1]) * k_.shape[-2] * (q.shape[-1] + v.shape[-1])
            self.add(NO_PARAM, "fprop", flops, False, "attention kernel")
        return out

    def _hp_gemm(self, func, args, out) -> None:
        flops, form = gemm_flops(func, args, out), str(func.overloadpacket.__name__)
        ops = (args[0], args[1]) if func is CONV else tuple(args[i] for i in MM_OPS[func])
        sites = [self.index.site_of(t) for t in ops]
        site = sites[1] or sites[0]
        node = torch._C._current_autograd_node() if torch._C._current_graph_task_id() != -1 else None
        hit = self._nodes.get(id(node)) if node is not None else None
        if hit is not None:  # a backward GEMM of a forward parameter GEMM: named by that GEMM's node
            gemm = "dgrad" if hit[0] in sites else "wgrad"
            self.add(hit[0], gemm, flops, False, form, "ran in hp (no loka engine took it)", problem=hit[2])
            return
        if site is not None:
            problem = self.form_problem(func, args, ops, sites)
            gemm = "fprop" if torch._C._current_graph_task_id() == -1 else "dgrad"
            self.add(site, gemm, flops, False, form, "ran in hp (no loka engine took it)", _mkn(func, args, out),
                     problem)
            if gemm == "fprop":
                self._pending.append((out, site, problem))
            return
        self.add(NO_PARAM, "fprop", flops, False, form)

    def _hp_conv_backward(self, args) -> None:
        dy, w, mask = args[0], args[2], args[10]
        site = self.index.site_of(w)
        conv_args = (args[1], w, None, args[4], args[5], args[6], args[7], args[8], args[9])
        problem = conv_gemm_problem(conv_args)
        flops = 2.0 * dy.numel() * (args[1].shape[1] // args[9]) * math.prod(w.shape[2:])
        for gemm, wanted in zip(("dgrad", "wgrad"), mask[:2]):
            if wanted:
                self.add(site or NO_PARAM, gemm, flops, False, "convolution_backward",
                         "ran in hp (no loka engine took it)", problem=problem)

    def form_problem(self, func, args, ops, sites) -> str | None:
        """Why this GEMM on a parameter is in a form loka's engines cannot run in FP8 (None: they can)."""
        if func is CONV:
            return conv_gemm_problem(args)
        if sites[0] is not None and sites[1] is not None:
            return "both operands are parameters"
        side = ops[1] if sites[1] is not None else ops[0]
        if side.dim() == 3 and not self.index.broadcast(side):
            return batch_problem(side)
        return None


def _mkn(func, args, out) -> tuple[int, int, int]:
    if func is CONV:
        return out.numel() // out.shape[1], args[0].shape[1], out.shape[1]
    k = args[MM_OPS[func][0]].shape[-1]
    return out.numel() // out.shape[-1], k, out.shape[-1]
