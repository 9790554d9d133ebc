"""Contribution scores: exact and GTG Shapley values, coalition models, and real FedAvg cases."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from wharf.algorithms.contribution import (
    GTGResult,
    coalition_from_sum,
    coalition_model,
    exact_shapley,
    gtg_shapley,
    model_utility,
    per_round_shapley,
    round_utilities,
    scores_from_dict,
    scores_to_dict,
)
from wharf.algorithms.models import (
    arrays_to_model,
    init_model,
    model_to_arrays,
    set_standardization,
)
from wharf.algorithms.revenue import RevenueRule, split
from wharf.algorithms.strategies import FedAvg, weighted_average
from wharf.algorithms.training import (
    TrainSettings,
    evaluate,
    feature_moments,
    moments_to_standardization,
    torch_threads,
    train_local,
)
from wharf.datasets import load_breast_cancer, scale_to_published_ranges

Game = Callable[[frozenset[str]], float]


def _counting(game: Game) -> tuple[Game, list[frozenset[str]]]:
    calls: list[frozenset[str]] = []

    def value(coalition: frozenset[str]) -> float:
        calls.append(coalition)
        return game(coalition)

    return value, calls


def _table(players: list[str], game: Game) -> dict[frozenset[str], float]:
    return {
        frozenset(c): game(frozenset(c))
        for k in range(len(players) + 1)
        for c in itertools.combinations(players, k)
    }


# --------------------------------------------------------------------------- exact Shapley


def test_glove_game() -> None:
    # One left glove (a), two right gloves (b, c); a pair is worth 1.
    def glove(s: frozenset[str]) -> float:
        return float(min(len(s & {"a"}), len(s & {"b", "c"})))

    phi = exact_shapley(["a", "b", "c"], glove)
    assert phi == pytest.approx({"a": 2 / 3, "b": 1 / 6, "c": 1 / 6}, abs=1e-15)


def test_additive_game_gives_each_player_its_own_value() -> None:
    own = {"a": 1.5, "b": -2.0, "c": 4.25, "d": 0.0}
    # A constant v(∅) = 7 must not leak into anyone's value.
    phi = exact_shapley(list(own), lambda s: 7.0 + sum(own[p] for p in s))
    assert phi == pytest.approx(own, abs=1e-12)


def test_symmetric_players_equal_and_null_player_zero() -> None:
    # Majority of {a, b, c} wins; d never changes any coalition's value.
    def majority(s: frozenset[str]) -> float:
        return 1.0 if len(s & {"a", "b", "c"}) >= 2 else 0.0

    phi = exact_shapley(["d", "c", "b", "a"], majority)
    assert list(phi) == ["a", "b", "c", "d"]
    assert phi["a"] == phi["b"] == phi["c"] == pytest.approx(1 / 3, abs=1e-15)
    assert phi["d"] == 0.0


def test_quadratic_game_closed_form() -> None:
    # v(S) = (Σ_{i∈S} a_i)²: pairwise terms split evenly, so φ_i = a_i · Σ a.
    a = {"p1": 1.0, "p2": 2.0, "p3": 3.0, "p4": 4.0, "p5": 5.0}
    phi = exact_shapley(list(a), lambda s: sum(a[p] for p in s) ** 2)
    assert phi == pytest.approx({p: w * 15.0 for p, w in a.items()}, rel=1e-12)


def test_efficiency_and_one_evaluation_per_coalition() -> None:
    rng = random.Random(3)
    players = [f"n{i}" for i in range(7)]
    table = _table(players, lambda s: rng.uniform(-1.0, 1.0))
    value, calls = _counting(table.__getitem__)
    phi = exact_shapley(players, value)
    assert len(calls) == 2**7 == len(set(calls))
    full, empty = table[frozenset(players)], table[frozenset()]
    assert math.fsum(phi.values()) == pytest.approx(full - empty, abs=1e-12)
    # Input order does not matter, bit for bit.
    assert exact_shapley(players[::-1], table.__getitem__) == phi


def test_exact_shapley_refusals() -> None:
    value, calls = _counting(lambda s: 0.0)
    with pytest.raises(ValueError, match="17 players exceed"):
        exact_shapley([f"n{i}" for i in range(17)], value)
    assert calls == []  # refused before any evaluation
    with pytest.raises(ValueError, match="unique"):
        exact_shapley(["a", "a"], value)
    with pytest.raises(ValueError, match="non-empty strings"):
        exact_shapley(["a", ""], value)
    with pytest.raises(ValueError, match=r"coalition \{'b'\} is nan"):
        exact_shapley(["a", "b"], lambda s: math.nan if s == {"b"} else 1.0)
    assert exact_shapley([], value) == {}


# --------------------------------------------------------------------------- per-round


def test_per_round_shapley_sums_rounds_and_absent_players_get_zero() -> None:
    def glove(s: frozenset[str]) -> float:
        return float(min(len(s & {"a"}), len(s & {"b", "c"})))

    def additive(s: frozenset[str]) -> float:
        return sum({"a": 0.5, "b": 0.25}[p] for p in s)

    rounds = [_table(["a", "b", "c"], glove), _table(["a", "b"], additive)]
    total = per_round_shapley(rounds)
    assert total == pytest.approx({"a": 2 / 3 + 0.5, "b": 1 / 6 + 0.25, "c": 1 / 6})
    assert per_round_shapley([]) == {}


def test_per_round_shapley_names_missing_coalition() -> None:
    table = _table(["a", "b", "c"], lambda s: float(len(s)))
    del table[frozenset({"c", "a"})]
    complete = _table(["a", "b"], lambda s: 0.0)
    with pytest.raises(ValueError, match=r"round 1: no utility for coalition \{'a', 'c'\}"):
        per_round_shapley([complete, table])
    no_empty = _table(["a"], lambda s: 1.0)
    del no_empty[frozenset()]
    with pytest.raises(ValueError, match=r"round 0: no utility for coalition \{\}"):
        per_round_shapley([no_empty])


def test_per_round_shapley_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="frozensets"):
        per_round_shapley([{("a",): 1.0}])  # type: ignore[dict-item]
    table = _table(["a", "b"], lambda s: float(len(s)))
    table[frozenset({"b"})] = math.inf
    with pytest.raises(ValueError, match=r"round 0: utility of coalition \{'b'\} is inf"):
        per_round_shapley([table])


# --------------------------------------------------------------------------- GTG-Shapley

_WEIGHTS = {"p1": 1.0, "p2": 2.0, "p3": 3.0, "p4": 4.0, "p5": 5.0, "p6": 0.5}


def _quadratic(s: frozenset[str]) -> float:
    return sum(_WEIGHTS[p] for p in s) ** 2


def test_gtg_close_to_exact_on_known_game() -> None:
    exact = {p: w * sum(_WEIGHTS.values()) for p, w in _WEIGHTS.items()}
    full = _quadratic(frozenset(_WEIGHTS))
    result = gtg_shapley(list(_WEIGHTS), _quadratic, rng_seed=11, convergence_tol=0.01)
    assert isinstance(result, GTGResult)
    assert result.converged and not result.round_truncated
    assert result.permutations % 6 == 0  # stops at whole guided cycles
    # Each permutation's marginals add up to v(N) − v(∅), so efficiency holds exactly-ish.
    assert math.fsum(result.values.values()) == pytest.approx(full, rel=1e-12)
    for p in _WEIGHTS:
        assert abs(result.values[p] - exact[p]) <= 0.05 * full, (p, result.values[p], exact[p])
    # The ranking of clearly separated players is right.
    ranked = sorted(result.values, key=result.values.__getitem__)
    assert ranked == ["p6", "p1", "p2", "p3", "p4", "p5"]


def test_gtg_is_deterministic_for_a_seed() -> None:
    a = gtg_shapley(list(_WEIGHTS), _quadratic, rng_seed=5)
    b = gtg_shapley(list(_WEIGHTS)[::-1], _quadratic, rng_seed=5)
    c = gtg_shapley(list(_WEIGHTS), _quadratic, rng_seed=6)
    assert a == b
    assert a.values != c.values  # the seed really drives the sampling


def test_gtg_within_round_truncation_saves_evaluations() -> None:
    players = [f"n{i}" for i in range(8)]

    def saturating(s: frozenset[str]) -> float:
        # Any two players already reach the full value; later joiners add nothing.
        return min(len(s), 2) / 2

    truncated, calls = _counting(saturating)
    result = gtg_shapley(players, truncated, rng_seed=0)
    # Only ∅, N, singletons and pairs are ever needed: 2 + 8 + 28 = 38 of 256.
    assert result.evaluations == len(set(calls)) == len(calls)
    assert result.evaluations <= 38 < 2**8
    assert all(len(c) <= 2 or len(c) == 8 for c in calls)
    assert math.fsum(result.values.values()) == pytest.approx(1.0)
    full = gtg_shapley(players, saturating, rng_seed=0, within_round_truncation=0.0)
    assert full.evaluations > 2 * result.evaluations


def test_gtg_between_round_truncation() -> None:
    value, calls = _counting(lambda s: 0.9 + 0.001 * len(s))
    result = gtg_shapley(["a", "b", "c"], value, rng_seed=0, between_round_truncation=0.01)
    assert result == GTGResult(
        {"a": 0.0, "b": 0.0, "c": 0.0}, 2, 0, converged=True, round_truncated=True
    )
    assert sorted(map(len, calls)) == [0, 3]


def test_gtg_permutation_cap_and_validation() -> None:
    capped = gtg_shapley(
        list(_WEIGHTS), _quadratic, rng_seed=0, max_permutations=7, convergence_tol=1e-9
    )
    assert capped.permutations == 7 and not capped.converged
    for kwargs, match in [
        ({"rng_seed": True}, "rng_seed"),
        ({"rng_seed": 0, "max_permutations": -1}, "max_permutations"),
        ({"rng_seed": 0, "within_round_truncation": -0.1}, "within_round_truncation"),
        ({"rng_seed": 0, "between_round_truncation": math.nan}, "between_round_truncation"),
        ({"rng_seed": 0, "convergence_tol": 0.0}, "convergence_tol"),
    ]:
        with pytest.raises(ValueError, match=match):
            gtg_shapley(["a"], lambda s: 1.0, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- coalition models


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


_GLOBAL = {"fc.weight": _f32(1.0, 1.0), "standardize.mean": _f32(0.5)}
_DELTAS = {
    "a": {"fc.weight": _f32(1.0, -1.0), "standardize.mean": _f32(9.0)},
    "b": {"fc.weight": _f32(3.0, 0.0), "standardize.mean": _f32(0.0)},
    "c": {"fc.weight": _f32(-4.0, 2.0), "standardize.mean": _f32(0.0)},
}


def test_coalition_model_uniform_and_weighted_mean() -> None:
    ab = coalition_model(_GLOBAL, _DELTAS, frozenset({"a", "b"}))
    np.testing.assert_array_equal(ab["fc.weight"], _f32(3.0, 0.5))
    # Standardize buffers are frozen exactly as in the FedAvg strategy.
    np.testing.assert_array_equal(ab["standardize.mean"], _f32(0.5))
    weighted = coalition_model(_GLOBAL, _DELTAS, frozenset({"a", "b"}), {"a": 3.0, "b": 1.0})
    np.testing.assert_array_equal(weighted["fc.weight"], _f32(1.0 + 1.5, 1.0 - 0.75))
    empty = coalition_model(_GLOBAL, _DELTAS, frozenset())
    assert all(np.array_equal(empty[k], _GLOBAL[k]) for k in _GLOBAL)
    assert all(v.dtype == np.float32 for v in ab.values())


def test_full_coalition_is_the_fedavg_round() -> None:
    counts = {"a": 10, "b": 30, "c": 60}
    ours = coalition_model(_GLOBAL, _DELTAS, frozenset(_DELTAS), counts)
    avg = weighted_average([(_DELTAS[n], counts[n]) for n in sorted(_DELTAS)])
    theirs, _ = FedAvg().apply(_GLOBAL, avg, {}, 0)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_coalition_from_sum_matches_clear_text() -> None:
    members = frozenset({"a", "c"})
    plain_sum = {k: _DELTAS["a"][k] + _DELTAS["c"][k] for k in _GLOBAL}
    secure = coalition_from_sum(_GLOBAL, plain_sum, 2)
    clear = coalition_model(_GLOBAL, _DELTAS, members)
    assert all(np.array_equal(secure[k], clear[k]) for k in clear)
    weighted_sum = {k: 2 * _DELTAS["a"][k] + 6 * _DELTAS["c"][k] for k in _GLOBAL}
    secure_w = coalition_from_sum(_GLOBAL, weighted_sum, 8)
    clear_w = coalition_model(_GLOBAL, _DELTAS, members, {"a": 2, "c": 6})
    assert all(np.allclose(secure_w[k], clear_w[k]) for k in clear_w)
    with pytest.raises(ValueError, match="count"):
        coalition_from_sum(_GLOBAL, plain_sum, 0)
    with pytest.raises(ValueError, match="missing"):
        coalition_from_sum(_GLOBAL, {"fc.weight": _f32(0, 0)}, 1)


@pytest.mark.parametrize(
    ("members", "weights", "deltas", "match"),
    [
        ({"a", "zed"}, None, _DELTAS, r"\['zed'\] have no update"),
        ({"a", "b"}, {"a": 1.0}, _DELTAS, r"no weight for coalition members \['b'\]"),
        ({"a", "b"}, {"a": 1.0, "b": 0.0}, _DELTAS, "must be positive"),
        ({"a"}, {"a": math.nan}, _DELTAS, "weight of 'a' is nan"),
        ({"a"}, None, {"a": {"fc.weight": _f32(1.0)}}, "missing"),
        (
            {"a"},
            None,
            {"a": {"fc.weight": _f32(1.0, 2.0, 3.0), "standardize.mean": _f32(0)}},
            "shape",
        ),
        (
            {"a"},
            None,
            {"a": {"fc.weight": _f32(1.0, math.nan), "standardize.mean": _f32(0)}},
            "NaN",
        ),
    ],
)
def test_coalition_model_rejects(
    members: set[str],
    weights: dict[str, float] | None,
    deltas: Mapping[str, Mapping[str, np.ndarray]],
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        coalition_model(_GLOBAL, deltas, frozenset(members), weights)


def test_scores_validation() -> None:
    assert scores_to_dict({"b": 1, "a": np.float64(-0.5)}) == {"a": -0.5, "b": 1.0}
    assert list(scores_to_dict({"b": 1, "a": 2})) == ["a", "b"]
    assert scores_from_dict({"x": 0, "y": 2.5}) == {"x": 0.0, "y": 2.5}
    cases: list[tuple[Any, str]] = [
        ({"a": math.nan}, "nan"),
        ({"a": -math.inf}, "-inf"),
        ({"a": True}, "real number"),
        ({"a": "1.0"}, "real number"),
        ({"": 1.0}, "non-empty"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            scores_to_dict(bad)
        with pytest.raises(ValueError, match=match):
            scores_from_dict(bad)
    with pytest.raises(ValueError, match="mapping"):
        scores_from_dict([("a", 1.0)])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real FedAvg


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    frame = scale_to_published_ranges(load_breast_cancer())
    return (
        frame.drop(columns="diagnosis").to_numpy(np.float32),
        frame["diagnosis"].to_numpy(np.int64),
    )


def _build() -> torch.nn.Module:
    return init_model("mlp", (30,), 2, {"hidden": [16]}, seed=0)


def test_model_utility_matches_evaluate(cancer: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = cancer
    model = _build()
    set_standardization(model, *moments_to_standardization(*feature_moments(x)))
    with torch_threads(1):
        train_local(model, x[:200], y[:200], TrainSettings("adam", 0.01, 2, 32, seed=0))
    weights = model_to_arrays(model)
    report = evaluate(model, x[200:], y[200:])
    assert model_utility(weights, _build, x[200:], y[200:], "accuracy") == report.accuracy
    assert model_utility(weights, _build, x[200:], y[200:], "neg_loss") == -report.mean_loss
    with pytest.raises(ValueError, match="empty validation set"):
        model_utility(weights, _build, x[:0], y[:0])
    with pytest.raises(ValueError, match="metric"):
        model_utility(weights, _build, x, y, "f1")  # type: ignore[arg-type]


def _simulate_fedavg(
    parts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    x_val: np.ndarray,
    y_val: np.ndarray,
    rounds: int = 4,
) -> list[dict[frozenset[str], float]]:
    """FedAvg in process; returns each round's coalition utility table (minus the loss)."""
    model = _build()
    all_x = np.concatenate([x for x, _ in parts.values()])
    set_standardization(model, *moments_to_standardization(*feature_moments(all_x)))
    global_weights = model_to_arrays(model)
    counts = {name: float(len(y)) for name, (_, y) in parts.items()}

    def utility(weights: Mapping[str, np.ndarray]) -> float:
        return model_utility(weights, _build, x_val, y_val, "neg_loss")

    tables = []
    with torch_threads(1):
        for r in range(rounds):
            deltas = {}
            for name, (x, y) in parts.items():
                local = arrays_to_model(_build(), global_weights)
                # Every node trains with the job's seed for the round, as Wharf nodes do.
                train_local(local, x, y, TrainSettings("adam", 0.01, 1, 16, seed=r))
                trained = model_to_arrays(local)
                deltas[name] = {k: trained[k] - global_weights[k] for k in global_weights}
            tables.append(round_utilities(global_weights, deltas, utility, counts))
            global_weights = coalition_model(global_weights, deltas, frozenset(parts), counts)
    return tables


