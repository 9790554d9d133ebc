"""An append-only, hash-chained, signed audit ledger (全流程可追溯、存证).

The coordinator and every node keep one, so that each party holds its own
evidence of what happened to a job and nobody can rewrite history alone:

* every entry's hash covers its sequence number, time, kind, job, payload and the
  previous entry's hash, so editing, deleting, inserting or reordering an entry
  breaks the chain at that point;
* every entry is signed by the ledger owner's certified key, so recomputing the
  hashes after an edit does not help without that key;
* nodes sign the coordinator's chain head into their usage receipts and the
  coordinator countersigns receipts (:mod:`wharf.records`), and a head can be
  handed to any external notary (:class:`AnchorSink`), so even the owner cannot
  quietly drop its latest entries — which a chain alone cannot reveal.

``entry_hash = SHA-256(canonical_json({"domain": "wharf.ledger.v1", "seq", "time",
"kind", "job_id", "payload", "prev_hash"}))``; the first entry has ``seq`` 1 and
``prev_hash`` :data:`GENESIS`; the signature is ECDSA P-256 over
``canonical_json({"domain": "wharf.ledger.v1", "entry_hash": …})``.

Storage is SQLAlchemy Core, so the same :class:`Ledger` lives in the
coordinator's database and in a node's: a table of entries (default ``ledger``)
and a table of signer certificates by fingerprint (``ledger_certs``; a renewed
certificate is simply another row). :func:`verify_entries` checks any sequence
of entries, read from a database (:func:`load_entries`) or from an exported JSONL
file (:meth:`Ledger.export_jsonl`), against the deployment CA alone.

Entry kinds are free-form (``[a-z][a-z0-9_.-]*``) so later features need no
migration; the ones Wharf writes are listed in :data:`KINDS`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from wharf.identity import Signer, canonical_json, verify_signature
from wharf.records import RecordError, SignedRecord, certified_peer

__all__ = [
    "GENESIS",
    "JSONL_FORMAT",
    "KINDS",
    "RECORD_ENTRY_KINDS",
    "AnchorSink",
    "Entry",
    "FileAnchor",
    "Ledger",
    "LedgerError",
    "LedgerUnreadable",
    "VerifyReport",
    "cert_fingerprint",
    "entry_hash",
    "load_entries",
    "sqlite_engine",
    "verify_entries",
    "verify_path",
]

LEDGER_DOMAIN = "wharf.ledger.v1"
GENESIS = "0" * 64
JSONL_FORMAT = "wharf-ledger/1"

KINDS: dict[str, str] = {
    "job_submitted": "coordinator: a job was accepted (job hash, owner, bundle hash)",
    "grant_issued": "node: a signed grant for a job (the grant record); coordinator: its copy",
    "grant_refused": "node: a job was refused, with the policy's reasons",
    "grant_revoked": "node: an operator revoked a grant; tasks stop at the next check",
    "round_started": "coordinator: a round began (round, participating nodes)",
    "round_finished": "coordinator: a round ended (round, model hash, outcome)",
    "receipt": "both: a usage receipt (node-signed, coordinator-countersigned)",
    "model_stored": "coordinator: a model blob was stored (job, round, sha256)",
    "destruction": "both: a node's destruction attestation at job end",
    "registration": "node: a dataset registration certificate; coordinator: its copy",
    "anchored": "either: the ledger head was handed to an external notary (receipt)",
}
"""The entry kinds Wharf writes, and who writes them. Kinds are not restricted."""

RECORD_ENTRY_KINDS: dict[str, str] = {
    "registration": "registration",
    "grant": "grant_issued",
    "receipt": "receipt",
    "destruction": "destruction",
}
"""The entry kind under which :meth:`Ledger.append_record` logs each record kind."""

_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_APPEND_ATTEMPTS = 50


class LedgerError(Exception):
    """A ledger cannot be written, or an entry in it is malformed (one line saying why)."""


class LedgerUnreadable(LedgerError):
    """The file or database cannot be read as a ledger at all (a user error, not tampering)."""


# --------------------------------------------------------------------------- entries


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 hex of a PEM certificate's bytes: the key of the certificate table."""
    return hashlib.sha256(bytes(cert_pem).strip()).hexdigest()


