"""``loka demo``: the whole loka workflow on the bundled ranker, start to finish.

    train a little in bf16 -> probe -> mods -> probe the modded model -> plan
    -> convert -> continue training (bf16 and FP8 side by side, same data)
    -> gate FP8 against bf16 on the same held-out examples -> serve requests

Each stage prints what it decided and why; the end prints the summary a model
owner reads: sites with verdicts and reasons, chosen kernels, expected and
measured speedup, and NE bf16 vs FP8 with its paired interval. On CPU the
``small`` ranker takes about 40 s of CPU time on one thread (README); its wall clock
grows with the machine's load (31 min on a 2-core machine shared with other jobs), so
the demo says before its slow stages how long they will take at the pace it measured,
and ``quick=True`` (``loka demo --quick``) runs fewer steps and examples. Timings on
CPU are not representative of GPU speed and are labelled so. With a CUDA device the
``base`` size is used.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from loka import mods
from loka.app.demo.fp8 import choose_fp8, runnable_here
from loka.devices import detect_target, get_target
from loka.dispatch.producers import producer_sites
from loka.app.demo.summary import print_summary
from loka.dispatch import Budget, plan
from loka.gate import gate
from loka.kernels.costmodel import DEVICE_MODELS
from loka.models import Ranker, RankerConfig, SyntheticStream, TrainConfig, evaluate, train
from loka.models.engine import InferenceEngine
from loka.models.headroom_cli import ranker_headroom
from loka.models.serve_extra import require_serve
from loka.models.train import task_losses, total_loss
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.cli import train_with_probe
from loka.probe.headroom_section import headroom_summary, with_headroom
from loka.probe.workload import Workload

SIZES_BY_DEVICE = {"cpu": "small", "cuda": "base"}
# Steps and examples per device: on CPU the whole demo fits in a few minutes on two cores.
STEPS_BY_DEVICE = {
    "cpu": dict(warm_steps=150, probe_steps=24, continue_steps=100, eval_examples=65_536),
    "cuda": dict(warm_steps=300, probe_steps=40, continue_steps=200, eval_examples=262_144),
}
# --quick: the same stages with fewer steps and examples (the gate may then be inconclusive).
QUICK_STEPS_BY_DEVICE = {
    "cpu": dict(warm_steps=60, probe_steps=12, continue_steps=30, eval_examples=16_384),
    "cuda": dict(warm_steps=100, probe_steps=20, continue_steps=60, eval_examples=65_536),
}
FP8_MODES = ("auto", "plan", "safe-sites")


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; ``"auto"`` / ``None`` pick by device (``SIZES_BY_DEVICE``, ``STEPS_BY_DEVICE``).

    ``fp8``: which FP8 model trains next to bf16 -- ``"plan"`` (the plan, even if it keeps
    everything in bf16), ``"safe-sites"`` (every accuracy-safe site, see ``loka.app.demo.fp8``),
    or ``"auto"`` (the plan, unless it converts nothing). ``quick``: the steps and examples
    not given come from ``QUICK_STEPS_BY_DEVICE`` (a shorter run for a slow or busy machine).
    ``target``: a GPU to probe and plan for (``"b200"``, ``"mi300x"``; loka/devices.py): the probe
    measures every recipe it runs, FP8 and FP4 side by side per site, and the plan only those; off
    that GPU its GEMMs run emulated (``loka.app.demo.fp8.runnable_here``). None: this device's defaults.
    """

    size: str = "auto"
    device: str = "auto"
    out_dir: str = "runs/demo"
    warm_steps: int | None = None
    probe_steps: int | None = None
    probe_every: int = 4
    continue_steps: int | None = None
    batch_size: int = 512
    eval_examples: int | None = None
    serve_requests: int = 8
    fp8: str = "auto"
    seed: int = 0
    progress: bool = True
    quick: bool = False
    target: str | None = None

    def __post_init__(self) -> None:
        for name in ("warm_steps", "probe_steps", "probe_every", "continue_steps", "batch_size", "eval_examples",
                     "serve_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {value}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not valid; use 'auto', 'cpu' or 'cuda'")
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8={self.fp8!r} is not valid; use one of {', '.join(FP8_MODES)}")
        if self.target is not None:
            get_target(self.target)  # raises naming the GPUs loka knows

    def resolved(self) -> "DemoConfig":
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        size = SIZES_BY_DEVICE[device] if self.size == "auto" else self.size
        defaults = (QUICK_STEPS_BY_DEVICE if self.quick else STEPS_BY_DEVICE)[device]
        steps = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, device=device, size=size, **steps)