def _split(
    cancer: tuple[np.ndarray, np.ndarray], per_node: int = 60
) -> tuple[np.random.Generator, list[np.ndarray], np.ndarray, np.ndarray]:
    x, y = cancer
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    val, rest = order[:169], order[169:]
    chunks = [rest[i * per_node : (i + 1) * per_node] for i in range(4)]
    return rng, chunks, x[val], y[val]


@pytest.mark.parametrize("noise", ["shuffled_labels", "random_features"])
def test_noise_node_scores_visibly_lower(cancer: tuple[np.ndarray, np.ndarray], noise: str) -> None:
    x, y = cancer
    rng, chunks, x_val, y_val = _split(cancer)
    parts = {name: (x[idx], y[idx]) for name, idx in zip(("a", "b", "c"), chunks, strict=False)}
    junk = chunks[3]
    if noise == "shuffled_labels":
        parts["noise"] = (x[junk], rng.permutation(y[junk]))
    else:
        parts["noise"] = (rng.uniform(0.0, 1.0, x[junk].shape).astype(np.float32), y[junk])
    tables = _simulate_fedavg(parts, x_val, y_val)
    phi = per_round_shapley(tables)
    honest = [phi[n] for n in ("a", "b", "c")]
    # Measured over ten data splits: honest nodes 0.15–0.29, noise −0.45 to −0.16 (neg loss).
    assert min(honest) > 0.05
    assert phi["noise"] < -0.05
    assert min(honest) - phi["noise"] > 0.2
    total_gain = math.fsum(t[frozenset(parts)] for t in tables)
    assert math.fsum(phi.values()) == pytest.approx(total_gain, abs=1e-9)

    # GTG-Shapley on the same utilities reaches the same verdict.
    gtg: dict[str, float] = dict.fromkeys(parts, 0.0)
    for r, table in enumerate(tables):
        est = gtg_shapley(list(parts), table.__getitem__, rng_seed=r)
        for name, value in est.values.items():
            gtg[name] += value
    assert max(gtg, key=gtg.__getitem__) != "noise"
    assert gtg["noise"] < 0 < min(gtg[n] for n in ("a", "b", "c"))
    for name in parts:
        assert abs(gtg[name] - phi[name]) < 0.1

    # And the revenue split pays the noise node its floor and nothing more.
    rule = RevenueRule(100_000, "EUR", 0.05, 0.0)
    amounts = split(rule, phi, dict.fromkeys(parts, 60))
    assert amounts["noise"] == 5_000
    assert all(amounts[n] > 20_000 for n in ("a", "b", "c"))


def test_duplicated_data_does_not_double_value(cancer: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = cancer
    _, chunks, x_val, y_val = _split(cancer)
    a, c = (x[chunks[0]], y[chunks[0]]), (x[chunks[1]], y[chunks[1]])
    alone = per_round_shapley(_simulate_fedavg({"a": a, "c": c}, x_val, y_val))
    copy = (a[0].copy(), a[1].copy())
    dup = per_round_shapley(_simulate_fedavg({"a": a, "a_copy": copy, "c": c}, x_val, y_val))
    # Identical data and seed give identical updates: the copies are symmetric players.
    assert dup["a"] == pytest.approx(dup["a_copy"], abs=1e-12)
    pair = dup["a"] + dup["a_copy"]
    # Over ten splits pair/alone was 1.22–1.34: registering the data twice earns more than
    # once (Shapley values are not replication-proof) but nowhere near double, and each
    # copy is worth clearly less than the original was on its own.
    assert 1.05 * alone["a"] < pair < 1.6 * alone["a"]
    assert dup["a"] < 0.8 * alone["a"]
    assert dup["c"] > 0.5 * alone["c"]
