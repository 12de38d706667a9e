"""Replicate-mode gate on planted runs where the truth is known: no difference, a real 0.1% regression, noise only.

Planted "training runs": every run scores the same held-out examples, whose true click
probability is sigmoid(z). A run predicts sigmoid(z + b_r + s * g_r), with b_r a run-level
shift (training noise between runs, sd tau) and g_r per-example noise (the variant's
quality, scale s). The true expected NE of a variant is computed by Gauss-Hermite
quadrature over b and g (an oracle independent of the gate), so each scenario's truth
is known before the gate sees any sample.
"""

from __future__ import annotations

import numpy as np
import pytest

from loka.gate import EvalOutputs, gate
from loka.gate.budget import GateBudget
from loka.gate.replicates import ReplicateError, gate_replicates, replicate_ne, runs_needed

N = 200_000


def _population(seed: int):
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.0, N)
    y = (rng.random(N) < 1 / (1 + np.exp(-z))).astype(np.float64)
    return z, y


def _runs(z, y, rng, n_runs: int, s: float, tau: float) -> list[EvalOutputs]:
    out = []
    for _ in range(n_runs):
        logit = z + rng.normal(0, tau) + s * rng.normal(size=z.size)
        out.append(EvalOutputs.build(np.arange(z.size), {"ctr": y}, {"ctr": 1 / (1 + np.exp(-logit))}))
    return out


def _true_ne(z: np.ndarray, s: float, tau: float) -> float:
    """Expected NE of a variant (noise s, run shift sd tau) over runs, by quadrature: the oracle."""
    x, w = np.polynomial.hermite_e.hermegauss(24)
    w = w / w.sum()
    dev = np.sqrt(s**2 + tau**2) * x  # b + s g is Gaussian with this sd for each example
    p = 1 / (1 + np.exp(-z))
    q = 1 / (1 + np.exp(-(z[:, None] + dev[None, :])))
    loss = -(p[:, None] * np.log(q) + (1 - p[:, None]) * np.log1p(-q)) @ w
    rate = p.mean()
    return float(loss.mean() / -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate)))


def test_no_difference_passes():
    seed = 101
    z, y = _population(seed)
    rng = np.random.default_rng(seed + 1)
    # the same variant on both sides: the truth is exactly 0
    res = gate_replicates(_runs(z, y, rng, 4, 0.04, 0.002), _runs(z, y, rng, 4, 0.04, 0.002), GateBudget(ne_rel=0.0005))
    (check,) = res.checks
    assert check.verdict == "pass", res.table()
    assert check.ci_lo < 0 < check.ci_hi


def test_real_regression_of_a_tenth_of_a_percent_is_caught():
    seed = 202
    z, y = _population(seed)
    s_b, s_c, tau = 0.05, 0.0935, 0.002
    truth = _true_ne(z, s_c, tau) / _true_ne(z, s_b, tau) - 1
    assert 0.0007 < truth < 0.0013, truth  # the planted regression is about 0.1%
    rng = np.random.default_rng(seed + 1)
    res = gate_replicates(_runs(z, y, rng, 3, s_b, tau), _runs(z, y, rng, 3, s_c, tau), GateBudget(ne_rel=0.0002))
    (check,) = res.checks
    assert check.verdict == "regression", res.table()
    assert check.ci_lo < truth < check.ci_hi


def test_noise_only_is_not_called_a_regression_while_single_pairs_flip():
    seed = 303
    z, y = _population(seed)
    tau = 0.08  # run-to-run shift: NE of single runs differs by ~0.1%, as seen across data orders
    rng = np.random.default_rng(seed + 1)
    base, cand = _runs(z, y, rng, 4, 0.1, tau), _runs(z, y, rng, 4, 0.1, tau)
    res = gate_replicates(base, cand, GateBudget(ne_rel=0.0002))
    (check,) = res.checks
    assert check.verdict == "inconclusive", res.table()  # honest: the runs cannot tell
    assert check.ci_lo < 0 < check.ci_hi  # the truth (0) is inside
    assert "between-run se" in res.notes[0]
    # the paired gate on single pairs decides, in both directions, on noise alone
    verdicts = {gate(b, c, ne_rel=0.0002, n_boot=200).checks[0].verdict for b, c in zip(base, cand)}
    assert verdicts & {"pass", "regression"}, verdicts