class _Stages:
    """Stage headers and how long each stage took (printed as it goes and in the summary)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, title: str) -> None:
        self.end()
        print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)
        self._current = (title, time.perf_counter())

    def end(self) -> None:
        if self._current is not None:
            title, t0 = self._current
            self.seconds[title] = time.perf_counter() - t0
            print(f"({self.seconds[title]:.0f} s)", flush=True)
            self._current = None


def _stream(cfg, batch_size: int, seed: int, device: str, start: int = 0):
    stream = SyntheticStream(cfg, batch_size, seed=seed, device=device)
    if start:
        stream.load_state_dict({**stream.state_dict(), "position": start})
    return stream


def warm_up(cfg: DemoConfig):
    """Stage 1: train the ranker a little in bf16 (fp32 on CPU) from scratch."""

    tc = TrainConfig(size=cfg.size, steps=cfg.warm_steps, batch_size=cfg.batch_size, device=cfg.device,
                     seed=cfg.seed, data_seed=cfg.seed, out_dir=str(Path(cfg.out_dir) / "bf16_warm"),
                     progress=cfg.progress, overwrite=True)  # the demo's own directory: rerunnable
    result = train(tc)
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.examples_per_s:,.0f} examples/s")
    return result


def probe_model(model: nn.Module, cfg: DemoConfig, out: Path, label: str, *, time_kernels: bool = True,
                html: bool = True):
    """Run sampled training steps on a copy of ``model`` with the Probe attached; returns (report, paths).

    ``time_kernels``: also time each site's candidate kernels at its shape on this device.
    ``html``: also write the HTML report with plots (else JSON and Markdown only).
    """

    work = copy.deepcopy(model)  # probing trains; the demo's own trajectory stays untouched
    stream = _stream(work.config, cfg.batch_size, cfg.seed + 17, cfg.device)

    def loss_fn(m, batch):
        return total_loss(task_losses(m(batch), batch))

    schedule = SamplingSchedule(warmup=0, every=cfg.probe_every, max_samples=max(3, cfg.probe_steps // cfg.probe_every))
    config = (ProbeConfig(schedule=schedule, seed=cfg.seed) if cfg.target is None else
              ProbeConfig.for_device(cfg.target, schedule=schedule, seed=cfg.seed))
    probe = Probe(work, config)
    workload = Workload(work, stream.batch, loss_fn, name=f"ranker-{cfg.size}")
    train_with_probe(workload, probe, cfg.probe_steps, lr=1e-4, device=cfg.device, autocast=cfg.device == "cuda",
                     progress=cfg.progress)
    held_out = [stream.batch(cfg.probe_steps + 1 + i) for i in range(4)]  # an interval needs >= 2 batches
    probe.measure_sensitivity(lambda b: loss_fn(work, b), batches=held_out, progress=cfg.progress)
    if time_kernels:
        probe.time_sites(device=cfg.device, progress=cfg.progress, warmup=5, iters=20)
    print("building the report: verdicts, intervals, distribution fits of every operand ...", flush=True)
    report = probe.report(model=f"ranker-{cfg.size} ({label})", steps=cfg.probe_steps, device=cfg.device)
    if not html:
        stem = out / f"probe_{label}"
        paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
        paths["json"].write_text(report.to_json())
        paths["md"].write_text(report.to_markdown(paths["json"]))
        return report, paths
    print("writing the HTML report (plots) ...", flush=True)
    return report, report.save(out, stem=f"probe_{label}")


def apply_mods(model: nn.Module, report, sample) -> list:
    """Stage 3: the exact mods that help FP8 here, with the keep-in-hp policy first."""

    policy = mods.keep_hp.apply(model, sample=sample)
    keep = policy.data["policy"]
    results = [policy]
    results.append(mods.scale_migration.apply(model, report, sample=sample))
    results.append(mods.padding.apply(model, sample=sample, module_filter_fn=lambda m, fqn: fqn not in keep))
    changed = [r for r in results[1:] if r.changes]
    if changed:
        for r in results:
            print(r.table())
    else:
        print(f"no mod changes this model ({mods_skip_reason(results)}); {len(keep)} sites stay bf16 by the "
              "keep-in-hp policy (listed in the plan)")
    return results


def mods_skip_reason(results) -> str:
    """One line: why each mod after the keep-in-hp policy changed nothing (its skip reasons, counted)."""
    parts = []
    for r in results[1:]:
        reasons: dict[str, int] = {}
        for _, why in r.skipped:
            key = re.sub(r"spread [\d.]+ <", "spread <", why.removeprefix("probe report: "))
            key = "kept bf16 by the keep-in-hp policy" if key == "excluded by module_filter_fn" else key
            reasons[key] = reasons.get(key, 0) + 1
        what = "; ".join(f"{n}x {k}" for k, n in reasons.items()) or "nothing it applies to"
        parts.append(f"{r.name} skipped {sum(reasons.values())} ({what})")
    return "; ".join(parts)


def make_plan(report, cfg: DemoConfig, keep: dict, out: Path, report_json: Path, producers: dict | None = None):
    """Stage 5: the fastest kernel per GEMM within the default budget; keep-in-hp sites stay bf16.

    On a GPU the kernels are timed there. On a CPU, timings say nothing about a
    GPU, so kernels are ranked by the H100 speed model (loka.kernels.costmodel)
    and the plan says so. ``producers``: the sites whose input their own norm can hand over in
    FP8 (loka.dispatch.producers.producer_sites), priced without that cast.
    """

    target = get_target(cfg.target) if cfg.target else None
    here = detect_target(cfg.device)
    speed = "h100" if cfg.device == "cpu" else "measured"
    if target is not None and (here is None or here.arch != target.arch):  # its kernels do not run here
        speed = target.caps.speed_model
    if speed != "measured":
        why = "CPU timings are not representative" if cfg.device == "cpu" else f"this GPU is not a {cfg.target}"
        print(f"timings: the {speed} speed model for the FP8 kernels {f'{target.name} runs' if target else 'available here'}"
              f" ({why})")
    p = plan(report, Budget(), speed_model=speed, device=cfg.device, progress=cfg.progress, keep_bf16=keep,
             producers=producers, target=target)
    path = p.save(out / "plan.json")
    keep_path = out / "keep_bf16.json"
    keep_path.write_text(json.dumps(keep, indent=1, sort_keys=True))
    prod_path = out / "producers.json"
    prod_path.write_text(json.dumps(producers or {}, indent=1, sort_keys=True))
    print(f"{len(producers or {})} sites can take their input in FP8 from their own norm (fused norm+quantize); "
          f"{sum(s.producer is not None for s in p.sites)} of them are in FP8 in this plan")
    print(p.summary())
    print(f"same as: loka plan --report {report_json} --speed-model {speed} --keep-bf16 {keep_path} "
          f"--producers {prod_path} --device {cfg.target or cfg.device} --out {out}")
    if p.totals()["fp8_gemms"] == 0:
        print(_all_bf16_explanation(report, cfg))
    return p, path


def headroom_of(cfg: DemoConfig, plan) -> dict:
    """The whole training step's FP8 headroom at the demo's size and batch, on the speed model of the GPU
    the plan is for (CPU: the H100's, as the plan), with what the plan captures of it."""
    name = "h100"
    if cfg.device == "cuda":
        gpu = torch.cuda.get_device_name().upper()
        name = next((k for k in DEVICE_MODELS if k.upper() in gpu), "h100")
    return ranker_headroom(cfg.size, cfg.batch_size, name, plan)


def _all_bf16_explanation(report, cfg: DemoConfig) -> str:
    k_n = max(max(s["in_features"], s["out_features"]) for s in report.sites)
    where = "on the H100 speed model" if cfg.device == "cpu" else "as timed on this GPU"
    return (f"Why nothing is in FP8: every GEMM of the {cfg.size} ranker is small (K, N <= {k_n}); at such shapes, "
            f"{where}, quantizing the operands costs more than the FP8 GEMM saves (measured on an H100, "
            "bench/results/h100_2026-11-22_gemm.md: FP8 GEMMs beat bf16 from K, N = 1024, and with the "
            "quantization counted only from K, N = 2048 at M = 32768). That is the plan doing its job, not a failure. "
            + (f"On a CUDA device the demo uses the base ranker, whose {wide_linears('base')} are where FP8 can "
               "win, and times the kernels there." if cfg.device == "cpu" else
               "Try a larger ranker (--size large) or batch."))


def pace_line(cfg: DemoConfig, warm_seconds: float) -> str:
    """How long the slow stages will take at the pace stage 1 ran, and how to make them shorter."""
    per_step = warm_seconds / cfg.warm_steps
    # both branches take continue_steps each; the FP8 branch is emulated on CPU, so at least as slow
    at_least = 2 * cfg.continue_steps * per_step
    shorter = ("`loka demo --quick`, or fewer --continue-steps / --eval-examples" if not cfg.quick
               else "fewer --continue-steps / --eval-examples")
    return (f"(at this machine's pace in stage 1, {per_step:.2f} s a step, these {2 * cfg.continue_steps} steps take "
            f"at least {at_least / 60:.1f} min, then the gate scores {cfg.eval_examples:,} examples twice; "
            f"a shorter run: {shorter})")


def wide_linears(size: str, at_least: int = 1024) -> str:
    """Where FP8 can win in a ranker size, read from its config: its Linears with K and N >= ``at_least``."""
    with torch.device("meta"):  # shapes only, no memory
        model = Ranker(RankerConfig.from_size(size))
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= at_least]
    if not shapes:
        return f"Linears (none with K, N >= {at_least})"
    k, n = (f"{min(v)}-{max(v)}" if min(v) < max(v) else str(v[0]) for v in zip(*shapes))
    return f"{len(shapes)} Linears with K, N >= {at_least} (K {k}, N {n})"


