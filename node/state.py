"""The node's own small database: registered datasets with their registration
certificates, the grants it decided, the usage receipts it signed, its
destruction attestations, and its audit ledger (:class:`wharf.ledger.Ledger`,
tables ``ledger`` and ``ledger_certs``) — all in one SQLite file,
``STATE_DIR/node.db``, so ``wharf audit verify STATE_DIR/node.db`` checks it.

It survives restarts with the node's identity. The daemon and the ``wharf node``
commands open it concurrently (the operator approves a grant while the daemon
runs): writes are short transactions, a decision and its ledger entry commit
together, and a transaction that loses a race is retried
(:meth:`NodeState.transact`).

In plaintext mode the node has no key: the ledger is opened read-only and
nothing is appended to it; grants and receipts are kept unsigned, for the
node's own checks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from wharf.identity import Signer
from wharf.ledger import Ledger
from wharf.records import SignedRecord

__all__ = [
    "GrantOutcome",
    "GrantRow",
    "NodeState",
    "ReceiptRow",
    "RegisteredDataset",
    "Spend",
    "StateConflict",
]

T = TypeVar("T")
GrantOutcome = Literal["pending", "granted", "refused", "revoked"]
OUTCOMES: tuple[GrantOutcome, ...] = ("pending", "granted", "refused", "revoked")

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("label", sa.String(256), nullable=False),
    sa.Column("features_json", sa.Text, nullable=False),
    sa.Column("feature_shape_json", sa.Text, nullable=False),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("schema_hash", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("added", sa.Float, nullable=False),
    # Registration (added by issue 5; older databases are migrated in place).
    sa.Column("classification", sa.String(16), nullable=False, server_default="general"),
    sa.Column("column_levels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("purposes_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("prohibited_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("certificate_json", sa.Text, nullable=False, server_default=""),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("job_hash", sa.String(64), nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("requester", sa.String(64), nullable=False),
    sa.Column("dataset", sa.String(64), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    # The signed grant (SignedRecord JSON); "" unless granted, and in plaintext mode.
    sa.Column("grant_json", sa.Text, nullable=False),
    # The grant's body (what the node checks in plaintext mode, where nothing is signed).
    sa.Column("grant_body_json", sa.Text, nullable=False),
    sa.Column("bundle_sha", sa.String(64), nullable=False),
    # Whether the coordinator has been told the current outcome (see ``version``).
    sa.Column("reported", sa.Boolean, nullable=False),
    # Bumped on every change of outcome, so marking "reported" never hides a newer one.
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)

receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("receipt_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    # rows_used x epochs: the unit of the grant's samples quota.
    sa.Column("samples", sa.BigInteger, nullable=False),
    # SignedRecord JSON (countersigned once the coordinator accepted it); in plaintext
    # mode the unsigned receipt body.
    sa.Column("json", sa.Text, nullable=False),
    sa.Column("signed", sa.Boolean, nullable=False),
    sa.Column("countersigned", sa.Boolean, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

attestations = sa.Table(
    "attestations",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    # SignedRecord JSON of the destruction attestation; unsigned body in plaintext mode.
    sa.Column("json", sa.Text, nullable=False),
    sa.Column("signed", sa.Boolean, nullable=False),
    sa.Column("reported", sa.Boolean, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)


privacy_spends = sa.Table(
    "privacy_spends",
    metadata,
    sa.Column("dataset", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("epsilon", sa.Float, nullable=False),
    sa.Column("delta", sa.Float, nullable=False),
    # The job's DP plan on this dataset (guarantees and mechanism parameters), as granted.
    sa.Column("plan_json", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

releases = sa.Table(
    "releases",
    metadata,
    # (job, round) whose aggregate this node let be revealed (secure: it sent its unmask
    # shares as a survivor; plaintext: it uploaded its update). At most one per round.
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)


class StateConflict(RuntimeError):
    """A row changed under a read-modify-write; :meth:`NodeState.transact` retries."""


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    path: str
    format: str
    label: str
    features: list[str]
    feature_shape: list[int]
    schema: list[list[str]]
    schema_hash: str
    fingerprint: str
    rows: int
    added: float
    classification: str = "general"
    column_levels: dict[str, str] | None = None
    purposes: list[str] | None = None
    prohibited: list[str] | None = None
    certificate_json: str = ""

    @property
    def num_rows(self) -> int:
        """``rows`` under the name :class:`wharf.records.DescriptionLike` reads."""
        return self.rows

    @property
    def certificate(self) -> SignedRecord | None:
        """The signed registration certificate, if any (parsed, **not** verified)."""
        return SignedRecord.from_json(self.certificate_json) if self.certificate_json else None


@dataclass(frozen=True)
class GrantRow:
    """The node's decision on one offered job (one scenario, one authorisation)."""

    job_id: str
    job_hash: str
    spec_json: str
    requester: str
    dataset: str
    outcome: GrantOutcome
    reason: str
    grant_json: str
    grant_body_json: str
    bundle_sha: str
    reported: bool
    version: int
    created: float
    updated: float


