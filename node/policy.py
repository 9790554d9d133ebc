"""The data holder's policy: which jobs this node refuses, approves by itself, or
leaves to its operator — and why.

A hospital or bank, not the coordinator, decides what may be done with its data
(数据用途和用量控制, 分类分级, 负面清单). The policy is a TOML file the node's operator
writes; :func:`evaluate` applies it to one job offered on one registered dataset
before any data is touched, and every refusal carries the exact reason, so the
developer sees why in ``wharf job watch``.

Schema (every field optional; unknown fields are errors that name the field)::

    allowed_purposes   = ["medical-research"]  # purpose codes; empty = no job allowed
    prohibited_columns = ["ssn"]                # node-wide negative list (adds to the
                                                # datasets' own prohibited columns)
    grant_ttl_hours    = 720                    # how long a grant stays valid

    [levels.general]        # what a job needs to touch data at this level
    usable             = true
    secure_aggregation = true   # job must run with federation.secure = true
    dp_required        = false  # job must run with differential privacy
    max_epsilon        = 8.0    # if it has DP: epsilon at most this
    max_delta          = 1e-5   # if it has DP: delta at most this

    [levels.important]      # defaults: secure_aggregation = true, dp_required = true
    [levels.core]           # default usable = false, and it cannot be set true

    [budget]                # total differential-privacy budget of each dataset, over
    epsilon = 10.0          # all jobs (basic composition: epsilons and deltas add up);
    delta   = 1e-4          # no [budget]: no limit (spends are still recorded)
    [budget.datasets.cancer]  # a dataset's own budget instead of the default
    epsilon = 4.0
    delta   = 1e-5

    [quotas]                # per job, at this node
    max_rounds  = 100       # federation.rounds
    max_epochs  = 5         # training.epochs (local epochs per round)
    max_samples = 1000000   # rows x epochs x rounds

    [[auto_approve]]        # standing rules; every field given must match
    requester     = "alice"             # or a list; the name in the requester's certificate
    purpose       = "medical-research"  # or a list
    dataset       = "cancer"            # or a list
    max_level     = "general"           # most sensitive level the job may touch
    bundle_sha256 = []                  # bundle jobs: only these bundle hashes

Levels: a column's level is its own (from the registration certificate) but
never below its dataset's; a job touches every feature column it names (all
registered features if ``data.features`` is empty) and the label column. A field
missing from a ``[levels.X]`` table keeps that level's default, so relaxing a
requirement is always explicit.

The job's DP guarantee on a dataset depends on the dataset (its row count sets
the sampling rate), so callers compute it (:mod:`wharf.algorithms.privacy.plan`)
and pass ``dp=(epsilon, delta)`` to :func:`evaluate`; the budget check against
what earlier jobs spent needs the node's records and lives in
:mod:`wharf.node.budget`. A dataset with a budget takes only jobs with DP.
"""

from __future__ import annotations

import math
import re
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from wharf.records import LEVELS, Grant, Protections, Quotas, level_rank, max_level
from wharf.spec import NAME_RE, PURPOSE_RE, JobSpec

__all__ = [
    "DEFAULT_LEVELS",
    "AutoApproveRule",
    "BudgetRule",
    "Decision",
    "LevelRule",
    "Outcome",
    "Policy",
    "PolicyError",
    "QuotaRule",
    "RegistrationLike",
    "evaluate",
    "load_policy",
    "parse_policy",
]

Outcome = Literal["refuse", "auto_approve", "pending"]
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PolicyError(ValueError):
    """The policy file is malformed; the message names the field and what to fix."""


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class LevelRule:
    """What a job must have to touch data at one classification level."""

    usable: bool = True
    secure_aggregation: bool = True
    dp_required: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None


DEFAULT_LEVELS: dict[str, LevelRule] = {
    "general": LevelRule(secure_aggregation=True),
    "important": LevelRule(secure_aggregation=True, dp_required=True),
    "core": LevelRule(usable=False),
}
"""Safe defaults: secure aggregation everywhere, DP for ``important``, ``core`` never."""


