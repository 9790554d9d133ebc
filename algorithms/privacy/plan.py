"""A job's differential-privacy plan for one dataset: what noise, and what it costs.

The job spec says *what* guarantee is wanted (``[privacy.record_level]``,
``[privacy.participant_level]``: a target epsilon or a noise level); this
module turns that into the mechanism parameters and the guarantee for a given
dataset, with the accountants of :mod:`.accounting`:

* **Record level** (DP-SGD): the sampling rate and number of steps depend on the
  dataset's row count, so each node calibrates its *own* noise multiplier to hit
  the job's epsilon on its data (or reports the epsilon a given multiplier gives).
  The node computes this plan at grant time, signs it into the grant, and hands
  exactly these numbers to its trainer; the coordinator never chooses them.
* **Participant level** (distributed Skellam): the plan depends only on the spec
  and the model's size, so every node and the coordinator compute the *same*
  plan (the coordinator needs the scale to read the sum). A node still adds
  only the noise of the plan it computed and signed itself.

What a dataset is charged (:meth:`JobPrivacy.spend`): the smaller of the two
guarantees. A participant-level guarantee covers every record of the dataset
(changing one record changes at most the whole participant), and post-processing
cannot weaken either, so the records' loss is bounded by both; charging the
smaller one is exact, not optimistic.

Rows are treated as public: the registration certificate states each dataset's
row count, and the record-level accountant uses add/remove-one-record
neighbouring under Poisson sampling. ``docs/privacy.md`` spells this out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wharf.spec import JobSpec

from .accounting import Guarantee, calibrate_participant_level, record_level_guarantee
from .skellam import SkellamPlan, make_plan

__all__ = [
    "DP_DEFAULT_MAX_NODES",
    "JobPrivacy",
    "dp_max_nodes",
    "min_contributors",
    "model_size",
    "participant_plan",
    "participant_releases",
    "plan_job_privacy",
    "releases_per_round",
]

DP_DEFAULT_MAX_NODES = 64
"""Most nodes a participant-level round may hold when the spec sets no
``federation.max_nodes``: the Skellam plan sizes its integer scale so that this
many nodes' noisy updates never wrap in Z_2^32, so the coordinator must not exceed it."""


def dp_max_nodes(spec: JobSpec) -> int:
    """The largest round a participant-level job may run (see :data:`DP_DEFAULT_MAX_NODES`)."""
    return spec.federation.max_nodes or DP_DEFAULT_MAX_NODES


def min_contributors(spec: JobSpec) -> int:
    """How many nodes' noise shares must be in a revealed sum (participant level)."""
    level = spec.privacy.participant_level
    if level is None:
        return 0
    return level.min_contributors or spec.federation.min_nodes


