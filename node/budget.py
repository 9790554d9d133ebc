"""Each dataset's differential-privacy budget, and what the jobs granted so far spent.

The data holder sets a total (epsilon, delta) per dataset in the node's policy
(``[budget]``, ``[budget.datasets.NAME]``). Every granted job with DP charges
the dataset the guarantee its plan gives on that dataset
(:meth:`wharf.algorithms.privacy.plan.JobPrivacy.spend`), in the same
transaction as the signed grant, which is itself an entry in the node's audit
ledger; the charges live in the node's own database, so a restart changes
nothing. Charges compose by *basic composition* (epsilons add, deltas add):
the simplest rule that is valid for any mix of mechanisms and accountants, and
never optimistic. A job whose charge would exceed what is left is refused at
grant time, with the numbers.

A charge is made when the grant is signed, not when rounds run: the grant
allows the whole job, and the node cannot know in advance how many rounds the
coordinator will complete. Nothing is refunded for a job that stops early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from wharf.node.policy import BudgetRule, Policy
from wharf.node.state import NodeState, Spend

__all__ = ["BudgetStatus", "budget_problem", "budget_status"]

_SLACK = 1e-9
"""Relative tolerance, so a job that spends exactly what is left is not refused by rounding."""


@dataclass(frozen=True)
class BudgetStatus:
    """A dataset's budget (``None``: no limit), what was spent, and by which jobs."""

    dataset: str
    budget: BudgetRule | None
    spends: list[Spend]

    @property
    def spent_epsilon(self) -> float:
        return math.fsum(s.epsilon for s in self.spends)

    @property
    def spent_delta(self) -> float:
        return math.fsum(s.delta for s in self.spends)

    @property
    def remaining_epsilon(self) -> float:
        return math.inf if self.budget is None else self.budget.epsilon - self.spent_epsilon

    @property
    def remaining_delta(self) -> float:
        return math.inf if self.budget is None else self.budget.delta - self.spent_delta

    def to_dict(self) -> dict[str, object]:
        b = self.budget
        return {
            "dataset": self.dataset,
            "budget": None if b is None else {"epsilon": b.epsilon, "delta": b.delta},
            "spent": {"epsilon": self.spent_epsilon, "delta": self.spent_delta},
            "remaining": None
            if b is None
            else {"epsilon": self.remaining_epsilon, "delta": self.remaining_delta},
            "jobs": [
                {"job_id": s.job_id, "epsilon": s.epsilon, "delta": s.delta, "at": s.created}
                for s in self.spends
            ],
        }


def budget_status(
    state: NodeState, policy: Policy | None, dataset: str, conn: Connection | None = None
) -> BudgetStatus:
    """The dataset's budget under ``policy`` and its recorded charges."""
    budget = policy.budget_for(dataset) if policy is not None else None
    return BudgetStatus(dataset, budget, state.spends(dataset, conn))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def budget_problem(
    status: BudgetStatus, job_id: str, spend: tuple[float, float] | None
) -> str | None:
    """Why charging ``spend`` (``None``: the job has no DP) would overspend, else ``None``."""
    b = status.budget
    if b is None:
        return None
    name = status.dataset
    if spend is None:
        return (
            f"dataset {name!r} has a privacy budget (epsilon {_fmt(b.epsilon)}, delta "
            f"{_fmt(b.delta)}); a job without differential privacy would exceed any budget — "
            "add a [privacy] section to the job"
        )
    if any(s.job_id == job_id for s in status.spends):
        return None  # already charged (the same job decided again)
    eps, delta = spend
    left_eps, left_delta = status.remaining_epsilon, status.remaining_delta
    over_eps = eps > left_eps + _SLACK * b.epsilon
    over_delta = delta > left_delta + _SLACK * b.delta
    if not (over_eps or over_delta):
        return None
    jobs = ", ".join(f"{s.job_id[:12]} {_fmt(s.epsilon)}" for s in status.spends) or "none"
    what = []
    if over_eps:
        what.append(f"epsilon {_fmt(eps)} but only {_fmt(max(left_eps, 0.0))} is left")
    if over_delta:
        what.append(f"delta {_fmt(delta)} but only {_fmt(max(left_delta, 0.0))} is left")
    return (
        f"privacy budget of dataset {name!r} exceeded: the job needs {' and '.join(what)} "
        f"(budget epsilon {_fmt(b.epsilon)}, delta {_fmt(b.delta)}; spent epsilon "
        f"{_fmt(status.spent_epsilon)}, delta {_fmt(status.spent_delta)} by "
        f"{len(status.spends)} job(s): {jobs})"
    )
