"""Contribution scores an exchange operator computes for a product.

**Consented clear-text mode** (``valuation.mode = "clear"`` in the job spec; only for
plaintext jobs, and every node's grant binds that spec, so granting is consenting):
the coordinator kept each node's update of every round
(:func:`wharf.coordinator.dossier.valuation_bytes`). The operator downloads them and,
with *its own* validation data, computes the exact per-round Shapley value of each
node (:func:`wharf.algorithms.contribution.per_round_shapley`): in round ``r`` the
utility of a coalition ``S`` is the validation score of ``w_r + FedAvg(S)`` minus
that of ``w_r``; a node's score is the sum over rounds. The default score is the
negative mean cross-entropy (``neg_loss``), which separates a node with useless data
from useful ones far more reliably than accuracy on small validation sets.

**Secure mode** (``valuation.mode = "secure"``; secure aggregation with
participant-level DP): no update is ever seen. Each round's masked vectors also
carried one leave-one-out sum per roster node, every one with the full
participant-level noise, all revealed in the round's single unmasking and charged to
each dataset's budget (:func:`wharf.algorithms.privacy.plan.releases_per_round`). The
coordinator kept the noised means; the operator scores node ``i`` in round ``r`` by
its leave-one-out value ``U(w_r + mean(N)) − U(w_r + mean(N∖{i}))`` and sums over
rounds (:func:`secure_scores`). It reveals, per round, each node's update only as the
difference of two independently noised sums — a release covered by the
participant-level guarantee. docs/contribution.md compares it with clear-text mode.

Scores are computed once, at packaging, and stated in the passport with the method;
the revenue split is then recomputed by anyone from the passport alone
(:mod:`wharf.algorithms.revenue`). Torch evaluation is not bit-reproducible across
machines, so buyers re-check the split, not the scores.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from wharf.spec import JobSpec

__all__ = ["Valuation", "clear_text_scores", "load_rounds", "secure_scores"]

Metric = Literal["accuracy", "neg_loss"]


@dataclass(frozen=True)
class Valuation:
    """Per-node scores, per-round values, and how they were computed (for the passport)."""

    scores: dict[str, float]
    per_round: dict[int, dict[str, float]]
    method: str
    metric: str
    validation_rows: int

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "metric": self.metric,
            "scores": dict(sorted(self.scores.items())),
            "per_round": {
                str(r): dict(sorted(v.items())) for r, v in sorted(self.per_round.items())
            },
            "validation_rows": self.validation_rows,
        }


Round = tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[str, int]]


def load_rounds(path: Path, job_hash: str, mode: str = "clear") -> dict[int, Round]:
    """Read a valuation file: round -> (start weights, updates by name, counts by name).

    In clear mode the names are nodes (updates and example counts); in secure mode
    they are coalitions, ``all`` and ``without.<node>`` (noised mean updates and
    member counts). ValueError if the file is of another job or mode.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:  # type: ignore[no-untyped-call]
        meta = fh.metadata() or {}
        if meta.get("format") != "wharf-valuation/1":
            raise ValueError(f"{path} is not a Wharf valuation file")
        if meta.get("job_hash") != job_hash:
            raise ValueError(f"{path} belongs to another job ({meta.get('job_hash', '?')[:12]}…)")
        found = meta.get("mode", "clear")
        if found != mode:
            raise ValueError(f"{path} holds {found}-mode valuation material, not {mode}")
        counts = {
            int(r): {str(k): int(v) for k, v in n.items()}
            for r, n in json.loads(meta["rounds"]).items()
        }
        rounds: dict[int, Round] = {r: ({}, {n: {} for n in c}, c) for r, c in counts.items()}
        for key in fh.keys():
            head, _, rest = key.partition("/")
            rnd = int(head[1:])
            kind, _, name = rest.partition("/")
            if kind == "global":
                rounds[rnd][0][name] = fh.get_tensor(key)
            else:
                node, _, tensor = name.partition("/")
                rounds[rnd][1][node][tensor] = fh.get_tensor(key)
    return rounds


def _utility_fn(
    spec: JobSpec, x: np.ndarray, y: np.ndarray, metric: Metric
) -> Callable[[Mapping[str, np.ndarray]], float]:
    from wharf.algorithms import contribution, models

    m = spec.model
    options = {"hidden": list(m.hidden)} if m.kind == "mlp" else {}
    shape = tuple(m.input_shape) or tuple(x.shape[1:])

    def build():  # type: ignore[no-untyped-def]
        return models.build_model(m.kind, shape, m.num_classes, options)

    def utility(weights: Mapping[str, np.ndarray]) -> float:
        return contribution.model_utility(weights, build, x, y, metric)

    return utility