def entry_hash(seq: int, time_: float, kind: str, job_id: str, payload: Any, prev_hash: str) -> str:
    """The chained hash of one entry (see the module docstring)."""
    return hashlib.sha256(
        canonical_json(
            {
                "domain": LEDGER_DOMAIN,
                "job_id": job_id,
                "kind": kind,
                "payload": payload,
                "prev_hash": prev_hash,
                "seq": seq,
                "time": time_,
            }
        )
    ).hexdigest()


def _signed_message(digest: str) -> bytes:
    return canonical_json({"domain": LEDGER_DOMAIN, "entry_hash": digest})


@dataclass(frozen=True)
class Entry:
    """One ledger entry as stored. ``payload_json`` is kept verbatim so that an entry
    whose payload was mangled still loads and is reported by verification."""

    seq: int
    time: float
    kind: str
    job_id: str
    payload_json: str
    prev_hash: str
    entry_hash: str
    signature: bytes
    signer_cert_pem: bytes

    @property
    def payload(self) -> dict[str, Any]:
        """The payload object (LedgerError if it is not a JSON object)."""
        try:
            value = json.loads(self.payload_json)
        except json.JSONDecodeError:
            raise LedgerError(f"entry {self.seq}: payload is not valid JSON") from None
        if not isinstance(value, dict):
            raise LedgerError(f"entry {self.seq}: payload is not a JSON object")
        return value

    def record(self) -> SignedRecord | None:
        """The signed record embedded by :meth:`Ledger.append_record`, if any (not verified)."""
        raw = self.payload.get("record")
        return None if raw is None else SignedRecord.from_dict(raw)

    @property
    def signer(self) -> str:
        """The signer certificate's fingerprint."""
        return cert_fingerprint(self.signer_cert_pem) if self.signer_cert_pem else ""

    def to_dict(self) -> dict[str, Any]:
        """JSONL form: the certificate is referenced by fingerprint (see :data:`JSONL_FORMAT`)."""
        try:
            payload: Any = self.payload
        except LedgerError:
            payload = self.payload_json
        return {
            "entry_hash": self.entry_hash,
            "job_id": self.job_id,
            "kind": self.kind,
            "payload": payload,
            "prev_hash": self.prev_hash,
            "seq": self.seq,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "signer": self.signer,
            "time": self.time,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_entries`.

    ``first_bad_seq`` is the first sequence position where the history is wrong
    (for a deleted entry: the missing number). ``head_seq``/``head_hash`` are the
    last entry verified good; ``owner`` is the signer's ``role name``.
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS
    owner: str = ""


def verify_entries(
    entries: Iterable[Entry],
    ca_pem: bytes | str,
    *,
    expect_name: str | None = None,
    expect_role: str | None = None,
    expect_heads: Iterable[tuple[int, str]] = (),
    check_records: bool = True,
) -> VerifyReport:
    """Check a whole ledger, in order, against the deployment CA; stop at the first fault.

    Detects: an edited entry (hash mismatch), a deleted, inserted or reordered
    entry (sequence gap or ``prev_hash`` break), a bad signature, a signer
    certificate not from the CA (or not valid at the entry's time), a signer other
    than the ledger's owner (the first entry's signer, or ``expect_name``/
    ``expect_role``), and time running backwards. ``expect_heads`` are
    ``(seq, entry_hash)`` pairs known from elsewhere — anchors, or coordinator
    heads signed into receipts — and catch a truncated tail, which no chain can
    reveal by itself. With ``check_records`` every signed record embedded in an
    entry (:meth:`Ledger.append_record`) is verified too, as of its ``issued_at``:
    a ledger owner cannot log a receipt or grant that its signer never made.
    """
    prev_seq, prev_hash, prev_time = 0, GENESIS, -math.inf
    owner: tuple[str, str] | None = None
    hashes: dict[int, str] = {}
    count = 0

    def bad(seq: int, problem: str) -> VerifyReport:
        return VerifyReport(
            ok=False,
            count=count,
            first_bad_seq=seq,
            problem=problem,
            head_seq=prev_seq,
            head_hash=prev_hash,
            owner=" ".join(owner) if owner else "",
        )

    wanted = sorted(set(expect_heads))
    keep = {seq for seq, _ in wanted}
    for e in entries:
        expected = prev_seq + 1
        if e.seq != expected:
            if e.seq > expected:
                return bad(
                    expected,
                    f"entry {expected} is missing (found {e.seq} after {prev_seq}): "
                    "an entry was deleted or moved",
                )
            return bad(expected, f"entry {e.seq} appears after entry {prev_seq}: entries reordered")
        try:
            payload = e.payload
        except LedgerError as exc:
            return bad(e.seq, str(exc).split(": ", 1)[1])
        try:
            digest = entry_hash(e.seq, e.time, e.kind, e.job_id, payload, e.prev_hash)
        except (TypeError, ValueError) as exc:
            return bad(e.seq, f"entry cannot be hashed: {exc}")
        if digest != e.entry_hash:
            return bad(e.seq, "entry hash mismatch: the entry was edited")
        if e.prev_hash != prev_hash:
            return bad(
                e.seq,
                f"prev_hash does not match entry {prev_seq}'s hash: the chain is broken "
                "(an entry before it was removed, replaced or reordered)",
            )
        if not e.signer_cert_pem:
            return bad(e.seq, "signer certificate is missing")
        try:
            peer = certified_peer(e.signer_cert_pem, ca_pem, e.time)
        except RecordError as exc:
            return bad(e.seq, str(exc))
        if owner is None:
            if expect_role is not None and peer.role != expect_role:
                return bad(
                    e.seq, f"ledger is signed by {peer.role} {peer.name!r}, not a {expect_role}"
                )
            if expect_name is not None and peer.name != expect_name:
                return bad(e.seq, f"ledger is signed by {peer.name!r}, not {expect_name!r}")
            owner = (peer.role, peer.name)
        elif (peer.role, peer.name) != owner:
            return bad(
                e.seq,
                f"entry signed by {peer.role} {peer.name!r}, but the ledger belongs to "
                f"{owner[0]} {owner[1]!r}",
            )
        if not verify_signature(e.signer_cert_pem, _signed_message(e.entry_hash), e.signature):
            return bad(e.seq, "bad signature")
        if e.time < prev_time:
            return bad(e.seq, "entry time is earlier than the previous entry's: entries reordered")
        if check_records and "record" in payload:
            problem = _embedded_record_problem(payload["record"], ca_pem)
            if problem:
                return bad(e.seq, problem)
        count += 1
        prev_seq, prev_hash, prev_time = e.seq, e.entry_hash, e.time
        if e.seq in keep:
            hashes[e.seq] = e.entry_hash
    for seq, digest in wanted:
        if seq > prev_seq:
            return bad(
                prev_seq + 1,
                f"the ledger ends at entry {prev_seq} but entry {seq} was anchored: "
                "entries were removed from the end",
            )
        if hashes.get(seq) != digest:
            return bad(seq, f"entry {seq} differs from its anchored hash {digest[:12]}…")
    return VerifyReport(
        ok=True,
        count=count,
        head_seq=prev_seq,
        head_hash=prev_hash,
        owner=" ".join(owner) if owner else "",
    )


def _embedded_record_problem(raw: Any, ca_pem: bytes | str) -> str:
    try:
        signed = SignedRecord.from_dict(raw)
        issued = signed.body.get("issued_at")
        at = float(issued) if isinstance(issued, int | float) else None
        signed.verify(ca_pem, now=at)
        for cs in signed.countersignatures:
            cs.verify(signed.kind, signed.record_hash, ca_pem, expect_role=None)
    except RecordError as exc:
        kind = raw.get("kind", "?") if isinstance(raw, dict) else "?"
        return f"embedded {kind} record is invalid: {exc}"
    return ""


# --------------------------------------------------------------------------- SQL storage


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def sqlite_engine(path: Path, *, read_only: bool = False) -> Engine:
    """An engine on an SQLite file with Wharf's settings (WAL, busy timeout).

    ``read_only`` opens the file with ``mode=ro`` (it must exist), for auditors.
    """
    if read_only:
        import sqlite3

        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        return sa.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)
        )
    engine = sa.create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _tables(table_name: str) -> tuple[sa.Table, sa.Table]:
    md = sa.MetaData()
    entries = sa.Table(
        table_name,
        md,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False, index=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("signer", sa.String(64), nullable=False),
    )
    certs = sa.Table(
        f"{table_name}_certs",
        md,
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("cert_pem", sa.Text, nullable=False),
    )
    return entries, certs


def _row_entry(row: sa.RowMapping, certs: dict[str, bytes]) -> Entry:
    try:
        return Entry(
            seq=int(row["seq"]),
            time=float(row["time"]),
            kind=str(row["kind"]),
            job_id=str(row["job_id"]),
            payload_json=str(row["payload"]),
            prev_hash=str(row["prev_hash"]),
            entry_hash=str(row["entry_hash"]),
            signature=bytes(row["signature"]),
            signer_cert_pem=certs.get(str(row["signer"]), b""),
        )
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"ledger row {row.get('seq')!r} is malformed: {exc}") from None


def _read_sql(
    engine: Engine, table_name: str, job_id: str | None, kind: str | None
) -> Iterator[Entry]:
    entries, certs_t = _tables(table_name)
    if not sa.inspect(engine).has_table(table_name):
        raise LedgerUnreadable(f"no ledger table {table_name!r} in this database")
    with engine.connect() as c:
        certs = {
            str(r.fingerprint): str(r.cert_pem).encode("ascii")
            for r in c.execute(sa.select(certs_t.c.fingerprint, certs_t.c.cert_pem))
        }
        q = entries.select().order_by(entries.c.seq)
        if job_id is not None:
            q = q.where(entries.c.job_id == job_id)
        if kind is not None:
            q = q.where(entries.c.kind == kind)
        for row in c.execute(q).mappings():
            yield _row_entry(row, certs)


class Ledger:
    """An append-only signed hash chain in an SQL table (a transaction per append).

    Appends are serialised by a lock within the process; across processes (or
    several :class:`Ledger` objects on one database) the primary key on ``seq``
    makes a concurrent append fail instead of forking the chain, and the append is
    retried on the new head. ``signer`` may be ``None`` for a read-only view.
    """

    def __init__(
        self, engine: Engine, signer: Signer | None = None, table_name: str = "ledger"
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", table_name):
            raise LedgerError(f"invalid ledger table name {table_name!r}")
        self.engine = engine
        self.signer = signer
        self.table_name = table_name
        self._entries, self._certs = _tables(table_name)
        self._entries.metadata.create_all(engine)
        self._lock = threading.Lock()
        self._cert_stored = False

    # -- writing ----------------------------------------------------------------------

    def append(
        self,
        kind: str,
        job_id: str,
        payload: dict[str, Any],
        *,
        conn: Connection | None = None,
    ) -> Entry:
        """Append one signed entry and return it.

        With ``conn`` the entry is written inside the caller's transaction (so that,
        say, a job row and its ``job_submitted`` entry commit together); a conflict
        then raises and the caller's transaction should be retried. Without it the
        append is its own transaction and conflicts are retried here.
        """
        if self.signer is None:
            raise LedgerError("this ledger was opened without a signer; it is read-only")
        if not _KIND_RE.fullmatch(kind):
            raise LedgerError(f"invalid entry kind {kind!r}: use lowercase [a-z0-9_.-]")
        if not isinstance(job_id, str) or len(job_id) > 64:
            raise LedgerError("job_id must be a string of at most 64 characters")
        if not isinstance(payload, dict):
            raise LedgerError("payload must be a dict")
        payload_json = canonical_json(payload).decode("utf-8")  # rejects NaN, non-str keys
        with self._lock:
            if conn is not None:
                return self._append(conn, kind, job_id, payload, payload_json)
            for attempt in range(_APPEND_ATTEMPTS):
                try:
                    with self.engine.begin() as c:
                        entry = self._append(c, kind, job_id, payload, payload_json)
                except (IntegrityError, OperationalError):
                    if attempt == _APPEND_ATTEMPTS - 1:
                        raise
                    time.sleep(0.002 * (attempt + 1))
                    continue
                # Committed: the certificate row is there for good. (Not trusted after a
                # caller's transaction, which may still roll back.)
                self._cert_stored = True
                return entry
        raise AssertionError("unreachable")

    def _append(
        self, c: Connection, kind: str, job_id: str, payload: dict[str, Any], payload_json: str
    ) -> Entry:
        assert self.signer is not None
        t = self._entries
        last = c.execute(
            sa.select(t.c.seq, t.c.entry_hash, t.c.time).order_by(t.c.seq.desc()).limit(1)
        ).first()
        prev_seq, prev_hash, prev_time = (
            (int(last.seq), str(last.entry_hash), float(last.time)) if last else (0, GENESIS, 0.0)
        )
        seq = prev_seq + 1
        now = max(time.time(), prev_time)  # times never run backwards along the chain
        digest = entry_hash(seq, now, kind, job_id, payload, prev_hash)
        signature = self.signer.sign(_signed_message(digest))
        cert_pem = bytes(self.signer.cert_pem)
        fingerprint = cert_fingerprint(cert_pem)
        if not self._cert_stored:
            have = c.execute(
                sa.select(self._certs.c.fingerprint).where(self._certs.c.fingerprint == fingerprint)
            ).first()
            if have is None:
                c.execute(
                    self._certs.insert().values(
                        fingerprint=fingerprint, cert_pem=cert_pem.decode("ascii")
                    )
                )
        c.execute(
            t.insert().values(
                seq=seq,
                time=now,
                kind=kind,
                job_id=job_id,
                payload=payload_json,
                prev_hash=prev_hash,
                entry_hash=digest,
                signature=signature,
                signer=fingerprint,
            )
        )
        return Entry(
            seq=seq,
            time=now,
            kind=kind,
            job_id=job_id,
            payload_json=payload_json,
            prev_hash=prev_hash,
            entry_hash=digest,
            signature=signature,
            signer_cert_pem=cert_pem,
        )

    def append_record(
        self,
        signed: SignedRecord,
        *,
        kind: str | None = None,
        extra: dict[str, Any] | None = None,
        conn: Connection | None = None,
    ) -> Entry:
        """Log a signed record (payload ``{"record": …, **extra}``) under its job.

        ``kind`` defaults to :data:`RECORD_ENTRY_KINDS` for the record's kind. Verify
        the record before logging it: :func:`verify_entries` re-checks it later.
        """
        entry_kind = kind or RECORD_ENTRY_KINDS.get(signed.kind, signed.kind)
        job_id = signed.body.get("job_id", "")
        payload = {**(extra or {}), "record": signed.to_dict()}
        return self.append(
            entry_kind, job_id if isinstance(job_id, str) else "", payload, conn=conn
        )

    def anchor(self, sink: AnchorSink) -> str:
        """Hand the current head to ``sink`` and record its receipt as an ``anchored`` entry."""
        seq, digest = self.head()
        receipt = sink.anchor(digest, seq)
        self.append("anchored", "", {"head_hash": digest, "receipt": receipt, "seq": seq})
        return receipt

    # -- reading ----------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """``(seq, entry_hash)`` of the last entry; ``(0, GENESIS)`` when empty."""
        t = self._entries
        with self.engine.connect() as c:
            last = c.execute(
                sa.select(t.c.seq, t.c.entry_hash).order_by(t.c.seq.desc()).limit(1)
            ).first()
        return (int(last.seq), str(last.entry_hash)) if last else (0, GENESIS)

    def iter_entries(self, job_id: str | None = None, kind: str | None = None) -> Iterator[Entry]:
        """Entries in sequence order, optionally only one job's or one kind's."""
        return _read_sql(self.engine, self.table_name, job_id, kind)

    def entries(self, job_id: str | None = None, kind: str | None = None) -> list[Entry]:
        return list(self.iter_entries(job_id, kind))

    def verify(self, ca_pem: bytes | str, **kw: Any) -> VerifyReport:
        """:func:`verify_entries` over this whole ledger (keywords as there)."""
        return _verify_stream(self.iter_entries(), ca_pem, **kw)

    def export_jsonl(self, path: Path) -> int:
        """Write the ledger to ``path`` as JSONL; return the number of entries.

        The first line is a header ``{"format": "wharf-ledger/1", "certs": {fp: pem}}``;
        each further line is one entry (:meth:`Entry.to_dict`). The file verifies on
        its own with :func:`verify_path`.
        """
        entries = self.entries()
        certs = {e.signer: e.signer_cert_pem.decode("ascii") for e in entries if e.signer}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(canonical_json({"certs": certs, "format": JSONL_FORMAT}).decode() + "\n")
            for e in entries:
                fh.write(canonical_json(e.to_dict()).decode("utf-8") + "\n")
        tmp.replace(path)
        return len(entries)


# --------------------------------------------------------------------------- files


def _read_jsonl(path: Path) -> Iterator[Entry]:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
        try:
            header = json.loads(first)
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != JSONL_FORMAT:
            raise LedgerUnreadable(
                f"{path} is neither an SQLite database nor a Wharf ledger export "
                f"(no {JSONL_FORMAT} header)"
            )
        certs_raw = header.get("certs")
        if not isinstance(certs_raw, dict):
            raise LedgerUnreadable(f"{path}: the header's certs must be an object")
        certs = {str(k): str(v).encode("ascii", errors="replace") for k, v in certs_raw.items()}
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            yield _json_entry(line, certs, f"{path}:{lineno}")


def _json_entry(line: str, certs: dict[str, bytes], where: str) -> Entry:
    try:
        raw = json.loads(line)
        payload = raw["payload"]
        if not isinstance(raw["seq"], int) or isinstance(raw["seq"], bool):
            raise TypeError("seq must be an integer")
        return Entry(
            seq=raw["seq"],
            time=float(raw["time"]),
            kind=str(raw["kind"]),
            job_id=str(raw["job_id"]),
            payload_json=payload
            if isinstance(payload, str)
            else canonical_json(payload).decode("utf-8"),
            prev_hash=str(raw["prev_hash"]),
            entry_hash=str(raw["entry_hash"]),
            signature=base64.b64decode(raw["signature"], validate=True),
            signer_cert_pem=certs.get(str(raw["signer"]), b""),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise LedgerError(f"{where}: malformed entry ({exc})") from None


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def load_entries(path: Path, table_name: str = "ledger") -> Iterator[Entry]:
    """Entries from an SQLite database (opened read-only) or a JSONL export, in file order.

    Raises :class:`LedgerError` for a missing or unrecognised file, a missing table,
    or a malformed entry (lazily, as it is reached).
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerUnreadable(f"ledger file not found: {path}")
    try:
        sqlite = _is_sqlite(path)
    except OSError as exc:
        raise LedgerUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None
    if sqlite:
        engine = sqlite_engine(path, read_only=True)

        def rows() -> Iterator[Entry]:
            try:
                yield from _read_sql(engine, table_name, None, None)
            except sa.exc.DBAPIError as exc:
                raise LedgerUnreadable(f"cannot read {path}: {exc.orig}") from None
            finally:
                engine.dispose()

        return rows()
    return _read_jsonl(path)


def verify_path(
    path: Path,
    ca_pem: bytes | str,
    *,
    table_name: str = "ledger",
    expect_heads: Iterable[tuple[int, str]] = (),
    expect_name: str | None = None,
    expect_role: str | None = None,
    check_records: bool = True,
) -> VerifyReport:
    """Verify a ledger file (SQLite database or JSONL export); see :func:`verify_entries`.

    A malformed entry mid-file is reported as the first bad entry, not raised;
    :class:`LedgerUnreadable` is raised when the file cannot be read as a ledger.
    """
    return _verify_stream(
        load_entries(path, table_name),
        ca_pem,
        expect_heads=expect_heads,
        expect_name=expect_name,
        expect_role=expect_role,
        check_records=check_records,
    )


def _verify_stream(entries: Iterable[Entry], ca_pem: bytes | str, **kw: Any) -> VerifyReport:
    """:func:`verify_entries`, turning a malformed entry met on the way into a report."""
    last_seq = [0]

    def tracked() -> Iterator[Entry]:
        for e in entries:
            yield e
            last_seq[0] = e.seq

    try:
        return verify_entries(tracked(), ca_pem, **kw)
    except LedgerUnreadable:
        raise
    except LedgerError as exc:
        return VerifyReport(
            ok=False, count=last_seq[0], first_bad_seq=last_seq[0] + 1, problem=str(exc)
        )


# --------------------------------------------------------------------------- anchoring


class AnchorSink(Protocol):
    """Somewhere outside the ledger owner's control that witnesses a head.

    Optional: a notary service, a blockchain, a write-once file on another party's
    storage. Returns a receipt string the owner records in its ledger.
    """

    def anchor(self, head_hash: str, seq: int) -> str: ...


class FileAnchor:
    """Reference :class:`AnchorSink`: appends ``{"seq", "head_hash", "time"}`` lines to a file.

    Worth something only if the file lives where the ledger's owner cannot rewrite
    it (another party's disk, append-only storage). :meth:`heads` feeds
    :func:`verify_entries`'s ``expect_heads``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def anchor(self, head_hash: str, seq: int) -> str:
        if not _HEX64.fullmatch(head_hash) or seq < 0:
            raise LedgerError("anchor needs a sha256 hex head hash and a seq >= 0")
        line = canonical_json({"head_hash": head_hash, "seq": seq, "time": time.time()})
        with self._lock, open(self.path, "ab") as fh:
            offset = fh.tell()
            fh.write(line + b"\n")
            fh.flush()
        return f"file:{self.path}@{offset}"

    def heads(self) -> list[tuple[int, str]]:
        """Every anchored ``(seq, head_hash)``, in file order."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out: list[tuple[int, str]] = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                out.append((int(raw["seq"]), str(raw["head_hash"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise LedgerError(f"{self.path}:{n} is not an anchor line") from None
        return out
