"""The neighbour graph: who masks with whom and who holds whose shares.

Why derived from a public seed: in SecAgg+ (Bell et al. CCS'20) each node
masks only with its ``k`` graph neighbours, which is what makes the protocol
scale, but a malicious coordinator that could *choose* the graph could
surround a victim with colluders. So the coordinator publishes a 32-byte seed
(``os.urandom``), the graph is a deterministic function of ``(seed, n, k)``,
and every node recomputes it and refuses any neighbour list that differs
(:func:`check_neighbours`). The seed is also bound into every signed message
through the round context, so all honest nodes provably use one graph.

Nodes are identified by their 1-based roster index (``1..n``), which is also
their Shamir x-coordinate.

Up to :data:`~.params.COMPLETE_GRAPH_MAX_NODES` nodes the graph is complete.
Beyond, it is a random ``k``-regular simple graph built by the pairing
procedure of Steger and Wormald (as in NetworkX's ``random_regular_graph``):
shuffle the ``n*k`` "stubs", pair neighbours in the shuffled order, keep the
pairs that are new simple edges, and reshuffle only the leftover stubs; if the
leftovers can no longer be paired, restart with the next attempt number. All
randomness comes from :class:`~.prg.DeterministicRandom`, so the result is
reproducible bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .errors import AbortReason, SecAggAborted
from .prg import DeterministicRandom

GRAPH_SEED_BYTES = 32
MAX_ATTEMPTS = 10_000


def new_graph_seed() -> bytes:
    """A fresh public seed for one round's graph (the coordinator calls this)."""
    return os.urandom(GRAPH_SEED_BYTES)


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected ``degree``-regular graph on roster indices ``1..num_nodes``."""

    num_nodes: int
    degree: int
    adjacency: tuple[frozenset[int], ...]
    """``adjacency[i - 1]`` is the neighbour set of node ``i`` (never contains ``i``)."""

    def neighbours(self, index: int) -> frozenset[int]:
        """Open neighbourhood of ``index``."""
        if not 1 <= index <= self.num_nodes:
            raise KeyError(index)
        return self.adjacency[index - 1]

    def closed_neighbourhood(self, index: int) -> frozenset[int]:
        """The node and its neighbours: the holders of its Shamir shares."""
        return self.neighbours(index) | {index}


def _suitable(edges: set[tuple[int, int]], leftover: Iterable[int]) -> bool:
    """True if some pair of distinct leftover nodes is not yet an edge."""
    nodes = sorted(leftover)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            if (a, b) not in edges:
                return True
    return not nodes


def _try_regular(seed: bytes, n: int, k: int, attempt: int) -> set[tuple[int, int]] | None:
    label = b"graph|%d|%d|%d" % (n, k, attempt)
    rng = DeterministicRandom(seed, label)
    edges: set[tuple[int, int]] = set()
    stubs = [v for v in range(1, n + 1) for _ in range(k)]
    while stubs:
        rng.shuffle(stubs)
        leftover: Counter[int] = Counter()
        it = iter(stubs)
        for a, b in zip(it, it, strict=True):
            if a > b:
                a, b = b, a
            if a != b and (a, b) not in edges:
                edges.add((a, b))
            else:
                leftover[a] += 1
                leftover[b] += 1
        if not _suitable(edges, leftover):
            return None
        stubs = [v for v in sorted(leftover) for _ in range(leftover[v])]
    return edges


@lru_cache(maxsize=8)
def derive_graph(seed: bytes, num_nodes: int, degree: int) -> NeighbourGraph:
    """The graph every party derives from the public ``seed`` (see module docstring).

    Cached (the result is immutable): parties sharing a process derive it once.
    """
    n, k = num_nodes, degree
    if n < 2 or not 1 <= k <= n - 1:
        raise ValueError(f"no {k}-regular graph on {n} nodes")
    if (n * k) % 2:
        raise ValueError(f"a {k}-regular graph on {n} nodes needs n*k even")
    if len(seed) != GRAPH_SEED_BYTES:
        raise ValueError(f"graph seeds are {GRAPH_SEED_BYTES} bytes")
    if k == n - 1:
        everyone = frozenset(range(1, n + 1))
        adjacency = tuple(everyone - {i} for i in range(1, n + 1))
        return NeighbourGraph(n, k, adjacency)
    for attempt in range(MAX_ATTEMPTS):
        edges = _try_regular(seed, n, k, attempt)
        if edges is not None:
            adj: list[set[int]] = [set() for _ in range(n)]
            for a, b in edges:
                adj[a - 1].add(b)
                adj[b - 1].add(a)
            return NeighbourGraph(n, k, tuple(frozenset(s) for s in adj))
    raise RuntimeError(f"could not build a {k}-regular graph on {n} nodes")  # pragma: no cover


def check_neighbours(
    graph: NeighbourGraph, index: int, claimed: Iterable[int] | None
) -> frozenset[int]:
    """Return ``index``'s neighbours; raise ``BAD_GRAPH`` if ``claimed`` lists others.

    ``claimed`` is the neighbour list a coordinator sent (``None`` when it sent
    none, in which case the derived list is simply used).
    """
    derived = graph.neighbours(index)
    if claimed is not None:
        claimed_list = list(claimed)
        if len(claimed_list) != len(set(claimed_list)) or frozenset(claimed_list) != derived:
            raise SecAggAborted(
                AbortReason.BAD_GRAPH,
                f"neighbours of node {index} sent by the coordinator differ from the graph "
                "derived from the public seed",
            )
    return derived
