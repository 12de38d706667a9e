"""bench/gpu_check.py: its CPU smoke run has every stage with a status, and a stage that fails or
hangs is a row with the reason, never the end of the run (stages injected with --inject).

The smoke run sees only what the lent GPU machine has (torch, numpy, scipy, triton, pytest,
matplotlib, ml-dtypes): every other installed package is hidden from it and its stages by a
``sitecustomize`` on PYTHONPATH. Its time limits are set far above any CPU's time, so a loaded
machine passes as an idle one does (only the injected hang meets its limit).
No test here depends on how fast the machine is: only a stage that hangs by design meets its
limit, and the subprocess timeout is a guard against a hung runner, not a speed check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_machine import as_on_the_gpu_machine

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["doctor", "gpu_tests", "ranker_base", "kernels", "probe_overhead", "sharded", "gpu_tests_rest", "ranker_large"]
STATUSES = {"ok", "failed", "timed out", "skipped"}
UNLIMITED = 10**6  # seconds: a stage limit / budget no run reaches
NO_LIMITS = ("--budget-s", str(UNLIMITED), *(a for name in STAGES for a in ("--limit", f"{name}={UNLIMITED}")))
HANG_GUARD_S = 3600  # only a runner that never ends fails on this


def _run(tmp_path: Path, *extra: str, timeout: float = HANG_GUARD_S) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "out"
    env = as_on_the_gpu_machine(tmp_path)
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--work", str(tmp_path / "work"),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    doc = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    return proc, doc, md


def _md_rows(md: str) -> dict[str, list[str]]:
    table = md.split("| # | stage |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:] if line.startswith("|")]
    return {cells[1].strip(): [c.strip() for c in cells[2:]] for cells in rows}


@pytest.mark.slow
def test_cpu_smoke_every_stage_has_a_status_and_a_failing_or_hanging_stage_is_a_row(tmp_path):
    proc, doc, md = _run(tmp_path, "--cpu-smoke", "--inject", "broken=fail", "--inject", "hang=timeout:2", *NO_LIMITS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {s["name"]: s for s in doc["stages"]}
    assert list(stages) == ["broken", "hang"] + STAGES, "injected stages run first, then every stage in order"
    assert all(s["status"] in STATUSES for s in stages.values())
    # The injected failure and hang are rows with their reasons; every real stage still ran after them.
    assert stages["broken"]["status"] == "failed" and "injected failure" in stages["broken"]["reason"]
    assert stages["hang"]["status"] == "timed out" and "2 s limit" in stages["hang"]["reason"]
    assert stages["hang"]["elapsed_s"] >= 2, "the hung stage ran until its limit, then its process group was stopped"
    for name in STAGES:
        assert stages[name]["status"] == "ok", (name, stages[name]["reason"], stages[name]["log_tail"][-10:])
    header = doc["header"]
    assert header["representative"] is False and header["versions"]["torch"] != "not installed"
    # It ran as on the GPU machine: the hidden packages were missing, and said so.
    assert all(stages[n]["elapsed_s"] < 3600 for n in STAGES), "a stage met the limit meant never to be met"
    assert "torchao: not installed" in json.dumps(stages["ranker_base"]["figures"]), stages["ranker_base"]["figures"]
    assert header["commit"] and header["command"].startswith("python bench/gpu_check.py ") and "--cpu-smoke" in header["command"]
    # Figures come from each stage's own outputs.
    assert "loka doctor" in md and "bf16" in stages["doctor"]["figures"]["doctor"]
    for name in ("gpu_tests", "gpu_tests_rest"):
        tests = stages[name]["figures"]
        assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0 and tests["skipped"] == tests["tests"]
    variants = [v["name"] for v in stages["ranker_base"]["figures"]["variants"]]
    assert variants == ["bf16", "torchao-tensorwise", "loka-plan"]
    kernels = stages["kernels"]["figures"]
    assert [r["gemm"] for r in kernels["rows"]] == ["fprop", "dgrad", "wgrad"] and kernels["done"]
    for row in kernels["rows"]:
        labels = [e["what"] for e in row["entries"]]
        assert labels[:2] == ["bf16 (per call)", "bf16"] and any(w.startswith("ceiling") for w in labels)
        assert all(e["median_ms"] > 0 and not e["representative"] for e in row["entries"] if "error" not in e)
    assert stages["probe_overhead"]["figures"]["steps"] == 4
    sharded = stages["sharded"]["figures"]
    # the smoke run hides torchrec, as the GPU machine lacks it: the row says why and how to install it
    assert not sharded["ran"] and sharded["reason"].startswith("not run: torchrec") and "pip install" in sharded["reason"]
    # The Markdown has the same rows, each with its status and reason.
    rows = _md_rows(md)
    assert list(rows) == list(stages)
    assert rows["broken"][1] == "failed" and "injected failure" in rows["broken"][3]
    assert rows["hang"][1] == "timed out"
    assert "NOT representative" in md


def test_failing_gpu_tests_are_counted_and_named_from_junit(tmp_path):
    fake = tmp_path / "test_fake_gpu.py"
    fake.write_text("import pytest\n\n"
                    "@pytest.mark.requires_cuda\ndef test_wrong_scale():\n    assert 1.0 == 2.0, 'scale off by one ulp'\n\n"
                    "@pytest.mark.requires_cuda\ndef test_right():\n    assert True\n\n"
                    "def test_not_gpu():\n    assert False\n")
    # Outside tests/, so neither is in GPU_MUST_RUN: they are the rest of the GPU tests.
    proc, doc, md = _run(tmp_path, "--cpu-smoke", "--only", "gpu_tests_rest", "--tests", str(fake), *NO_LIMITS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {s["name"]: s for s in doc["stages"]}
    assert [stages[n]["status"] for n in STAGES] == ["skipped"] * 6 + ["failed", "skipped"]
    assert stages["doctor"]["reason"] == "not in --only"
    figures = stages["gpu_tests_rest"]["figures"]
    # The unmarked test is deselected by -m; of the two marked ones one fails.
    assert (figures["tests"], figures["passed"], figures["failures"]) == (2, 1, 1)
    assert [f["test"].split("::")[-1] for f in figures["failed"]] == ["test_wrong_scale"]
    assert "scale off by one ulp" in figures["failed"][0]["message"]
    assert stages["gpu_tests_rest"]["reason"].startswith("1 failed, 0 errors of 2")
    assert "test_wrong_scale" in md


def test_bad_options_are_refused_by_name(tmp_path):
    for extra, message in ((["--limit", "nosuch=3"], "unknown stages ['nosuch']"),
                           (["--inject", "x=explode"], "use NAME=fail|timeout|ok")):
        proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path / "o"),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_gpu_tests_past_their_limit_still_report_what_ran(tmp_path):
    """The limit must fire after test_quick passed; on a machine too loaded for pytest to get there
    in time (test_quick left no mark) the limit doubles and the run repeats, so speed never decides."""
    fake = tmp_path / "test_slow_gpu.py"
    mark = tmp_path / "quick_passed"
    fake.write_text("import pathlib\nimport time\nimport pytest\n\n"
                    f"@pytest.mark.requires_cuda\ndef test_quick():\n    pathlib.Path({str(mark)!r}).touch()\n\n"
                    "@pytest.mark.requires_cuda\ndef test_hangs():\n    time.sleep(100000)\n")
    limit = 6
    while True:
        mark.unlink(missing_ok=True)
        proc, doc, _md = _run(tmp_path, "--cpu-smoke", "--only", "gpu_tests_rest", "--tests", str(fake),
                              "--budget-s", str(UNLIMITED), "--limit", f"gpu_tests_rest={limit}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        if mark.exists() or limit >= 768:
            break
        limit *= 2  # pytest had not reached test_quick yet: a loaded machine, not a finding
    stage = next(s for s in doc["stages"] if s["name"] == "gpu_tests_rest")
    assert stage["status"] == "timed out" and stage["elapsed_s"] >= limit
    # SIGINT first: pytest wrote its JUnit report, with the test that finished before the limit.
    assert stage["figures"].get("passed", 0) >= 1, stage
    assert f"{limit} s limit" in stage["reason"]


def test_every_must_run_name_is_a_gpu_test():
    """Each GPU_MUST_RUN entry names GPU-marked tests that exist (a renamed test must not drop out)."""
    spec = importlib.util.spec_from_file_location("loka_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    GPU_MUST_RUN = conftest.GPU_MUST_RUN
    files = sorted({name.split("::")[0] for name in GPU_MUST_RUN})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "(requires_cuda or requires_sm89) and gpu_must", *files],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    for name in GPU_MUST_RUN:
        assert any(c.startswith(name) for c in collected), f"{name} selects no GPU test"


@pytest.mark.slow
def test_gpu_tests_collect_without_the_extras(tmp_path):
    """On the GPU machine the check's test stages collect all of tests/: a module that needs an extra
    (serving, sklearn) must skip there, not stop the collection with an error."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "requires_cuda or requires_sm89", "tests"],
                          cwd=ROOT, capture_output=True, text=True, env=as_on_the_gpu_machine(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.splitlines()[-1].lower(), proc.stdout[-3000:]


def test_the_sharded_stage_runs_where_torchrec_is_installed(tmp_path):
    """The smoke run hides torchrec (the GPU machine lacks it); here, where CI installs it, the stage's
    own script trains its steps on one process (TorchRec tables + FSDP2)."""
    if subprocess.run([sys.executable, "-c", "import torchrec"], capture_output=True).returncode != 0:
        pytest.skip("torchrec is not installed here (scripts/setup.sh installs it)")
    out = tmp_path / "sharded.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_sharded.py"), "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ran"] and doc["steps"] == 5 and doc["device"] == "cpu", doc
