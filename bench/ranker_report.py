"""The Markdown (and JSON) that bench/ranker.py writes: one row per variant, nothing dropped.

Kept apart from the runner so the tables can be read (and tested) without running anything.
A variant that did not run has its row with the reason in every table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ranker_flops import GemmFlops, Peak


@dataclass
class VariantResult:
    """What one variant measured; ``status`` is "ok" or why it did not (fully) run."""

    name: str
    status: str = "ok"
    sites: str = ""
    compiled: bool = False
    step_ms: tuple[float, float, float] | None = None  # median, p10, p90
    first_step_s: float | None = None  # the first training step, torch.compile's tracing and codegen included
    ne: dict[str, float] = field(default_factory=dict)
    ne_vs_bf16: dict[str, object] = field(default_factory=dict)  # task -> BootstrapResult
    latency_ms: dict[int, tuple[float, float] | str] = field(default_factory=dict)  # batch -> (p50, p99) or error
    notes: list[str] = field(default_factory=list)
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated over the variant (None on CPU)
    predicted_speedup: float | None = None  # loka-plan: the step speed-up its plan predicts vs this run's bf16

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "sites": self.sites, "compiled": self.compiled,
                "step_ms": self.step_ms, "first_step_s": self.first_step_s, "ne": self.ne,
                "ne_vs_bf16": {t: dataclasses.asdict(r) for t, r in self.ne_vs_bf16.items()},
                "latency_ms": {str(b): v for b, v in self.latency_ms.items()}, "notes": self.notes,
                "peak_mem_gib": self.peak_mem_gib, "predicted_speedup": self.predicted_speedup}


@dataclass
class RunInfo:
    """Where, how and on what the variants ran (the header of the file)."""

    command: str
    date_utc: str
    device: str
    representative: bool
    versions: dict[str, str]
    size: str
    batch_size: int
    warmup: int
    steps: int
    eval_examples: int
    flops: GemmFlops
    peak: Peak | None
    settings: list[str]
    flops_executed: GemmFlops | None = None  # what the device runs (with recomputation); None: = flops


def _status_row(r: VariantResult, n_cols: int) -> str:
    return f"| {r.name} | " + " | ".join([r.status] + ["—"] * (n_cols - 2)) + " |"


def training_table(results: list[VariantResult], info: RunInfo) -> list[str]:
    lines = ["| variant | FP8 sites | compiled | step ms, median (p10–p90) | examples/s | TFLOP/s | MFU | "
             "MFU executed | vs bf16 | first step s (incl. compile) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r.step_ms[0] for r in results if r.name == "bf16" and r.step_ms), None)
    flops = info.flops.train_step(info.batch_size)
    executed = (info.flops_executed or info.flops).train_step(info.batch_size)
    for r in results:
        if r.step_ms is None:
            lines.append(_status_row(r, 11))
            continue
        med, p10, p90 = r.step_ms
        tflops = flops / (med * 1e-3) / 1e12
        mfu = f"{100 * tflops / info.peak.bf16:.1f}%" if info.peak else "n/a"
        mfu_exec = f"{100 * executed / (med * 1e-3) / 1e12 / info.peak.bf16:.1f}%" if info.peak else "n/a"
        speed = f"{base / med:.2f}x" if base else "n/a"
        mem = "—" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}"
        lines.append(f"| {r.name} | {r.sites} | {'yes' if r.compiled else 'no'} | {med:.3f} ({p10:.3f}–{p90:.3f}) | "
                     f"{info.batch_size / (med * 1e-3):,.0f} | {tflops:.3g} | {mfu} | {mfu_exec} | {speed} | "
                     f"{'—' if r.first_step_s is None else f'{r.first_step_s:.1f}'} | {mem} |")
    return lines


def _ne_delta_cell(res) -> str:
    if res is None:
        return "—"
    return f"{100 * res.rel_diff:+.3f}% [{100 * res.rel_ci_lo:+.3f}%, {100 * res.rel_ci_hi:+.3f}%]"


def quality_table(results: list[VariantResult], tasks: list[str]) -> list[str]:
    head = " | ".join(f"NE {t}" for t in tasks) + " | " + " | ".join(f"ΔNE {t} vs bf16 (95% CI)" for t in tasks)
    lines = [f"| variant | {head} |", "|---|" + "---|" * (2 * len(tasks))]
    for r in results:
        if not r.ne:
            lines.append(_status_row(r, 1 + 2 * len(tasks)))
            continue
        ne = " | ".join(f"{r.ne[t]:.5f}" for t in tasks)
        delta = " | ".join(_ne_delta_cell(r.ne_vs_bf16.get(t)) if r.name != "bf16" else "(baseline)" for t in tasks)
        lines.append(f"| {r.name} | {ne} | {delta} |")
    return lines


def latency_table(results: list[VariantResult], batch_sizes: list[int]) -> list[str]:
    lines = ["| variant | " + " | ".join(f"B={b} p50 / p99 ms" for b in batch_sizes) + " |",
             "|---|" + "---|" * len(batch_sizes)]
    for r in results:
        if not r.latency_ms:
            lines.append(_status_row(r, 1 + len(batch_sizes)))
            continue
        cells = [_latency_cell(r.latency_ms.get(b)) for b in batch_sizes]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(results: list[VariantResult], batch_sizes: list[int]) -> list[str]:
    """bf16 time / variant time: training step (median) and inference (p50) per batch size, with the
    plan's predicted step speed-up and its error beside the measured one (loka-plan)."""
    base = next((r for r in results if r.name == "bf16"), None)
    lines = ["| variant | training step | predicted (plan) | prediction error | "
             + " | ".join(f"inference B={b}" for b in batch_sizes) + " |",
             "|---|---|---|---|" + "---|" * len(batch_sizes)]
    if base is None:
        return lines[:2] + ["| (no bf16 row in this run: no ratios) |" + " |" * (3 + len(batch_sizes))]
    for r in results:
        if r.name == "bf16":
            continue
        step = _ratio(base.step_ms and base.step_ms[0], r.step_ms and r.step_ms[0])
        pred, err = "—", "—"
        if r.predicted_speedup is not None:
            pred = f"{r.predicted_speedup:.2f}x"
            if r.step_ms and base.step_ms:
                measured = base.step_ms[0] / r.step_ms[0]
                err = f"{100 * (r.predicted_speedup - measured) / measured:+.1f}%"
        infer = [_ratio(_p50(base.latency_ms.get(b)), _p50(r.latency_ms.get(b))) for b in batch_sizes]
        lines.append(f"| {r.name} | {step} | {pred} | {err} | " + " | ".join(infer) + " |")
    return lines