@dataclass(frozen=True)
class QuotaRule:
    """Per-job limits at this node; ``None`` means no limit."""

    max_rounds: int | None = None
    max_epochs: int | None = None
    max_samples: int | None = None


@dataclass(frozen=True)
class AutoApproveRule:
    """A standing approval: matches a job when every listed field matches.

    An empty tuple / ``None`` means the field is not listed. ``bundle_sha256`` is
    special: a job with a code bundle matches only if its hash is listed here, so a
    rule that lists none never approves bundle code.
    """

    requester: tuple[str, ...] = ()
    purpose: tuple[str, ...] = ()
    dataset: tuple[str, ...] = ()
    max_level: str | None = None
    bundle_sha256: tuple[str, ...] = ()

    def mismatch(self, job: JobSpec, requester: str, level: str) -> str | None:
        """Why this rule does not approve the job, or ``None`` if it does."""
        if self.requester and requester not in self.requester:
            return f"requester {requester!r} is not {_either(self.requester)}"
        if self.purpose and job.purpose not in self.purpose:
            return f"purpose {job.purpose!r} is not {_either(self.purpose)}"
        if self.dataset and job.data.dataset not in self.dataset:
            return f"dataset {job.data.dataset!r} is not {_either(self.dataset)}"
        if self.max_level is not None and level_rank(level) > level_rank(self.max_level):
            return f"the job touches {level!r} data, above {self.max_level!r}"
        if _has_bundle(job) and job.bundle.sha256 not in self.bundle_sha256:
            return f"code bundle {job.bundle.sha256[:12] or '(unbound)'}… is not listed"
        return None


@dataclass(frozen=True)
class BudgetRule:
    """A dataset's total privacy budget over all jobs: (epsilon, delta)."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class Policy:
    """A parsed node policy. The default refuses everything (no purpose allowed)."""

    allowed_purposes: tuple[str, ...] = ()
    prohibited_columns: tuple[str, ...] = ()
    levels: Mapping[str, LevelRule] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    quotas: QuotaRule = field(default_factory=QuotaRule)
    auto_approve: tuple[AutoApproveRule, ...] = ()
    grant_ttl_hours: float = 720.0
    budget: BudgetRule | None = None
    dataset_budgets: Mapping[str, BudgetRule] = field(default_factory=dict)

    def rule(self, level: str) -> LevelRule:
        return self.levels.get(level, DEFAULT_LEVELS[level])

    def budget_for(self, dataset: str) -> BudgetRule | None:
        """The dataset's own budget, else the default one, else ``None`` (no limit)."""
        return self.dataset_budgets.get(dataset, self.budget)


def _either(values: Sequence[str]) -> str:
    return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(map(repr, values))


def _has_bundle(job: JobSpec) -> bool:
    return job.uses_bundle or bool(job.bundle.sha256)


# --------------------------------------------------------------------------- parsing


