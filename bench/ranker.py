"""The ranker, side by side: bf16 vs naive FP8 (torchao) vs Transformer Engine vs the loka plan.

One command, on a GPU (H100-class; writes bench/results/<device>-<date>.md and .json):

    python bench/ranker.py --size large --out bench/results/

CPU smoke run (tiny ranker, a few steps, no torch.compile; writes to a temporary directory,
the file says the timings are NOT representative); ``--compile on`` adds torch.compile, whose
inductor backend compiles one C++ file per generated kernel on CPU (minutes per variant, see
bench/README.md):

    python bench/ranker.py --size tiny --cpu-smoke
    python bench/ranker.py --size tiny --cpu-smoke --compile on

In ONE process, on the same batches and from the same initial weights, every variant
(see bench/ranker_variants.py: ``bf16``, ``torchao-tensorwise``, ``torchao-rowwise``,
``te``, ``loka-plan``) is trained for ``--warmup`` + ``--steps`` steps and then:

- **training step**: median (p10-p90) of the timed steps (loka.timer.time_fn: CUDA
  events on GPU, perf_counter on CPU), examples/s, achieved GEMM TFLOP/s and MFU
  (bench/ranker_flops.py: FLOPs counted from the Linear/BatchMatmul shapes, peak by device name;
  MFU of the useful work, histories packed, and of the executed work, histories padded as the
  device runs them), and peak device memory (torch.cuda.max_memory_allocated);
- **quality**: NE per task on the same held-out examples, and the paired relative NE
  difference to bf16 with a 95% bootstrap interval (loka.gate.paired_bootstrap);
- **inference**: p50/p99 latency of one eval-mode, no-grad forward at each ``--infer-batch-sizes``
  (each call timed on its own; loka's Float8Linear quantizes its weights once, in eval mode;
  torchao's modules quantize weights and activations per call, as trained).

``--plan plan.json`` gives the loka plan; without it the plan is made here (a short probe of
``--probe-steps`` steps, then ``loka.dispatch.plan(measure=True)`` on this device) when the
``loka-plan`` variant's turn comes, and saved next to the results (a plan that cannot be made
is that row's error). The results are rewritten after every variant. torch.compile: dynamo is reset between variants and its recompile limit
raised (the header says so), so a variant never falls back to eager silently.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling bench modules

from ranker_flops import count_gemm_flops, peak_for  # noqa: E402
from ranker_report import RunInfo, VariantResult, render  # noqa: E402
from ranker_variants import BUILDERS, VARIANTS, Unavailable, library_versions  # noqa: E402
from ranker_limits import time_limit  # noqa: E402
from triton_timing import raise_recompile_limit  # noqa: E402

GPU_DEFAULTS = dict(threads=None, batch_size=8192, warmup=10, steps=50, eval_examples=65536,
                    infer_batch_sizes="1,64,512,4096", infer_iters=100, probe_steps=20, compile="on")
SMOKE_DEFAULTS = dict(threads=1, batch_size=64, warmup=1, steps=3, eval_examples=1024, infer_batch_sizes="1,16",
                      infer_iters=5, probe_steps=2, compile="off", variant_timeout=900.0)
RECOMPILE_LIMIT = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="large", help="loka.models ranker size (tiny, small, base, large)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--plan", default=None, help="loka plan JSON for the loka-plan variant (default: make one here)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/ on GPU, a temp dir on CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny settings on CPU; NOT representative")
    for name, kind in (("batch_size", int), ("warmup", int), ("steps", int), ("eval_examples", int),
                       ("infer_batch_sizes", str), ("infer_iters", int), ("probe_steps", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p.add_argument("--compile", choices=("on", "off"), default=None, help="torch.compile the variants (GPU default on)")
    p.add_argument("--compile-backend", choices=("inductor", "aot_eager"), default="inductor",
                   help="torch.compile backend: inductor (generated kernels; on CPU a C++ compile per kernel) or "
                        "aot_eager (dynamo + AOTAutograd tracing only, no codegen: checks that every variant traces)")
    p.add_argument("--variant-timeout", type=float, default=None,
                   help="seconds one variant may take (build, compile, train, eval, serve); past it the variant is "
                        "a row with the reason and the next one runs (default: no limit; --cpu-smoke: 900)")
    p.add_argument("--plan-timeout", type=float, default=None,
                   help="seconds making the loka plan here may take (probe + kernels timed on the device), on top "
                        "of the loka-plan variant's own --variant-timeout; past it that row says so (default: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (--cpu-smoke: 1; more threads than free cores make CPU steps erratic)")
    p.add_argument("--compiled-casts", action="store_true",
                   help="with --compile on: prove on this device which sites' casts torch.compile fuses into their "
                        "producers (several compiles of the model: loka.dispatch.compiled_casts) and plan those "
                        "sites without their casts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.cpu_smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.infer_batch_sizes = [int(b) for b in args.infer_batch_sizes.split(",")]
    if min([args.batch_size, args.steps, args.eval_examples, args.infer_iters] + args.infer_batch_sizes) < 1:
        p.error("--batch-size, --steps, --eval-examples, --infer-iters and the batch sizes must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step, where torch.compile compiles, is timed on its own)")
    for flag, value in (("--variant-timeout", args.variant_timeout), ("--plan-timeout", args.plan_timeout)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be > 0 seconds")
    if args.compiled_casts and (args.compile != "on" or args.plan):
        p.error("--compiled-casts proves casts torch.compile fuses for the plan made here: it needs --compile on "
                "and no --plan")
    return args


def configure_dynamo(backend: str = "inductor") -> str:
    """Reset-and-raise policy of torch.compile for this run, as a sentence for the header."""
    raise_recompile_limit(RECOMPILE_LIMIT)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    loud = hasattr(cfg, "fail_on_recompile_limit_hit")
    if loud:
        cfg.fail_on_recompile_limit_hit = True  # an eager fallback would be an error row, not a silent slow row
    # Data-dependent shapes (boolean indexing, nonzero) would break the graph, and dynamo then re-traced the
    # resumed frame on every call (the ranker's history layout did once; tiny, CPU: 0.92 s a step instead of
    # 13 ms); captured, each variant compiles once per grad mode and batch shape.
    cfg.capture_dynamic_output_shape_ops = True
    cfg.capture_scalar_outputs = True
    return (f"torch.compile (backend {backend}): torch._dynamo.reset() before every variant; "
            f"torch._dynamo.config.{name} raised to {getattr(cfg, name)}"
            + ("; fail_on_recompile_limit_hit=True" if loud else "")
            + "; capture_dynamic_output_shape_ops=True and capture_scalar_outputs=True (no graph break at "
              "data-dependent shapes)"
            + ("; aot_eager traces (dynamo + AOTAutograd) but generates no kernels: step times are eager speed"
               if backend == "aot_eager" else ""))


class Setup:
    """What every variant shares: the base model (on CPU), the training batches, the held-out stream."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        from loka.models import Ranker, RankerConfig, SyntheticStream

        self.device = device
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.cfg = RankerConfig.from_size(args.size)
        torch.manual_seed(args.seed)
        self.base = Ranker(self.cfg)
        stream = SyntheticStream(self.cfg, args.batch_size, seed=args.seed, device=device)
        self.base.over.init_bias(stream.base_rates())
        n_batches = min(args.warmup + args.steps, 64)  # reused in order when there are more steps
        self.batches = [stream.batch(i) for i in range(n_batches)]
        # Jagged history layouts built here, outside the timed step (their sizes are host reads).
        self.layouts = [self.base.history_layout(b) for b in self.batches]
        self.held_out = SyntheticStream(self.cfg, min(4096, args.eval_examples), seed=1_000_003, device=device)

    def fresh_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.base).to(self.device)

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)


