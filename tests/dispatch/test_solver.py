"""The multiple-choice knapsack behind the plan: exact (milp) vs greedy."""

from __future__ import annotations

import itertools
import random

import pytest

from loka.dispatch.solver import Option, solve, solve_exact, solve_greedy


def _brute_force(options, capacity):
    groups = sorted({o.group for o in options})
    by_group = {g: [None] + [o for o in options if o.group == g] for g in groups}
    best = 0.0
    for combo in itertools.product(*by_group.values()):
        picked = [o for o in combo if o is not None]
        if sum(o.weight for o in picked) <= capacity + 1e-12:
            best = max(best, sum(o.value for o in picked))
    return best


def test_exact_beats_greedy_on_a_constructed_case():
    # Greedy takes A (best value per weight) and then B no longer fits; the optimum is B alone.
    options = [Option("site_a|fprop", "k|r", value=6.0, weight=5.0), Option("site_b|fprop", "k|r", value=10.0, weight=10.0)]
    greedy, exact = solve_greedy(options, 10.0), solve_exact(options, 10.0)
    assert greedy.value == 6.0 and greedy.chosen == {"site_a|fprop": "k|r"}
    assert exact.value == 10.0 and exact.chosen == {"site_b|fprop": "k|r"}
    assert exact.solver == "milp"


def test_exact_matches_brute_force_on_random_instances():
    rng = random.Random()
    for _ in range(20):
        options = [Option(f"g{g}", f"o{j}", rng.uniform(0.1, 10), rng.uniform(0, 5))
                   for g in range(4) for j in range(rng.randint(1, 3))]
        capacity = rng.uniform(0, 10)
        sol = solve_exact(options, capacity)
        assert sol.weight <= capacity * (1 + 1e-6)
        assert len(sol.chosen) == len(set(sol.chosen))
        assert sol.value == pytest.approx(_brute_force(options, capacity), rel=1e-6)
        assert solve_greedy(options, capacity).value <= sol.value + 1e-9


def test_one_option_per_group_and_zero_weight_first():
    options = [Option("g", "a", 5.0, 0.0), Option("g", "b", 6.0, 1.0), Option("h", "c", 1.0, 0.0)]
    sol = solve(options, 0.5)
    assert sol.chosen == {"g": "a", "h": "c"}


def test_non_positive_values_never_chosen_and_bad_input_rejected():
    assert solve([Option("g", "a", -1.0, 0.0)], 1.0).chosen == {}
    with pytest.raises(ValueError, match="finite"):
        Option("g", "a", float("nan"), 0.0)
    with pytest.raises(ValueError, match="method"):
        solve([], 1.0, method="fast")
