"""``loka demo``: per-device defaults, the FP8 model it trains when the plan converts nothing,
the summary lines a newcomer reads, and (slow) one whole run at tiny size."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loka.app.demo.ranker import QUICK_STEPS_BY_DEVICE, STEPS_BY_DEVICE, DemoConfig, pace_line
from loka.app.demo.fp8 import convert_safe_sites, modelled_speedup, safe_site_recipes
from loka.app.demo.summary import ne_lines
from loka.dispatch.plans import GemmChoice, Plan, SitePlan
from loka.gate.result import Check, GateResult
from loka.recipe import GEMMS


def test_config_fills_steps_by_device_and_keeps_given_ones():
    cfg = DemoConfig(device="cpu", continue_steps=7).resolved()
    assert cfg.size == "small" and cfg.continue_steps == 7
    assert cfg.warm_steps == STEPS_BY_DEVICE["cpu"]["warm_steps"]
    assert cfg.eval_examples == STEPS_BY_DEVICE["cpu"]["eval_examples"]


def test_quick_takes_fewer_steps_and_examples_and_keeps_given_ones():
    """The demo took 31 min on a busy 2-core machine: --quick is the documented shorter run."""
    import argparse

    from loka.app.demo.cli import register

    for device in ("cpu", "cuda"):
        quick, full = QUICK_STEPS_BY_DEVICE[device], STEPS_BY_DEVICE[device]
        assert set(quick) == set(full) and all(quick[k] < full[k] for k in full)
    cfg = DemoConfig(device="cpu", quick=True, eval_examples=5000).resolved()
    assert cfg.continue_steps == QUICK_STEPS_BY_DEVICE["cpu"]["continue_steps"] and cfg.eval_examples == 5000
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers())
    assert parser.parse_args(["demo", "--quick"]).quick and not parser.parse_args(["demo"]).quick


def test_pace_line_says_how_long_the_slow_stages_take_and_how_to_shorten_them():
    cfg = DemoConfig(device="cpu").resolved()
    line = pace_line(cfg, warm_seconds=cfg.warm_steps * 1.5)  # 1.5 s a step: a busy machine
    minutes = 2 * cfg.continue_steps * 1.5 / 60
    assert "1.50 s a step" in line and f"at least {minutes:.1f} min" in line and "--quick" in line
    assert f"{cfg.eval_examples:,} examples" in line
    quick = DemoConfig(device="cpu", quick=True).resolved()
    assert "--quick" not in pace_line(quick, 10.0) and "--continue-steps" in pace_line(quick, 10.0)


@pytest.mark.parametrize("kw, words", [({"fp8": "all"}, "fp8='all' is not valid"),
                                       ({"warm_steps": 0}, "warm_steps must be >= 1")])
def test_bad_config_says_what_to_do(kw, words):
    with pytest.raises(ValueError, match=words):
        DemoConfig(**kw)


def test_the_all_bf16_explanation_names_base_shapes_from_its_config():
    """The demo said base's interaction MLPs were "K ~1000-1150, N 1024-1536"; base has fm_hidden 2048."""
    from loka.app.demo.ranker import _all_bf16_explanation
    from loka.models import Ranker, RankerConfig

    report = SimpleNamespace(sites=[{"in_features": 64, "out_features": 32}])
    text = _all_bf16_explanation(report, DemoConfig(device="cpu").resolved())
    with torch.device("meta"):
        wide = [m for m in Ranker(RankerConfig.from_size("base")).modules()
                if isinstance(m, torch.nn.Linear) and min(m.in_features, m.out_features) >= 1024]
    ks, ns = [m.in_features for m in wide], [m.out_features for m in wide]
    assert f"{len(wide)} Linears" in text and f"K {min(ks)}-{max(ks)}, N {min(ns)}-{max(ns)}" in text, text
    assert str(RankerConfig.from_size("base").fm_hidden) in text and "1150" not in text


def _site(fqn, k, n, verdicts, err):
    errors = {r: {g: {"mean": e, "ci_lo": e, "ci_hi": e, "n": 3} for g in GEMMS} for r, e in err.items()}
    verdict = "safe" if "safe" in verdicts.values() else "unsafe"
    return {"fqn": fqn, "in_features": k, "out_features": n, "verdict": verdict, "errors": errors,
            "recipe_verdicts": {r: {"verdict": v} for r, v in verdicts.items()}}


def test_safe_sites_take_the_lowest_error_safe_recipe_and_respect_the_policy():
    report = SimpleNamespace(sites=[
        _site("a", 64, 64, {"tensorwise": "safe", "rowwise": "safe"}, {"tensorwise": 0.05, "rowwise": 0.03}),
        _site("b", 64, 64, {"tensorwise": "safe", "rowwise": "unsafe"}, {"tensorwise": 0.05, "rowwise": 0.2}),
        _site("kept", 64, 64, {"tensorwise": "safe"}, {"tensorwise": 0.01}),
        _site("unsafe", 64, 64, {"tensorwise": "unsafe"}, {"tensorwise": 0.3}),
        _site("odd", 13, 64, {"tensorwise": "safe"}, {"tensorwise": 0.01}),  # K not a multiple of 16
        _site("mx_only", 64, 64, {"mx": "safe", "tensorwise": "unsafe"}, {"mx": 0.01, "tensorwise": 0.3}),
    ])
    assert safe_site_recipes(report, keep={"kept": "policy"}) == {"a": "rowwise", "b": "tensorwise"}


