"""bench/gpu_check.py: its CPU smoke run has every stage with a status, and a stage that fails or
hangs is a row with the reason, never the end of the run (stages injected with --inject).

The smoke run sees only what the lent GPU machine has (torch, numpy, scipy, triton, pytest,
matplotlib, ml-dtypes): every other installed package is hidden from it and its stages by a
``sitecustomize`` on PYTHONPATH. Its time limits are set far above any CPU's time, so a loaded
machine passes as an idle one does (only the injected hang meets its limit)."""

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
STAGES = ["doctor", "gpu_tests", "ranker_base", "kernels", "probe_overhead", "gpu_tests_rest", "ranker_large"]
STATUSES = {"ok", "failed", "timed out", "skipped"}
NO_TIME_LIMIT = ("--budget-s", "36000", *(a for s in STAGES for a in ("--limit", f"{s}=3600")))


def _run(tmp_path: Path, *extra: str, timeout: float = 7200) -> tuple[subprocess.CompletedProcess, dict, str]:
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
    proc, doc, md = _run(tmp_path, "--cpu-smoke", "--inject", "broken=fail", "--inject", "hang=timeout:2",
                         *NO_TIME_LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {s["name"]: s for s in doc["stages"]}
    assert list(stages) == ["broken", "hang"] + STAGES, "injected stages run first, then every stage in order"
    assert all(s["status"] in STATUSES for s in stages.values())
    # The injected failure and hang are rows with their reasons; every real stage still ran after them.
    assert stages["broken"]["status"] == "failed" and "injected failure" in stages["broken"]["reason"]
    assert stages["hang"]["status"] == "timed out" and "2 s limit" in stages["hang"]["reason"]
    assert stages["hang"]["elapsed_s"] < 2 + 15 + 10, "the hung stage's process group was stopped (SIGINT, SIGTERM, SIGKILL)"
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
    proc, doc, md = _run(tmp_path, "--cpu-smoke", "--only", "gpu_tests_rest", "--tests", str(fake), *NO_TIME_LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {s["name"]: s for s in doc["stages"]}
    assert [stages[n]["status"] for n in STAGES] == ["skipped"] * 5 + ["failed", "skipped"]
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
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_gpu_tests_past_their_limit_still_report_what_ran(tmp_path):
    fake = tmp_path / "test_slow_gpu.py"
    fake.write_text("import time\nimport pytest\n\n"
                    "@pytest.mark.requires_cuda\ndef test_quick():\n    assert True\n\n"
                    "@pytest.mark.requires_cuda\ndef test_hangs():\n    time.sleep(3600)\n")
    # test_hangs never ends. The limit must leave pytest time to start and pass test_quick: on a loaded
    # machine it may not, and the run is repeated with a longer limit (the check does not depend on speed).
    for limit in (30, 120, 480, 1920):
        (tmp_path / str(limit)).mkdir()
        proc, doc, _md = _run(tmp_path / str(limit), "--cpu-smoke", "--only", "gpu_tests_rest", "--tests", str(fake),
                              "--limit", f"gpu_tests_rest={limit}", "--budget-s", str(4 * limit))
        assert proc.returncode == 0, proc.stderr[-3000:]
        stage = next(s for s in doc["stages"] if s["name"] == "gpu_tests_rest")
        assert stage["status"] == "timed out" and f"{limit} s limit" in stage["reason"]
        assert stage["elapsed_s"] < limit + 15 + 10, "stopped: SIGINT, then SIGTERM and SIGKILL"
        if stage["figures"].get("passed", 0) >= 1:
            break  # pytest got as far as passing test_quick before the limit
    # SIGINT first: pytest wrote its JUnit report, with the test that finished before the limit.
    assert stage["figures"].get("passed", 0) >= 1, stage


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