@dataclass(frozen=True)
class JobPrivacy:
    """The DP plan of one job on one dataset, as a node signs it into its grant."""

    record_level: Guarantee | None = None
    participant_level: Guarantee | None = None
    skellam: SkellamPlan | None = None

    def spend(self) -> tuple[float, float]:
        """``(epsilon, delta)`` this job costs the dataset's budget (the tighter guarantee)."""
        found = [g for g in (self.record_level, self.participant_level) if g is not None]
        if not found:
            return (math.inf, 1.0)
        best = min(found, key=lambda g: g.epsilon)
        return (best.epsilon, best.delta)

    @property
    def dpsgd(self) -> Mapping[str, Any] | None:
        """The DP-SGD parameters for the trainer (noise multiplier, clip, sample rate)."""
        if self.record_level is None:
            return None
        m = self.record_level.mechanism
        return {
            "noise_multiplier": float(m["noise_multiplier"]),
            "max_grad_norm": float(m["clip"]),
            "sample_rate": float(m["sample_rate"]),
            "steps_per_round": int(m["steps"]) // int(m["rounds"]),
        }

    def guarantees(self) -> list[Guarantee]:
        return [g for g in (self.record_level, self.participant_level) if g is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "guarantees": [g.to_dict() for g in self.guarantees()],
            "skellam": self.skellam.to_dict() if self.skellam is not None else None,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> JobPrivacy:
        """Strict inverse of :meth:`to_dict`; ValueError on anything else."""
        if not isinstance(raw, Mapping) or set(raw) != {"guarantees", "skellam"}:
            raise ValueError("a privacy plan needs exactly 'guarantees' and 'skellam'")
        items = raw["guarantees"]
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise ValueError("privacy plan 'guarantees' must be a list")
        by_kind: dict[str, Guarantee] = {}
        for item in items:
            g = Guarantee.from_dict(item)
            if g.kind in by_kind:
                raise ValueError(f"privacy plan lists two {g.kind} guarantees")
            by_kind[g.kind] = g
        skellam = SkellamPlan.from_dict(raw["skellam"]) if raw["skellam"] is not None else None
        if ("participant_level" in by_kind) != (skellam is not None):
            raise ValueError("a participant-level guarantee and its Skellam plan go together")
        return cls(by_kind.get("record_level"), by_kind.get("participant_level"), skellam)


def releases_per_round(spec: JobSpec) -> int:
    """How many Skellam sums one participant's update enters per round.

    One (the training sum), or ``max_nodes`` under ``valuation.mode = "secure"``: the
    training sum plus the leave-one-out sum of every other roster node (a round has at
    most ``max_nodes`` nodes, and a node's own leave-one-out sum holds only noise).
    """
    if spec.valuation.mode == "secure":
        return dp_max_nodes(spec)
    return 1


def participant_releases(spec: JobSpec) -> int:
    """Skellam releases the participant-level accountant composes for the whole job."""
    return spec.federation.rounds * releases_per_round(spec)


def participant_plan(spec: JobSpec, num_params: int) -> tuple[Guarantee, SkellamPlan]:
    """The participant-level plan every party computes alike from the spec and model size.

    The guarantee's ``rounds`` is the number of composed releases
    (:func:`participant_releases`): the job's rounds, times ``max_nodes`` when a secure
    valuation rides along.
    """
    level = spec.privacy.participant_level
    if level is None:
        raise ValueError("the job has no participant-level privacy")
    rounds = participant_releases(spec)
    m = min_contributors(spec)
    n_max = dp_max_nodes(spec)
    if level.epsilon > 0:
        plan = calibrate_participant_level(
            level.epsilon,
            level.delta,
            rounds,
            clip=level.clip,
            num_params=num_params,
            min_contributors=m,
            max_nodes=n_max,
        )
    else:
        plan = make_plan(level.clip, num_params, m, n_max, level.noise_multiplier)
    return Guarantee.for_participant_level(plan, rounds, level.delta), plan


def model_size(spec: JobSpec, input_shape: Sequence[int]) -> int:
    """Values in the model's state dict (parameters and buffers) — the length of the update
    vector a node sends — built on the ``meta`` device, so nothing is allocated."""
    import torch

    from wharf.algorithms import models

    m = spec.model
    options = {"hidden": list(m.hidden)} if m.kind == "mlp" else {}
    with torch.device("meta"):
        net = models.build_model(
            m.kind, tuple(m.input_shape or input_shape), m.num_classes, options
        )
    return sum(int(t.numel()) for t in net.state_dict().values())


def plan_job_privacy(spec: JobSpec, *, num_rows: int, num_params: int) -> JobPrivacy | None:
    """The job's DP plan on a dataset of ``num_rows`` rows, or ``None`` if it has no DP.

    Raises ValueError when the requested guarantee cannot be met (for example a
    noise level that leaves no room for the model's size in the 32-bit ring).
    """
    p = spec.privacy
    if not p.enabled:
        return None
    record = None
    if p.record_level is not None:
        r, t = p.record_level, spec.training
        record = record_level_guarantee(
            epsilon=r.epsilon or None,
            noise_multiplier=r.noise_multiplier or None,
            delta=r.delta,
            clip=r.clip,
            num_rows=num_rows,
            batch_size=t.batch_size,
            epochs=t.epochs,
            rounds=spec.federation.rounds,
        )
    participant, skellam = (None, None)
    if p.participant_level is not None:
        participant, skellam = participant_plan(spec, num_params)
    return JobPrivacy(record, participant, skellam)
