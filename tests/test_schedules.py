import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blendq import constant, cubic, exponential, linear


def test_cubic_matches_eq6():
    s = cubic(10, 30)
    assert s(0) == 0.0 and s(10) == 0.0
    assert s(20) == pytest.approx(1 - 0.5**3)
    assert s(30) == 1.0 and s(1000) == 1.0


def test_update_frequency_holds_alpha():
    s = cubic(0, 100, every=10)
    assert s(11) == s(19) == s(10)
    assert s(20) > s(19)


def test_exponential_and_linear_and_constant():
    assert exponential(0.1)(10) == pytest.approx(1 - math.exp(-1))
    assert linear(0, 4)(1) == pytest.approx(0.25)
    assert constant(0.5)(123) == 0.5
    assert cubic(5, 5)(5) == 0.0 and cubic(5, 5)(6) == 1.0  # a jump


@given(
    t0=st.integers(0, 50),
    width=st.integers(0, 50),
    every=st.integers(1, 7),
    kind=st.sampled_from(["cubic", "linear", "exp"]),
)
def test_monotone_in_unit_interval(t0, width, every, kind):
    s = (
        exponential(0.05, t0, every)
        if kind == "exp"
        else (cubic if kind == "cubic" else linear)(t0, t0 + width, every)
    )
    values = [s(k) for k in range(0, 150)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cubic(10, 5), "t0 <= t1"),
        (lambda: cubic(0, 10, every=0), "every"),
        (lambda: exponential(-1.0), "rate"),
        (lambda: constant(2.0), "value"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()