def continue_training(model: nn.Module, cfg: DemoConfig, label: str):
    """Stage 6: continue from the warm weights on the same data (fresh optimizers on both branches)."""

    tc = TrainConfig(size=cfg.size, steps=cfg.continue_steps, batch_size=cfg.batch_size, device=cfg.device,
                     seed=cfg.seed, warmup_steps=0, out_dir=str(Path(cfg.out_dir) / label), progress=cfg.progress,
                     overwrite=True)
    data = _stream(model.config, cfg.batch_size, cfg.seed, cfg.device, start=cfg.warm_steps)
    t0 = time.perf_counter()
    result = train(tc, model=model, data=data)
    result.wall_s = time.perf_counter() - t0
    print(f"{label}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.examples_per_s:,.0f} examples/s")
    return result


def gate_fp8(bf16_model: nn.Module, fp8_model: nn.Module, cfg: DemoConfig, out: Path):
    """Stage 7: NE, AUC, calibration of both on the same held-out examples, paired intervals."""

    outputs = {}
    for label, model in (("bf16", bf16_model), ("fp8", fp8_model)):
        held_out = _stream(model.config, 4096, 1_000_003, cfg.device)  # the same examples for both
        report = evaluate(model, held_out, n_examples=cfg.eval_examples, progress=cfg.progress)
        report.outputs.save(out / f"eval_{label}.npz")
        outputs[label] = report
        print(f"{label}:\n{report.table()}")
    paths = [out / "eval_bf16.npz", out / "eval_fp8.npz"]
    print(f"same as: loka gate --baseline {paths[0]} --candidate {paths[1]} --allow-different-models")
    result = gate(*paths, allow_different_models=True)  # padding mods change the module tree, not the function
    (out / "gate.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    print(result.table())
    return outputs, result


def serve_requests(model: nn.Module, cfg: DemoConfig) -> dict:
    """Stage 8: the FP8 model behind the HTTP scoring service on loopback, a few real requests."""
    require_serve("loka demo's serving stage")
    from loka.models.serve import ScoringServer  # optional: the serve extra (uvicorn, h11, pydantic)
    from loka.models.serving_schema import batch_to_request  # optional: the serve extra (pydantic)


    engine = InferenceEngine(copy.deepcopy(model), device=cfg.device)
    stream = _stream(model.config, 64, 4242, "cpu")
    latencies = []
    with ScoringServer(engine, port=0) as server:
        for i in range(cfg.serve_requests):
            body = json.dumps(batch_to_request(stream.batch(i))).encode()
            req = urllib.request.Request(server.url + "/score", body, {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                reply = json.loads(resp.read())
            latencies.append((time.perf_counter() - t0) * 1e3)
    scores = {k: v[:3] for k, v in reply["scores"].items()} if "scores" in reply else reply
    print(f"{cfg.serve_requests} requests of 64 candidates: median {sorted(latencies)[len(latencies) // 2]:.1f} ms; "
          f"last reply's first scores: {scores}")
    return {"latency_ms": latencies, "last_scores": scores}


def run(cfg: DemoConfig | None = None) -> dict:
    """Run every stage; returns the figures printed at the end (also written to ``out_dir/summary.json``)."""

    cfg = (cfg or DemoConfig()).resolved()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_import_noise()
    torch.manual_seed(cfg.seed)
    print(f"loka demo: ranker size {cfg.size} on {cfg.device}{f' for {cfg.target}' if cfg.target else ''}; "
          f"results in {out}/")
    if cfg.device == "cpu":
        print("(CPU: FP8 runs emulated and timings are measured but not representative of GPU speed; the plan is "
              "made for an H100 from a speed model)")
    stages = _Stages()

    stages.start(f"1. train the {cfg.size} ranker in bf16 for {cfg.warm_steps} steps")
    warm = warm_up(cfg)
    sample = _stream(warm.model.config, 256, cfg.seed + 5, cfg.device).batch(0)

    gpu = cfg.device == "cuda"
    stages.start("2. probe the bf16 model: per-site statistics, FP8 error with intervals, speed")
    if not gpu:
        print("(kernel timing skipped on CPU: CPU timings say nothing about a GPU, so the probe's speed column and "
              "the plan use the H100 speed model; on a GPU both probes time every candidate kernel)")
    report_before, paths_before = probe_model(warm.model, cfg, out, "before_mods", time_kernels=gpu, html=False)
    print(report_before.to_markdown(paths_before["json"]))

    stages.start("3. mods: keep-in-hp policy, scale migration, padding (all exact)")
    modded = copy.deepcopy(warm.model)
    mod_results = apply_mods(modded, report_before, sample)
    keep = mod_results[0].data["policy"]

    if any(r.changes for r in mod_results[1:]):  # the keep-in-hp policy changes nothing in the model
        stages.start("4. probe the modded model")
        report, report_paths = probe_model(modded, cfg, out, "after_mods", time_kernels=gpu)
    else:
        stages.start("4. probe the modded model: skipped, the mods changed nothing (the first probe's report is used)")
        report, report_paths = report_before, report_before.save(out, stem="probe_before_mods")
    print(f"probe report: {report_paths.get('html')}")

    stages.start("5. plan: fastest kernel per GEMM within the accuracy budget")
    plan, plan_path = make_plan(report, cfg, keep, out, report_paths["json"], producer_sites(modded, sample))
    headroom = headroom_of(cfg, plan)
    print(headroom_summary(headroom))
    report = with_headroom(report, headroom)  # the saved report shows the headroom section
    report_paths = report.save(out, stem=Path(report_paths["json"]).stem)
    modded_bf16 = copy.deepcopy(modded)  # the baseline: same modded weights, never converted
    fp8 = choose_fp8(modded, runnable_here(plan, cfg.device), report, keep, cfg.fp8, sample, cfg.target)

    label = "FP8 plan" if fp8.kind == "plan" else "FP8 (accuracy-safe sites)"
    stages.start(f"6. continue training {cfg.continue_steps} steps: bf16 and {label} side by side, same data")
    print("(bf16 = the modded model unconverted; the mods are exact, so FP8 is the only difference)")
    print(pace_line(cfg, stages.seconds[next(iter(stages.seconds))]))
    bf16_run = continue_training(modded_bf16, cfg, "bf16")
    fp8_run = continue_training(modded, cfg, "fp8")

    stages.start(f"7. gate: {label} vs bf16 on the same {cfg.eval_examples:,} held-out examples")
    evals, gate_result = gate_fp8(bf16_run.model, fp8_run.model, cfg, out)

    stages.start(f"8. serve: the {label} model behind the scoring service on 127.0.0.1")
    served = serve_requests(fp8_run.model, cfg)
    stages.end()

    return print_summary(cfg, out, report=report, plan=plan, plan_path=plan_path, fp8=fp8, runs=(bf16_run, fp8_run),
                         gate_result=gate_result, served=served, report_paths=report_paths, stages=stages.seconds,
                         headroom=headroom)


def _quiet_import_noise() -> None:
    """Silence two import-time warnings that say nothing about this run (CPU builds lack the SM90 kernels)."""

    logging.getLogger("torchao").setLevel(logging.ERROR)  # "Failed to load ..._C_cutlass_90a.abi3.so"
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # register_constant() on an Enum
