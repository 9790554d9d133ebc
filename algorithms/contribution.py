"""Data holders' contribution to a finished federated job, from per-round coalition utilities.

An exchange sells a finished job as a product that states how much each data holder
contributed, and pays them accordingly (:mod:`wharf.algorithms.revenue`). Retraining a
model for every coalition of holders is out of the question, so contribution is measured
per round on models *reconstructed* from the updates the round already produced (the
"gradient Shapley" idea of Song et al. 2019 and GTG-Shapley):

* round ``r`` starts from global weights ``w_r``; node ``i`` sends ``Δ_i``;
* the coalition model of ``S`` is ``w_r + mean_{i∈S} Δ_i`` (uniform or example-weighted,
  :func:`coalition_model`), i.e. the FedAvg step the round would have taken had only
  ``S`` participated;
* its utility ``U_r(S)`` is its validation score (accuracy or minus the mean loss,
  :func:`model_utility`) minus ``U_r(∅)``, the score of ``w_r`` itself
  (:func:`round_utilities`);
* a node's contribution is the sum over rounds of its Shapley value in the game ``U_r``
  (:func:`per_round_shapley`), or of the GTG-Shapley estimate of it when there are too
  many nodes to enumerate every coalition (:func:`gtg_shapley`).

Per-round games rather than one game over the whole job: the round structure is what
makes reconstruction possible (no retraining), and a node that only joined some rounds
is valued on those rounds alone.

Secure mode. Under secure aggregation the coordinator never sees an individual ``Δ_i``,
only (DP-noised) sums over coalitions; :func:`coalition_from_sum` builds the coalition
model from such a sum and the coalition's size. Which sums may be revealed, and what
that costs in privacy, is decided by the orchestration, not here.

Everything here is deterministic: the exact computations enumerate coalitions in a fixed
order and add with :func:`math.fsum`, and GTG-Shapley's permutation sampling is seeded
(the seed is not a secret; it only has to make the estimate reproducible).

Limits worth stating to buyers and sellers (measured in ``tests/test_contribution.py``
on breast-cancer FedAvg runs):

* Shapley values are not replication-proof. A holder who enters the same data twice
  under two identities gets two equal values that together exceed what the data earned
  once (about 1.2-1.35x in the tests; never double, and each copy is worth clearly less
  than the original alone). Against that, rely on one identity per data holder, not on
  the valuation.
* Accuracy moves in steps of ``1/len(validation set)`` and rewards a model that merely
  learned the class prior; with it a node holding shuffled labels sometimes scored
  slightly positive. Minus the validation loss separated noise from honest data with a
  wide margin on every split tried, so prefer ``neg_loss``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import torch
from torch import nn

from wharf.algorithms.models import arrays_to_model
from wharf.algorithms.strategies import FedAvg, average_from_sum, check_same
from wharf.algorithms.training import evaluate

__all__ = [
    "MAX_EXACT_PLAYERS",
    "GTGResult",
    "coalition_from_sum",
    "coalition_model",
    "exact_shapley",
    "gtg_shapley",
    "model_utility",
    "per_round_shapley",
    "round_utilities",
    "scores_from_dict",
    "scores_to_dict",
]

#: Largest player count for exact Shapley values: 2**16 coalition evaluations per game.
MAX_EXACT_PLAYERS = 16

#: Minimum number of sampled permutations before GTG-Shapley may stop on convergence.
_GTG_MIN_PERMUTATIONS = 30
#: GTG-Shapley compares the current estimate with the estimates this many permutations back.
_GTG_WINDOW = 10
#: Automatic permutation cap of GTG-Shapley, per player.
_GTG_AUTO_PER_PLAYER = 50

Coalition = frozenset[str]
Weights = dict[str, np.ndarray]
ValueFn = Callable[[Coalition], float]
ArrayLike = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- validation


def _fmt(coalition: Iterable[str]) -> str:
    """A coalition as ``{'a', 'b'}`` (sorted), ``{}`` when empty: stable in error messages."""
    return "{" + ", ".join(repr(p) for p in sorted(coalition)) + "}"


def _is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is no utility), NumPy scalars included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: object, what: str) -> float:
    if not _is_real(value):
        raise ValueError(f"{what} must be a real number, got {type(value).__name__}")
    out = float(value)  # type: ignore[arg-type]
    if not math.isfinite(out):
        raise ValueError(f"{what} is {out}; scores must be finite")
    return out


def _players(players: Iterable[str]) -> tuple[str, ...]:
    """Sorted, unique, non-empty string names: results never depend on the caller's order."""
    names = list(players)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"player names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"player names must be unique; repeated: {dupes}")
    return tuple(sorted(names))