def _p50(value) -> float | None:
    return value[0] if isinstance(value, tuple) else None


def _ratio(base: float | None, mine: float | None) -> str:
    return f"{base / mine:.2f}x" if base and mine else "—"


def _latency_cell(value) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value[0]:.3f} / {value[1]:.3f}"


def header(info: RunInfo) -> list[str]:
    lines = [f"# Ranker benchmark: `{info.size}`, batch {info.batch_size}, {info.device}", ""]
    if not info.representative:
        lines += ["**CPU run: timings are NOT representative of GPU speed; this file only shows the "
                  "benchmark runs end to end.**", ""]
    lines += [f"- command: `{info.command}`", f"- date (UTC): {info.date_utc}", f"- device: {info.device}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in info.versions.items()),
              f"- training: {info.warmup} warm-up + {info.steps} timed steps per variant, the same batches in the "
              f"same order from the same initial weights; NE on the same {info.eval_examples} held-out examples",
              f"- GEMM FLOPs (useful: the real examples once, jagged histories): {info.flops.describe()}",
              "- GEMM FLOPs executed: " + (f"{info.flops_executed.describe()} (activation recomputation and "
                                           "flash attention's recomputed scores included); `MFU executed` is of "
                                           "these" if info.flops_executed else "the same as useful on this device"),
              "- peak: " + (f"{info.peak.describe()}; MFU = achieved TFLOP/s / bf16 dense peak for every variant"
                            if info.peak else "n/a (no tensor-core peak for this device); MFU n/a"),
              "- peak GiB: torch.cuda.max_memory_allocated over the variant (build, training, eval, inference)"]
    lines += [f"- {s}" for s in info.settings]
    return lines


def render(results: list[VariantResult], info: RunInfo, tasks: list[str], batch_sizes: list[int]) -> str:
    lines = header(info)
    lines += ["", "## Training step", ""] + training_table(results, info)
    lines += ["", f"## Quality after {info.warmup + info.steps} steps", ""] + quality_table(results, tasks)
    lines += ["", "## Inference latency (eval mode, no grad)", ""] + latency_table(results, batch_sizes)
    lines += ["", "## Speed vs bf16, measured in this run", ""] + ratio_table(results, batch_sizes)
    notes = [f"- {r.name}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"
