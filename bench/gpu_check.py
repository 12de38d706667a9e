"""One prepared GPU check: everything in loka that needs a GPU, in one call of at most 7 minutes.

    pip install -q --no-deps --no-build-isolation -e . && python bench/gpu_check.py --out $OUT/gpu_check

writes ``gpu_check.md`` (the summary), ``gpu_check.json`` (device, versions, commit, command,
every stage's status, time and figures), ``gpu_check.log`` (every stage's output) and
``gpu_tests.xml`` (pytest's JUnit report) into ``--out``. Stages, in order of value:

1. ``doctor``: versions, the device and ``loka doctor``;
2. ``gpu_tests``: the GPU tests that must run (``gpu_must``, tests/conftest.py ``GPU_MUST_RUN``:
   the numerics of every kernel, the scale rule, the probe on the device, compile + FP8
   gradients): counts and failing tests;
3. ``ranker_base``: bench/ranker.py at ``base``: bf16, torchao rowwise and tensorwise, loka's
   plan made on the device (probe + measured kernels; made last, so the other rows are saved
   even if it fails): step time, examples/s, MFU on useful and on executed FLOPs, ΔNE vs bf16
   with its interval, inference p50/p99, peak memory;
4. ``kernels``: bench/gpu_check_kernels.py: the ranker's own GEMM shapes (fprop, dgrad, wgrad),
   bf16 vs every FP8 kernel with its quantization vs the pre-quantized ceiling, CUDA graphs;
5. ``probe_overhead``: bench/probe_overhead.py at ``base`` on the device;
6. ``gpu_tests_rest``: the other GPU-marked tests, with what is left of the budget (at least 30 s);
7. ``ranker_large``: bench/ranker.py at ``large`` at a batch that fits (bf16 and loka's plan),
   with whatever is left of the budget.

Each stage runs in its own process (its own process group) under its own time limit: the
smaller of its planned limit (``--limit NAME=SECONDS`` changes one) and what is left of
``--budget-s``. A stage that fails or runs past its limit is a row with the reason and its
output's last lines; the next stage runs. The summary is rewritten when each stage starts
and ends, so a run killed from outside still leaves everything measured so far.

The ranker stages run eagerly by default (``--ranker-compile off``): compiled, each variant
spends 30-75+ s in torch.compile at ``base`` (H200, 2026-11-30: bf16 30.9 s first step,
torchao tensorwise 45.7 s, rowwise past 75 s), which does not fit 7 minutes next to the rest;
``--ranker-compile on`` (with a larger ``--budget-s``) gives the compiled figures.

``--cpu-smoke`` runs every stage at tiny sizes on CPU with small limits (figures NOT
representative); CI runs it. ``--inject NAME=fail|timeout|ok[:SECONDS]`` adds a stage, run
first, that fails, hangs or passes: it shows that such a stage becomes a row, not the end.
Needs torch >= 2.11, triton, scipy, pytest; torchao optional (its rows say "not installed").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling bench modules

import gpu_check_report as report  # noqa: E402
import gpu_check_sharded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 420.0  # 7 minutes, the whole run, compile included
MIN_STAGE_S = 5.0  # a stage with less than this left is skipped, not started
STOP_GRACE_S = 15.0  # kept back from the budget: stopping a stage may take this long (SIGINT, SIGTERM, SIGKILL)
TEST_MARKERS = "requires_cuda or requires_sm89"
MUST_TESTS = f"({TEST_MARKERS}) and gpu_must"  # tests/conftest.py GPU_MUST_RUN: run first, must fit 120 s
REST_TESTS = f"({TEST_MARKERS}) and not gpu_must"  # the other GPU tests, with what is left


@dataclass(frozen=True)
class Stage:
    """A command run in its own process, its planned time limit, and how to read what it wrote."""

    name: str
    what: str
    argv: tuple[str, ...]
    limit_s: float
    collect: Callable[[], tuple[dict, list[str]]]
    min_s: float = MIN_STAGE_S  # with less than this left of the budget the stage is skipped


def _py(*args: str) -> tuple[str, ...]:
    return (sys.executable, *args)


def gpu_stages(args, work: Path, out: Path) -> list[Stage]:
    """The stages on a CUDA device, with the planned limits (390 s, and what is left for `large`)."""
    rb, rl = work / "ranker_base", work / "ranker_large"
    ranker = ("bench/ranker.py", "--no-progress", "--compile", args.ranker_compile)
    return [
        Stage("doctor", "versions, device, `loka doctor`", _py(__file__, "--stage-env", str(work / "env.json")),
              30, lambda: report.collect_env(work)),
        Stage("gpu_tests", f'pytest -m "{MUST_TESTS}": kernel numerics, scale rule, probe, compile + FP8 grads',
              _pytest(args.tests, out, MUST_TESTS, "gpu_tests.xml"), 120,
              lambda: report.collect_tests(out / "gpu_tests.xml")),
        Stage("ranker_base", "ranker `base` side by side (eager unless --ranker-compile on)",
              _py(*ranker, "--size", "base", "--variants", "bf16,torchao-rowwise,torchao-tensorwise,loka-plan",
                  "--steps", "10", "--warmup", "3", "--eval-examples", "16384", "--infer-batch-sizes", "512,4096",
                  "--infer-iters", "20", "--probe-steps", "6", "--variant-timeout", "25", "--plan-timeout", "30",
                  "--out", str(rb)),
              140, lambda: report.collect_ranker(rb)),  # 4 variants x 25 s + the plan's 30 s, inside 140
        Stage("kernels", "GEMMs at the ranker's shapes, CUDA graphs",
              _py("bench/gpu_check_kernels.py", "--size", "base", "--batch", "8192", "--max-shapes", "6",
                  "--json", str(work / "kernels.json")), 60, lambda: report.collect_kernels(work)),
        Stage("probe_overhead", "probe overhead at `base` on the device",
              _py("bench/probe_overhead.py", "--size", "base", "--steps", "20", "--every", "5", "--batch-size",
                  "4096", "--device", "cuda", "--out", str(work / "probe_overhead.json")),
              40, lambda: report.collect_probe_overhead(work)),
        _sharded_stage(work, "cuda", 40),
        Stage("gpu_tests_rest", f'pytest -m "{REST_TESTS}", with what is left',
              _pytest(args.tests, out, REST_TESTS, "gpu_tests_rest.xml"), 90,
              lambda: report.collect_tests(out / "gpu_tests_rest.xml"), min_s=30),
        Stage("ranker_large", "ranker `large` at batch 1024 (bf16, loka plan, then torchao tensorwise if time is "
              "left), with what is left",
              _py(*ranker, "--size", "large", "--batch-size", "1024", "--variants", "bf16,loka-plan,torchao-tensorwise",
                  "--steps", "5", "--warmup", "2", "--eval-examples", "4096", "--infer-batch-sizes", "512,4096",
                  "--infer-iters", "10",
                  "--probe-steps", "4", "--variant-timeout", "40", "--out", str(rl)),
              120, lambda: report.collect_ranker(rl), min_s=60),
    ]


def smoke_stages(args, work: Path, out: Path) -> list[Stage]:
    """The same stages at tiny sizes on CPU (each a few seconds; NOT representative)."""
    rb, rl = work / "ranker_base", work / "ranker_large"
    tiny = ("bench/ranker.py", "--cpu-smoke", "--no-progress", "--size", "tiny", "--steps", "1", "--warmup", "1",
            "--eval-examples", "1024", "--infer-batch-sizes", "4", "--infer-iters", "2", "--probe-steps", "2")
    return [
        Stage("doctor", "versions, device, `loka doctor`",
              _py(__file__, "--stage-env", str(work / "env.json"), "--device", "cpu"), 30,
              lambda: report.collect_env(work)),
        Stage("gpu_tests", f'pytest -m "{MUST_TESTS}" (collects, all skip on CPU)',
              _pytest(args.tests, out, MUST_TESTS, "gpu_tests.xml"), 40,
              lambda: report.collect_tests(out / "gpu_tests.xml")),
        Stage("ranker_base", "ranker `tiny` side by side",
              _py(*tiny, "--variants", "bf16,torchao-tensorwise,loka-plan", "--out", str(rb)), 60,
              lambda: report.collect_ranker(rb)),
        Stage("kernels", "GEMMs at the tiny ranker's largest shape",
              _py("bench/gpu_check_kernels.py", "--size", "tiny", "--batch", "64", "--max-shapes", "1", "--device",
                  "cpu", "--iters", "2", "--warmup", "0", "--kernels", "scaled_mm", "--json",
                  str(work / "kernels.json")), 40, lambda: report.collect_kernels(work)),
        Stage("probe_overhead", "probe overhead at `tiny` on CPU",
              _py("bench/probe_overhead.py", "--size", "tiny", "--steps", "4", "--every", "2", "--batch-size", "16",
                  "--device", "cpu", "--out", str(work / "probe_overhead.json")),
              40, lambda: report.collect_probe_overhead(work)),
        _sharded_stage(work, "cpu", 40),
        Stage("gpu_tests_rest", f'pytest -m "{REST_TESTS}" (collects, all skip on CPU)',
              _pytest(args.tests, out, REST_TESTS, "gpu_tests_rest.xml"), 40,
              lambda: report.collect_tests(out / "gpu_tests_rest.xml")),
        Stage("ranker_large", "ranker `tiny` again, bf16 only (stands in for `large`)",
              _py(*tiny, "--variants", "bf16", "--out", str(rl)), 40, lambda: report.collect_ranker(rl)),
    ]


def _sharded_stage(work: Path, device: str, limit_s: float) -> Stage:
    """TorchRec-sharded tables + FSDP2 on one process, where torchrec is installed (else the row says why)."""
    return Stage("sharded", "ranker `tiny`, TorchRec row-wise tables + FSDP2, one process",
                 _py("bench/gpu_check_sharded.py", "--device", device, "--json", str(work / "sharded.json")),
                 limit_s, lambda: gpu_check_sharded.collect(work))


def _pytest(tests: str, out: Path, markers: str, xml: str) -> tuple[str, ...]:
    return _py("-m", "pytest", "-m", markers, *shlex.split(tests), "-q", "-p", "no:cacheprovider",
               "-o", "junit_family=xunit1", f"--junitxml={out / xml}")


def injected_stages(specs: list[str]) -> list[Stage]:
    """``NAME=fail|timeout|ok[:SECONDS]`` stages (see the module docstring)."""
    stages = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        kind, _, seconds = rest.partition(":")
        if not name or kind not in ("fail", "timeout", "ok"):
            raise ValueError(f"--inject {spec!r}: use NAME=fail|timeout|ok[:SECONDS], e.g. broken=fail or hang=timeout:2")
        limit = float(seconds) if seconds else 5.0
        stages.append(Stage(name, f"injected ({kind})", _py(__file__, "--stage-inject", kind), limit,
                            report.collect_nothing))
    return stages


# ---------------------------------------------------------------- running one stage


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the stage's whole process group (compile workers, pytest children): SIGINT first, so
    pytest still writes its JUnit report and a script its partial results, then SIGTERM, SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 8.0), (signal.SIGTERM, 4.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _reason(lines: list[str]) -> str:
    """The line that names the error (the last ``SomethingError: ...``), else the last line printed."""
    for line in reversed(lines):
        text = line.strip()
        if text and (text.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")) or text.startswith("FAILED")):
            return text[:300]
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), "")


def run_stage(stage: Stage, result: report.StageResult, limit_s: float, log: Path) -> None:
    """Run ``stage`` under ``limit_s`` with its output in ``log``; fill ``result`` (never raises)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # SIGINT back to its default in the stage: started from a background job (nohup, `&`) it is
        # ignored, and then Python installs no KeyboardInterrupt and pytest writes no JUnit when stopped.
        proc = subprocess.Popen(stage.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_default_sigint)
        try:
            result.returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            result.status, result.reason = "timed out", f"ran past its {limit_s:.0f} s limit and was stopped"
        except BaseException:  # the check itself is being stopped: never leave a stage running behind it
            _kill_group(proc)
            raise
    result.elapsed_s = time.perf_counter() - t0
    lines = log.read_text(errors="replace").splitlines()
    result.log_tail = lines[-40:]
    if result.status != "timed out":
        if result.returncode == 0:
            result.status = "ok"
        else:
            result.status = "failed"
            result.reason = f"exit code {result.returncode}: {_reason(lines)}"
    try:
        result.figures, result.markdown = stage.collect()
    except Exception as exc:  # an unreadable output is part of the row, not the end of the run
        result.figures, result.markdown = {}, [f"(could not read the stage's output: {type(exc).__name__}: {exc})"]
    summary = result.figures.get("summary") if isinstance(result.figures, dict) else None
    if summary:  # the stage's own one-line summary (counts, variants that ran), before any failure reason
        result.reason = f"{summary}; {result.reason}" if result.reason else summary