def scores_to_dict(scores: Mapping[str, float]) -> dict[str, float]:
    """Validated contribution scores as a plain name-sorted ``dict[str, float]``.

    This is the form scores take in a product bundle (JSON): names are non-empty strings
    and every score is a finite real. NaN or infinity raises ValueError rather than being
    written, since a buyer's revenue recomputation could not use it and JSON has no
    portable spelling for it.
    """
    out: dict[str, float] = {}
    for name in _players(scores):
        out[name] = _finite(scores[name], f"score of {name!r}")
    return out


def scores_from_dict(data: Mapping[str, object]) -> dict[str, float]:
    """Parse scores read back from a bundle, strictly (same rules as :func:`scores_to_dict`).

    Accepts ints as well as floats (JSON writes ``0.0`` as ``0`` in some encoders) but no
    bools, strings or nulls: a malformed bundle must fail, not pay someone zero.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"scores must be a mapping of name to number, got {type(data).__name__}")
    out: dict[str, float] = {}
    for name in _players(data):
        out[name] = _finite(data[name], f"score of {name!r}")
    return out


# --------------------------------------------------------------------------- exact Shapley


def _popcounts(n: int) -> np.ndarray:
    counts = np.zeros(1 << n, dtype=np.int64)
    for mask in range(1, 1 << n):
        counts[mask] = counts[mask >> 1] + (mask & 1)
    return counts


def exact_shapley(players: Sequence[str], value: ValueFn) -> dict[str, float]:
    """Exact Shapley values ``φ_i = Σ_{S⊆N∖{i}} |S|!(n−|S|−1)!/n! · (v(S∪{i}) − v(S))``.

    ``value`` is called exactly once per coalition (all ``2**n`` of them, the empty one
    included) and must return a finite number. Efficiency holds:
    ``Σ φ_i = v(N) − v(∅)`` up to floating-point rounding. The result is keyed by player
    name in sorted order and does not depend on the order of ``players``.

    Each player's sum is taken with :func:`math.fsum` over a fixed enumeration, so the
    same inputs give bit-identical values on every machine. More than
    :data:`MAX_EXACT_PLAYERS` players is refused (use :func:`gtg_shapley`): 2**17
    model evaluations are not a reasonable per-round cost.
    """
    names = _players(players)
    n = len(names)
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"exact Shapley values need 2**n coalition evaluations; {n} players exceed the "
            f"limit of {MAX_EXACT_PLAYERS} (use gtg_shapley)"
        )
    if n == 0:
        return {}
    size = 1 << n
    values = np.empty(size, dtype=np.float64)
    for mask in range(size):
        coalition = frozenset(names[j] for j in range(n) if mask >> j & 1)
        values[mask] = _finite(value(coalition), f"value of coalition {_fmt(coalition)}")
    # Weight of a coalition of size k not containing i; exact rational, rounded once.
    fact = math.factorial
    weight_by_size = np.array(
        [float(Fraction(fact(k) * fact(n - k - 1), fact(n))) for k in range(n)]
    )
    masks = np.arange(size, dtype=np.int64)
    sizes = _popcounts(n)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        bit = 1 << i
        without = masks[(masks & bit) == 0]
        terms = weight_by_size[sizes[without]] * (values[without | bit] - values[without])
        out[name] = math.fsum(terms.tolist())
    return out


def _table_value(table: Mapping[Coalition, float], where: str) -> tuple[tuple[str, ...], ValueFn]:
    """The players of a coalition table and a value function reading it, after checking
    that every subset of those players (the empty one included) is present."""
    for key in table:
        if not isinstance(key, frozenset):
            raise ValueError(
                f"{where}: coalitions must be frozensets of names, got {type(key).__name__}"
            )
    players = _players(set().union(*table) if table else set())
    if len(players) > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"{where}: {len(players)} participants exceed the exact-Shapley limit of "
            f"{MAX_EXACT_PLAYERS}"
        )
    for k in range(len(players) + 1):
        for combo in itertools.combinations(players, k):
            if frozenset(combo) not in table:
                raise ValueError(
                    f"{where}: no utility for coalition {_fmt(combo)}; the table must hold "
                    f"every subset of the round's participants {list(players)}"
                )

    def value(coalition: Coalition) -> float:
        return _finite(table[coalition], f"{where}: utility of coalition {_fmt(coalition)}")

    return players, value


def per_round_shapley(rounds: Sequence[Mapping[Coalition, float]]) -> dict[str, float]:
    """Sum over rounds of each round's exact Shapley values, from tables of utilities.

    ``rounds[r]`` maps every subset of round ``r``'s participants (the union of its
    keys), including ``frozenset()``, to ``U_r(S)``; a missing coalition raises
    ValueError naming it and the round. A player absent from a round gets 0 for it.
    The result holds every player seen in any round, sorted by name; per-player sums
    use :func:`math.fsum` so the total is independent of rounding order.
    """
    per_player: dict[str, list[float]] = {}
    for r, table in enumerate(rounds):
        players, value = _table_value(table, f"round {r}")
        phi = exact_shapley(players, value)
        for name in players:
            per_player.setdefault(name, []).append(phi[name])
    return {name: math.fsum(per_player[name]) for name in sorted(per_player)}


# --------------------------------------------------------------------------- GTG-Shapley


@dataclass(frozen=True)
class GTGResult:
    """GTG-Shapley estimates and what they cost.

    ``evaluations`` counts distinct coalitions whose value was computed (``v(∅)`` and
    ``v(N)`` included): each is a model evaluation on the validation set, the cost
    that matters. ``permutations`` is the number of sampled permutations (0 when the
    round was truncated), ``converged`` whether sampling stopped on the convergence
    test rather than at the permutation cap, and ``round_truncated`` whether the
    whole round was skipped because ``|v(N) − v(∅)|`` was below the threshold.
    """

    values: dict[str, float]
    evaluations: int
    permutations: int
    converged: bool
    round_truncated: bool


def _relative_change(history: deque[list[float]]) -> float:
    """Largest ``Σ_i |φ_old_i − φ_i| / Σ_i |φ_i|`` over the estimates in the window.

    Normalised by the total rather than per player (as some implementations do): a
    null player's estimate hovers around 0, and a per-player relative error would never
    settle for it, so sampling would always run to the cap.
    """
    current = history[-1]
    scale = math.fsum(abs(c) for c in current)
    if scale == 0.0:
        return 0.0
    return max(
        math.fsum(abs(o - c) for o, c in zip(old, current, strict=True)) / scale for old in history
    )


def _check_threshold(name: str, value: float) -> float:
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def gtg_shapley(
    players: Sequence[str],
    value: ValueFn,
    *,
    rng_seed: int,
    max_permutations: int = 0,
    within_round_truncation: float = 0.01,
    between_round_truncation: float = 0.01,
    convergence_tol: float = 0.05,
) -> GTGResult:
    """GTG-Shapley estimate of the Shapley values of one round's game.

    Liu, Tian, Chen, Ren and Xu, "GTG-Shapley: Efficient and Accurate Participant
    Contribution Evaluation in Federated Learning", ACM TIST 13(4), 2022. Monte-Carlo
    permutation sampling with three savings:

    * **between-round truncation**: if ``|v(N) − v(∅)| ≤ between_round_truncation`` the
      round barely moved the model and every value is 0 (two evaluations);
    * **guided sampling**: permutation ``k`` starts with player ``k mod n`` (players in
      sorted order) and shuffles the rest, so every player is valued as the first
      joiner equally often; the first position carries the largest marginal gains in
      federated learning, and leaving it to chance is what makes plain Monte-Carlo
      estimates noisy;
    * **within-round truncation**: once ``|v(N) − v(prefix)| < within_round_truncation``
      the remaining players of that permutation get marginal 0 without evaluating
      their coalitions (the prefix already performs like the whole round).

    Coalition values are cached, so a coalition met again in another permutation is
    not re-evaluated. Sampling stops after at least ``max(30, n)`` permutations (rounded
    up to whole cycles of ``n``), at the end of a cycle, when the estimate moved by at
    most ``convergence_tol`` (``Σ|Δφ| / Σ|φ|``) over the last 10 permutations; or at
    ``max_permutations`` (0 means ``50·n``).

    Both truncation thresholds are absolute, in the units of ``value`` (0.01 is one
    accuracy point); they bias each estimate by at most about the threshold and can be
    set to 0 to disable truncation.

    Randomness: the shuffles come from ``random.Random(rng_seed)``. The seed is not a
    secret (nothing is protected by the permutation order); it exists so that anyone
    holding the coalition utilities and the seed reproduces the same estimate. Results
    do not depend on the order of ``players``.
    """
    names = _players(players)
    n = len(names)
    if isinstance(rng_seed, bool) or not isinstance(rng_seed, int):
        raise ValueError(f"rng_seed must be an int, got {rng_seed!r}")
    if (
        isinstance(max_permutations, bool)
        or not isinstance(max_permutations, int)
        or max_permutations < 0
    ):
        raise ValueError(f"max_permutations must be an int >= 0, got {max_permutations!r}")
    within = _check_threshold("within_round_truncation", within_round_truncation)
    between = _check_threshold("between_round_truncation", between_round_truncation)
    if not (_is_real(convergence_tol) and math.isfinite(convergence_tol) and convergence_tol > 0):
        raise ValueError(f"convergence_tol must be a finite number > 0, got {convergence_tol!r}")
    if n == 0:
        return GTGResult({}, 0, 0, converged=True, round_truncated=False)

    cache: dict[Coalition, float] = {}

    def v(coalition: Coalition) -> float:
        if coalition not in cache:
            cache[coalition] = _finite(value(coalition), f"value of coalition {_fmt(coalition)}")
        return cache[coalition]

    v_empty = v(frozenset())
    v_full = v(frozenset(names))
    if abs(v_full - v_empty) <= between:
        return GTGResult(
            dict.fromkeys(names, 0.0), len(cache), 0, converged=True, round_truncated=True
        )

    limit = max_permutations or _GTG_AUTO_PER_PLAYER * n
    min_perms = -(-max(_GTG_MIN_PERMUTATIONS, n) // n) * n
    rng = random.Random(rng_seed)
    marginals: list[list[float]] = [[] for _ in range(n)]
    totals = [0.0] * n  # running sums for the convergence test; the result uses fsum
    history: deque[list[float]] = deque(maxlen=_GTG_WINDOW + 1)
    converged = False
    k = 0
    while k < limit:
        first = k % n
        rest = [j for j in range(n) if j != first]
        rng.shuffle(rest)
        prefix: list[str] = []
        previous = v_empty
        for j in (first, *rest):
            prefix.append(names[j])
            if abs(v_full - previous) >= within:
                current = v(frozenset(prefix))
            else:
                current = previous
            marginals[j].append(current - previous)
            totals[j] += current - previous
            previous = current
        k += 1
        history.append([t / k for t in totals])
        if k >= min_perms and k % n == 0 and len(history) == history.maxlen:
            if _relative_change(history) <= convergence_tol:
                converged = True
                break
    estimate = {name: math.fsum(marginals[j]) / k for j, name in enumerate(names)}
    return GTGResult(estimate, len(cache), k, converged=converged, round_truncated=False)


# --------------------------------------------------------------------------- coalition models


def _fedavg_step(
    global_weights: Mapping[str, np.ndarray], avg_delta: Mapping[str, np.ndarray]
) -> Weights:
    # The same server step a plaintext FedAvg round takes (server_lr 1), frozen
    # Standardize buffers included, so the coalition N reproduces the real next model.
    new, _ = FedAvg().apply(global_weights, avg_delta, {}, 0)
    return new


def coalition_model(
    global_weights: Mapping[str, np.ndarray],
    deltas: Mapping[str, Mapping[str, np.ndarray]],
    members: frozenset[str],
    weights: Mapping[str, float] | None = None,
) -> Weights:
    """``w + mean_{i∈S} Δ_i``: the model the round would have produced with only ``members``.

    ``weights`` (e.g. example counts) turns the mean into ``Σ w_i·Δ_i / Σ w_i``; without
    it every member counts once. The step is FedAvg's (server learning rate 1, frozen
    Standardize buffers copied unchanged), so for the full set it equals the round's
    real FedAvg update; jobs run with another server rule get the FedAvg counterfactual.
    The empty coalition is the global model itself. Members are summed in name order in
    float64, so the result is deterministic; arrays come back float32, sorted by name.
    """
    unknown = sorted(set(members) - set(deltas))
    if unknown:
        raise ValueError(f"coalition members {unknown} have no update")
    zero = {name: np.zeros(np.shape(arr)) for name, arr in global_weights.items()}
    if not members:
        return _fedavg_step(global_weights, zero)
    if weights is not None:
        missing = sorted(set(members) - set(weights))
        if missing:
            raise ValueError(f"no weight for coalition members {missing}")
    total = 0.0
    summed = {name: np.zeros(np.shape(arr), dtype=np.float64) for name, arr in zero.items()}
    for member in sorted(members):
        w = 1.0 if weights is None else _finite(weights[member], f"weight of {member!r}")
        if w <= 0:
            raise ValueError(f"weight of {member!r} must be positive, got {w}")
        update = deltas[member]
        check_same(global_weights, update, f"update of {member!r}")
        for name in summed:
            summed[name] += w * np.asarray(update[name], dtype=np.float64)
        total += w
    return _fedavg_step(global_weights, average_from_sum(summed, total))


def coalition_from_sum(
    global_weights: Mapping[str, np.ndarray],
    delta_sum: Mapping[str, np.ndarray],
    count: float,
) -> Weights:
    """Secure mode: the coalition model from the (noised) sum of its members' updates.

    Under secure aggregation the coordinator only learns ``Σ_{i∈S} Δ_i`` (or the
    example-weighted ``Σ n_i·Δ_i``) plus noise; ``count`` is the divisor that turns it
    into the mean: the member count for a plain sum, the total example count for a
    weighted one. The step is the same FedAvg step as :func:`coalition_model`, so with
    exact sums both give the same model. For the empty coalition use the global
    weights (there is no sum to divide).
    """
    check_same(global_weights, delta_sum, "coalition sum")
    if not _is_real(count) or not (math.isfinite(count) and count > 0):
        raise ValueError(f"count must be a positive number, got {count!r}")
    return _fedavg_step(global_weights, average_from_sum(delta_sum, float(count)))


def model_utility(
    weights: Mapping[str, np.ndarray],
    build: Callable[[], nn.Module],
    x: ArrayLike,
    y: ArrayLike,
    metric: Literal["accuracy", "neg_loss"] = "accuracy",
) -> float:
    """Score of ``weights`` on validation data ``(x, y)``: accuracy or minus the mean loss.

    ``build`` returns a fresh model of the job's architecture; the weights are loaded
    strictly (:func:`~wharf.algorithms.models.arrays_to_model`), so a malformed
    coalition model fails instead of being scored. Minus the loss (rather than the
    loss) so that for both metrics larger is better and utilities add up to gains.
    Accuracy moves in steps of ``1/len(y)``, which hides small contributions on small
    validation sets; ``neg_loss`` is smooth.
    """
    if metric not in ("accuracy", "neg_loss"):
        raise ValueError(f"metric must be 'accuracy' or 'neg_loss', got {metric!r}")
    model = arrays_to_model(build(), weights)
    report = evaluate(model, x, y)
    if report.num_examples == 0:
        raise ValueError("cannot score a model on an empty validation set")
    score = report.accuracy if metric == "accuracy" else -report.mean_loss
    return _finite(score, f"{metric} of the model")


def round_utilities(
    global_weights: Mapping[str, np.ndarray],
    deltas: Mapping[str, Mapping[str, np.ndarray]],
    utility: Callable[[Mapping[str, np.ndarray]], float],
    weights: Mapping[str, float] | None = None,
) -> dict[Coalition, float]:
    """``U(S) = utility(coalition_model(S)) − utility(w)`` for every subset of the nodes.

    The clear-text-mode table one round contributes to :func:`per_round_shapley`
    (``U(∅)`` is 0 by construction). ``2**n`` model evaluations, so at most
    :data:`MAX_EXACT_PLAYERS` nodes; for more, hand a value function built from
    :func:`coalition_model` to :func:`gtg_shapley` instead.
    """
    players = _players(deltas)
    if len(players) > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"{len(players)} nodes exceed the exact-Shapley limit of {MAX_EXACT_PLAYERS}"
        )
    base = _finite(utility(global_weights), "utility of the global model")
    table: dict[Coalition, float] = {frozenset(): 0.0}
    for k in range(1, len(players) + 1):
        for combo in itertools.combinations(players, k):
            members = frozenset(combo)
            model = coalition_model(global_weights, deltas, members, weights)
            score = _finite(utility(model), f"utility of coalition {_fmt(members)}")
            table[members] = score - base
    return table
