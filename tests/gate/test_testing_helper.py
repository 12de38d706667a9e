"""loka.gate.testing.assert_no_regression: silent on pass, AssertionError with the table on regression."""

from __future__ import annotations

import pytest

from loka.gate import GateInputError
from loka.gate.testing import assert_no_regression

from .helpers import synthetic_pair


def test_passes_quietly_and_returns_the_result():
    a, b = synthetic_pair(n=4000, noise=0.002)
    result = assert_no_regression(a, b, n_boot=300)
    assert result.verdict == "pass"


def test_regression_raises_with_the_table():
    a, b = synthetic_pair(n=4000, noise=0.4)
    with pytest.raises(AssertionError, match=r"(?s)quality gate failed.*ne\[click\].*REGRESSION"):
        assert_no_regression(a, b, ne_rel=0.0002, n_boot=300)


def test_bad_input_is_not_an_assertion():
    a, _ = synthetic_pair(n=1000)
    _, other = synthetic_pair(n=1000)
    with pytest.raises(GateInputError, match="eval sets differ"):
        assert_no_regression(a, other)