def make_plan(setup: Setup, args: argparse.Namespace, out_dir: Path, show: bool):
    """A short probe on a copy of the base model, then a plan timed on this device; saved to out_dir."""
    from loka.dispatch import Budget, plan
    from loka.dispatch.compiled_casts import plan_with_compiled_casts
    from loka.dispatch.producers import producer_sites
    from loka.models.train import task_losses, total_loss
    from loka.probe.cli import train_with_probe
    from loka.probe.config import ProbeConfig, SamplingSchedule
    from loka.probe.probe import Probe
    from loka.probe.workload import Workload

    model = setup.fresh_model()
    batches = setup.batches
    # Sites whose input can come in FP8 from their own norm: priced without that cast (producer_pricing).
    producers = producer_sites(model, (batches[0], setup.layouts[0]))
    wl = Workload(model, lambda i: batches[i % len(batches)],
                  lambda m, b: total_loss(task_losses(m(b), b)), name=f"ranker-{args.size}")
    steps = args.probe_steps
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=max(1, steps // 10)),
                                     candidates=("tensorwise", "rowwise")))
    train_with_probe(wl, probe, steps, lr=1e-3, device=str(setup.device), autocast=setup.autocast, progress=show)
    probe.measure_sensitivity(lambda b: wl.loss_fn(model, b), batches=batches[:4], progress=show)
    report = probe.report(model=f"ranker-{args.size}")
    dtype = torch.bfloat16 if setup.autocast else torch.float32
    bench = {"warmup": 2, "iters": 5} if args.cpu_smoke else {"warmup": 5, "iters": 20}
    kw = dict(budget=Budget(), measure=True, device=setup.device, dtype=dtype, progress=show, bench=bench)
    if args.compiled_casts:  # proved on a fresh copy (the probed one may still carry the probe's hooks)
        p, proofs = plan_with_compiled_casts(report, setup.fresh_model(), (batches[0], setup.layouts[0]), train=True,
                                             producers=producers, **kw)
        if show:
            print(proofs.summary(), file=sys.stderr)
    else:
        p = plan(report, producers=producers, **kw)
    path = p.save(out_dir / f"plan-{args.size}.json")
    del model, probe, wl  # the probed copy (and its Adam state) must not stay on the device
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return p, (f"loka plan made here: probe of {steps} steps on a copy of the base model, then "
               f"loka.dispatch.plan(measure=True) on this device; saved to {path}")


