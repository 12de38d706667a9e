"""bench/fp8_projection.py: a thin wrapper of `loka headroom` that checks the model against GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("fp8_projection", ROOT / "bench" / "fp8_projection.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_runs_are_the_figures_of_their_records():
    proj = _load()
    for run in proj.GPU_RUNS.values():
        text = (ROOT / run["record"]).read_text()
        assert f"| bf16 | " in text and f"{run['bf16']:.3f}" in text


def test_cli_prints_the_headroom_and_says_what_it_cannot_compare(tmp_path, capsys):
    proj = _load()
    out = tmp_path / "p.json"
    assert proj.main(["--size", "tiny", "--batch", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| per-call casts |" in text and "## Against GPU runs" in text and "Serving at batch 4096" in text
    assert "No GPU run of `tiny` at batch 64 on h200" in text
    doc = json.loads(out.read_text())
    assert doc["size"] == "tiny" and {"per_call", "producers", "prequantized"} <= set(doc["regimes"])
    assert doc["serving"]["assumptions"]["serving"] is True
    assert proj.main(["--size", "huge"]) == 2 and proj.main(["--size", "tiny", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_against_gpu_runs_prints_the_step_error_and_the_unchecked_regimes():
    proj = _load()
    doc = {"step": {"bf16_ms": 220.0}, "regimes": {}}
    lines = proj.against_gpu_runs(doc, "base", 8192, "h200")
    assert "modelled 220.0 ms, measured 240.5 ms" in lines[0] and "-9%" in lines[0]
    assert "per_call, producers, prequantized regime(s)" in lines[-1]
