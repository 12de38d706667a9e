"""``loka probe`` through its own ``register`` on a fresh parser, with a module:factory model."""

import argparse
from pathlib import Path

import pytest

from loka.probe import cli
from loka.probe.report import ProbeReport
from loka.probe.workload import load_workload

TOY = str(Path(__file__).with_name("probe_toy.py")) + ":factory"


def _parse(argv, named_workloads=None):
    parser = argparse.ArgumentParser(prog="loka")
    cli.register(parser.add_subparsers(dest="command"), named_workloads=named_workloads)
    return parser.parse_args(argv)


def test_cli_writes_all_three_report_forms(tmp_path, capsys):
    args = _parse(["probe", "--model", TOY, "--steps", "6", "--every", "2", "--out", str(tmp_path),
                   "--recipes", "tensorwise,rowwise", "--predict", "mx", "--kernels", "emulated", "--timing"])
    assert args.func(args) == 0
    report = ProbeReport.load(tmp_path / "probe_report.json")
    assert report.doc["sampled_steps"] == [0, 2, 4]
    assert {s["fqn"] for s in report.sites} == {"inp", "hidden", "out"}
    assert all(s["sensitivity"] and s["timings"] for s in report.sites)
    assert (tmp_path / "probe_report.md").read_text().startswith("# loka probe report")
    assert "base64" in (tmp_path / "probe_report.html").read_text()
    assert "| `hidden` |" in capsys.readouterr().out


@pytest.mark.parametrize("model, message", [("nosuchsize", "unknown name"), ("json:nothing", "has no attribute")])
def test_cli_bad_model_is_a_clear_error(tmp_path, capsys, model, message):
    args = _parse(["probe", "--model", model, "--steps", "1", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert message in capsys.readouterr().err


def test_cli_named_workload_is_offered_by_the_caller(tmp_path, capsys):
    """The probe knows no model: a bare --model name resolves only among the names its caller offers."""
    args = _parse(["probe", "--model", "small", "--steps", "1", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "unknown name; use one of []" in capsys.readouterr().err
    seen = []

    def toy(*, batch_size, seed, device):
        seen.append((batch_size, seed, device))
        return load_workload(TOY)

    args = _parse(["probe", "--model", "toy", "--steps", "2", "--every", "1", "--out", str(tmp_path), "--no-timing",
                   "--no-sensitivity", "--batch-size", "7", "--seed", "3"], named_workloads={"toy": toy})
    assert args.func(args) == 0
    assert seen == [(7, 3, "cpu")]


def test_cli_skips_kernel_timing_on_cpu_and_says_how_to_force_it(tmp_path, capsys):
    """Timings on CPU decide nothing for a GPU plan: not taken unless --timing (issue 29, item 20)."""
    args = _parse(["probe", "--model", TOY, "--steps", "2", "--every", "1", "--out", str(tmp_path),
                   "--no-sensitivity", "--device", "cpu", "--json", str(tmp_path / "copy.json")])
    assert args.func(args) == 0
    report = ProbeReport.load(tmp_path / "probe_report.json")
    assert report.sites and not any(s["timings"] for s in report.sites)
    out = capsys.readouterr().out
    assert "kernel timing skipped on CPU" in out and "--timing" in out
    assert ProbeReport.load(tmp_path / "copy.json").sites == report.sites  # --json PATH: the report


def test_cli_no_sampled_step(tmp_path, capsys):
    args = _parse(["probe", "--model", TOY, "--steps", "2", "--warmup", "5", "--out", str(tmp_path), "--no-timing"])
    assert args.func(args) == 2
    assert "no step was sampled" in capsys.readouterr().err
