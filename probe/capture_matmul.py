"""Capturing the GEMMs of parameters that no module hook sees, at the ATen level.

A cross network's ``x @ self.W``, DCN-M's ``torch.matmul(self.kernels[i], x)``, AutoInt's
``torch.tensordot(x, self.W_Query, ...)``, any ``einsum``, ``F.linear``, the packed projection of
``nn.MultiheadAttention`` and a 1x1 ``Conv2d`` all reach ATen as a GEMM with the parameter (or a
view or autocast copy of it) as an operand. During a sampled step the parameters get the same
routing ``loka.convert`` uses (:class:`loka.param_gemms.ParamGemms`), with a
:class:`CaptureEngine` in place of the FP8 engine: it runs each GEMM in hp, as the model would,
and records it like a Linear's: sampled input rows and the weight as ``[N, K]`` at fprop, the
output gradient when the backward runs the GEMM's dgrad (or its wgrad, when the input needs no
gradient). A site is named by the parameter's site name (a convolution by its module), plus
``#i`` for the i-th GEMM of a forward when a parameter feeds several. Steps that are not
sampled install nothing.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from loka.aten_gemms import engine_scope, param_sites, report
from loka.param_gemms import ParamGemms
from loka.probe.capture import StepCapture, record_forward, record_grad
from loka.probe.sites import is_gemm_module
from loka.recipe import GEMMS

_NOT_GEMM_WEIGHTS = (nn.Embedding, nn.EmbeddingBag)


def matmul_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """``{id(W): (site, W)}`` for every parameter of 2+ dims that no module hook captures: not a
    module site's weight (a Linear the model calls, a 1x1 Conv1d) and not a table."""
    owners = {id(p): (fqn, m) for fqn, m in model.named_modules() for p in m.parameters(recurse=False)}
    parents = {id(c): m for m in model.modules() for c in m.children()}
    out = {}
    for full, (site, p) in param_sites(model).items():
        _, mod = owners[id(p)]
        called = not isinstance(parents.get(id(mod)), nn.MultiheadAttention)  # MHA never calls out_proj
        if full.endswith("weight") and is_gemm_module(mod) and called or isinstance(mod, _NOT_GEMM_WEIGHTS):
            continue
        out[id(p)] = (site, p)
    return out


class _WeightView:
    """What ``record_forward`` reads of a site: its weight as ``[N, K]``."""

    def __init__(self, w_nk: torch.Tensor) -> None:
        self.weight = w_nk


class CaptureEngine:
    """Stands in for a ``ParamEngine`` on a sampled step: each GEMM in hp, its operands recorded."""

    def __init__(self, site: str, param: nn.Parameter, capture: StepCapture) -> None:
        self.site, self._param, self.capture = site, [param], capture
        self.expected = {g: 0 for g in GEMMS}
        self.ran = {g: {"fp8": 0, "hp": 0} for g in GEMMS}
        self.records: dict[int, object] = {}  # fprop number -> MicroBatch
        self.fprops = 0  # fprops so far this step (the pairing key of a backward GEMM)
        self.in_forward = 0  # fprops so far in the current forward (the ``#i`` of a site key)
        self.current_pair: int | None = None
        self.last_why = ""

    @property
    def param(self) -> nn.Parameter:
        return self._param[0]

    def new_forward(self) -> None:
        self.in_forward = 0

    def pair_key(self) -> int:
        return self.fprops

    def count(self, gemm, why, form, flops, shape) -> None:
        self.ran[gemm]["hp"] += 1  # a batched GEMM run slice by slice (``why`` empty) or in hp as a whole
        report(self.site, gemm, flops, False, form, why or "probed in hp", shape, convertible=not why)

    def mm(self, gemm: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, form: str,
           count: bool = True) -> torch.Tensor:
        """``a · bᵀ`` in hp; fprop records ``a`` (input rows) and ``b`` (weight [N, K]), dgrad/wgrad ``dy``."""
        with engine_scope():
            out = (a @ b.to(a.dtype).t()).to(out_dtype)
        shape = (a.shape[0], a.shape[1], b.shape[0])
        self.ran[gemm]["hp"] += 1
        report(self.site, gemm, 2.0 * shape[0] * shape[1] * shape[2], False, form, "probed in hp", shape,
               convertible=True)
        t0 = time.perf_counter()
        try:
            if gemm == "fprop":
                key = self.site if self.in_forward == 0 else f"{self.site}#{self.in_forward}"
                self.records[self.fprops] = record_forward(self.capture, key, _WeightView(b), a)
                self.fprops += 1
                self.in_forward += 1
            else:
                rec = self.records.get(self.current_pair)
                if rec is not None and rec.dy is None:
                    record_grad(self.capture, rec, a if gemm == "dgrad" else a.t())  # dy rows [M, N]
        finally:
            self.capture.hook_seconds += time.perf_counter() - t0
        return out


class _CaptureRouting(ParamGemms):
    def _enter(self, module, args) -> None:
        for e in self.engines.values():
            e.new_forward()
        super()._enter(module, args)


def install_matmul(root: nn.Module, capture: StepCapture, params: dict[int, str]) -> _CaptureRouting | None:
    """Capture the GEMMs of ``params`` (``{id(W): site}``) during ``root``'s forwards and their
    backward this step (the hooks' handles go to ``capture``)."""
    if not params:
        return None
    by_id = {id(p): p for p in root.parameters()}
    engines = {site: CaptureEngine(site, by_id[i], capture) for i, site in params.items() if i in by_id}
    router = _CaptureRouting(engines)
    capture.handles.extend(router.attach(root))
    return router
