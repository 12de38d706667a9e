"""``loka demo``: the whole loka workflow on the bundled ranker, start to finish.

    train a little in bf16 -> probe -> mods -> probe the modded model -> plan
    -> convert -> continue training (bf16 and FP8 side by side, same data)
    -> gate FP8 against bf16 on the same held-out examples -> serve requests

Each stage prints what it decided and why; the end prints the summary a model
owner reads: sites with verdicts and reasons, chosen kernels, expected and
measured speedup, and NE bf16 vs FP8 with its paired interval. On CPU the
``small`` ranker runs in a few minutes; timings there are not representative
of GPU speed and are labelled so. With a CUDA device the ``base`` size is used.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

SIZES_BY_DEVICE = {"cpu": "small", "cuda": "base"}


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; ``"auto"`` picks by device (see ``SIZES_BY_DEVICE``)."""

    size: str = "auto"
    device: str = "auto"
    out_dir: str = "runs/demo"
    warm_steps: int = 300
    probe_steps: int = 40
    probe_every: int = 4
    continue_steps: int = 200
    batch_size: int = 512
    eval_examples: int = 100_000
    serve_requests: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("warm_steps", "probe_steps", "probe_every", "continue_steps", "batch_size", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not valid; use 'auto', 'cpu' or 'cuda'")

    def resolved(self) -> "DemoConfig":
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        size = SIZES_BY_DEVICE[device] if self.size == "auto" else self.size
        return replace(self, device=device, size=size)


def _say(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def _stream(cfg, batch_size: int, seed: int, device: str, start: int = 0):
    from loka.models import SyntheticStream

    stream = SyntheticStream(cfg, batch_size, seed=seed, device=device)
    if start:
        stream.load_state_dict({**stream.state_dict(), "position": start})
    return stream


def warm_up(cfg: DemoConfig):
    """Stage 1: train the ranker a little in bf16 (fp32 on CPU) from scratch."""
    from loka.models import TrainConfig, train

    _say(f"1. train the {cfg.size} ranker in bf16 for {cfg.warm_steps} steps")
    tc = TrainConfig(size=cfg.size, steps=cfg.warm_steps, batch_size=cfg.batch_size, device=cfg.device,
                     seed=cfg.seed, data_seed=cfg.seed, out_dir=str(Path(cfg.out_dir) / "bf16_warm"),
                     progress=cfg.progress)
    result = train(tc)
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.examples_per_s:,.0f} examples/s")
    return result


def probe_model(model: nn.Module, cfg: DemoConfig, out: Path, label: str):
    """Run sampled training steps on a copy of ``model`` with the Probe attached; returns the report."""
    from loka.models.train import task_losses
    from loka.probe import Probe, ProbeConfig, SamplingSchedule
    from loka.probe.cli import train_with_probe
    from loka.probe.workload import Workload

    work = copy.deepcopy(model)  # probing trains; the demo's own trajectory stays untouched
    stream = _stream(work.config, cfg.batch_size, cfg.seed + 17, cfg.device)

    def loss_fn(m, batch):
        return sum(task_losses(m(batch), batch).values())

    schedule = SamplingSchedule(warmup=0, every=cfg.probe_every, max_samples=max(3, cfg.probe_steps // cfg.probe_every))
    probe = Probe(work, ProbeConfig(schedule=schedule, seed=cfg.seed))
    workload = Workload(work, stream.batch, loss_fn, name=f"ranker-{cfg.size}")
    train_with_probe(workload, probe, cfg.probe_steps, lr=1e-4, device=cfg.device, autocast=cfg.device == "cuda",
                     progress=cfg.progress)
    batch = stream.batch(cfg.probe_steps + 1)
    probe.measure_sensitivity(lambda: loss_fn(work, batch), progress=cfg.progress)
    probe.time_sites(device=cfg.device, progress=cfg.progress, warmup=2, iters=5 if cfg.device == "cpu" else 20)
    report = probe.report(model=f"ranker-{cfg.size} ({label})", steps=cfg.probe_steps, device=cfg.device)
    paths = report.save(out, stem=f"probe_{label}")
    return report, paths


def apply_mods(model: nn.Module, report, sample) -> list:
    """Stage 3: the exact mods that help FP8 here, with the keep-in-hp policy first."""
    from loka import mods

    policy = mods.keep_hp.apply(model, sample=sample)
    keep = policy.data["policy"]
    results = [policy]
    results.append(mods.scale_migration.apply(model, report, sample=sample))
    results.append(mods.padding.apply(model, sample=sample, module_filter_fn=lambda m, fqn: fqn not in keep))
    for r in results:
        print(r.table())
    return results


def make_plan(report, cfg: DemoConfig, keep: dict, out: Path):
    """Stage 5: the fastest kernel per GEMM within the default budget; keep-in-hp sites stay bf16.

    On a GPU the kernels are timed there. On a CPU, timings say nothing about a
    GPU, so kernels are ranked by the H100 speed model (loka.dispatch.costmodel)
    and the plan says so.
    """
    from loka.dispatch import KERNELS, Budget, plan
    from loka.dispatch.costmodel import H100_SXM, model_timings

    timings = None
    if cfg.device == "cpu":
        names = [k.name for k in KERNELS if not k.hp and k.name != "emulated" and k.available("cpu")]
        timings = model_timings(report, names, H100_SXM)
        print(f"timings: {H100_SXM.name} for kernels {names} (CPU timings are not representative)")
    p = plan(report, Budget(), timings=timings, measure=cfg.device == "cuda", device=cfg.device,
             progress=cfg.progress, keep_bf16=keep)
    path = p.save(out / "plan.json")
    print(p.summary())
    return p, path


def continue_training(model: nn.Module, cfg: DemoConfig, label: str):
    """Stage 6: continue from the warm weights on the same data (fresh optimizers on both branches)."""
    from loka.models import TrainConfig, train

    tc = TrainConfig(size=cfg.size, steps=cfg.continue_steps, batch_size=cfg.batch_size, device=cfg.device,
                     seed=cfg.seed, warmup_steps=0, out_dir=str(Path(cfg.out_dir) / label), progress=cfg.progress)
    data = _stream(model.config, cfg.batch_size, cfg.seed, cfg.device, start=cfg.warm_steps)
    t0 = time.perf_counter()
    result = train(tc, model=model, data=data)
    result.wall_s = time.perf_counter() - t0
    print(f"{label}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.examples_per_s:,.0f} examples/s")
    return result


def gate_fp8(bf16_model: nn.Module, fp8_model: nn.Module, cfg: DemoConfig, out: Path):
    """Stage 7: NE, AUC, calibration of both on the same held-out examples, paired intervals."""
    from loka.gate import gate
    from loka.models import evaluate

    outputs = {}
    for label, model in (("bf16", bf16_model), ("fp8", fp8_model)):
        held_out = _stream(model.config, 4096, 1_000_003, cfg.device)
        report = evaluate(model, held_out, n_examples=cfg.eval_examples, progress=cfg.progress)
        report.outputs.save(out / f"eval_{label}.npz")
        outputs[label] = report
        print(f"{label}:\n{report.table()}")
    result = gate(outputs["bf16"].outputs, outputs["fp8"].outputs, allow_different_models=True)
    (out / "gate.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    print(result.table())
    return outputs, result


def serve_requests(model: nn.Module, cfg: DemoConfig) -> dict:
    """Stage 8: the FP8 model behind the HTTP scoring service on loopback, a few real requests."""
    import urllib.request

    from loka.models.engine import InferenceEngine
    from loka.models.serve import ScoringServer
    from loka.models.serving_schema import batch_to_request

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


def summary_rows(report, plan) -> list[dict]:
    """One row per planned site: shape, probe verdict + reason, chosen kernels, expected speedup."""
    probed = {s["fqn"]: s for s in report.sites}
    rows = []
    for sp in plan.sites:
        site = probed.get(sp.fqn, {})
        rows.append({
            "site": sp.fqn,
            "shape": f"{sp.m}x{sp.in_features}x{sp.out_features}",
            "probe": f"{site.get('verdict', '?')}: {site.get('reason', '')}",
            "plan": " ".join(f"{g}={c.kernel}" + (f"/{c.recipe}" if c.is_fp8 else "") for g, c in sp.gemms.items()),
            "why": sp.summary_reason(),
            "speedup": sp.expected_speedup(),
        })
    return rows


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'site':<40} {'M x K x N':<16} {'plan':<58} {'exp.':>6}  probe verdict / plan reason"]
    for r in rows:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['site']:<40} {r['shape']:<16} {r['plan']:<58} {sp:>6}  {r['probe']}")
        lines.append(f"{'':<40} {'':<16} {'':<58} {'':>6}  plan: {r['why']}")
    return "\n".join(lines)


def run(cfg: DemoConfig | None = None) -> dict:
    """Run every stage; returns the figures printed at the end (also written to ``out_dir/summary.json``)."""
    cfg = (cfg or DemoConfig()).resolved()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    print(f"loka demo: ranker size {cfg.size} on {cfg.device}; results in {out}/")
    if cfg.device == "cpu":
        print("(CPU: timings below are measured but not representative of GPU speed)")

    warm = warm_up(cfg)
    sample = _stream(warm.model.config, 256, cfg.seed + 5, cfg.device).batch(0)

    _say("2. probe the bf16 model: per-site statistics, FP8 error with intervals, timings")
    report_before, _ = probe_model(warm.model, cfg, out, "before_mods")
    print(report_before.to_markdown())

    _say("3. mods: keep-in-hp policy, scale migration, padding (all exact)")
    modded = copy.deepcopy(warm.model)
    mod_results = apply_mods(modded, report_before, sample)
    keep = mod_results[0].data["policy"]

    _say("4. probe the modded model")
    report, report_paths = probe_model(modded, cfg, out, "after_mods")

    _say("5. plan: fastest kernel per GEMM within the accuracy budget")
    from loka.convert import convert

    plan, plan_path = make_plan(report, cfg, keep, out)
    conversion = convert(modded, plan=plan)
    print(f"converted {len(conversion.converted)} sites to FP8; kept {len(conversion.skipped)} in bf16")

    _say(f"6. continue training {cfg.continue_steps} steps: bf16 and FP8 plan side by side")
    bf16_run = continue_training(copy.deepcopy(warm.model), cfg, "bf16")
    fp8_run = continue_training(modded, cfg, "fp8_plan")

    _say("7. gate: FP8 plan vs bf16 on the same held-out examples")
    evals, gate_result = gate_fp8(bf16_run.model, fp8_run.model, cfg, out)

    _say("8. serve: the FP8 model behind the scoring service on 127.0.0.1")
    served = serve_requests(fp8_run.model, cfg)

    _say("summary")
    rows = summary_rows(report, plan)
    print(format_summary(rows))
    totals = plan.totals()
    measured = bf16_run.wall_s / fp8_run.wall_s
    exp = totals.get("speedup")
    rep = "" if cfg.device == "cuda" else " (CPU: not representative of GPU speed)"
    print(f"\nexpected GEMM speedup from the plan: {'-' if exp is None else f'{exp:.2f}x'}{rep}")
    print(f"measured training speed FP8 plan / bf16: {measured:.2f}x{rep}")
    for check in gate_result.checks:
        if check.kind == "model" and check.name.startswith("ne"):
            print(f"{check.name} FP8 vs bf16: {check.estimate:+.4%} [{check.ci_lo:+.4%}, {check.ci_hi:+.4%}] "
                  f"(budget {check.budget}): {check.verdict}")
    print(f"gate: {gate_result.verdict}")
    html = report_paths.get("html")
    print(f"probe report: {html}\nplan: {plan_path}")
    summary = {
        "config": asdict(cfg),
        "sites": rows,
        "plan_totals": totals,
        "measured_train_speedup": measured,
        "representative": cfg.device == "cuda",
        "gate": gate_result.to_dict(),
        "serve": served,
        "paths": {"report_html": str(html), "plan": str(plan_path)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