def latency(fn, batch, iters: int, warmup: int, device) -> tuple[float, float]:
    """(p50, p99) ms of ``fn(batch)``, each call timed on its own by loka's timer."""
    from loka.timer import time_fn

    for _ in range(warmup):
        fn(batch)
    samples = sorted(time_fn(lambda: fn(batch), warmup=0, iters=1, device=device).median_ms for _ in range(iters))
    pick = lambda q: samples[min(len(samples) - 1, round(q * (len(samples) - 1)))]  # noqa: E731
    return pick(0.5), pick(0.99)


def run_variant(name: str, setup: Setup, args, plan, infer_batches) -> tuple[VariantResult, dict | None]:
    """Build, train, evaluate and serve one variant; returns its result and its held-out predictions."""
    from loka.models import build_optimizers, predict
    from loka.models.train import task_losses, total_loss
    from loka.timer import time_fn
    from loka.weight_cache import freeze_fp8_weights

    result = VariantResult(name)
    torch._dynamo.reset()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    try:
        built = BUILDERS[name](setup.fresh_model(), device=setup.device, plan=plan,
                               sample=(setup.batches[0], setup.layouts[0]))
    except Unavailable as exc:
        result.status = str(exc)
        return result, None
    model, result.sites, result.notes = built.model, built.sites_cell(), list(built.notes)
    result.compiled = built.compile and args.compile == "on"
    runner = torch.compile(model, backend=args.compile_backend) if result.compiled else model
    opts = build_optimizers(model, lr_dense=2e-3, lr_sparse=0.05, weight_decay=1e-5)
    position = [0]

    def step():
        i = position[0] % len(setup.batches)
        batch, layout = setup.batches[i], setup.layouts[i]
        position[0] += 1
        with setup.amp(), built.forward_context():
            loss = total_loss(task_losses(runner(batch, layout), batch))
        loss.backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    result.first_step_s = _first_step_seconds(step, setup.device)
    t = time_fn(step, warmup=args.warmup - 1, iters=args.steps, device=setup.device)
    result.step_ms = (t.median_ms, t.p10_ms, t.p90_ms)
    with setup.amp(), built.forward_context():
        pred = predict(model, setup.held_out, args.eval_examples)
    result.ne = ne_per_task(pred, list(setup.cfg.tasks))
    model.eval()
    frozen = freeze_fp8_weights(model)  # serving casts loka's FP8 weights once, also in compiled graphs
    if frozen:
        result.notes.append(f"serving: {frozen} FP8 weights frozen (cast once, as loka.models.InferenceEngine does)")

    @torch.no_grad()  # not inference_mode: torchao's rowwise Float8Linear cannot reshape its cast input there
    def serve(batch):
        with setup.amp(), built.forward_context():
            return runner(batch)

    for b, batch in infer_batches.items():
        try:
            result.latency_ms[b] = latency(serve, batch, args.infer_iters, max(2, args.warmup), setup.device)
        except Exception as exc:  # e.g. a kernel that refuses M at batch 1: that cell, not the row
            result.latency_ms[b] = _error_text(exc)
    if setup.device.type == "cuda":  # the memory estimate of a variant is checked against this
        result.peak_mem_gib = torch.cuda.max_memory_allocated(setup.device) / 2**30
    return result, pred


