"""Revenue split: exact integer payouts a buyer can recompute from the bundle alone."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from wharf.algorithms.revenue import RULE_VERSION, RevenueRule, shares, split


def _rule(total: int = 1000, floor: float = 0.0, usage_weight: float = 0.0) -> RevenueRule:
    return RevenueRule(total, "EUR", floor, usage_weight)


def test_hand_computed_example() -> None:
    # floor 1/8 and usage weight 1/4 are exact binary fractions, so by hand:
    # c = (3/4, 1/4, 0) (c's negative score counts as 0), u = (1/10, 3/10, 6/10),
    # blend = 3/4·c + 1/4·u = (47/80, 21/80, 12/80), w = 1/8 + 5/8·blend
    # = (63/128, 37/128, 28/128); ×1000 = 492.1875, 289.0625, 218.75 → floors sum to 999
    # and the one unit left goes to the largest remainder (c, .75).
    rule = _rule(1000, 0.125, 0.25)
    scores = {"a": 3.0, "b": 1.0, "c": -2.0}
    usage = {"a": 10, "b": 30, "c": 60}
    assert shares(rule, scores, usage) == {
        "a": Fraction(63, 128),
        "b": Fraction(37, 128),
        "c": Fraction(7, 32),
    }
    assert split(rule, scores, usage) == {"a": 492, "b": 289, "c": 219}


def _random_case(rng: random.Random) -> tuple[RevenueRule, dict[str, float], dict[str, int]]:
    n = rng.randint(1, 12)
    names = rng.sample([f"node-{i:02d}" for i in range(40)], n)
    scores = {name: rng.choice([0.0, rng.uniform(-1, 1), rng.uniform(0, 1e-6)]) for name in names}
    usage = {name: rng.choice([0, rng.randint(0, 10**6)]) for name in names}
    floor = rng.choice([0.0, rng.uniform(0, 1 / n), 1 / n])
    rule = RevenueRule(rng.randint(0, 10**9), "USD", floor, rng.choice([0.0, 1.0, rng.random()]))
    return rule, scores, usage


def test_amounts_sum_exactly_and_respect_the_floor() -> None:
    rng = random.Random(20240607)
    for _ in range(300):
        rule, scores, usage = _random_case(rng)
        amounts = split(rule, scores, usage)
        assert sum(amounts.values()) == rule.total_minor_units
        assert list(amounts) == sorted(scores)
        assert all(isinstance(v, int) for v in amounts.values())
        n = len(scores)
        floor = min(Fraction(rule.floor_fraction), Fraction(1, n))
        assert min(amounts.values()) >= math.floor(floor * rule.total_minor_units)
        weights = shares(rule, scores, usage)
        assert sum(weights.values()) == 1
        # Largest remainder never moves anyone by a whole unit from the exact amount.
        for name, amount in amounts.items():
            assert abs(amount - weights[name] * rule.total_minor_units) < 1


def test_floor_guarantee_for_a_useless_node() -> None:
    rule = _rule(10_000, 0.1)
    amounts = split(rule, {"good": 5.0, "bad": -3.0}, {"good": 1, "bad": 1})
    assert amounts == {"bad": 1000, "good": 9000}


def test_all_zero_scores_split_equally() -> None:
    assert split(_rule(90), dict.fromkeys("abc", 0.0), dict.fromkeys("abc", 7)) == {
        "a": 30,
        "b": 30,
        "c": 30,
    }
    # All negative is "nobody helped": equal too, rather than a division by zero.
    assert split(_rule(90), {"a": -1.0, "b": -2.0, "c": -0.5}, dict.fromkeys("abc", 0)) == {
        "a": 30,
        "b": 30,
        "c": 30,
    }


def test_negative_scores_count_as_zero() -> None:
    usage = dict.fromkeys("abc", 1)
    assert split(_rule(100), {"a": 1.0, "b": -5.0, "c": 3.0}, usage) == {"a": 25, "b": 0, "c": 75}
    # A very negative score takes nothing away from the others.
    assert split(_rule(100), {"a": 1.0, "b": -1e9, "c": 3.0}, usage) == {"a": 25, "b": 0, "c": 75}


def test_usage_weight_one_splits_by_usage_only() -> None:
    scores = {"a": 100.0, "b": 0.0}
    assert split(_rule(100, usage_weight=1.0), scores, {"a": 1, "b": 3}) == {"a": 25, "b": 75}
    assert split(_rule(100, usage_weight=0.0), scores, {"a": 1, "b": 3}) == {"a": 100, "b": 0}
    # Blend (5/8, 3/8): 62.5 and 37.5 tie on the remainder and "a" comes first by name.
    assert split(_rule(100, usage_weight=0.5), scores, {"a": 1, "b": 3}) == {"a": 63, "b": 37}
    # No usage recorded at all: the usage part is equal.
    assert split(_rule(100, usage_weight=1.0), scores, {"a": 0, "b": 0}) == {"a": 50, "b": 50}


def test_deterministic_across_dict_orderings() -> None:
    scores = {"x": 0.1, "y": 0.2, "z": 0.3, "w": 0.7}
    usage = {"x": 5, "y": 3, "z": 0, "w": 11}
    rule = _rule(1001, 0.05, 0.3)
    expected = split(rule, scores, usage)
    for order in itertools.permutations(scores):
        reordered_scores = {k: scores[k] for k in order}
        reordered_usage = {k: usage[k] for k in reversed(order)}
        result = split(rule, reordered_scores, reordered_usage)
        assert result == expected and list(result) == sorted(scores)


def test_ties_broken_by_name() -> None:
    equal = dict.fromkeys(["zeta", "alpha", "mid"], 1.0)
    usage = dict.fromkeys(equal, 1)
    assert split(_rule(100), equal, usage) == {"alpha": 34, "mid": 33, "zeta": 33}
    assert split(_rule(101), equal, usage) == {"alpha": 34, "mid": 34, "zeta": 33}
    # A larger remainder beats an earlier name: 100 × (1/8, 7/8) = 12.5, 87.5 ties on
    # .5 and "a" wins; with 3/16 vs 13/16 (18.75, 81.25) "b" wins on remainder .75.
    assert split(_rule(100), {"a": 1.0, "b": 7.0}, {"a": 0, "b": 0}) == {"a": 13, "b": 87}
    assert split(_rule(100), {"a": 13.0, "b": 3.0}, {"a": 0, "b": 0}) == {"a": 81, "b": 19}


def test_floor_capped_at_exactly_one_over_n() -> None:
    # The float 0.1 is slightly above 1/10; ten nodes still get an exactly equal split.
    names = [f"n{i}" for i in range(10)]
    scores = {name: float(i) for i, name in enumerate(names)}
    rule = _rule(1_000_000, 0.1)
    assert set(split(rule, scores, dict.fromkeys(names, 1)).values()) == {100_000}
    with pytest.raises(ValueError, match=r"floor·n"):
        split(rule, {**scores, "n10": 1.0}, dict.fromkeys([*names, "n10"], 1))


def test_zero_and_huge_totals() -> None:
    assert split(_rule(0, 0.2), {"a": 1.0, "b": 2.0}, {"a": 1, "b": 1}) == {"a": 0, "b": 0}
    total = 10**30 + 7  # far beyond float precision; still exact
    amounts = split(RevenueRule(total, "JPY", 0.0, 0.0), {"a": 1.0, "b": 2.0}, {"a": 0, "b": 0})
    # total = 3q + 2: exact amounts q + 2/3 and 2q + 1 + 1/3; the left unit goes to "a".
    assert amounts == {
        "a": 333_333_333_333_333_333_333_333_333_336,
        "b": 666_666_666_666_666_666_666_666_666_671,
    }
    assert sum(amounts.values()) == total


def test_buyer_recomputes_from_json_bundle() -> None:
    rule = RevenueRule(123_457, "GBP", 0.07, 0.35)
    scores = {"h1": 0.1 + 0.2, "h2": 1 / 3, "h3": 2.718281828459045e-3, "h4": -0.25}
    usage = {"h1": 17, "h2": 4, "h3": 99, "h4": 0}
    bundle = json.dumps({"rule": rule.to_dict(), "scores": scores, "usage": usage})
    loaded = json.loads(bundle)
    again = split(RevenueRule.from_dict(loaded["rule"]), loaded["scores"], loaded["usage"])
    assert again == split(rule, scores, usage)
    assert RevenueRule.from_dict(loaded["rule"]) == rule


def test_rule_to_dict_round_trip_and_strictness() -> None:
    rule = RevenueRule(500, "CHF", 0.1, 0.5)
    data = rule.to_dict()
    assert data == {
        "version": RULE_VERSION,
        "total_minor_units": 500,
        "currency": "CHF",
        "floor_fraction": 0.1,
        "usage_weight": 0.5,
    }
    assert RevenueRule.from_dict(data) == rule
    assert RevenueRule.from_dict({**data, "usage_weight": 1, "floor_fraction": 0}) == RevenueRule(
        500, "CHF", 0.0, 1.0
    )
    bad: list[tuple[dict[str, Any], str]] = [
        ({**data, "extra": 1}, r"unexpected \['extra'\]"),
        ({k: v for k, v in data.items() if k != "currency"}, r"missing \['currency'\]"),
        ({**data, "version": 2}, "version 2"),
        ({**data, "version": True}, "version True"),
        ({**data, "total_minor_units": 500.0}, "total_minor_units"),
        ({**data, "total_minor_units": True}, "total_minor_units"),
        ({**data, "floor_fraction": "0.1"}, "floor_fraction"),
        ({**data, "usage_weight": None}, "usage_weight"),
    ]
    for payload, match in bad:
        with pytest.raises(ValueError, match=match):
            RevenueRule.from_dict(payload)
    with pytest.raises(ValueError, match="mapping"):
        RevenueRule.from_dict([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_minor_units": -1}, "total_minor_units"),
        ({"total_minor_units": 10.0}, "total_minor_units"),
        ({"currency": "eur"}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"currency": "E1R"}, "currency"),
        ({"currency": "ÄBC"}, "currency"),
        ({"floor_fraction": -0.01}, "floor_fraction"),
        ({"floor_fraction": 1.5}, "floor_fraction"),
        ({"floor_fraction": math.nan}, "floor_fraction"),
        ({"usage_weight": 1.01}, "usage_weight"),
        ({"usage_weight": math.inf}, "usage_weight"),
        ({"usage_weight": False}, "usage_weight"),
    ],
)
def test_bad_rules(kwargs: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = {
        "total_minor_units": 100,
        "currency": "EUR",
        "floor_fraction": 0.1,
        "usage_weight": 0.5,
    }
    with pytest.raises(ValueError, match=match):
        RevenueRule(**{**fields, **kwargs})


def test_numpy_scalars_are_normalised() -> None:
    fields: dict[str, Any] = {
        "total_minor_units": np.int64(100),
        "currency": "EUR",
        "floor_fraction": np.float64(0.25),
        "usage_weight": np.float32(0.5),
    }
    rule = RevenueRule(**fields)
    assert type(rule.total_minor_units) is int and type(rule.floor_fraction) is float
    assert rule == RevenueRule(100, "EUR", 0.25, 0.5)
    usage: dict[str, Any] = {"a": np.int64(3)}
    assert split(rule, {"a": np.float64(1.0)}, usage) == {"a": 100}


@pytest.mark.parametrize(
    ("scores", "usage", "match"),
    [
        ({"a": 0.4, "b": 0.1}, {"a": 1, "c": 1}, r"only in scores \['b'\], only in usage \['c'\]"),
        ({}, {}, "zero nodes"),
        ({"a": math.nan}, {"a": 1}, "score of 'a' must be a finite number"),
        ({"a": math.inf}, {"a": 1}, "score of 'a'"),
        ({"a": True}, {"a": 1}, "score of 'a'"),
        ({"a": 1.0}, {"a": -1}, "usage of 'a'"),
        ({"a": 1.0}, {"a": 2.5}, "usage of 'a'"),
        ({"a": 1.0}, {"a": False}, "usage of 'a'"),
        ({"": 1.0}, {"": 1}, "non-empty"),
    ],
)
def test_bad_inputs(scores: dict[str, Any], usage: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split(_rule(), scores, usage)


def test_floor_times_n_above_one_is_refused() -> None:
    with pytest.raises(ValueError, match="guarantees more than the whole price"):
        split(_rule(100, 0.4), dict.fromkeys("abc", 1.0), dict.fromkeys("abc", 1))
