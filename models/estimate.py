"""Memory and FLOPs of one training step of the ranker, known before a GPU is touched.

A size that does not fit, or whose time goes to small GEMMs, should be found on a laptop, not
after a GPU job ran out of memory. `estimate_step` runs one real training step (bf16 autocast
forward, backward, optimizer step) of any size at any batch on *fake* CPU tensors
(`FakeTensorMode`: shapes, dtypes and allocations, no storage), so `large` at batch 8192 costs
seconds and no memory, and measures:

- FLOPs per example per arch with `FlopCounterMode`'s formulas: **useful** (the real batch
  once: every matmul forward, and again for each operand that needs a gradient) and
  **executed** (plus the forward of blocks that activation checkpointing recomputes).
  Attention inside the variable-length flash kernel is added from the history lengths
  (4·s²·d forward per example and layer; backward 2x forward useful, 2.5x executed, flash
  recomputing the scores).
- peak memory with `MemTracker` (parameters, gradients, optimizer states, activations,
  temporaries), as the caching allocator would need it at least.

What is modelled rather than run: attention keeps what a flash kernel keeps (q, k, v, output,
logsumexp), as on CUDA, not the [S, S] scores of the CPU math kernel; the sparse embedding
gradient is one row of values and one index per looked-up id (the meta kernel of the sparse
backward cannot size it); autocast follows the CPU's op lists, which match CUDA's for the ops
the ranker uses (Linear, bmm, SDPA in bf16; norms and losses in float32). The history lengths
follow `SyntheticStream`'s law. To be checked against the GPU's own peak memory figure.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

from .batch import Batch
from .config import RankerConfig
from .history_layout import HistoryLayout
from .ranker import Ranker
from .synthetic import history_length
from .train import task_losses, total_loss

ARCHES = ("sparse", "dense", "sequence", "interaction", "over")
BIG_GEMM = 2048  # K and N at or above which FP8 GEMMs beat bf16 on H100/H200 (design.md)


@dataclass(frozen=True)
class StepEstimate:
    """One training step of ``size`` at ``batch_size``; FLOPs are GEMM FLOPs per example."""

    size: str
    batch_size: int
    params: int
    embedding_params: int
    tokens: dict[str, int]  # sequence tokens: real (CLS + events), executed, padded (B * (K + T))
    flops_per_example: dict[str, dict[str, float]]  # arch -> {"useful", "executed"}
    big_gemm_share: float  # of interaction + over useful FLOPs, at sites with K, N >= 2048
    peak_memory_gib: float
    memory_gib: dict[str, float] = field(default_factory=dict)  # peak by kind (MemTracker)
    checkpoint_blocks: bool = False
    embedding_dtype: str = "float32"

    def total_flops(self, kind: str = "useful") -> float:
        return sum(v[kind] for v in self.flops_per_example.values())

    @property
    def interaction_share(self) -> float:
        """Interaction + over arch share of the step's useful GEMM FLOPs."""
        f = self.flops_per_example
        return (f["interaction"]["useful"] + f["over"]["useful"]) / max(self.total_flops(), 1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "interaction_share": self.interaction_share,
                "flops_per_example_total": {k: self.total_flops(k) for k in ("useful", "executed")}}

    def table(self) -> str:
        lines = [f"ranker {self.size}, batch {self.batch_size}: {self.params / 1e6:,.1f} M parameters "
                 f"({(self.params - self.embedding_params) / 1e6:,.1f} M outside embeddings, "
                 f"table {self.embedding_dtype}), checkpointing {'on' if self.checkpoint_blocks else 'off'}",
                 "", "| arch | useful MFLOP / example | executed MFLOP / example | share |", "|---|---|---|---|"]
        total = max(self.total_flops(), 1.0)
        for arch, v in self.flops_per_example.items():
            lines.append(f"| {arch} | {v['useful'] / 1e6:,.1f} | {v['executed'] / 1e6:,.1f} "
                         f"| {v['useful'] / total:.1%} |")
        lines.append(f"| total | {self.total_flops() / 1e6:,.1f} | {self.total_flops('executed') / 1e6:,.1f} | |")
        t = self.tokens
        lines += ["", f"training step GEMM FLOPs (forward + backward); interaction + over: "
                      f"{self.interaction_share:.1%}, {self.big_gemm_share:.1%} of it at K, N >= {BIG_GEMM}",
                  f"sequence tokens: {t['real']:,} real, {t['executed']:,} executed, {t['padded']:,} padded",
                  self.peak_line(),
                  "(fake tensors on CPU; GPU step time and MFU are measured by bench/ranker.py)"]
        return "\n".join(lines)

    def peak_line(self) -> str:
        """The peak and what holds memory at that moment (MemTracker's snapshot at the overall peak),
        in MiB below 1 GiB so that a small model shows no row of 0.00."""
        scale, unit = (1.0, "GiB") if self.peak_memory_gib >= 1 else (1024.0, "MiB")
        held = {k: v * scale for k, v in self.memory_gib.items() if v * scale >= 0.005}
        empty = [k for k in self.memory_gib if k not in held]
        line = (f"estimated peak memory: {self.peak_memory_gib * scale:.2f} {unit} ("
                + ", ".join(f"{k} {v:.2f}" for k, v in held.items()) + ")")
        if "grad" in empty:  # the usual case: activations peak at the end of the forward
            line += (f"; at that moment (in the forward, before backward allocates gradients) "
                     f"{', '.join(empty)} hold nothing")
        elif empty:
            line += f"; {', '.join(empty)} hold nothing at that moment"
        return line


