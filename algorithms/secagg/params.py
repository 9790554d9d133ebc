"""Protocol constants and the rules that fix a round's parameters.

Why the rules live here and are *checkable*: against a malicious coordinator a
node cannot take the degree ``k`` or threshold ``t`` on trust. A coordinator
that lowers ``t`` or shrinks the neighbourhood can collect enough shares to
unmask one node. So every node recomputes :func:`choose_params` from the public
roster size and refuses a round whose parameters differ
(:meth:`SecAggParams.check_rules`).

Rules (DESIGN.md §5; Bonawitz et al. CCS'17, Bell et al. CCS'20):

* complete graph up to 64 nodes (``k = n - 1``); beyond that a random
  ``k``-regular graph with ``k = 2*ceil(log2 n) + 1``, raised by one if
  ``n*k`` is odd (a ``k``-regular graph on ``n`` vertices needs ``n*k`` even);
* a node's secrets are shared among its closed neighbourhood (its ``k``
  neighbours and itself, ``k + 1`` holders);
* threshold ``t = ceil(2(k+1)/3)`` against a malicious coordinator (default),
  ``t = floor(k/2) + 1`` when the coordinator is only semi-honest;
* ring ``Z_2^32`` with ``ceil(log2 N_max) + 1`` bits of headroom, so the sum of
  ``N_max`` inputs at the clip bound never wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AbortReason, SecAggAborted

PROTOCOL_VERSION = 1
"""Bumped on any change to messages, key derivation or signed transcripts."""

RING_BITS = 32
"""Masked values live in Z_2^32 (``numpy.uint32``): wrap-around is free."""

COMPLETE_GRAPH_MAX_NODES = 64
"""Up to this many nodes every node is every other node's neighbour."""

MIN_NODES = 2
"""Secure aggregation of one input is no aggregation."""

MAX_NODES = 100_000
"""Upper bound a node accepts: every node re-derives the whole graph (O(n k))."""


def headroom_bits(max_nodes: int) -> int:
    """Bits kept free so that ``max_nodes`` inputs never overflow: ``ceil(log2 N) + 1``."""
    if max_nodes < 1:
        raise ValueError("max_nodes must be at least 1")
    return math.ceil(math.log2(max_nodes)) + 1


def max_value_bits(max_nodes: int) -> int:
    """Largest per-value bit width (sign included) that leaves the headroom free."""
    bits = RING_BITS - headroom_bits(max_nodes)
    if bits < 2:
        raise ValueError(f"max_nodes={max_nodes} leaves no bits for values in Z_2^32")
    return bits


def recommended_degree(num_nodes: int) -> int:
    """Neighbour degree ``k`` for ``num_nodes`` participants (see module docstring)."""
    if num_nodes < MIN_NODES:
        raise ValueError(f"secure aggregation needs at least {MIN_NODES} nodes")
    if num_nodes <= COMPLETE_GRAPH_MAX_NODES:
        return num_nodes - 1
    k = 2 * math.ceil(math.log2(num_nodes)) + 1
    if (num_nodes * k) % 2:
        k += 1  # n*k must be even; rounding up keeps the security bound
    return min(k, num_nodes - 1)


def min_threshold(degree: int, malicious: bool = True) -> int:
    """Smallest admissible Shamir threshold for neighbourhoods of ``degree + 1`` holders."""
    if degree < 1:
        raise ValueError("degree must be at least 1")
    if malicious:
        return -(-2 * (degree + 1) // 3)  # ceil(2(k+1)/3) in exact integer arithmetic
    return degree // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Everything the nodes of one round must agree on before any key is exchanged.

    ``value_bits`` is the width of one quantised value including its sign;
    ``clip`` the symmetric clip range of the real-valued model update;
    ``max_nodes`` the ``N_max`` that sizes the headroom (may exceed
    ``num_nodes``, e.g. when the job's layout is fixed before the roster is).
    """

    num_nodes: int
    degree: int
    threshold: int
    value_bits: int
    clip: float
    max_nodes: int
    malicious: bool = True

    @property
    def complete_graph(self) -> bool:
        return self.degree == self.num_nodes - 1

    @property
    def holders(self) -> int:
        """Share holders per secret: the ``k`` neighbours and the owner."""
        return self.degree + 1

    def problems(self, *, require_malicious: bool = True) -> list[str]:
        """Every way these parameters break the rules (empty list: they are fine).

        ``require_malicious`` is the *checking node's* policy, not the
        coordinator's claim: a node that assumes a malicious coordinator
        refuses a semi-honest threshold even if the coordinator says so.
        """
        out: list[str] = []
        n, k, t = self.num_nodes, self.degree, self.threshold
        if not MIN_NODES <= n <= MAX_NODES:
            return [f"num_nodes={n} outside [{MIN_NODES}, {MAX_NODES}]"]
        if k != recommended_degree(n):
            out.append(f"degree {k} != required {recommended_degree(n)} for {n} nodes")
        malicious = self.malicious or require_malicious
        if require_malicious and not self.malicious:
            out.append("semi-honest threshold offered but this node requires the malicious rule")
        if k < 1:
            out.append(f"degree {k} < 1")
        else:
            floor_t = min_threshold(k, malicious)
            if t < floor_t:
                rule = "ceil(2(k+1)/3)" if malicious else "floor(k/2)+1"
                out.append(f"threshold {t} < {rule} = {floor_t} for k={k}")
        if t > k + 1:
            out.append(f"threshold {t} > k+1 = {k + 1} share holders")
        if self.max_nodes < n:
            out.append(f"max_nodes {self.max_nodes} < num_nodes {n}")
        else:
            try:
                limit = max_value_bits(self.max_nodes)
            except ValueError as exc:
                out.append(str(exc))
            else:
                if not 2 <= self.value_bits <= limit:
                    out.append(
                        f"value_bits {self.value_bits} outside [2, {limit}] "
                        f"(headroom for {self.max_nodes} nodes)"
                    )
        if not (math.isfinite(self.clip) and self.clip > 0):
            out.append(f"clip {self.clip} must be a positive finite number")
        return out

    def check_rules(self, *, require_malicious: bool = True) -> None:
        """Raise :class:`SecAggAborted` (``BAD_PARAMETERS``) unless the rules hold."""
        problems = self.problems(require_malicious=require_malicious)
        if problems:
            raise SecAggAborted(AbortReason.BAD_PARAMETERS, "; ".join(problems))


def choose_params(
    num_nodes: int,
    malicious: bool = True,
    *,
    clip: float = 8.0,
    max_nodes: int | None = None,
    value_bits: int | None = None,
) -> SecAggParams:
    """The parameters the rules prescribe for ``num_nodes`` participants.

    ``max_nodes`` defaults to ``num_nodes``; ``value_bits`` defaults to the
    widest width the headroom allows (finest quantisation).
    """
    n_max = num_nodes if max_nodes is None else max_nodes
    k = recommended_degree(num_nodes)
    params = SecAggParams(
        num_nodes=num_nodes,
        degree=k,
        threshold=min_threshold(k, malicious),
        value_bits=max_value_bits(n_max) if value_bits is None else value_bits,
        clip=float(clip),
        max_nodes=n_max,
        malicious=malicious,
    )
    problems = params.problems(require_malicious=malicious)
    if problems:
        raise ValueError("; ".join(problems))
    return params
