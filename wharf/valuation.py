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

Scores are computed once, at packaging, and stated in the passport with the method;
the revenue split is then recomputed by anyone from the passport alone
(:mod:`wharf.algorithms.revenue`). Torch evaluation is not bit-reproducible across
machines, so buyers re-check the split, not the scores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from wharf.spec import JobSpec

__all__ = ["ClearTextValuation", "clear_text_scores", "load_rounds"]

Metric = Literal["accuracy", "neg_loss"]


@dataclass(frozen=True)
class ClearTextValuation:
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


def load_rounds(path: Path, job_hash: str) -> dict[int, Round]:
    """Read a valuation file: round -> (start weights, node updates, node example counts)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:  # type: ignore[no-untyped-call]
        meta = fh.metadata() or {}
        if meta.get("format") != "wharf-valuation/1":
            raise ValueError(f"{path} is not a Wharf valuation file")
        if meta.get("job_hash") != job_hash:
            raise ValueError(f"{path} belongs to another job ({meta.get('job_hash', '?')[:12]}…)")
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


def clear_text_scores(
    path: Path,
    spec: JobSpec,
    job_hash: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    metric: Metric = "neg_loss",
) -> ClearTextValuation:
    """Exact per-round Shapley values of every node from a valuation file and validation data."""
    from wharf.algorithms import contribution, models

    m = spec.model
    options = {"hidden": list(m.hidden)} if m.kind == "mlp" else {}
    shape = tuple(m.input_shape) or tuple(x.shape[1:])

    def build():  # type: ignore[no-untyped-def]
        return models.build_model(m.kind, shape, m.num_classes, options)

    def utility(weights: Mapping[str, np.ndarray]) -> float:
        return contribution.model_utility(weights, build, x, y, metric)

    rounds = load_rounds(path, job_hash)
    tables = []
    per_round: dict[int, dict[str, float]] = {}
    for rnd in sorted(rounds):
        start, deltas, counts = rounds[rnd]
        table = contribution.round_utilities(
            start, deltas, utility, {n: float(c) for n, c in counts.items()}
        )
        tables.append(table)
        per_round[rnd] = contribution.per_round_shapley([table])
    scores = contribution.per_round_shapley(tables)
    return ClearTextValuation(
        scores=scores,
        per_round=per_round,
        method="clear-text exact per-round Shapley (consented; valuation.mode = clear)",
        metric=metric,
        validation_rows=len(y),
    )