def _mem_tracker():
    """torch's MemTracker, or a clear error naming what is missing."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker  # optional: a torch.distributed tool
    except ImportError as exc:
        raise RuntimeError(f"loka.models.estimate needs torch's MemTracker ({exc}); install a torch "
                           ">= 2.5 built with torch.distributed.") from exc
    return MemTracker


def shape_batch(cfg: RankerConfig, batch_size: int, seed: int = 0) -> Batch:
    """A batch with real shapes and history lengths (`SyntheticStream`'s law) and zero ids:
    all an estimate needs, and far cheaper than generating examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    b, t = batch_size, cfg.history_len
    gen = torch.Generator().manual_seed(seed)
    length = history_length(gen, b, t) if t else torch.zeros(b)
    mask = torch.arange(t) < length.floor().clamp(0, t)[:, None]
    zeros = torch.zeros(b, t, dtype=torch.long)
    return Batch(dense=torch.zeros(b, cfg.n_dense), sparse=torch.zeros(b, cfg.n_sparse, dtype=torch.long),
                 multi_hot=torch.zeros(b, cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.long),
                 multi_hot_mask=torch.ones(b, cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.bool),
                 hist_items=zeros, hist_actions=zeros, hist_gaps=zeros.float(), hist_mask=mask,
                 labels=torch.zeros(b, len(cfg.tasks)), label_weights=torch.ones(b, len(cfg.tasks)))


def estimate_step(cfg: RankerConfig, batch_size: int, seed: int = 0, memory: bool = True,
                  flops: bool = True) -> StepEstimate:
    """Peak memory and FLOPs per arch of one bf16-autocast training step; see the module doc.
    ``memory=False`` / ``flops=False`` skip that pass (each is one step on fake tensors)."""
    batch = shape_batch(cfg, batch_size, seed)
    layout = (HistoryLayout.jagged_tokens(batch.hist_mask, cfg.seq_summary_tokens, attention="flash-estimate")
              if cfg.history_len else None)
    peak, by_kind = _peak_memory(cfg, batch, layout) if memory else (float("nan"), {})
    per_arch, sites = _count_flops(cfg, batch, layout) if flops else ({}, [])
    with torch.device("meta"):
        model = Ranker(cfg)
    return StepEstimate(
        size=cfg.size, batch_size=batch_size, params=model.num_parameters(),
        embedding_params=sum(p.numel() for p in model.embedding_parameters()),
        tokens=_tokens(cfg, layout, batch_size), flops_per_example=per_arch,
        big_gemm_share=_big_gemm_share(sites), peak_memory_gib=peak, memory_gib=by_kind,
        checkpoint_blocks=cfg.checkpoint_blocks, embedding_dtype=cfg.embedding_dtype)


def _peak_memory(cfg: RankerConfig, batch: Batch, layout) -> tuple[float, dict[str, float]]:
    """Peak GiB of forward, backward and optimizer step on fake tensors, and its parts by kind."""
    MemTracker = _mem_tracker()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Ranker(cfg)
        model.sparse.estimated_grads = []
        dense_opt = _adamw_with_state(model)
        adagrad_state = torch.zeros(model.sparse.table.weight.shape[0])  # one float32 per row
        tracker = MemTracker()
        tracker.track_external(model, dense_opt, adagrad_state)
        with tracker, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MemTracker warns on parameters without a gradient
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = total_loss(task_losses(model(batch, layout), batch))
            loss.backward()
            dense_opt.step()
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values())) if peak else {}
    gib = {str(k).split(".")[-1].lower(): v / 2**30 for k, v in by_kind.items()}
    return gib.pop("total", 0.0), gib


_MATMUL_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}