# ---------------------------------------------------------------- the run


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git checkout here)"


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "torchao", "scipy", "pytest", "loka"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", help="folder for gpu_check.md / .json / .log and gpu_tests.xml")
    p.add_argument("--cpu-smoke", action="store_true", help="every stage at tiny sizes on CPU (NOT representative)")
    p.add_argument("--budget-s", type=float, default=None, help=f"wall-clock budget of the whole run (default "
                   f"{BUDGET_S:g}; --cpu-smoke 240)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="change a stage's limit")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (others: skipped rows)")
    p.add_argument("--inject", action="append", default=[], metavar="NAME=KIND[:SECONDS]",
                   help="add a stage, run first, that fails, times out or passes (checks the runner)")
    p.add_argument("--tests", default=None, help="pytest paths (default: tests; --cpu-smoke: two files with GPU tests "
                   "of both sets, which skip on CPU)")
    p.add_argument("--ranker-compile", choices=("on", "off"), default="off", help="torch.compile the ranker variants")
    p.add_argument("--work", default=None, help="folder for the stages' own outputs (default: a temporary folder)")
    p.add_argument("--stage-env", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-inject", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage_env is None and args.stage_inject is None and not args.out:
        p.error("--out DIR is required")
    args.budget_s = args.budget_s or (240.0 if args.cpu_smoke else BUDGET_S)
    args.tests = args.tests or ("tests/core/test_timer.py tests/core/test_scale_rule.py" if args.cpu_smoke else "tests")
    try:
        args.limits = {k: float(v) for k, _, v in (s.partition("=") for s in args.limit)}
    except ValueError:
        p.error(f"--limit takes NAME=SECONDS, got {args.limit}")
    return args


def plan_stages(args, work: Path, out: Path) -> list[Stage]:
    stages = injected_stages(args.inject) + (smoke_stages if args.cpu_smoke else gpu_stages)(args, work, out)
    unknown = set(args.limits) - {s.name for s in stages}
    if unknown:
        raise ValueError(f"--limit names unknown stages {sorted(unknown)}; stages: {[s.name for s in stages]}")
    return [Stage(s.name, s.what, s.argv, args.limits.get(s.name, s.limit_s), s.collect, s.min_s) for s in stages]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage_env is not None:
        return stage_env(Path(args.stage_env), args.device)
    if args.stage_inject is not None:
        return stage_inject(args.stage_inject)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loka-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stages = plan_stages(args, work, out)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    header = {"command": "python bench/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "commit": _commit(), "versions": _versions(), "budget_s": args.budget_s, "elapsed_s": 0.0,
              "device": "cpu (smoke)" if args.cpu_smoke else "(not read yet)", "representative": False,
              "work": str(work)}
    results = [report.StageResult(s.name, s.what, "python " + shlex.join(s.argv[1:]), s.limit_s) for s in stages]
    print(f"gpu_check: budget {args.budget_s:g} s; plan: " + ", ".join(f"{s.name} {s.limit_s:g} s" for s in stages),
          flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: stop the stage, keep the summary
    try:
        run_all(stages, results, header, args, out, work)
    except KeyboardInterrupt:
        for r in results:
            if r.status == "running":
                r.status, r.reason = "stopped", "the check itself was interrupted while this stage ran"
        report.write(out, header, results)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = (out / "gpu_check.md").read_text()
    print(text)
    table = [line for line in text.splitlines() if line.startswith("|")][:len(stages) + 2]
    print("\n".join(["", "gpu_check: stages (the summary above is in " + str(out / "gpu_check.md") + "):"] + table))
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def run_all(stages: list[Stage], results: list[report.StageResult], header: dict, args, out: Path, work: Path):
    """Every stage in turn under the budget; the summary rewritten as each starts and ends."""
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    with open(out / "gpu_check.log", "w") as log:
        for stage, result in zip(stages, results):
            left = args.budget_s - (time.perf_counter() - t0) - STOP_GRACE_S
            if only is not None and stage.name not in only:
                result.status, result.reason = "skipped", "not in --only"
            elif left < min(stage.min_s, stage.limit_s):
                result.status, result.reason = "skipped", (f"only {max(left, 0):.0f} s of the {args.budget_s:g} s budget "
                                                           f"left; it needs at least {min(stage.min_s, stage.limit_s):g} s")
            else:
                result.status = "running"
                header["elapsed_s"] = time.perf_counter() - t0
                report.write(out, header, results)
                run_stage(stage, result, min(stage.limit_s, left), work / f"{stage.name}.log")
                log.write(f"===== {stage.name}: {result.status} after {result.elapsed_s:.1f} s: {result.command}\n")
                log.write((work / f"{stage.name}.log").read_text(errors="replace")[-200_000:] + "\n")
                log.flush()
                if stage.name == "doctor" and result.figures.get("device"):
                    header["device"] = result.figures["device"]
                    header["representative"] = bool(result.figures.get("cuda"))
            header["elapsed_s"] = time.perf_counter() - t0
            report.write(out, header, results)
            print(f"gpu_check: {stage.name}: {result.status}"
                  + (f" ({result.elapsed_s:.1f} s)" if result.elapsed_s is not None else "")
                  + (f": {result.reason}" if result.reason else ""), flush=True)


def stage_env(path: Path, device: str | None) -> int:
    """The doctor stage: versions, the device (CUDA queried here, in the stage's process) and `loka doctor`."""
    import contextlib
    import io

    # The runner itself never imports torch or loka (a broken install must still give a report);
    # only the stage's own process does, here.
    import torch

    from loka.app.cli import main as loka_main

    cuda = torch.cuda.is_available() and device != "cpu"
    env = {"cuda": cuda, "versions": dict(_versions(), cuda=str(torch.version.cuda))}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        cap = torch.cuda.get_device_capability(0)
        env["device"] = f"{props.name} (sm_{cap[0]}{cap[1]}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        env["device"] = "cpu (no CUDA device)" if device != "cpu" else "cpu (smoke)"
    path.write_text(json.dumps(env, indent=1))  # written before the doctor, which might fail
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = loka_main(["doctor", "--device", "cuda" if cuda else "cpu"])
    env["doctor"] = buf.getvalue()
    path.write_text(json.dumps(env, indent=1))
    print(env["doctor"])
    return rc


def stage_inject(kind: str) -> int:
    """A stage that passes, fails or hangs on purpose (--inject)."""
    if kind == "fail":
        raise RuntimeError("injected failure (--inject NAME=fail)")
    if kind == "timeout":
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
