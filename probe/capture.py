"""Capturing the operands of a site's three GEMMs on a sampled step.

On a sampled step each active site gets one forward hook. It records the input
``x`` and the weight ``W`` (detached copies: the optimizer may update ``W`` in place
before the step ends) and registers a tensor hook on the output that records the
output gradient ``dy`` when backward reaches it. A tensor hook observes the gradient
and returns nothing, so autograd's numerics are untouched, and nothing is recorded
when there is no backward (evaluation) or the output does not require grad.

Large operands are row-sampled at capture time: at most ``capture_rows`` random rows of
``x`` are copied, and the same rows of ``dy`` (so wgrad's pairing of x and dy rows holds).
The element count, non-finite count and amax are still taken over the whole tensor, so
non-finite values are never missed, by reductions that run a fixed-size chunk at a time
(:func:`exact_counts`): nothing of the operand's size is allocated. This bounds both the
memory and the analysis cost of a sampled step at large batch sizes.

The hooks never wait for the device (no ``.item()``, no pageable host-device copy, no
boolean indexing) except where ``allow_sync`` says a sync is free (CPU): reading values
back is left to the analysis after the step (:mod:`loka.probe.probe`'s worker).

Every forward call of a site is one *micro-batch* record ``(x, W, dy)``; gradient
accumulation (several forward/backward pairs per step) and a module called several
times per forward simply give several records, each paired with its own ``dy``.
Hooks are removed when the step ends, so unsampled steps run no probe code at all.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from loka.probe.sites import channels_first


@dataclass
class MicroBatch:
    """One forward call of a site: operands in the GEMM layout, reduction dim last."""

    x: torch.Tensor  # [m, K] input rows kept (m <= M), as the GEMM saw them (bf16 under autocast)
    w: torch.Tensor  # [N, K] weight, in the dtype the GEMM used
    m: int  # M, the rows of the whole input
    x_full: torch.Tensor  # [numel, nonfinite, finite amax] of the whole input (float64, on its device)
    rows: torch.Tensor | None = None  # kept row indices (on the operands' device), None when all rows are kept
    dy: torch.Tensor | None = None  # [m, N] output gradient rows, None until/unless backward ran
    dy_full: torch.Tensor | None = None
    channels_first: bool = False  # a 1x1 Conv1d: x and dy arrive [B, K, L] and are read as [B, L, K]


# Reductions over a whole activation or gradient go CHUNK_ELEMENTS at a time, so their
# temporaries (a chunk cast to the GEMM's dtype and one work buffer) stay a fixed size whatever
# the operand's size: at most 16 bytes per chunk element (64 MiB), 4 (16 MiB) for bf16.
CHUNK_ELEMENTS = 1 << 22


def exact_counts(t: torch.Tensor, dtype: torch.dtype | None = None, *, allow_sync: bool | None = None) -> torch.Tensor:
    """``[numel, nonfinite, finite amax]`` of ``t`` cast to ``dtype`` (float64, on ``t``'s device).

    Exact over the whole tensor, with bounded extra memory: nothing of ``t``'s size is ever
    allocated (no full cast, mask or int64 copy; see :data:`CHUNK_ELEMENTS`). ``allow_sync``
    (None: only on CPU, where it is free) lets one reduction settle the common all-finite
    case: ``max|t|`` is NaN or Inf exactly when a value is, and reading it is a device sync.
    Without it every chunk counts its non-finite values, and nothing waits for the device.
    """
    dtype = dtype or t.dtype
    numel = torch.full((), float(t.numel()), dtype=torch.float64, device=t.device)
    if t.numel() == 0:
        return torch.stack([numel, numel.new_zeros(()), numel.new_zeros(())])
    may_sync = t.device.type == "cpu" if allow_sync is None else allow_sync
    if may_sync:
        # Rounding to ``dtype`` is monotone, so the cast of max|t| is the max of the cast values.
        amax = _max_abs(t).to(dtype).double()
        if bool(torch.isfinite(amax)):
            return torch.stack([numel, amax.new_zeros(()), amax])
    nonfinite, amax = [], []
    for c in _chunks(t, CHUNK_ELEMENTS):
        c = c.to(dtype)  # a chunk-sized cast: values out of dtype's range become Inf, as in the GEMM
        work = c - c  # 0 where c is finite, NaN where it is NaN or +-Inf
        nonfinite.append(_count_nan(work, t.device.type))
        torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0, out=work)
        amax.append(_max_abs(work))
        del c, work  # free this chunk's buffers before the next chunk allocates its own
    nonfinite_sum = torch.stack(nonfinite).double().sum()  # float64 before summing: exact past 2**24
    return torch.stack([numel, nonfinite_sum, torch.stack(amax).amax().double()])


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max|t|`` in one pass with no temporary (NaN if any value is NaN): ``aminmax`` is several
    times faster on CPU than ``abs().amax()`` (which copies) or an inf-norm."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi)


def _count_nan(work: torch.Tensor, device_type: str) -> torch.Tensor:
    """The NaN count of ``work`` (0 or NaN everywhere; overwritten), without a temporary on CPU
    (``count_nonzero`` is one pass there) nor elsewhere, where ``count_nonzero`` is
    ``(x != 0).sum()``: a bool mask and an int64 copy of it."""
    if device_type == "cpu":
        return torch.count_nonzero(work)
    return work.nan_to_num_(nan=1.0).sum(dtype=torch.float32)  # exact: a chunk has < 2**24 elements


def _chunks(t: torch.Tensor, size: int):
    """Views of ``t`` of at most ``size`` elements covering it once (no copies, any strides)."""
    if t.numel() <= size:
        yield t
    elif t.is_contiguous():
        yield from t.view(-1).split(size)
    elif t[0].numel() > size:
        for part in t.unbind(0):
            yield from _chunks(part, size)
    else:
        yield from t.split(size // t[0].numel(), dim=0)


def take_rows(t: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``t[..., K]`` as GEMM rows ``[m, K]`` in ``dtype``: the ``rows`` kept (flat row indices on
    ``t``'s device), or all of them; a fresh copy of only what is kept, whatever ``t``'s strides."""
    lead = t.shape[:-1]
    if rows is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.device)
        return out.copy_(t).view(-1, t.shape[-1])
    return t[_unravel(rows, lead)].to(dtype)