def _sum_rounds(per_round: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Each node's score: its values summed over rounds (``math.fsum``, name-sorted)."""
    values: dict[str, list[float]] = {}
    for rnd in sorted(per_round):
        for node, v in per_round[rnd].items():
            values.setdefault(node, []).append(v)
    return {node: math.fsum(values[node]) for node in sorted(values)}


def _coalition_value(
    start: Mapping[str, np.ndarray],
    deltas: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float],
    utility: Callable[[Mapping[str, np.ndarray]], float],
    base: float,
    members: frozenset[str],
) -> float:
    """``U(S)`` of a clear-text round for GTG-Shapley: utility gain over the start model
    (``base`` is its utility)."""
    from wharf.algorithms import contribution

    return utility(contribution.coalition_model(start, deltas, members, weights)) - base


def secure_round_values(
    start: Mapping[str, np.ndarray],
    means: Mapping[str, Mapping[str, np.ndarray]],
    members: Mapping[str, int],
    utility: Callable[[Mapping[str, np.ndarray]], float],
) -> dict[str, float]:
    """One round's leave-one-out values from noised coalition means.

    ``means``/``members`` are keyed ``all`` and ``without.<node>``. A node whose
    leave-one-out sum has as many members as the training sum did not contribute
    that round (it dropped): it scores 0. (Every sum has at least two noise shares:
    the plan's ``min_contributors`` is at least 2, so no leave-one-out sum is empty.)
    """
    from wharf.algorithms import contribution
    from wharf.algorithms.secure_vectors import ALL_COALITION, COALITION_PREFIX

    if ALL_COALITION not in means:
        raise ValueError("the round has no training sum")
    full = utility(contribution.coalition_from_sum(start, means[ALL_COALITION], 1.0))
    out: dict[str, float] = {}
    for label in sorted(means):
        if not label.startswith(COALITION_PREFIX):
            continue
        node = label[len(COALITION_PREFIX) :]
        if members[label] >= members[ALL_COALITION]:
            out[node] = 0.0
            continue
        out[node] = full - utility(contribution.coalition_from_sum(start, means[label], 1.0))
    return out


def clear_text_scores(
    path: Path,
    spec: JobSpec,
    job_hash: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    metric: Metric = "neg_loss",
) -> Valuation:
    """Exact per-round Shapley values of every node from a valuation file and validation data."""
    from wharf.algorithms import contribution

    utility = _utility_fn(spec, x, y, metric)
    rounds = load_rounds(path, job_hash)
    per_round: dict[int, dict[str, float]] = {}
    estimated = False
    for rnd in sorted(rounds):
        start, deltas, counts = rounds[rnd]
        weights = {n: float(c) for n, c in counts.items()}
        if len(deltas) <= contribution.MAX_EXACT_PLAYERS:
            table = contribution.round_utilities(start, deltas, utility, weights)
            per_round[rnd] = contribution.per_round_shapley([table])
            continue
        # 2^n coalitions is too many: GTG-Shapley's truncated permutation sampling,
        # seeded by the round number so anyone with the same updates gets the same.
        estimated = True
        value = functools.partial(_coalition_value, start, deltas, weights, utility, utility(start))
        per_round[rnd] = contribution.gtg_shapley(sorted(deltas), value, rng_seed=rnd).values
    scores = _sum_rounds(per_round)
    method = "clear-text exact per-round Shapley (consented; valuation.mode = clear)"
    if estimated:
        method = (
            "clear-text per-round Shapley (consented; valuation.mode = clear; exact up to "
            f"{contribution.MAX_EXACT_PLAYERS} nodes a round, GTG-Shapley estimates above)"
        )
    return Valuation(
        scores=scores,
        per_round=per_round,
        method=method,
        metric=metric,
        validation_rows=len(y),
    )


def secure_scores(
    path: Path,
    spec: JobSpec,
    job_hash: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    metric: Metric = "neg_loss",
) -> Valuation:
    """Leave-one-out scores from a secure-mode valuation file and validation data:
    per round, the utility of the noised training mean minus that of each noised
    leave-one-out mean (:func:`secure_round_values`); a node's score is the sum."""
    utility = _utility_fn(spec, x, y, metric)
    rounds = load_rounds(path, job_hash, mode="secure")
    per_round: dict[int, dict[str, float]] = {}
    for rnd in sorted(rounds):
        start, means, members = rounds[rnd]
        per_round[rnd] = secure_round_values(start, means, members, utility)
    return Valuation(
        scores=_sum_rounds(per_round),
        per_round=per_round,
        method=(
            "secure leave-one-out on DP-noised coalition sums (valuation.mode = secure; "
            "participant-level noise in every sum, charged to each dataset's budget)"
        ),
        metric=metric,
        validation_rows=len(y),
    )