class _TrainingFlops(TorchDispatchMode):
    """Forward matmul FLOPs per module (via `ModuleTracker`), and the step's: each matmul once
    forward and once more for every operand that needs a gradient (dgrad, wgrad), so a forward
    alone counts the training step, attributed to the module that ran it (FlopCounterMode's
    backward attribution misplaces ops at module boundaries)."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ModuleTracker()
        self.forward: dict[str, float] = defaultdict(float)
        self.step: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            flops = float(formula(*args, **kwargs, out_val=out))
            operands = _MATMUL_OPERANDS.get(func.overloadpacket.__name__, ())
            grads = sum(bool(getattr(args[i], "requires_grad", False)) for i in operands)
            for name in set(self.tracker.parents) | {"Global"}:
                self.forward[name] += flops
                self.step[name] += flops * (1 + grads)
        return out


def _count_flops(cfg: RankerConfig, batch: Batch, layout) -> tuple[dict, list]:
    """Useful training FLOPs per example per arch from one forward on fake tensors; executed
    ones add the forward of the blocks ``checkpoint_blocks`` recomputes, and flash's extra
    products in its backward."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Ranker(cfg)
        sites: list = []
        hooks = _linear_hooks(model, sites)
        counter = _TrainingFlops()
        with counter.tracker, counter, torch.autocast("cpu", dtype=torch.bfloat16):
            model(batch, layout)
        for h in hooks:
            h.remove()
    step, again = _per_arch(counter.step), _recomputed(cfg, counter.forward)
    attention = _attention_flops(cfg, layout)
    b, out = batch.size, {}
    for arch in ARCHES:
        useful, executed = step[arch], step[arch] + again[arch]
        if arch == "sequence":
            useful, executed = useful + 3 * attention, executed + 3.5 * attention
            executed += attention if cfg.checkpoint_blocks else 0.0
        out[arch] = {"useful": useful / b, "executed": executed / b}
    return out, sites


def count_step_flops(cfg: RankerConfig, batches: list[Batch]) -> dict[str, float]:
    """Training-step GEMM FLOPs per example of the real ``batches`` (CPU tensors), summed over
    arches: {"useful", "executed"}. Counted on fake tensors, so any size costs seconds."""
    useful = executed = examples = 0.0
    for batch in batches:
        layout = (HistoryLayout.jagged_tokens(batch.hist_mask, cfg.seq_summary_tokens, attention="flash-estimate")
                  if cfg.history_len else None)
        per_arch, _ = _count_flops(cfg, batch, layout)
        useful += batch.size * sum(v["useful"] for v in per_arch.values())
        executed += batch.size * sum(v["executed"] for v in per_arch.values())
        examples += batch.size
    return {"useful": useful / examples, "executed": executed / examples}


def _adamw_with_state(model: Ranker) -> torch.optim.Optimizer:
    """AdamW over the dense parameters with its two states per element already allocated, as
    in every step after the first (the peak of a later step holds them)."""
    params = model.dense_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _arch_of(module_name: str) -> str | None:
    """ModuleTracker's module names look like ``Ranker.sequence.blocks.0.qkv``."""
    parts = module_name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ARCHES else None


def _per_arch(flops: dict[str, float]) -> dict[str, float]:
    out = dict.fromkeys(ARCHES, 0.0)
    for name, value in flops.items():
        if name.count(".") == 1 and _arch_of(name):
            out[_arch_of(name)] += value
    return out


def _recomputed(cfg: RankerConfig, forward: dict[str, float]) -> dict[str, float]:
    """Forward FLOPs of the blocks ``checkpoint_blocks`` recomputes in backward."""
    out = dict.fromkeys(ARCHES, 0.0)
    if not cfg.checkpoint_blocks:
        return out
    for name, value in forward.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[1:3] in (["sequence", "blocks"], ["interaction", "layers"]):
            out[parts[1]] += value
    return out


def _attention_flops(cfg: RankerConfig, layout: HistoryLayout | None) -> float:
    """Forward FLOPs of QKᵀ and AV over every example's own tokens, all layers: 4·s²·d each."""
    if layout is None:
        return 0.0
    s = (layout.offsets[1:] - layout.offsets[:-1]).double()
    return float(4 * (s * s).sum()) * cfg.seq_dim * cfg.seq_layers


def _tokens(cfg: RankerConfig, layout: HistoryLayout | None, b: int) -> dict[str, int]:
    if layout is None:
        return {"real": 0, "executed": 0, "padded": 0}
    return {"real": int(layout.offsets[-1]), "executed": layout.n_tokens,
            "padded": b * (cfg.seq_summary_tokens + cfg.history_len)}


def _linear_hooks(model: Ranker, sites: list) -> list:
    """Record (rows, K, N) of every interaction and over Linear as the forward runs it."""
    def hook(module, args, _out):
        sites.append((args[0].numel() // module.in_features, module.in_features, module.out_features))

    return [m.register_forward_hook(hook) for arch in (model.interaction, model.over)
            for m in arch.modules() if isinstance(m, torch.nn.Linear)]


def _big_gemm_share(sites: list) -> float:
    """Share of the interaction + over Linear FLOPs at sites whose K and N are >= BIG_GEMM
    (fprop K=in, N=out; dgrad K=out, N=in; wgrad K=rows, N=in: all three qualify together)."""
    total = sum(m * k * n for m, k, n in sites)
    big = sum(m * k * n for m, k, n in sites if min(k, n) >= BIG_GEMM)
    return big / max(total, 1)