def _first_step_seconds(step, device: torch.device) -> float:
    """Wall time of the first training step: where torch.compile traces and generates code."""
    import time

    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _error_text(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"error: {type(exc).__name__}: {first}"


def ne_per_task(pred: dict, tasks: list[str]) -> dict[str, float]:
    from loka.gate import normalized_entropy

    out = {}
    for i, task in enumerate(tasks):
        keep = pred["weights"][:, i] > 0
        out[task] = float(normalized_entropy(pred["labels"][keep, i], pred["probs"][keep, i]))
    return out


def paired_vs_bf16(results: list[VariantResult], preds: dict[str, dict], tasks: list[str]) -> None:
    from loka.gate import paired_bootstrap

    base = preds.get("bf16")
    if base is None:
        return
    for r in results:
        if r.name == "bf16" or r.name not in preds:
            continue
        for i, task in enumerate(tasks):
            keep = base["weights"][:, i] > 0
            r.ne_vs_bf16[task] = paired_bootstrap(base["labels"][keep, i], base["probs"][keep, i],
                                                  preds[r.name]["probs"][keep, i], metric="ne", n_boot=500, seed=0)


def resolve_device(args) -> torch.device | None:
    if args.cpu_smoke:
        return torch.device("cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/ranker.py: no CUDA GPU here; use --cpu-smoke (or --device cpu) to check it on CPU",
              file=sys.stderr)
        return None
    return device


def results_dir(args, device: torch.device) -> Path:
    """--out, else bench/results/ on GPU; CPU figures never land in bench/results/ by default."""
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" if device.type == "cuda"
                                           else Path(tempfile.mkdtemp(prefix="loka-ranker-bench-")))
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_all(args, setup: Setup, get_plan, show: bool, on_result=None, save_plan=None) -> list[VariantResult]:
    """Every variant in turn (one on the device at a time) and the paired NE vs bf16.

    ``get_plan()`` is called when the ``loka-plan`` variant's turn comes (so the variants before
    it are measured even if making the plan fails or runs long); ``on_result(results)`` after
    each variant, so a run stopped from outside still leaves the rows measured so far;
    ``save_plan(plan)`` receives the plan stating its predicted step (this run's bf16 step).
    """
    from loka.models import SyntheticStream
    from loka.timer import device_name

    infer_batches = {b: SyntheticStream(setup.cfg, b, seed=7, device=setup.device).batch(0)
                     for b in args.infer_batch_sizes}
    results, preds = [], {}
    for name in args.variants:
        if show:
            print(f"bench/ranker.py: {name} ...", file=sys.stderr)
        try:
            plan = None
            if name == "loka-plan":  # making the plan has its own limit, so a stage's limits add up
                with time_limit(args.plan_timeout, "making the loka plan", option="--plan-timeout"):
                    plan = get_plan()
            with time_limit(args.variant_timeout, name):
                r, pred = run_variant(name, setup, args, plan, infer_batches)
        except Exception as exc:  # one failing variant is a row with the error, the others still run
            r, pred = VariantResult(name, status=_error_text(exc)), None
        results.append(r)
        if pred is not None:
            preds[name] = pred
        gc.collect()
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
        paired_vs_bf16(results, preds, list(setup.cfg.tasks))
        predicted_vs_measured(results, get_plan if "loka-plan" in args.variants else None, save_plan,
                              f"measured bf16 step of bench/ranker.py --size {args.size} on {device_name(setup.device)}, "
                              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")
        if on_result is not None:
            on_result(results)
    return results


def predicted_vs_measured(results: list[VariantResult], plan_of, save_plan=None, source: str = "") -> None:
    """The loka-plan row's step speed-up as its plan predicts it (loka.dispatch.predict), beside the
    measured one, both against the bf16 row of this run; the plan stating it goes to ``save_plan``."""
    from loka.dispatch.predict import with_predicted_step

    rows = {r.name: r for r in results}
    base, mine = rows.get("bf16"), rows.get("loka-plan")
    if plan_of is None or base is None or mine is None or not base.step_ms or not mine.step_ms:
        return
    if mine.predicted_speedup is not None or any(n.startswith("no predicted step") for n in mine.notes):
        return  # stated once, when both rows first exist
    try:
        stated = with_predicted_step(plan_of(), base.step_ms[0], source)
        mine.predicted_speedup = stated.step["speedup"]
        if save_plan is not None:
            save_plan(stated)
    except ValueError as exc:  # e.g. timings from another device than the one measured here
        mine.predicted_speedup = None
        mine.notes.append(f"no predicted step speed-up: {exc}")


def write_results(results, args, argv, setup: Setup, flops, settings, out_dir: Path, flops_executed=None,
                  quiet: bool = False) -> Path:
    """<device>-<date>.md and .json in ``out_dir``; prints the Markdown unless ``quiet``."""
    from loka.timer import device_name

    now = datetime.datetime.now(datetime.timezone.utc)
    dev_name = device_name(setup.device)
    cli = argv if argv is not None else sys.argv[1:]
    info = RunInfo(command="python bench/ranker.py " + " ".join(shlex.quote(a) for a in cli),
                   date_utc=now.strftime("%Y-%m-%d %H:%M"), device=dev_name,
                   representative=setup.device.type == "cuda", versions=library_versions(), size=args.size,
                   batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                   eval_examples=args.eval_examples, flops=flops, peak=peak_for(dev_name), settings=settings,
                   flops_executed=flops_executed)
    text = render(results, info, list(setup.cfg.tasks), args.infer_batch_sizes)
    stem = ("cpu" if setup.device.type != "cuda" else _slug(dev_name)) + f"-{now:%Y-%m-%d}"
    path = out_dir / f"{stem}.md"
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps({"info": {k: str(v) for k, v in info.__dict__.items()},
                                                     "flops": _flops_json(info),
                                                     "variants": [r.to_dict() for r in results]}, indent=2))
    if not quiet:
        print(text)
        print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args)
    if device is None:
        return 2
    from loka.dispatch import load_plan

    show = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = results_dir(args, device)
    settings = [configure_dynamo(args.compile_backend) if args.compile == "on" else "torch.compile: off (--compile off)"]
    if args.variant_timeout:
        settings.append(f"time limit per variant: {args.variant_timeout:g} s (--variant-timeout)")
    setup = Setup(args, device)
    settings.append("precision: bf16 autocast around every variant's forward" if setup.autocast else
                    "precision: fp32 (no bf16 autocast on this device, as loka.models.train); the `bf16` row is fp32")
    flops, flops_executed = step_flops(setup)
    made: dict = {}

    def get_plan():
        """The loka plan, given or made here (once); a failure is the loka-plan row's error."""
        if "plan" not in made:
            try:
                if args.plan:
                    made["plan"], how = load_plan(args.plan), f"loka plan: {args.plan} (given)"
                else:
                    made["plan"], how = make_plan(setup, args, out_dir, show)
            except Exception as exc:
                made["plan"], how = exc, f"loka plan: could not be made here ({_error_text(exc)})"
            settings.append(how)
        if isinstance(made["plan"], Exception):
            raise made["plan"]
        return made["plan"]

    def save(results, quiet=True):
        return write_results(results, args, argv, setup, flops, settings, out_dir, flops_executed, quiet=quiet)

    def save_plan(p):
        settings.append(f"loka plan with its predicted step: {p.save(out_dir / f'plan-{args.size}.json')}")

    save(run_all(args, setup, get_plan, show, on_result=save, save_plan=save_plan), quiet=False)
    return 0