def _unravel(rows: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, ...]:
    """Flat row indices as one index tensor per leading dim. Integer arithmetic with Python
    ints only: ``torch.unravel_index`` builds its divisors with ``torch.tensor(..., device=)``,
    a pageable host-to-device copy, which is a sync on CUDA."""
    index = []
    for d in reversed(lead[1:]):
        index.append(rows % d)
        rows = rows // d
    return (rows, *reversed(index))


@dataclass
class StepCapture:
    """Everything captured at the active sites during one sampled step.

    ``allow_sync``: whether the hooks may read a value back from the device (see
    :func:`exact_counts`); None allows it only on CPU, where it costs nothing.
    """

    step: int
    capture_rows: int = 1 << 62
    seed: int = 0
    allow_sync: bool | None = None
    records: dict[str, list[MicroBatch]] = field(default_factory=dict)
    hook_seconds: float = 0.0  # time spent inside the hooks (probe cost paid during the step)
    handles: list[RemovableHandle] = field(default_factory=list)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _gemm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the GEMM ran in: autocast's dtype when active, else the input's."""
    dev = x.device.type
    if hasattr(torch, "is_autocast_enabled") and _autocast_on(dev):
        return torch.get_autocast_dtype(dev) if hasattr(torch, "get_autocast_dtype") else torch.bfloat16
    return x.dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older signature without a device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): nothing is autocast there
        return False


def record_forward(capture: StepCapture, fqn: str, module: nn.Module, x: torch.Tensor) -> MicroBatch:
    """What the forward hook keeps of one call: sampled input rows, the weight, exact counts.

    Runs on the training thread at every sampled step: no device sync (unless
    ``capture.allow_sync``) and no temporary of the input's size.
    """
    conv = channels_first(module)
    x = x.detach().transpose(-1, -2) if conv else x.detach()  # [..., K] (a view: no copy)
    dtype = _gemm_dtype(x, module.weight)
    records = capture.records.setdefault(fqn, [])
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    rows = _device_rows(_kept_rows(m, capture, fqn, len(records)), x.device)
    weight = module.weight.detach()
    w = weight.reshape(weight.shape[0], -1).to(dtype, copy=True)  # [N, K]; the optimizer may update W later
    rec = MicroBatch(x=take_rows(x, rows, dtype), w=w, m=m, rows=rows,
                     x_full=exact_counts(x, dtype, allow_sync=capture.allow_sync), channels_first=conv)
    records.append(rec)
    return rec


def record_grad(capture: StepCapture, rec: MicroBatch, grad: torch.Tensor) -> None:
    """What the output's tensor hook keeps of ``dy``: the rows kept of ``x``, exact counts."""
    dy = grad.detach().transpose(-1, -2) if rec.channels_first else grad.detach()  # [..., N]
    rec.dy_full = exact_counts(dy, allow_sync=capture.allow_sync)
    rec.dy = take_rows(dy, rec.rows, dy.dtype)  # the total gradient of the output, once per backward


def _forward_hook(fqn: str, capture: StepCapture):
    def hook(module: nn.Module, args: tuple, output) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        t0 = time.perf_counter()
        try:
            rec = record_forward(capture, fqn, module, args[0])
            if output.requires_grad and torch.is_grad_enabled():
                output.register_hook(_grad_hook(rec, capture))
        finally:
            capture.hook_seconds += time.perf_counter() - t0

    return hook


def _grad_hook(rec: MicroBatch, capture: StepCapture):
    def hook(grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            record_grad(capture, rec, grad)
        finally:
            capture.hook_seconds += time.perf_counter() - t0
        return None  # observe only: autograd's gradient is untouched

    return hook


def _kept_rows(m: int, capture: StepCapture, fqn: str, call: int) -> torch.Tensor | None:
    if m <= capture.capture_rows:
        return None
    # Seeded by (seed, step, site, call) so reruns sample the same rows; the global RNG is untouched.
    key = f"{capture.seed}/{capture.step}/{fqn}/{call}".encode()
    g = torch.Generator().manual_seed(zlib.crc32(key))
    return torch.randperm(m, generator=g)[: capture.capture_rows].sort().values


def _device_rows(rows: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Row indices moved to ``device`` without waiting: a pageable host-to-CUDA copy syncs, a
    pinned ``non_blocking`` one does not (the caching host allocator keeps the buffer alive)."""
    if rows is None or rows.device == device:
        return rows
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def install(sites: dict[str, nn.Module], step: int, capture_rows: int | None = None, seed: int = 0,
            allow_sync: bool | None = None) -> StepCapture:
    """Hook every module in ``sites`` (fqn -> module) for one step; call ``remove_hooks`` after."""
    capture = StepCapture(step=step, capture_rows=capture_rows or (1 << 62), seed=seed, allow_sync=allow_sync)
    for fqn, module in sites.items():
        capture.handles.append(module.register_forward_hook(_forward_hook(fqn, capture)))
    return capture
