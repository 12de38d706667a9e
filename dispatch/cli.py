"""``loka plan``, ``loka doctor`` and ``loka bench-kernels``: thin CLI over loka.dispatch.

    loka doctor [--device cuda]
    loka plan --report probe.json [--budget "wgrad=0.05,ne=2e-4"] --out runs/plan [--measure] [--refresh]
              [--objective speed|accuracy]   (accuracy: every GEMM the budget allows, fast or not)
              [--speed-model h100|h200|b200|mi300x|mi350x|measured] [--keep-bf16 keep_bf16.json]
              [--producers producers.json] [--device b200|mi300x|h100|...|cuda|cpu]
              [--bf16-step-ms 41.5]   (the plan then states its predicted step speed-up)
              [--m-buckets 1,64,512]   (serving plan: fprop timed at those batch sizes)
    loka bench-kernels --shape 8192,512,512 [--recipes rowwise,tensorwise] [--device cuda] [--refresh]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from loka.cli_vocab import add_device, add_json, out_file, resolve_device, write_json
from loka.dispatch import Budget, plan
from loka.dispatch.microbench import open_cache
from loka.dispatch.headroom_estimate import plan_headroom
from loka.dispatch.planner import OBJECTIVES, library_versions
from loka.probe.timing import time_site
from loka.dispatch.predict import with_predicted_step
from loka.jsonio import encode_floats
from loka.devices import detect_target, device_and_target, target_names
from loka.kernels import KERNELS
from loka.kernels.costmodel import DEVICE_MODELS
from loka.probe.headroom_section import headroom_summary
from loka.recipe import RECIPE_NAMES, as_recipe


def register(subparsers) -> None:
    doctor = subparsers.add_parser("doctor", help="list every FP8 kernel and whether it runs on this machine")
    add_device(doctor, "device to check")
    doctor.set_defaults(func=_doctor)

    p = subparsers.add_parser(
        "plan", help="choose a kernel (or bf16) per GEMM from a probe report and a budget",
        epilog="Producer choices need the model and a sample batch, which `loka plan` does not have: mark casts "
               "torch.compile fuses into their producers with loka.dispatch.compiled_casts.with_compiled_casts(plan, "
               "model, sample, train=...) and fused norm+quantize with loka.dispatch.producers.with_producers, in Python.")
    p.add_argument("--report", required=True, help="probe report JSON (loka probe ... --out)")
    p.add_argument("--budget", default="", help="e.g. 'fprop=0.08,dgrad=0.12,wgrad=0.05,ne=2e-4,sqnr_fprop=25', or a budget JSON file")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write plan.json into")
    p.add_argument("--measure", action="store_true", help="micro-benchmark sites the report has no timings for")
    p.add_argument("--speed-model", choices=(*DEVICE_MODELS, "measured"), default=None,
                   help="rank kernels by that GPU's speed model at every site (plan for a GPU not at hand, e.g. on "
                        "CPU; b200, mi300x, mi350x are spec, not measured), or 'measured' (= --measure); default: the "
                        "report's timings, or the --device target's speed model when planning away from it")
    p.add_argument("--keep-bf16", default=None, metavar="JSON",
                   help="JSON file {site: reason} of sites a policy keeps in bf16 (the demo writes keep_bf16.json)")
    p.add_argument("--bf16-step-ms", type=float, default=None, metavar="MS",
                   help="the measured bf16 training step (ms) of the model on the plan's device: the plan then "
                        "states its predicted step speed-up (the GEMM time it saves, the rest unchanged)")
    p.add_argument("--producers", default=None, metavar="JSON",
                   help="JSON file {site: norm_quant|compiled_cast} of sites whose fprop input arrives in FP8 from "
                        "its producer (loka.dispatch.producers.producer_sites writes it); priced without that cast")
    p.add_argument("--refresh", action="store_true", help="re-measure instead of using cached micro-benchmarks")
    add_device(p, "the device the plan is for: a GPU name (" + ", ".join(target_names()) + "), whose recipes and "
                  "kernels alone are planned, or a torch device (its GPU detected)")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names to consider (default: all)")
    p.add_argument("--solver", default="auto", choices=("auto", "exact", "greedy"))
    p.add_argument("--objective", default="speed", choices=OBJECTIVES,
                   help="speed (default): FP8 only where it is faster; accuracy: every GEMM the accuracy budget allows, "
                        "with its lowest-error recipe, fast or not (to check FP8's quality on your model with "
                        "`loka gate` when the speed plan keeps everything in bf16)")
    p.add_argument("--m-buckets", default=None, help="serving plan: comma-separated batch sizes, e.g. 1,64,512")
    add_json(p, "the plan")
    p.set_defaults(func=_plan)

    b = subparsers.add_parser("bench-kernels", help="time every kernel for one site shape (cached)")
    b.add_argument("--shape", required=True, help="M,K,N of the site y[M,N] = x[M,K] W[N,K]^T")
    b.add_argument("--recipes", default="tensorwise,rowwise", help="comma-separated recipe names")
    add_device(b, "device to time on")
    b.add_argument("--iters", type=int, default=20, help="timed calls per kernel (default 20)")
    b.add_argument("--refresh", action="store_true", help="re-measure instead of using cached timings")
    add_json(b, "the timings")
    b.set_defaults(func=_bench)


def _device(arg: str | None) -> torch.device:
    return torch.device(resolve_device(arg))


def doctor_text(device: torch.device) -> str:
    """What this machine has: versions, device, and every kernel with available / reason."""

    versions = library_versions()
    dev = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
        dev = f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"
    target = detect_target(device)
    lines = [
        f"python {platform.python_version()} · " + " · ".join(f"{k} {v or ('none' if k == 'cuda' else 'not installed')}" for k, v in versions.items()),
        f"device: {dev}",
        (f"target: {target.describe()}, runs {', '.join(target.caps.recipes)} natively (loka/devices.py)"
         if target else "target: none detected (no GPU of loka/devices.py here); plan for one with "
                        "`loka plan --device " + "|".join(("b200", "h100", "mi300x")) + "|...`"),
        "",
        f"{'kernel':<22} {'backend':<10} {'recipes':<34} {'status':<12} reason",
    ]
    for kernel in KERNELS:
        ok, why = kernel.available(device)
        status = "available" if ok else "unavailable"
        note = why
        if ok and kernel.untested:
            note = "code path never run on this kind of machine by loka's tests (untested)"
        if kernel.not_default:
            note = f"{note}; {kernel.not_default}" if note else kernel.not_default
        lines.append(f"{kernel.name:<22} {kernel.backend:<10} {_recipes_taken(kernel, device):<34} {status:<12} {note}")
    return "\n".join(lines)


def _recipes_taken(kernel, device: torch.device) -> str:
    """Named recipes the kernel takes for fprop at an aligned shape (what it could be planned for)."""

    if kernel.hp:
        return "hp"
    names = [r for r in RECIPE_NAMES if r not in ("bf16", "rowwise_with_gw_hp")
             and kernel.supports(as_recipe(r).fprop, (256, 256, 256), torch.bfloat16, device)]
    return ",".join(names) or "-"


def _doctor(args) -> int:
    print(doctor_text(_device(args.device)))
    return 0


def _plan(args) -> int:
    try:
        budget = Budget.parse(args.budget)
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        print(f"loka plan: bad --budget: {exc}", file=sys.stderr)
        return 2
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    try:
        buckets = [int(m) for m in args.m_buckets.split(",")] if args.m_buckets else None
        keep = _keep_bf16(args.keep_bf16) if args.keep_bf16 else None
        producers = read_site_map(args.producers, "--producers", "norm_quant") if args.producers else None
        device, target = device_and_target(args.device)
        p = plan(args.report, budget, measure=args.measure, refresh=args.refresh, device=device,
                 kernels=kernels, method=args.solver, m_buckets=buckets, keep_bf16=keep, speed_model=args.speed_model,
                 producers=producers, target=target, objective=args.objective)
        if args.bf16_step_ms is not None:
            p = with_predicted_step(p, args.bf16_step_ms, "given on the command line (--bf16-step-ms)")
    except (ValueError, TypeError) as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        print(f"loka plan: {exc}", file=sys.stderr)
        return 2
    path = out_file(args.out, "plan.json")
    p.save(path)
    print(p.summary())
    print(_headroom_line(p, args))
    print(f"wrote {path}")
    if args.json:
        write_json(args.json, p.to_json())
    return 0


def _headroom_line(p, args) -> str:
    """What FP8 could save at the plan's sites on the planned-for GPU's speed model, and what the plan takes."""
    name = args.speed_model or next((k for k in DEVICE_MODELS if k.upper() in str(p.device.get("name", "")).upper()), None)
    if args.m_buckets or name not in DEVICE_MODELS:
        return ("FP8 headroom: not estimated here (training plans on an H100/H200, or with --speed-model h100|h200; "
                "`loka headroom` prices a whole step)")
    step = args.bf16_step_ms
    doc = plan_headroom(p, DEVICE_MODELS[name], step, "given on the command line (--bf16-step-ms)" if step else "")
    return headroom_summary(doc) + " (the plan's sites only; `loka headroom` prices the whole step)"


def _keep_bf16(path: str) -> dict[str, str]:
    """``{fqn: reason}`` from a JSON file; ValueError naming the problem otherwise."""
    return read_site_map(path, "--keep-bf16", "reason")


def read_site_map(path: str, flag: str, value: str) -> dict[str, str]:
    """``{fqn: str}`` from a JSON file; ValueError naming the flag, file and problem otherwise."""
    try:
        out = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {path}: not valid JSON ({exc}); write {{\"site.fqn\": \"{value}\"}}") from None
    if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
        raise ValueError(f"{flag} {path}: expected a JSON object {{\"site.fqn\": \"{value}\"}}")
    return out


def _bench(args) -> int:
    try:
        m, k, n = (int(v) for v in args.shape.split(","))
    except ValueError:
        print(f"loka bench-kernels: --shape {args.shape!r} must be M,K,N, e.g. 8192,512,512", file=sys.stderr)
        return 2
    if min(m, k, n) < 1:
        print(f"loka bench-kernels: --shape {args.shape!r}: M, K and N must each be >= 1, e.g. 8192,512,512",
              file=sys.stderr)
        return 2
    device = _device(args.device)
    dtype = torch.bfloat16
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    t = time_site((m, k, n), recipes, device=device, dtype=dtype, iters=args.iters, refresh=args.refresh,
                  cache=open_cache(None, device), progress=True).to_dict()
    print(f"device: {t['device_name']}" + ("" if t["representative"] else " (CPU: not representative of GPU speed)"))
    print(f"{'gemm':<6} {'kernel':<22} {'recipe':<12} {'median ms':>10} {'p10':>8} {'p90':>8} {'vs bf16':>8}")
    for gemm, ms in t["bf16_ms"].items():
        print(f"{gemm:<6} {'bf16':<22} {'-':<12} {ms:>10.4f} {'':>8} {'':>8} {'1.00x':>8}")
        for e in (e for e in t["entries"] if e["gemm"] == gemm):
            print(f"{gemm:<6} {e['kernel']:<22} {e['recipe']:<12} {e['median_ms']:>10.4f} {e['p10_ms']:>8.4f} "
                  f"{e['p90_ms']:>8.4f} {ms / e['median_ms']:>7.2f}x")
    for what, why in sorted(t["skipped"].items()):
        print(f"skipped {what}: {why}")
    if args.json:
        write_json(args.json, t)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run these subcommands without the top-level ``loka`` CLI (for tests and debugging)."""
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args)) if getattr(args, "func", None) else 2