def test_replicate_ne_needs_two_runs_a_side():
    y = np.array([0.0, 1.0, 1.0, 0.0])
    p = np.array([0.2, 0.7, 0.6, 0.3])
    with pytest.raises(ReplicateError, match="at least 2 baseline and 2 candidate"):
        replicate_ne(y, [p], [p, p])


def _saved(tmp_path, base: list, cand: list) -> dict[str, list[str]]:
    paths = {"b": [], "c": []}
    for side, runs in (("b", base), ("c", cand)):
        for k, run in enumerate(runs):
            paths[side].append(str(tmp_path / f"{side}{k}.npz"))
            run.save(paths[side][-1])
    return paths


def _cli(argv: list[str]) -> int:
    import argparse

    from loka.gate.cli import register

    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers())
    args = parser.parse_args(["gate", *argv, "--n-boot", "200"])
    return args.func(args)


def test_cli_takes_several_runs_a_side(tmp_path, capsys):
    seed = 404
    z, y = _population(seed)
    rng = np.random.default_rng(seed + 1)
    paths = _saved(tmp_path, _runs(z, y, rng, 3, 0.05, 0.002), _runs(z, y, rng, 3, 0.0935, 0.002))
    run = _cli
    assert run(["--baseline", *paths["b"], "--candidate", *paths["c"]]) == 1  # the planted 0.1% regression
    assert "replicates" in capsys.readouterr().out
    assert run(["--baseline", paths["b"][0], "--candidate", *paths["c"][:2], "--json", str(tmp_path / "r.json")]) == 2
    assert "at least 2 baseline" in capsys.readouterr().err


def _pairs(z, y, rng, n_pairs: int, s_b: float, s_c: float, tau: float, tau_w: float):
    """Paired runs: pair j shares its run shift (same seed and data order), plus a small within-pair divergence tau_w."""
    base, cand = [], []
    for _ in range(n_pairs):
        shift = rng.normal(0, tau)
        for side, s in ((base, s_b), (cand, s_c)):
            logit = z + shift + rng.normal(0, tau_w) + s * rng.normal(size=z.size)
            side.append(EvalOutputs.build(np.arange(z.size), {"ctr": y}, {"ctr": 1 / (1 + np.exp(-logit))}))
    return base, cand


def test_paired_replicates_decide_where_unpaired_cannot():
    """Run-to-run sd of ~0.1% hides a 0.1% regression from unpaired runs; pairs sharing their seed see it."""
    seed = 505
    z, y = _population(seed)
    s_b, s_c, tau = 0.05, 0.0935, 0.15
    truth = _true_ne(z, s_c, tau) / _true_ne(z, s_b, tau) - 1
    assert 0.0007 < truth < 0.0013, truth
    base, cand = _pairs(z, y, np.random.default_rng(seed + 1), 4, s_b, s_c, tau, 0.003)
    budget = GateBudget(ne_rel=0.0002, n_boot=200)
    unpaired = gate_replicates(base, cand, budget)
    assert unpaired.checks[0].verdict == "inconclusive", unpaired.table()
    assert "runs a side" in unpaired.table() and "evaluate on more examples" not in unpaired.table()
    paired = gate_replicates(base, cand, budget, paired=True)
    (check,) = paired.checks
    assert check.verdict == "regression" and check.name == "ne[ctr] paired replicates", paired.table()
    assert check.ci_lo < truth < check.ci_hi
    assert check.ci_hi - check.ci_lo < 0.5 * (unpaired.checks[0].ci_hi - unpaired.checks[0].ci_lo)
    assert "between-pair se" in paired.notes[0]


def test_paired_replicates_pass_no_difference():
    seed = 606
    z, y = _population(seed)
    base, cand = _pairs(z, y, np.random.default_rng(seed + 1), 3, 0.02, 0.02, 0.08, 0.002)
    res = gate_replicates(base, cand, GateBudget(ne_rel=0.0002, n_boot=200), paired=True)
    assert res.checks[0].verdict == "pass", res.table()
    assert res.checks[0].ci_lo < 0 < res.checks[0].ci_hi


