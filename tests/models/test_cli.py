"""`loka train`, `loka eval`, `loka serve` through the models package's register()."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from loka.gate import EvalOutputs
from loka.models.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = _run(["train", "--size", "tiny", "--steps", "6", "--batch-size", "64", "--out", str(out),
                 "--eval-examples", "2048", "--no-progress", "--threads", "1"])
    assert code == 0
    return out


def test_train_writes_checkpoint_metrics_and_eval(trained):
    assert (trained / "checkpoint.pt").exists()
    assert (trained / "metrics.jsonl").read_text().strip()
    report = json.loads((trained / "eval.json").read_text())
    assert {"ctr", "cvr"} <= set(report) and report["ctr"]["bayes_ne"] < 1
    outputs = EvalOutputs.load(trained / "eval_outputs.npz")
    assert set(outputs.tasks) == {"ctr", "ctcvr"} and outputs.n == 2048


def test_eval_outputs_and_compare(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoint.pt")
    assert _run(["eval", "--checkpoint", ckpt, "--eval-examples", "1024", "--out", str(tmp_path)]) == 0
    assert "Bayes NE" in capsys.readouterr().out
    assert EvalOutputs.load(tmp_path / "eval_outputs.npz").n == 1024
    assert _run(["eval", "--checkpoint", ckpt, "--eval-examples", "4096", "--compare", ckpt]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ctr"]["diff"] == 0.0  # a model against itself


def test_train_on_criteo_files(tmp_path, capsys):
    line = "\t".join(["1"] + ["3"] * 13 + ["0a1b2c3d"] * 26)
    (tmp_path / "d.tsv").write_text((line + "\n") * 20 + "garbage\n")
    code = _run(["train", "--size", "tiny", "--steps", "2", "--batch-size", "8", "--criteo",
                 str(tmp_path / "d.tsv"), "--on-error", "skip", "--no-progress"])
    assert code == 0
    assert "skipped malformed lines: 0" in capsys.readouterr().out  # the bad line is after step 2


def test_serve_command_answers_over_loopback_and_stops_gracefully_on_sigterm(trained):
    import threading

    from loka.models import RankerConfig, SyntheticStream
    from loka.models.serving_schema import batch_to_request

    code = ("import sys; from loka.models.cli import register; import argparse;"
            "p = argparse.ArgumentParser(); register(p.add_subparsers());"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--checkpoint", str(trained / "checkpoint.pt"),
                             "--port", "0", "--device", "cpu", "--max-wait-ms", "500"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        url = line.split(" at ")[1].strip().removesuffix("/score")
        with urllib.request.urlopen(url + "/health", timeout=20) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        body = json.dumps(batch_to_request(SyntheticStream(RankerConfig.from_size("tiny"), 3, seed=5).batch(0)))
        reply = {}

        def score():  # the batcher holds this request 0.5 s: SIGTERM arrives while it is in flight
            req = urllib.request.Request(url + "/score", body.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=20) as resp:
                reply.update(status=resp.status, body=json.loads(resp.read()))

        client = threading.Thread(target=score)
        client.start()
        time.sleep(0.2)
        proc.terminate()
        client.join(timeout=20)
        assert reply.get("status") == 200 and reply["body"]["n"] == 3
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait(timeout=20)