@dataclass(frozen=True)
class ReceiptRow:
    receipt_id: str
    job_id: str
    round: int
    samples: int
    json: str
    signed: bool
    countersigned: bool
    created: float


@dataclass(frozen=True)
class Spend:
    """One job's charge against one dataset's privacy budget."""

    dataset: str
    job_id: str
    epsilon: float
    delta: float
    plan_json: str
    created: float


@dataclass(frozen=True)
class AttestationRow:
    job_id: str
    json: str
    signed: bool
    reported: bool
    created: float


def _pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _migrate(engine: Engine) -> None:
    """Add columns that newer versions define to tables an older version created."""
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        if not missing:
            continue
        with engine.begin() as conn:
            for col in missing:
                ddl = col.type.compile(dialect=engine.dialect)
                default = col.server_default
                clause = ""
                if default is not None:
                    arg = getattr(default, "arg", "")
                    clause = " NOT NULL DEFAULT '" + str(arg).replace("'", "''") + "'"
                conn.exec_driver_sql(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {ddl}{clause}'
                )


class NodeState:
    """Typed access to the node database under ``state_dir``.

    ``signer`` is the node's certified key: with it, :attr:`ledger` can be appended
    to (the daemon, and the commands that sign). Without it the ledger is
    read-only and :meth:`log` / :meth:`log_record` do nothing (plaintext mode, and
    commands that only read).
    """

    def __init__(self, state_dir: Path, signer: Signer | None = None) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.engine: Engine = sa.create_engine(f"sqlite:///{state_dir / 'node.db'}")
        event.listen(self.engine, "connect", _pragmas)
        metadata.create_all(self.engine)
        _migrate(self.engine)
        self.ledger = Ledger(self.engine, signer)

    def close(self) -> None:
        """Fold the write-ahead log into ``node.db`` and close connections, so the file
        alone (copied, backed up, audited) holds everything."""
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except OperationalError:
            pass  # another process is writing: its own close will checkpoint
        self.engine.dispose()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "node.db"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"

    @property
    def bundle_dir(self) -> Path:
        """Offered jobs' code bundles, by SHA-256, kept as evidence of what was approved."""
        return self.state_dir / "bundles"

    def bundle_path(self, sha256: str) -> Path:
        return self.bundle_dir / f"{sha256}.zip"

    @property
    def signs(self) -> bool:
        """Whether this state has a key to sign ledger entries with."""
        return self.ledger.signer is not None

    def attach_signer(self, signer: Signer) -> None:
        """Sign ledger entries with ``signer`` from now on (the node's own key only)."""
        current = self.ledger.signer
        if current is not None and bytes(current.cert_pem) != bytes(signer.cert_pem):
            raise ValueError("this node state is already opened with another signing key")
        self.ledger.signer = signer

    # -- transactions and the ledger ----------------------------------------------------
    def transact(self, fn: Callable[[Connection], T], attempts: int = 50) -> T:
        """Run ``fn`` in one transaction, retrying when another writer got there first
        (a ledger sequence taken, the database busy, or a :class:`StateConflict`)."""
        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except (IntegrityError, OperationalError, StateConflict):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.002 * (attempt + 1))
        raise AssertionError("unreachable")

    def log(self, conn: Connection, kind: str, job_id: str, payload: dict[str, Any]) -> None:
        """Append a ledger entry inside ``conn``'s transaction (no-op without a key)."""
        if self.signs:
            self.ledger.append(kind, job_id, payload, conn=conn)

    def log_record(
        self,
        conn: Connection,
        signed: SignedRecord,
        *,
        kind: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Append a signed record to the ledger inside ``conn``'s transaction."""
        if self.signs:
            self.ledger.append_record(signed, kind=kind, extra=extra, conn=conn)

    # -- datasets -------------------------------------------------------------------------
    def add_dataset(
        self,
        name: str,
        path: Path,
        *,
        fmt: str,
        label: str,
        features: list[str],
        feature_shape: list[int],
        schema: list[list[str]],
        schema_hash: str,
        fingerprint: str,
        rows: int,
        replace: bool = False,
        classification: str = "general",
        column_levels: dict[str, str] | None = None,
        purposes: list[str] | None = None,
        prohibited: list[str] | None = None,
        certificate: SignedRecord | None = None,
    ) -> RegisteredDataset:
        """Register (or with ``replace`` re-register) a dataset; a signed certificate is
        stored with it and logged as a ``registration`` ledger entry in one transaction."""

        def write(c: Connection) -> None:
            exists = c.execute(sa.select(datasets.c.name).where(datasets.c.name == name)).first()
            if exists and not replace:
                raise ValueError(f"dataset {name!r} is already registered (use --replace)")
            if exists:
                c.execute(datasets.delete().where(datasets.c.name == name))
            c.execute(
                datasets.insert().values(
                    name=name,
                    path=str(path.resolve()),
                    format=fmt,
                    label=label,
                    features_json=json.dumps(features),
                    feature_shape_json=json.dumps(feature_shape),
                    schema_json=json.dumps(schema),
                    schema_hash=schema_hash,
                    fingerprint=fingerprint,
                    rows=rows,
                    added=time.time(),
                    classification=classification,
                    column_levels_json=json.dumps(dict(sorted((column_levels or {}).items()))),
                    purposes_json=json.dumps(list(purposes or [])),
                    prohibited_json=json.dumps(list(prohibited or [])),
                    certificate_json=certificate.to_json() if certificate else "",
                )
            )
            if certificate is not None:
                self.log_record(c, certificate)

        self.transact(write)
        got = self.get_dataset(name)
        assert got is not None
        return got

    def set_certificate(self, name: str, certificate: SignedRecord) -> None:
        """Attach a signed certificate to an already registered dataset (and log it)."""

        def write(c: Connection) -> None:
            done = c.execute(
                datasets.update()
                .where(datasets.c.name == name)
                .values(certificate_json=certificate.to_json())
            ).rowcount
            if not done:
                raise ValueError(f"no dataset named {name!r} is registered")
            self.log_record(c, certificate)

        self.transact(write)

    def get_dataset(self, name: str) -> RegisteredDataset | None:
        with self.engine.connect() as c:
            r = c.execute(datasets.select().where(datasets.c.name == name)).mappings().first()
        return _dataset(r) if r else None

    def list_datasets(self) -> list[RegisteredDataset]:
        with self.engine.connect() as c:
            return [
                _dataset(r)
                for r in c.execute(datasets.select().order_by(datasets.c.name)).mappings()
            ]

    def remove_dataset(self, name: str) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(datasets.delete().where(datasets.c.name == name)).rowcount)

    # -- grants ---------------------------------------------------------------------------
    def get_grant(self, job_id: str, conn: Connection | None = None) -> GrantRow | None:
        if conn is not None:
            r = conn.execute(grants.select().where(grants.c.job_id == job_id)).mappings().first()
            return _grant(r) if r else None
        with self.engine.connect() as c:
            return self.get_grant(job_id, c)

    def find_grant(self, prefix: str) -> GrantRow:
        """The grant whose job id is ``prefix`` or uniquely starts with it (ValueError if not)."""
        exact = self.get_grant(prefix)
        if exact is not None:
            return exact
        if not prefix:
            raise ValueError("give a job id")
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self.engine.connect() as c:
            rows = (
                c.execute(
                    grants.select().where(grants.c.job_id.like(pattern, escape="\\")).limit(2)
                )
                .mappings()
                .all()
            )
        if not rows:
            raise ValueError(
                f"no job {prefix!r} was offered to this node (see `wharf node grants`)"
            )
        if len(rows) > 1:
            raise ValueError(f"job id prefix {prefix!r} is ambiguous; give more characters")
        return _grant(rows[0])

    def list_grants(self, outcome: str | None = None) -> list[GrantRow]:
        q = grants.select().order_by(grants.c.updated.desc())
        if outcome is not None:
            q = q.where(grants.c.outcome == outcome)
        with self.engine.connect() as c:
            return [_grant(r) for r in c.execute(q).mappings()]

    def insert_grant(self, conn: Connection, **values: Any) -> None:
        now = time.time()
        values.setdefault("grant_json", "")
        values.setdefault("grant_body_json", "")
        conn.execute(
            grants.insert().values(reported=False, version=1, created=now, updated=now, **values)
        )

    def update_grant(self, conn: Connection, row: GrantRow, **values: Any) -> None:
        """Change a grant's outcome (and report it anew); StateConflict if it changed
        since ``row`` was read."""
        done = conn.execute(
            grants.update()
            .where(grants.c.job_id == row.job_id, grants.c.version == row.version)
            .values(reported=False, version=row.version + 1, updated=time.time(), **values)
        ).rowcount
        if not done:
            raise StateConflict(f"grant for job {row.job_id} changed meanwhile")

    def unreported_grants(self) -> list[GrantRow]:
        with self.engine.connect() as c:
            q = grants.select().where(grants.c.reported.is_(False)).order_by(grants.c.updated)
            return [_grant(r) for r in c.execute(q).mappings()]

    def mark_reported(self, job_id: str, version: int) -> bool:
        """Record that the coordinator knows outcome ``version`` (no-op if it changed since)."""
        with self.engine.begin() as c:
            return bool(
                c.execute(
                    grants.update()
                    .where(grants.c.job_id == job_id, grants.c.version == version)
                    .values(reported=True)
                ).rowcount
            )

    # -- receipts -------------------------------------------------------------------------
    def add_receipt(self, conn: Connection, row: ReceiptRow) -> None:
        conn.execute(
            receipts.insert().values(
                receipt_id=row.receipt_id,
                job_id=row.job_id,
                round=row.round,
                samples=row.samples,
                json=row.json,
                signed=row.signed,
                countersigned=row.countersigned,
                created=row.created,
            )
        )

    def set_countersigned(self, conn: Connection, receipt_id: str, json_text: str) -> bool:
        return bool(
            conn.execute(
                receipts.update()
                .where(receipts.c.receipt_id == receipt_id)
                .values(json=json_text, countersigned=True)
            ).rowcount
        )

    def receipts_for(self, job_id: str) -> list[ReceiptRow]:
        with self.engine.connect() as c:
            q = receipts.select().where(receipts.c.job_id == job_id).order_by(receipts.c.created)
            return [_receipt(r) for r in c.execute(q).mappings()]

    def get_receipt(self, receipt_id: str) -> ReceiptRow | None:
        with self.engine.connect() as c:
            r = (
                c.execute(receipts.select().where(receipts.c.receipt_id == receipt_id))
                .mappings()
                .first()
            )
        return _receipt(r) if r else None

    def samples_used(self, job_id: str) -> int:
        """Sample visits (rows x epochs) over every receipt of ``job_id``."""
        with self.engine.connect() as c:
            total = c.execute(
                sa.select(sa.func.coalesce(sa.func.sum(receipts.c.samples), 0)).where(
                    receipts.c.job_id == job_id
                )
            ).scalar_one()
        return int(total)

    # -- destruction attestations ------------------------------------------------------------
    def put_attestation(self, conn: Connection, job_id: str, json_text: str, signed: bool) -> None:
        conn.execute(attestations.delete().where(attestations.c.job_id == job_id))
        conn.execute(
            attestations.insert().values(
                job_id=job_id, json=json_text, signed=signed, reported=False, created=time.time()
            )
        )

    def get_attestation(self, job_id: str) -> AttestationRow | None:
        with self.engine.connect() as c:
            r = (
                c.execute(attestations.select().where(attestations.c.job_id == job_id))
                .mappings()
                .first()
            )
        return _attestation(r) if r else None

    def unreported_attestations(self) -> list[AttestationRow]:
        with self.engine.connect() as c:
            q = attestations.select().where(
                attestations.c.reported.is_(False), attestations.c.signed.is_(True)
            )
            return [_attestation(r) for r in c.execute(q).mappings()]

    def mark_attestation_reported(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                attestations.update().where(attestations.c.job_id == job_id).values(reported=True)
            )

    # -- privacy budget and releases ----------------------------------------------------------
    def add_spend(
        self, conn: Connection, dataset: str, job_id: str, epsilon: float, delta: float, plan: str
    ) -> None:
        """Charge ``job_id``'s (epsilon, delta) to ``dataset`` inside ``conn``'s transaction."""
        conn.execute(
            privacy_spends.insert().values(
                dataset=dataset,
                job_id=job_id,
                epsilon=float(epsilon),
                delta=float(delta),
                plan_json=plan,
                created=time.time(),
            )
        )

    def spends(self, dataset: str | None = None, conn: Connection | None = None) -> list[Spend]:
        """Every charge (oldest first), for one dataset or all."""
        q = privacy_spends.select().order_by(privacy_spends.c.created)
        if dataset is not None:
            q = q.where(privacy_spends.c.dataset == dataset)
        if conn is not None:
            return [_spend(r) for r in conn.execute(q).mappings()]
        with self.engine.connect() as c:
            return [_spend(r) for r in c.execute(q).mappings()]

    def add_release(self, job_id: str, rnd: int) -> bool:
        """Record that ``job_id``'s round ``rnd`` aggregate was released with this node's
        data; False if it already was (the caller must then refuse to release it again)."""
        try:
            with self.engine.begin() as c:
                c.execute(releases.insert().values(job_id=job_id, round=rnd, created=time.time()))
        except IntegrityError:
            return False
        return True

    def released_rounds(self, job_id: str) -> list[int]:
        with self.engine.connect() as c:
            q = sa.select(releases.c.round).where(releases.c.job_id == job_id)
            return sorted(int(r) for r in c.execute(q).scalars())