def test_inconclusive_pairs_say_how_many_pairs_would_decide():
    seed = 707
    z, y = _population(seed)
    base, cand = _pairs(z, y, np.random.default_rng(seed + 1), 2, 0.05, 0.0935, 0.08, 0.03)
    res = gate_replicates(base, cand, GateBudget(ne_rel=0.0002, n_boot=200), paired=True)
    check, table = res.checks[0], res.table()
    assert check.verdict == "inconclusive" and check.n_needed and check.n_needed > 2, table
    assert f"need n={check.n_needed} pairs" in table and "train more baseline/candidate pairs" in table
    assert "evaluate on more examples" not in table
    # more pairs at the same spread: the projected interval excludes the budget, one fewer does not
    r = replicate_ne(y, [b.probs["ctr"] for b in base], [c.probs["ctr"] for c in cand], paired=True, n_boot=200,
                     seed=0)
    assert runs_needed(r, 0.0002, 0.95) == check.n_needed


def test_eval_set_limited_replicates_say_so():
    seed = 808
    z, y = _population(seed)
    z, y = z[:20_000], y[:20_000]
    base, cand = _pairs(z, y, np.random.default_rng(seed + 1), 3, 0.05, 0.06, 0.08, 0.0)
    res = gate_replicates(base, cand, GateBudget(ne_rel=0.0002, n_boot=200), paired=True)
    check = res.checks[0]
    assert check.verdict == "inconclusive" and check.n_needed is None, res.table()
    assert "the eval set limits it" in res.table()
    assert "evaluate on more examples" in res.table().splitlines()[-1] and "train more" not in res.table()


def test_paired_replicates_need_one_candidate_per_baseline():
    y = np.array([0.0, 1.0, 1.0, 0.0])
    p = np.array([0.2, 0.7, 0.6, 0.3])
    with pytest.raises(ReplicateError, match="one candidate run per baseline run"):
        replicate_ne(y, [p, p, p], [p, p], paired=True)


def test_weighted_replicates_equal_repeated_examples():
    rng = np.random.default_rng(np.random.randint(2**31))
    n = 3000
    z = rng.normal(-1.0, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float64)
    runs = [1 / (1 + np.exp(-(z + rng.normal(0, 0.2, n)))) for _ in range(4)]
    w = rng.integers(1, 4, n).astype(np.float64)
    rep = np.repeat(np.arange(n), w.astype(int))
    weighted = replicate_ne(y, runs[:2], runs[2:], paired=True, weights=w, n_boot=100)
    repeated = replicate_ne(y[rep], [r[rep] for r in runs[:2]], [r[rep] for r in runs[2:]], paired=True, n_boot=100)
    assert weighted["estimate"] == pytest.approx(repeated["estimate"], rel=1e-10, abs=1e-14)
    assert weighted["ne_a"] == pytest.approx(repeated["ne_a"], rel=1e-12)


def test_cli_paired_and_gate_takes_lists(tmp_path, capsys):
    import loka

    seed = 909
    z, y = _population(seed)
    base, cand = _pairs(z, y, np.random.default_rng(seed + 1), 3, 0.05, 0.0935, 0.15, 0.003)
    paths = _saved(tmp_path, base, cand)
    run = _cli

    assert run(["--paired", "--baseline", *paths["b"], "--candidate", *paths["c"]]) == 1
    assert "ne[ctr] paired replicates" in capsys.readouterr().out
    assert run(["--paired", "--baseline", *paths["b"], "--candidate", *paths["c"][:2]]) == 2
    assert "one candidate run per baseline run" in capsys.readouterr().err
    assert run(["--paired", "--baseline", paths["b"][0], "--candidate", paths["c"][0]]) == 2
    assert "--paired pairs several runs a side" in capsys.readouterr().err
    # the Python spelling: loka.gate(list, list) is replicate mode
    res = loka.gate(paths["b"], paths["c"], paired=True, n_boot=200)
    assert res.checks[0].name == "ne[ctr] paired replicates" and res.verdict == "regression"
    assert loka.gate(base, cand, n_boot=200).checks[0].name == "ne[ctr] replicates"
    with pytest.raises(ValueError, match="list of runs on both sides"):
        loka.gate(base, cand[0])
