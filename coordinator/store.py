"""The coordinator's store: the source of truth for jobs, rounds, nodes and tasks.

SQLAlchemy Core over SQLite (WAL) by default, so PostgreSQL is a change of URL.
A round's outcome (new global model, optimizer state, metrics, participants)
is committed in one transaction, so a coordinator killed at any moment resumes
a running job from its last completed round: never losing one, never
repeating one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("job_hash", sa.String(64), nullable=False),
    sa.Column("bundle_sha", sa.String(64), nullable=False, default=""),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("rounds_total", sa.Integer, nullable=False),
    sa.Column("rounds_completed", sa.Integer, nullable=False, default=0),
    # Model after the last completed round (round 0 = initial, standardised).
    sa.Column("model_sha", sa.String(64), nullable=False, default=""),
    sa.Column("model_size", sa.BigInteger, nullable=False, default=0),
    sa.Column("strategy_state_sha", sa.String(64), nullable=False, default=""),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("metrics_json", sa.Text, nullable=False, default="{}"),
    sa.Column("nodes_json", sa.Text, nullable=False, default="[]"),
    sa.Column("model_sha", sa.String(64), nullable=False, default=""),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float, nullable=False, default=0.0),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("datasets_json", sa.Text, nullable=False, default="[]"),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("node", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("result_sha", sa.String(64), nullable=False, default=""),
    sa.Column("num_examples", sa.BigInteger, nullable=False, default=0),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("finished", sa.Float, nullable=False, default=0.0),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), nullable=False, index=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("round", sa.Integer, nullable=False, default=0),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("metrics_json", sa.Text, nullable=False, default="{}"),
    sa.Column("state", sa.String(32), nullable=False, default=""),
)

job_privacy = sa.Table(
    "job_privacy",
    metadata,
    # The differential-privacy guarantee a finished job states (JSON; see JobRunner).
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("privacy_json", sa.Text, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

valuation_updates = sa.Table(
    "valuation_updates",
    metadata,
    # Valuation material, kept as blobs for the operator with the model the round
    # started from. valuation.mode = "clear": each node's update (``node`` = the node,
    # ``num_examples`` its examples); "secure": the noised coalition means (``node`` =
    # "all" or "without.<node>", ``num_examples`` the coalition's member count).
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("node", sa.String(128), primary_key=True),
    sa.Column("start_model_sha", sa.String(64), nullable=False),
    sa.Column("delta_sha", sa.String(64), nullable=False),
    sa.Column("num_examples", sa.BigInteger, nullable=False),
)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("node", sa.String(64), primary_key=True),
    # granted | refused | pending | revoked
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("grant_json", sa.Text, nullable=False, default=""),
    sa.Column("updated", sa.Float, nullable=False),
)

receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("receipt_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("node", sa.String(64), nullable=False),
    # The node-signed receipt with the coordinator's countersignature.
    sa.Column("receipt_json", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

attestations = sa.Table(
    "attestations",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("node", sa.String(64), primary_key=True),
    sa.Column("attestation_json", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})
ACTIVE_STATES = frozenset({"pending_grants", "running"})


@dataclass(frozen=True)
class JobRow:
    job_id: str
    name: str
    owner: str
    spec_json: str
    job_hash: str
    bundle_sha: str
    state: str
    reason: str
    rounds_total: int
    rounds_completed: int
    model_sha: str
    model_size: int
    strategy_state_sha: str
    created: float
    updated: float


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    state: str
    attempt: int
    metrics: dict[str, float]
    nodes: list[str]
    model_sha: str
    started: float
    finished: float


@dataclass(frozen=True)
class EventRow:
    seq: int
    job_id: str
    time: float
    kind: str
    round: int
    message: str
    metrics: dict[str, float]
    state: str


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Store:
    """Typed operations on the coordinator database."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._event_cond = threading.Condition()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """A transaction; event watchers are woken once it has committed."""
        with self.engine.begin() as conn:
            yield conn
        self._notify()

    # -- jobs --------------------------------------------------------------
    def create_job(
        self,
        *,
        job_id: str,
        name: str,
        owner: str,
        spec_json: str,
        job_hash: str,
        bundle_sha: str,
        rounds_total: int,
    ) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(
                jobs.insert().values(
                    job_id=job_id,
                    name=name,
                    owner=owner,
                    spec_json=spec_json,
                    job_hash=job_hash,
                    bundle_sha=bundle_sha,
                    state="pending_grants",
                    reason="",
                    rounds_total=rounds_total,
                    rounds_completed=0,
                    model_sha="",
                    model_size=0,
                    strategy_state_sha="",
                    created=now,
                    updated=now,
                )
            )
            self._event(
                c,
                job_id,
                "submitted",
                state="pending_grants",
                message=f"job {name} submitted by {owner}",
            )

    def get_job(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as c:
            row = c.execute(jobs.select().where(jobs.c.job_id == job_id)).mappings().first()
        return JobRow(**row) if row else None

    def list_jobs(
        self, *, owner: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[JobRow]:
        q = jobs.select().order_by(jobs.c.created.desc()).limit(limit)
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        if state:
            q = q.where(jobs.c.state == state)
        with self.engine.connect() as c:
            return [JobRow(**r) for r in c.execute(q).mappings()]

    def active_jobs(self) -> list[JobRow]:
        q = jobs.select().where(jobs.c.state.in_(sorted(ACTIVE_STATES)))
        with self.engine.connect() as c:
            return [JobRow(**r) for r in c.execute(q.order_by(jobs.c.created)).mappings()]

    def set_state(self, job_id: str, state: str, reason: str = "") -> bool:
        """Move a job to ``state``; a terminal job never changes again. Returns success."""
        with self.tx() as c:
            res = c.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .where(jobs.c.state.not_in(sorted(TERMINAL_STATES)))
                .values(state=state, reason=reason, updated=time.time())
            )
            if res.rowcount:
                msg = f"job {state}" + (f": {reason}" if reason else "")
                self._event(c, job_id, "state", state=state, message=msg)
            return bool(res.rowcount)

    def set_initial_model(self, job_id: str, model_sha: str, model_size: int) -> None:
        with self.tx() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .values(model_sha=model_sha, model_size=model_size, updated=time.time())
            )

    def set_privacy(self, job_id: str, privacy_json: str) -> None:
        """Record the DP guarantee the job states (replacing an earlier statement)."""
        with self.tx() as c:
            c.execute(job_privacy.delete().where(job_privacy.c.job_id == job_id))
            c.execute(
                job_privacy.insert().values(
                    job_id=job_id, privacy_json=privacy_json, updated=time.time()
                )
            )

    def privacy(self, job_id: str) -> str:
        """The job's stated DP guarantee (JSON), or ``""`` if it has none (yet)."""
        q = sa.select(job_privacy.c.privacy_json).where(job_privacy.c.job_id == job_id)
        with self.engine.connect() as c:
            return str(c.execute(q).scalar_one_or_none() or "")

    def set_valuation_updates(
        self, job_id: str, rnd: int, start_model_sha: str, updates: dict[str, tuple[str, int]]
    ) -> None:
        """Keep round ``rnd``'s clear-text updates (node -> (delta blob sha, examples))."""
        with self.tx() as c:
            c.execute(
                valuation_updates.delete().where(
                    valuation_updates.c.job_id == job_id, valuation_updates.c.round == rnd
                )
            )
            for node, (sha, n) in sorted(updates.items()):
                c.execute(
                    valuation_updates.insert().values(
                        job_id=job_id,
                        round=rnd,
                        node=node,
                        start_model_sha=start_model_sha,
                        delta_sha=sha,
                        num_examples=n,
                    )
                )

    def valuation_updates(self, job_id: str) -> list[dict[str, Any]]:
        q = (
            valuation_updates.select()
            .where(valuation_updates.c.job_id == job_id)
            .order_by(valuation_updates.c.round, valuation_updates.c.node)
        )
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # -- rounds --------------------------------------------------------------
    def start_round(self, job_id: str, rnd: int, attempt: int, node_names: Sequence[str]) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(rounds.delete().where(rounds.c.job_id == job_id, rounds.c.round == rnd))
            c.execute(
                rounds.insert().values(
                    job_id=job_id,
                    round=rnd,
                    state="running",
                    attempt=attempt,
                    metrics_json="{}",
                    nodes_json=json.dumps(list(node_names)),
                    model_sha="",
                    started=now,
                    finished=0.0,
                )
            )
            self._event(
                c,
                job_id,
                "round_started",
                round=rnd,
                message=f"round {rnd} started with {len(node_names)} nodes"
                + (f" (attempt {attempt + 1})" if attempt else ""),
            )

    def fail_round(self, job_id: str, rnd: int, reason: str) -> None:
        with self.tx() as c:
            c.execute(
                rounds.update()
                .where(rounds.c.job_id == job_id, rounds.c.round == rnd)
                .values(state="failed", finished=time.time())
            )
            self._event(c, job_id, "round_failed", round=rnd, message=reason)

    def complete_round(
        self,
        job_id: str,
        rnd: int,
        *,
        model_sha: str,
        model_size: int,
        strategy_state_sha: str,
        metrics: Mapping[str, float],
        node_names: Sequence[str],
    ) -> None:
        """Atomically record a finished round and advance the job's model."""
        now = time.time()
        with self.tx() as c:
            job = c.execute(
                sa.select(jobs.c.rounds_completed, jobs.c.state).where(jobs.c.job_id == job_id)
            ).first()
            if job is None or job.rounds_completed != rnd - 1 or job.state != "running":
                raise RuntimeError(f"job {job_id}: round {rnd} is not the next round to record")
            c.execute(
                rounds.update()
                .where(rounds.c.job_id == job_id, rounds.c.round == rnd)
                .values(
                    state="completed",
                    metrics_json=json.dumps(dict(metrics)),
                    nodes_json=json.dumps(list(node_names)),
                    model_sha=model_sha,
                    finished=now,
                )
            )
            c.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .values(
                    rounds_completed=rnd,
                    model_sha=model_sha,
                    model_size=model_size,
                    strategy_state_sha=strategy_state_sha,
                    updated=now,
                )
            )
            self._event(
                c,
                job_id,
                "round_completed",
                round=rnd,
                metrics=metrics,
                message=f"round {rnd} completed with {len(node_names)} nodes",
            )

    def list_rounds(self, job_id: str) -> list[RoundRow]:
        q = rounds.select().where(rounds.c.job_id == job_id).order_by(rounds.c.round)
        with self.engine.connect() as c:
            return [
                RoundRow(
                    job_id=r["job_id"],
                    round=r["round"],
                    state=r["state"],
                    attempt=r["attempt"],
                    metrics=json.loads(r["metrics_json"]),
                    nodes=json.loads(r["nodes_json"]),
                    model_sha=r["model_sha"],
                    started=r["started"],
                    finished=r["finished"],
                )
                for r in c.execute(q).mappings()
            ]

    # -- tasks ---------------------------------------------------------------
    def create_task(
        self, *, task_id: str, job_id: str, rnd: int, attempt: int, node: str, kind: str
    ) -> None:
        with self.tx() as c:
            c.execute(
                tasks.insert().values(
                    task_id=task_id,
                    job_id=job_id,
                    round=rnd,
                    attempt=attempt,
                    node=node,
                    kind=kind,
                    state="sent",
                    error="",
                    result_sha="",
                    num_examples=0,
                    created=time.time(),
                    finished=0.0,
                )
            )

    def finish_task(
        self,
        task_id: str,
        *,
        ok: bool,
        error: str = "",
        result_sha: str = "",
        num_examples: int = 0,
    ) -> None:
        with self.tx() as c:
            c.execute(
                tasks.update()
                .where(tasks.c.task_id == task_id)
                .values(
                    state="done" if ok else "failed",
                    error=error,
                    result_sha=result_sha,
                    num_examples=num_examples,
                    finished=time.time(),
                )
            )

    def answer_offers(self, job_id: str, node: str, outcome: str) -> None:
        """Close the offer tasks a node has now answered."""
        with self.tx() as c:
            c.execute(
                tasks.update()
                .where(tasks.c.job_id == job_id, tasks.c.node == node)
                .where(tasks.c.kind == "TASK_OFFER", tasks.c.state == "sent")
                .values(
                    state="done",
                    error="" if outcome == "granted" else outcome,
                    finished=time.time(),
                )
            )

    def task_counts(self, job_id: str) -> dict[tuple[int, str], int]:
        q = (
            sa.select(tasks.c.round, tasks.c.state, sa.func.count())
            .where(tasks.c.job_id == job_id)
            .group_by(tasks.c.round, tasks.c.state)
        )
        with self.engine.connect() as c:
            return {(r[0], r[1]): int(r[2]) for r in c.execute(q)}

    # -- decisions, receipts, attestations -------------------------------------
    def set_decision(
        self, job_id: str, node: str, outcome: str, reason: str = "", grant_json: str = ""
    ) -> None:
        """Record a node's decision on a job (the latest one wins)."""
        now = time.time()
        with self.tx() as c:
            c.execute(
                decisions.delete().where(decisions.c.job_id == job_id, decisions.c.node == node)
            )
            c.execute(
                decisions.insert().values(
                    job_id=job_id,
                    node=node,
                    outcome=outcome,
                    reason=reason,
                    grant_json=grant_json,
                    updated=now,
                )
            )

    def decisions(self, job_id: str) -> dict[str, dict[str, Any]]:
        q = decisions.select().where(decisions.c.job_id == job_id).order_by(decisions.c.node)
        with self.engine.connect() as c:
            return {r["node"]: dict(r) for r in c.execute(q).mappings()}

    def add_receipt(self, receipt_id: str, job_id: str, rnd: int, node: str, data: str) -> None:
        with self.tx() as c:
            c.execute(
                receipts.insert().values(
                    receipt_id=receipt_id,
                    job_id=job_id,
                    round=rnd,
                    node=node,
                    receipt_json=data,
                    created=time.time(),
                )
            )

    def receipts(self, job_id: str) -> list[dict[str, Any]]:
        q = receipts.select().where(receipts.c.job_id == job_id).order_by(receipts.c.created)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def add_attestation(self, job_id: str, node: str, data: str) -> None:
        with self.tx() as c:
            c.execute(
                attestations.delete().where(
                    attestations.c.job_id == job_id, attestations.c.node == node
                )
            )
            c.execute(
                attestations.insert().values(
                    job_id=job_id, node=node, attestation_json=data, created=time.time()
                )
            )

    def attestations(self, job_id: str) -> list[dict[str, Any]]:
        q = attestations.select().where(attestations.c.job_id == job_id)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # -- nodes ---------------------------------------------------------------
    def upsert_node(self, name: str, datasets: list[dict[str, Any]]) -> None:
        now = time.time()
        payload = json.dumps(datasets, sort_keys=True)
        with self.tx() as c:
            exists = c.execute(sa.select(nodes.c.name).where(nodes.c.name == name)).first()
            if exists:
                c.execute(
                    nodes.update()
                    .where(nodes.c.name == name)
                    .values(datasets_json=payload, last_seen=now)
                )
            else:
                c.execute(
                    nodes.insert().values(
                        name=name, datasets_json=payload, first_seen=now, last_seen=now
                    )
                )

    def touch_node(self, name: str) -> None:
        with self.tx() as c:
            c.execute(nodes.update().where(nodes.c.name == name).values(last_seen=time.time()))

    def list_nodes(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [
                {
                    "name": r["name"],
                    "datasets": json.loads(r["datasets_json"]),
                    "last_seen": r["last_seen"],
                }
                for r in c.execute(nodes.select().order_by(nodes.c.name)).mappings()
            ]

    # -- events --------------------------------------------------------------
    def _event(
        self,
        c: Connection,
        job_id: str,
        kind: str,
        *,
        round: int = 0,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        state: str = "",
    ) -> None:
        c.execute(
            events.insert().values(
                job_id=job_id,
                time=time.time(),
                kind=kind,
                round=round,
                message=message,
                metrics_json=json.dumps(dict(metrics or {})),
                state=state,
            )
        )

    def _notify(self) -> None:
        with self._event_cond:
            self._event_cond.notify_all()

    def add_event(
        self,
        job_id: str,
        kind: str,
        *,
        round: int = 0,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        with self.tx() as c:
            self._event(c, job_id, kind, round=round, message=message, metrics=metrics)

    def events_after(self, job_id: str, after_seq: int, limit: int = 500) -> list[EventRow]:
        q = (
            events.select()
            .where(events.c.job_id == job_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as c:
            return [
                EventRow(
                    seq=r["seq"],
                    job_id=r["job_id"],
                    time=r["time"],
                    kind=r["kind"],
                    round=r["round"],
                    message=r["message"],
                    metrics=json.loads(r["metrics_json"]),
                    state=r["state"],
                )
                for r in c.execute(q).mappings()
            ]

    def wait_for_events(self, timeout: float) -> None:
        """Block until some event is recorded (or timeout)."""
        with self._event_cond:
            self._event_cond.wait(timeout)