def _dataset(r: sa.RowMapping) -> RegisteredDataset:
    return RegisteredDataset(
        name=r["name"],
        path=r["path"],
        format=r["format"],
        label=r["label"],
        features=json.loads(r["features_json"]),
        feature_shape=json.loads(r["feature_shape_json"]),
        schema=json.loads(r["schema_json"]),
        schema_hash=r["schema_hash"],
        fingerprint=r["fingerprint"],
        rows=int(r["rows"]),
        added=float(r["added"]),
        classification=r["classification"] or "general",
        column_levels=json.loads(r["column_levels_json"] or "{}"),
        purposes=json.loads(r["purposes_json"] or "[]"),
        prohibited=json.loads(r["prohibited_json"] or "[]"),
        certificate_json=r["certificate_json"] or "",
    )


def _grant(r: sa.RowMapping) -> GrantRow:
    outcome = str(r["outcome"])
    if outcome not in OUTCOMES:
        raise ValueError(f"grant row for job {r['job_id']} has unknown outcome {outcome!r}")
    return GrantRow(
        job_id=r["job_id"],
        job_hash=r["job_hash"],
        spec_json=r["spec_json"],
        requester=r["requester"],
        dataset=r["dataset"],
        outcome=outcome,  # type: ignore[arg-type]
        reason=r["reason"],
        grant_json=r["grant_json"],
        grant_body_json=r["grant_body_json"],
        bundle_sha=r["bundle_sha"],
        reported=bool(r["reported"]),
        version=int(r["version"]),
        created=float(r["created"]),
        updated=float(r["updated"]),
    )


def _receipt(r: sa.RowMapping) -> ReceiptRow:
    return ReceiptRow(
        receipt_id=r["receipt_id"],
        job_id=r["job_id"],
        round=int(r["round"]),
        samples=int(r["samples"]),
        json=r["json"],
        signed=bool(r["signed"]),
        countersigned=bool(r["countersigned"]),
        created=float(r["created"]),
    )


def _attestation(r: sa.RowMapping) -> AttestationRow:
    return AttestationRow(
        job_id=r["job_id"],
        json=r["json"],
        signed=bool(r["signed"]),
        reported=bool(r["reported"]),
        created=float(r["created"]),
    )


def _spend(r: sa.RowMapping) -> Spend:
    return Spend(
        dataset=r["dataset"],
        job_id=r["job_id"],
        epsilon=float(r["epsilon"]),
        delta=float(r["delta"]),
        plan_json=r["plan_json"],
        created=float(r["created"]),
    )