def step_flops(setup: Setup):
    """(useful, executed) GemmFlops of the timed batches themselves, counted on fake tensors
    (loka.models.estimate): useful = the real examples once (jagged history, attention inside
    the flash kernel included); executed adds activation recomputation and flash's recomputed
    scores. The site counts come from one forward of 4 examples."""
    import dataclasses

    from loka.models.estimate import count_step_flops

    sites = count_gemm_flops(setup.base, setup.batches[0].slice(0, 4).to("cpu"), 4)
    step = count_step_flops(setup.cfg, [b.to("cpu") for b in setup.batches[:2]])  # lengths vary little
    useful = dataclasses.replace(sites, fwd_per_example=step["useful"] / 3, counted_on_step=True)
    executed = dataclasses.replace(sites, fwd_per_example=step["executed"] / 3, counted_on_step=True)
    return useful, executed


def _flops_json(info: RunInfo) -> dict:
    """Per-step GEMM FLOPs (useful and executed) and the bf16 peak, for readers of the JSON."""
    executed = info.flops_executed or info.flops
    return {"train_step_useful": info.flops.train_step(info.batch_size),
            "train_step_executed": executed.train_step(info.batch_size),
            "peak_bf16_tflops": info.peak.bf16 if info.peak else None}


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


if __name__ == "__main__":
    sys.exit(main())
