"""Parameter rules (degree, threshold, headroom) and the seed-derived neighbour graph."""

from __future__ import annotations

import math
import os

import pytest

from wharf.algorithms.secagg import AbortReason, SecAggAborted, SecAggParams, choose_params
from wharf.algorithms.secagg.graph import check_neighbours, derive_graph, new_graph_seed
from wharf.algorithms.secagg.params import (
    headroom_bits,
    max_value_bits,
    min_threshold,
    recommended_degree,
)
from wharf.algorithms.secagg.prg import DeterministicRandom


@pytest.mark.parametrize(
    ("n", "k", "t_malicious", "t_semi_honest"),
    [
        (2, 1, 2, 1),
        (3, 2, 2, 2),
        (10, 9, 7, 5),
        (64, 63, 43, 32),
        (65, 16, 12, 9),  # 2*ceil(log2 65)+1 = 15, 65*15 odd -> 16
        (100, 15, 11, 8),
        (200, 17, 12, 9),
        (1000, 21, 15, 11),
        (4097, 28, 20, 15),  # 2*13+1 = 27, 4097*27 odd -> 28
    ],
)
def test_choose_params_follows_the_rules(n: int, k: int, t_malicious: int, t_semi_honest: int):
    p = choose_params(n)
    assert (p.degree, p.threshold, p.malicious) == (k, t_malicious, True)
    assert choose_params(n, malicious=False).threshold == t_semi_honest
    assert p.complete_graph == (n <= 64)
    assert (n * p.degree) % 2 == 0 and p.degree < n
    assert p.threshold == math.ceil(2 * (k + 1) / 3)
    assert choose_params(n, malicious=False).threshold == k // 2 + 1


def test_degree_is_made_feasible() -> None:
    for n in range(65, 3000, 37):
        k = recommended_degree(n)
        assert k < n and (n * k) % 2 == 0
        assert k in (2 * math.ceil(math.log2(n)) + 1, 2 * math.ceil(math.log2(n)) + 2)


def test_headroom() -> None:
    assert headroom_bits(1) == 1
    assert headroom_bits(2) == 2
    assert headroom_bits(1024) == 11
    assert headroom_bits(1025) == 12
    assert max_value_bits(1024) == 21
    assert choose_params(10).value_bits == 32 - (4 + 1)
    assert choose_params(10, max_nodes=1000).value_bits == 32 - (10 + 1)


def test_check_rules_lists_every_problem() -> None:
    good = choose_params(100)
    good.check_rules()
    bad = SecAggParams(
        num_nodes=100,
        degree=8,
        threshold=3,
        value_bits=31,
        clip=float("nan"),
        max_nodes=50,
        malicious=True,
    )
    problems = bad.problems()
    assert any("degree" in p for p in problems)
    assert any("threshold" in p for p in problems)
    assert any("max_nodes" in p for p in problems)
    assert any("clip" in p for p in problems)
    with pytest.raises(SecAggAborted) as err:
        bad.check_rules()
    assert err.value.reason is AbortReason.BAD_PARAMETERS


def test_node_policy_overrides_coordinator_claim() -> None:
    semi = choose_params(10, malicious=False)
    assert semi.problems(require_malicious=False) == []
    assert semi.problems(require_malicious=True)
    too_high = SecAggParams(10, 9, 11, 27, 8.0, 10)
    assert any("k+1" in p for p in too_high.problems())
    assert min_threshold(9) == 7


@pytest.mark.parametrize("n", [65, 200, 1001])
def test_random_regular_graph_is_simple_regular_and_reproducible(n: int) -> None:
    k = recommended_degree(n)
    seed = new_graph_seed()
    g = derive_graph(seed, n, k)
    for i in range(1, n + 1):
        nb = g.neighbours(i)
        assert len(nb) == k and i not in nb
        assert all(i in g.neighbours(j) for j in nb)
        assert g.closed_neighbourhood(i) == nb | {i}
    assert derive_graph(seed, n, k) == g
    assert derive_graph(os.urandom(32), n, k) != g


def test_complete_graph_up_to_64() -> None:
    g = derive_graph(new_graph_seed(), 64, 63)
    assert all(g.neighbours(i) == set(range(1, 65)) - {i} for i in range(1, 65))


def test_graph_check_refuses_other_neighbours() -> None:
    g = derive_graph(new_graph_seed(), 200, 17)
    assert check_neighbours(g, 5, sorted(g.neighbours(5))) == g.neighbours(5)
    assert check_neighbours(g, 5, None) == g.neighbours(5)
    stranger = next(j for j in range(1, 201) if j not in g.neighbours(5) and j != 5)
    wrong = [*sorted(g.neighbours(5))[:-1], stranger]
    with pytest.raises(SecAggAborted) as err:
        check_neighbours(g, 5, wrong)
    assert err.value.reason is AbortReason.BAD_GRAPH
    with pytest.raises(SecAggAborted):
        check_neighbours(g, 5, [*sorted(g.neighbours(5)), min(g.neighbours(5))])


def test_graph_rejects_infeasible_shapes() -> None:
    with pytest.raises(ValueError):
        derive_graph(new_graph_seed(), 65, 15)  # n*k odd
    with pytest.raises(ValueError):
        derive_graph(b"short", 100, 16)


def test_deterministic_random_is_uniform_and_fixed() -> None:
    seed = bytes(32)
    a = DeterministicRandom(seed, b"x")
    b = DeterministicRandom(seed, b"x")
    c = DeterministicRandom(seed, b"y")
    xs = [a.randbelow(10) for _ in range(20000)]
    assert xs == [b.randbelow(10) for _ in range(20000)]
    assert xs != [c.randbelow(10) for _ in range(20000)]
    counts = [xs.count(v) for v in range(10)]
    assert all(1700 < c < 2300 for c in counts)  # expected 2000, sd 42
    items = list(range(50))
    DeterministicRandom(seed, b"s").shuffle(items)
    assert sorted(items) == list(range(50)) and items != list(range(50))