def test_safe_sites_are_converted():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    assert convert_safe_sites(model, {"0": "rowwise", "2": "tensorwise"}) == {}
    assert type(model[0]).__name__ == "Float8Linear" and type(model[2]).__name__ == "Float8Linear"


def _plan(*shapes):
    sites = [SitePlan(f"s{i}", k, n, m, {g: GemmChoice(reason="kept bf16") for g in GEMMS})
             for i, (m, k, n) in enumerate(shapes)]
    return Plan(sites=sites, budget={})


def test_speed_model_expects_small_fp8_gemms_slower_and_large_ones_faster():
    small = _plan((512, 128, 128))
    assert modelled_speedup(small, {}) == pytest.approx(1.0)
    assert modelled_speedup(small, {"s0": "tensorwise"}) < 1.0
    # measured on an H100 (bench/results/h100_2026-11-22_gemm.md): with the quantization counted,
    # FP8 pays off only at large M with K, N >= 2048
    assert modelled_speedup(_plan((32768, 4096, 4096)), {"s0": "tensorwise"}) > 1.0


def _check(verdict, n_needed=None):
    return Check(name="ne[ctr]", kind="model", baseline=0.9588, candidate=0.9598, estimate=9.7e-4, ci_lo=-9.1e-4,
                 ci_hi=2.75e-3, budget="<= +0.0200%", verdict=verdict, n=65536, n_needed=n_needed, relative=True)


def test_inconclusive_ne_says_how_many_examples_would_decide():
    gate = GateResult(checks=(_check("inconclusive", 599_207),), n_examples=65536, confidence=0.95, n_boot=1000,
                      baseline="bf16", candidate="fp8")
    text = "\n".join(ne_lines(gate, 65536))
    assert "ne[ctr] bf16 0.95880 -> FP8 0.95980: +0.0970% [-0.0910%, +0.2750%]" in text
    assert "about 599,207 held-out examples would decide (now 65,536; --eval-examples)" in text
    assert "gate: inconclusive (the held-out set is too small to tell" in text


@pytest.mark.slow
def test_whole_demo_at_tiny_size(tmp_path, capsys, monkeypatch):
    from loka.app.cli import main
    from loka.app.demo.ranker import run

    cfg = DemoConfig(size="tiny", device="cpu", out_dir=str(tmp_path), warm_steps=4, probe_steps=12,
                     continue_steps=3, eval_examples=2048, serve_requests=2, fp8="safe-sites", progress=False)
    summary = run(cfg)
    out = capsys.readouterr().out
    for heading in ("=== 1. train", "=== 2. probe", "=== 3. mods", "=== 4. probe", "=== 5. plan", "=== 6. continue",
                    "=== 7. gate", "=== 8. serve", "=== summary"):
        assert heading in out, heading
    for line in ("expected GEMM speedup of the plan (H100 speed model)", "measured training speed",
                 "ne[ctr] bf16", "gate: ", "served 2 requests", "probe report (HTML): ", "time per stage: ",
                 "sites in FP8: every accuracy-safe site, not the plan): GEMM speed "):
        assert line in out, line
    assert summary["fp8_model"]["kind"] == "safe-sites" and summary["representative"] is False
    assert len(summary["sites"]) > 0 and all(r["plan"] and r["why"] for r in summary["sites"])
    assert Path(summary["paths"]["report_html"]).exists() and (tmp_path / "plan.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["stage_seconds"]
    # The FP8 headroom of the whole step: in the summary, its JSON, and the saved probe report's section.
    assert "FP8 headroom on the H100 SXM (speed model): GEMM + attention bound" in out.split("=== summary")[1]
    assert summary["headroom"]["kind"] == "loka.headroom" and summary["headroom"]["captured"] is not None
    assert "FP8 headroom: ranker tiny" in Path(summary["paths"]["report_html"]).read_text()
    # The mods stage changes something it shows, or says in one line why it changed nothing.
    mods_stage = out.split("=== 3. mods", 1)[1].split("\n=== 4.", 1)[0]
    assert "->" in mods_stage or len([x for x in mods_stage.splitlines()[1:] if x and not x.startswith("(")]) == 1

    # Every command the demo prints works: run each (a gate verdict is exit 0 or 1, a usage error 2).
    commands = re.findall(r"same as: (loka [^\n]+)", out) + re.findall(r"`(loka [^`]+)`", out)
    assert any(c.startswith("loka gate") for c in commands) and any(c.startswith("loka plan") for c in commands)
    plan_before = _plan_choices(tmp_path / "plan.json")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # commands with relative outputs write here
    reproduced = False
    for command in dict.fromkeys(commands):
        rc = main(shlex.split(command)[1:])
        assert rc in (0, 1), (command, rc, capsys.readouterr().err)
        if command.startswith("loka plan") and command.endswith(f"--out {tmp_path}"):
            # `loka plan` with the printed flags reproduced the demo's plan (it rewrote the same file)
            assert _plan_choices(tmp_path / "plan.json") == plan_before
            reproduced = True
    assert reproduced


def _plan_choices(path) -> dict:
    doc = json.loads(Path(path).read_text())
    return {s["fqn"]: {g: (c["kernel"], c["recipe"], c["reason"]) for g, c in s["gemms"].items()} for s in doc["sites"]}