class _Table:
    """Strict reader of one TOML table: types checked, unknown keys named."""

    def __init__(self, where: str, raw: Any, known: Iterable[str]) -> None:
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where or 'the policy'} must be a table")
        self.where, self.raw = where, raw
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise PolicyError(
                f"unknown field {self.name(unknown[0])}; valid fields here: {', '.join(known)}"
            )

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise PolicyError(f"{self.name(key)} must be true or false, got {value!r}")
        return value

    def count(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyError(f"{self.name(key)} must be a whole number >= 1, got {value!r}")
        return value

    def number(self, key: str, default: float | None, upper: float = math.inf) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= upper
        ):
            raise PolicyError(f"{self.name(key)} must be a number > 0, got {value!r}")
        return float(value)

    def words(self, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
        value = self.raw.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            raise PolicyError(f"{self.name(key)} must be a list of strings, got {value!r}")
        for v in value:
            if not pattern.fullmatch(v):
                raise PolicyError(f"{self.name(key)}: {v!r} is not {what}")
        return tuple(dict.fromkeys(value))


_TOP = (
    "allowed_purposes",
    "prohibited_columns",
    "grant_ttl_hours",
    "levels",
    "quotas",
    "budget",
)
_BUDGET_FIELDS = ("epsilon", "delta")
_LEVEL_FIELDS = ("usable", "secure_aggregation", "dp_required", "max_epsilon", "max_delta")
_QUOTA_FIELDS = ("max_rounds", "max_epochs", "max_samples")
_RULE_FIELDS = ("requester", "purpose", "dataset", "max_level", "bundle_sha256")
_COLUMN_RE = re.compile(r".{1,256}", re.S)
_PURPOSE = "a purpose code such as 'medical-research'"


def _level(where: str, raw: Any, name: str) -> LevelRule:
    t = _Table(where, raw, _LEVEL_FIELDS)
    base = DEFAULT_LEVELS[name]
    rule = LevelRule(
        usable=t.flag("usable", base.usable),
        secure_aggregation=t.flag("secure_aggregation", base.secure_aggregation),
        dp_required=t.flag("dp_required", base.dp_required),
        max_epsilon=t.number("max_epsilon", base.max_epsilon),
        max_delta=t.number("max_delta", base.max_delta, upper=1.0),
    )
    if name == "core" and rule.usable:
        raise PolicyError(f"{where}.usable cannot be true: core data is never usable by a job")
    return rule


def _rule(where: str, raw: Any) -> AutoApproveRule:
    t = _Table(where, raw, _RULE_FIELDS)
    level = raw.get("max_level")
    if level is not None and level not in LEVELS:
        raise PolicyError(f"{where}.max_level must be one of {', '.join(LEVELS)}, got {level!r}")
    rule = AutoApproveRule(
        requester=t.words("requester", NAME_RE, "a certificate name"),
        purpose=t.words("purpose", PURPOSE_RE, _PURPOSE),
        dataset=t.words("dataset", NAME_RE, "a dataset name"),
        max_level=level,
        bundle_sha256=t.words("bundle_sha256", _HEX64, "a lowercase sha256 hex digest"),
    )
    if not (rule.requester or rule.purpose or rule.dataset or rule.max_level):
        raise PolicyError(
            f"{where} has no conditions and would approve every job; "
            "name a requester, purpose, dataset or max_level"
        )
    return rule


def _budget(where: str, raw: Any) -> BudgetRule:
    t = _Table(where, raw, _BUDGET_FIELDS)
    eps = t.number("epsilon", None)
    delta = t.number("delta", None, upper=0.5)
    if eps is None or delta is None:
        raise PolicyError(f"[{where}] needs both epsilon and delta")
    return BudgetRule(eps, delta)


def _budgets(raw: Any) -> tuple[BudgetRule | None, dict[str, BudgetRule]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, Mapping):
        raise PolicyError("budget must be a table")
    per = raw.get("datasets", {})
    _Table("budget.datasets", per, per.keys() if isinstance(per, Mapping) else ())
    for name in per:
        if not NAME_RE.fullmatch(name):
            raise PolicyError(f"budget.datasets: {name!r} is not a dataset name")
    own = {k: v for k, v in raw.items() if k != "datasets"}
    default = _budget("budget", own) if own else None
    return default, {name: _budget(f"budget.datasets.{name}", v) for name, v in per.items()}


def parse_policy(raw: Mapping[str, Any]) -> Policy:
    """Validate a policy given as a mapping (parsed TOML)."""
    top = _Table("", raw, (*_TOP, "auto_approve"))
    levels_raw = raw.get("levels", {})
    _Table("levels", levels_raw, LEVELS)
    levels = {
        name: _level(f"levels.{name}", levels_raw[name], name) if name in levels_raw else rule
        for name, rule in DEFAULT_LEVELS.items()
    }
    q = _Table("quotas", raw.get("quotas", {}), _QUOTA_FIELDS)
    rules_raw = raw.get("auto_approve", [])
    if not isinstance(rules_raw, list):
        raise PolicyError("auto_approve must be an array of tables ([[auto_approve]])")
    ttl = top.number("grant_ttl_hours", 720.0)
    assert ttl is not None
    budget_raw = raw.get("budget")
    if isinstance(budget_raw, Mapping):
        _Table("budget", budget_raw, (*_BUDGET_FIELDS, "datasets"))
    budget, dataset_budgets = _budgets(budget_raw)
    return Policy(
        allowed_purposes=top.words("allowed_purposes", PURPOSE_RE, _PURPOSE),
        prohibited_columns=top.words("prohibited_columns", _COLUMN_RE, "a column name"),
        levels=levels,
        quotas=QuotaRule(
            max_rounds=q.count("max_rounds"),
            max_epochs=q.count("max_epochs"),
            max_samples=q.count("max_samples"),
        ),
        auto_approve=tuple(_rule(f"auto_approve[{i}]", r) for i, r in enumerate(rules_raw)),
        grant_ttl_hours=ttl,
        budget=budget,
        dataset_budgets=dataset_budgets,
    )


def load_policy(path: Path) -> Policy:
    """Read and validate a policy TOML file; :class:`PolicyError` names what is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_policy(raw)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- evaluation


class RegistrationLike(Protocol):
    """What :func:`evaluate` reads from a registration (``RegistrationCertificate`` fits)."""

    @property
    def dataset(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def features(self) -> tuple[str, ...]: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def row_count(self) -> int: ...
    @property
    def classification(self) -> str: ...
    @property
    def allowed_purposes(self) -> tuple[str, ...]: ...
    @property
    def prohibited_columns(self) -> tuple[str, ...]: ...

    def level_of(self, column: str) -> str: ...


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one job on one dataset, with everything a grant binds.

    ``reasons`` are the refusal reasons (all of them) for ``refuse``; why no
    standing rule applied for ``pending``; which rule applied for ``auto_approve``.
    """

    outcome: Outcome
    reasons: list[str]
    job_hash: str
    requester: str
    purpose: str
    dataset: str
    columns: tuple[str, ...]
    level: str
    quotas: Quotas
    protections: Protections
    bundle_sha256: str = ""
    rule: int | None = None

    @property
    def refused(self) -> bool:
        return self.outcome == "refuse"

    def grant(self, *, node: str, job_id: str, ttl_hours: float, now: float | None = None) -> Grant:
        """The grant this decision allows (unsigned; sign it with the node's key).

        Raises :class:`PolicyError` for a refusal: no grant may exist for it.
        """
        if self.refused:
            raise PolicyError("a refused job cannot be granted: " + "; ".join(self.reasons))
        issued = time.time() if now is None else now
        return Grant(
            node=node,
            job_id=job_id,
            job_hash=self.job_hash,
            requester=self.requester,
            purpose=self.purpose,
            datasets=(self.dataset,),
            columns=self.columns,
            quotas=self.quotas,
            protections=self.protections,
            expires_at=issued + ttl_hours * 3600.0,
            bundle_sha256=self.bundle_sha256,
            issued_at=issued,
        )


def _cols(columns: Iterable[str]) -> str:
    names = list(columns)
    return ("column " if len(names) == 1 else "columns ") + ", ".join(map(repr, names))


def _level_reasons(
    policy: Policy, level: str, columns: list[str], job: JobSpec, dp: tuple[float, float] | None
) -> list[str]:
    rule, what = policy.rule(level), f"{_cols(columns)} (level {level!r})"
    if level == "core" or not rule.usable:
        return [f"{what}: this node never lets a job use {level!r} data"]
    why = []
    if rule.secure_aggregation and not job.federation.secure:
        why.append(f"{what} require secure aggregation; set federation.secure = true")
    if dp is None:
        if rule.dp_required:
            why.append(f"{what} require differential privacy; the job has none")
    else:
        eps, delta = dp
        if rule.max_epsilon is not None and eps > rule.max_epsilon:
            why.append(f"{what} allow epsilon <= {rule.max_epsilon:g}; the job asks {eps:g}")
        if rule.max_delta is not None and delta > rule.max_delta:
            why.append(f"{what} allow delta <= {rule.max_delta:g}; the job asks {delta:g}")
    return why


def evaluate(
    policy: Policy,
    registration: RegistrationLike,
    job: JobSpec,
    requester: str,
    *,
    dp: tuple[float, float] | None = None,
) -> Decision:
    """Decide whether ``requester`` may run ``job`` on ``registration``'s dataset.

    ``requester`` is the name from the requester's certificate (never a field the
    requester typed). ``dp`` is the job's ``(epsilon, delta)`` if it trains with
    differential privacy. Refusal reasons are all collected, so a developer fixes
    everything in one go.
    """
    if dp is not None and not (dp[0] > 0 and 0 <= dp[1] < 1):
        raise ValueError(f"dp must be (epsilon > 0, 0 <= delta < 1), got {dp!r}")
    why: list[str] = []
    reg = registration
    if job.data.dataset != reg.dataset:
        why.append(f"the job asks for dataset {job.data.dataset!r}, not {reg.dataset!r}")

    # Purpose (one scenario, one purpose).
    if job.purpose not in policy.allowed_purposes:
        allowed = ", ".join(policy.allowed_purposes) or "none"
        why.append(f"purpose {job.purpose!r} is not allowed by this node's policy ({allowed})")
    if reg.allowed_purposes and job.purpose not in reg.allowed_purposes:
        why.append(
            f"purpose {job.purpose!r} is not allowed for dataset {reg.dataset!r} "
            f"({', '.join(reg.allowed_purposes)})"
        )

    # Columns: explicit features, else every registered feature; plus the label.
    implicit = not job.data.features
    features = list(reg.features) if implicit else list(job.data.features)
    unknown = [c for c in features if c not in reg.columns]
    if unknown:
        why.append(f"{_cols(unknown)} not in dataset {reg.dataset!r}")
    used = [c for c in dict.fromkeys([*features, reg.label]) if c in reg.columns]
    banned = set(reg.prohibited_columns) | set(policy.prohibited_columns)
    bad = [c for c in used if c in banned]
    if bad:
        hint = " (the job names no data.features, so it uses them all)" if implicit else ""
        why.append(f"{_cols(bad)} prohibited (negative list){hint}")

    # Classification: each column at max(its level, the dataset's level).
    by_level: dict[str, list[str]] = {}
    for c in used:
        by_level.setdefault(reg.level_of(c), []).append(c)
    for level in sorted(by_level, key=level_rank):
        why.extend(_level_reasons(policy, level, by_level[level], job, dp))
    level = max_level(by_level, floor=reg.classification)

    # Quotas (per job at this node).
    rounds, epochs = job.federation.rounds, job.training.epochs
    samples = reg.row_count * epochs * rounds
    q = policy.quotas
    if q.max_rounds is not None and rounds > q.max_rounds:
        why.append(f"federation.rounds = {rounds} exceeds this node's quota of {q.max_rounds}")
    if q.max_epochs is not None and epochs > q.max_epochs:
        why.append(
            f"training.epochs = {epochs} exceeds this node's quota of {q.max_epochs} per round"
        )
    if q.max_samples is not None and samples > q.max_samples:
        why.append(
            f"the job would use {samples} samples ({reg.row_count} rows x {epochs} epochs x "
            f"{rounds} rounds), above this node's quota of {q.max_samples}"
        )

    decision = Decision(
        outcome="refuse",
        reasons=why,
        job_hash=job.job_hash(),
        requester=requester,
        purpose=job.purpose,
        dataset=job.data.dataset,
        columns=tuple(used),
        level=level,
        quotas=Quotas(rounds=rounds, epochs=epochs, samples=samples),
        protections=Protections(
            secure_aggregation=job.federation.secure,
            dp_epsilon=dp[0] if dp else None,
            dp_delta=dp[1] if dp else None,
        ),
        bundle_sha256=job.bundle.sha256,
    )
    if why:
        return decision
    misses = []
    for i, rule in enumerate(policy.auto_approve):
        miss = rule.mismatch(job, requester, level)
        if miss is None:
            return replace(
                decision,
                outcome="auto_approve",
                reasons=[f"auto-approved by standing rule auto_approve[{i}]"],
                rule=i,
            )
        misses.append(f"auto_approve[{i}]: {miss}")
    pending = ["no standing rule approves this job; the node's operator must decide"]
    if _has_bundle(job):
        pending.insert(
            0,
            f"the job carries a code bundle ({job.bundle.sha256 or 'hash not bound'}); "
            "only an operator, or a rule listing that hash, can approve it",
        )
    return replace(decision, outcome="pending", reasons=pending + misses)
