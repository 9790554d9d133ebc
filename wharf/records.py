"""Signed records every party can verify offline.

A data holder's node decides what may be done with its data and must be able to
prove afterwards what it decided and what happened. These records are that proof.
Each is a small JSON body, signed by the party that vouches for it with the key of
its deployment certificate, and carrying that certificate, so anyone holding only
the CA certificate can check it years later without asking anyone:

* :class:`RegistrationCertificate` — a node's dataset: fingerprint, schema, row
  count, classification levels, allowed purposes, prohibited columns. Metadata
  only, never rows.
* :class:`Grant` — one scenario, one authorisation: a node allows exactly one job
  (bound by its canonical hash) for one purpose, datasets and columns, quotas and
  protections, until an expiry.
* :class:`UsageReceipt` — what one task used and sent; the coordinator
  countersigns it (:meth:`SignedRecord.countersign`), so it is the unit of
  account both sides agree on.
* :class:`DestructionAttestation` — what a node deleted at the end of a job.

Signing binds the kind and the body: the signature is over
``canonical_json({"domain": "wharf.record.v1", "kind": …, "record_hash": …})``
where ``record_hash`` is the SHA-256 of the canonical body. A verifier recomputes
the hash, checks that the certificate comes from the deployment CA (valid at the
record's ``issued_at``, so old records stay verifiable after a certificate is
renewed), that the signer has the expected role and name, that the signature is
right, and that the body names its signer (a node can only vouch for itself).
Every failure is a :class:`RecordError` whose message names the problem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from wharf.identity import (
    IdentityError,
    Peer,
    Signer,
    _verify_static,
    canonical_json,
    verify_signature,
)
from wharf.spec import NAME_RE, PURPOSE_RE

__all__ = [
    "CLOCK_SKEW_S",
    "LEVELS",
    "RECORD_KINDS",
    "AnyRecord",
    "Countersignature",
    "DeletedFile",
    "DescriptionLike",
    "DestructionAttestation",
    "Grant",
    "GrantError",
    "Protections",
    "Quotas",
    "RecordError",
    "RegistrationCertificate",
    "SignedRecord",
    "UsageReceipt",
    "body_hash",
    "certified_peer",
    "inventory",
    "level_rank",
    "max_level",
    "new_id",
    "parse_record",
]

RECORD_DOMAIN = "wharf.record.v1"
COUNTERSIGN_DOMAIN = "wharf.countersignature.v1"

LEVELS: tuple[str, ...] = ("general", "important", "core")
"""Classification levels, least to most sensitive (分类分级: 一般 < 重要 < 核心)."""

CLOCK_SKEW_S = 300.0
"""A record may claim an ``issued_at`` this far in the verifier's future (clock drift)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A record is malformed, altered, or not vouched for by whom it must be."""


class GrantError(RecordError):
    """A grant does not authorise what is being asked of the node; says why."""


# --------------------------------------------------------------------------- helpers


def level_rank(level: str) -> int:
    """0 for ``general``, 1 for ``important``, 2 for ``core``; RecordError otherwise."""
    try:
        return LEVELS.index(level)
    except ValueError:
        raise RecordError(
            f"unknown classification level {level!r}: expected one of {', '.join(LEVELS)}"
        ) from None


def max_level(levels: Iterable[str], floor: str = "general") -> str:
    """The most sensitive of ``levels`` (and ``floor``)."""
    return max([floor, *levels], key=level_rank)


def new_id() -> str:
    """A random 128-bit identifier (hex) for grants and receipts."""
    return secrets.token_hex(16)


def body_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of a record body."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts!r} (out of range)"


def _as_bytes(pem: bytes | str) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else bytes(pem)


def certified_peer(cert_pem: bytes | str, ca_pem: bytes | str, at: float) -> Peer:
    """Who ``cert_pem`` is, if the deployment CA vouches for it *at time* ``at``.

    :func:`wharf.identity.peer_from_pem` asks "valid now?", which is right for a
    live connection but wrong for evidence: a receipt signed last year must still
    verify after the node's certificate has been renewed. The structural checks
    (issued by the CA, not a CA, role extension and OU agree, valid CN) are the
    same ones, shared with :mod:`wharf.identity`.
    """
    try:
        verified = _verify_static(_as_bytes(cert_pem), _as_bytes(ca_pem))
    except IdentityError as exc:
        raise RecordError(f"signer certificate is not from the CA: {exc}") from None
    try:
        when = datetime.fromtimestamp(at, UTC)
    except (OverflowError, OSError, ValueError):
        raise RecordError(f"time {at!r} is out of range") from None
    if when < verified.not_before:
        raise RecordError(
            f"signer certificate was not yet valid at {_iso(at)} "
            f"(valid from {verified.not_before.isoformat(timespec='seconds')})"
        )
    if when > verified.not_after:
        raise RecordError(
            f"signer certificate had expired at {_iso(at)} "
            f"(expired {verified.not_after.isoformat(timespec='seconds')})"
        )
    return verified.peer


# --------------------------------------------------------------------------- strict body reader


class _Body:
    """Reads a record body field by field; missing, mistyped and unknown fields are errors.

    Bodies come from other parties (and from files anyone can edit), so nothing is
    trusted to have the right shape just because it parsed as JSON.
    """

    def __init__(self, kind: str, body: Any) -> None:
        if not isinstance(body, Mapping):
            raise RecordError(f"{kind} body must be a JSON object")
        self.kind = kind
        self.body = body
        self.seen: set[str] = set()

    def _get(self, key: str) -> Any:
        if key not in self.body:
            raise RecordError(f"{self.kind} is missing field {key!r}")
        self.seen.add(key)
        return self.body[key]

    def _bad(self, key: str, what: str, value: Any) -> RecordError:
        return RecordError(f"{self.kind}.{key} must be {what}, got {value!r}")

    def text(self, key: str, pattern: re.Pattern[str] | None = None, empty: bool = False) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        if value == "" and empty:
            return value
        if pattern is not None and not pattern.fullmatch(value):
            raise self._bad(key, f"a string matching {pattern.pattern}", value)
        if value == "":
            raise self._bad(key, "a non-empty string", value)
        return value

    def hex64(self, key: str, empty: bool = False) -> str:
        return self.text(key, _HEX64, empty=empty)

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, f"an integer >= {minimum}", value)
        return value

    def number(self, key: str, minimum: float = 0.0) -> float:
        value = self._get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise self._bad(key, f"a finite number >= {minimum}", value)
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def texts(self, key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or any(not isinstance(v, str) or not v for v in value):
            raise self._bad(key, "a list of non-empty strings", value)
        if pattern is not None:
            for v in value:
                if not pattern.fullmatch(v):
                    raise self._bad(key, f"a list of strings matching {pattern.pattern}", v)
        if len(set(value)) != len(value):
            raise self._bad(key, "a list without duplicates", value)
        return tuple(value)

    def table(self, key: str) -> _Body:
        value = self._get(key)
        return _Body(f"{self.kind}.{key}", value)

    def raw(self, key: str) -> Any:
        return self._get(key)

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise RecordError(f"{self.kind} has unknown field {unknown[0]!r}")


# --------------------------------------------------------------------------- signed envelope


def _record_message(kind: str, record_hash: str) -> bytes:
    return canonical_json({"domain": RECORD_DOMAIN, "kind": kind, "record_hash": record_hash})


def _countersign_message(kind: str, record_hash: str, at: float) -> bytes:
    return canonical_json(
        {"at": at, "domain": COUNTERSIGN_DOMAIN, "kind": kind, "record_hash": record_hash}
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise RecordError(f"{what} must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(f"{what} is not valid base64") from None


def _pem_field(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise RecordError(f"{what} must be a PEM certificate")
    return value.encode("ascii", errors="replace")


@dataclass(frozen=True)
class Countersignature:
    """A second party's signature over a record's kind and hash (e.g. the coordinator's
    acceptance of a usage receipt), made at ``countersigned_at``."""

    signer_cert_pem: bytes
    signature: bytes
    countersigned_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "countersigned_at": self.countersigned_at,
            "signature": _b64(self.signature),
            "signer_cert_pem": self.signer_cert_pem.decode("ascii"),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Countersignature:
        b = _Body("countersignature", raw)
        sig = _unb64(b.raw("signature"), "countersignature.signature")
        pem = _pem_field(b.raw("signer_cert_pem"), "countersignature.signer_cert_pem")
        at = b.number("countersigned_at")
        b.done()
        return cls(signer_cert_pem=pem, signature=sig, countersigned_at=at)

    def verify(
        self,
        kind: str,
        record_hash: str,
        ca_pem: bytes | str,
        *,
        expect_role: str | None = "coordinator",
        expect_name: str | None = None,
    ) -> Peer:
        """Check this countersignature over ``(kind, record_hash)``; return the countersigner."""
        peer = certified_peer(self.signer_cert_pem, ca_pem, self.countersigned_at)
        _expect(peer, expect_role, expect_name, "countersigned")
        message = _countersign_message(kind, record_hash, self.countersigned_at)
        if not verify_signature(self.signer_cert_pem, message, self.signature):
            raise RecordError(f"bad countersignature by {peer.role} {peer.name!r}")
        return peer


def _expect(peer: Peer, role: str | None, name: str | None, verb: str) -> None:
    if role is not None and peer.role != role:
        raise RecordError(f"wrong role: {verb} by {peer.role} {peer.name!r}, expected a {role}")
    if name is not None and peer.name != name:
        raise RecordError(f"wrong signer: {verb} by {peer.name!r}, expected {name!r}")


_USE_KIND_ROLE = "<the kind's signer role>"


@dataclass(frozen=True)
class SignedRecord:
    """A record body with its signer's certificate and signature (and countersignatures).

    ``record_hash`` is stored, not only derived, so that an edited body is reported
    as exactly that ("hash mismatch") rather than as a puzzling bad signature.
    Treat ``body`` as read-only: :meth:`verify` recomputes the hash every time.
    """

    kind: str
    body: dict[str, Any]
    signer_cert_pem: bytes
    signature: bytes
    record_hash: str
    countersignatures: tuple[Countersignature, ...] = ()

    # -- verification -------------------------------------------------------------

    def verify(
        self,
        ca_pem: bytes | str,
        *,
        expect_role: str | None = _USE_KIND_ROLE,
        expect_name: str | None = None,
        now: float | None = None,
    ) -> Peer:
        """Check everything about this record; return its signer or raise :class:`RecordError`.

        Checks, in order: a known kind; the body hashes to ``record_hash``; the body
        is well formed; the signer certificate comes from the CA and was valid at
        ``issued_at``; the signer has ``expect_role`` (by default the role that signs
        this kind, ``None`` for any) and ``expect_name``; the signature; the body
        names its signer; ``issued_at`` is not in the future; and the record is in
        force at ``now`` (default: the current time) if it has an expiry.
        """
        cls = _KINDS.get(self.kind)
        if cls is None:
            raise RecordError(f"unknown record kind {self.kind!r}")
        try:
            digest = body_hash(self.body)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{self.kind} body cannot be hashed: {exc}") from None
        if digest != self.record_hash:
            raise RecordError(
                f"hash mismatch: the {self.kind} body does not hash to its record_hash "
                "(the record was altered)"
            )
        record = cls.from_dict(self.body)
        peer = certified_peer(self.signer_cert_pem, ca_pem, record.issued_at)
        role = cls.SIGNER_ROLE if expect_role == _USE_KIND_ROLE else expect_role
        _expect(peer, role, expect_name, f"{self.kind} signed")
        message = _record_message(self.kind, self.record_hash)
        if not verify_signature(self.signer_cert_pem, message, self.signature):
            raise RecordError(f"bad signature on {self.kind} (claimed signer {peer.name!r})")
        subject = record.subject()
        if subject != peer.name:
            raise RecordError(
                f"wrong signer: {self.kind} speaks for {subject!r} but is signed by {peer.name!r}"
            )
        current = time.time() if now is None else now
        if record.issued_at > current + CLOCK_SKEW_S:
            raise RecordError(
                f"{self.kind} claims to be issued in the future ({_iso(record.issued_at)})"
            )
        expiry = record.expires()
        if expiry is not None and current > expiry:
            raise RecordError(f"{self.kind} expired at {_iso(expiry)}")
        return peer

    def parse(self) -> AnyRecord:
        """The typed record (strictly validated, **not** verified: call :meth:`verify`)."""
        return parse_record(self)

    # -- countersignatures ----------------------------------------------------------

    def countersign(self, signer: Signer, *, now: float | None = None) -> SignedRecord:
        """A copy with ``signer``'s countersignature added (verify the record first)."""
        cs = _countersign(self.kind, self.record_hash, signer, now)
        return SignedRecord(
            kind=self.kind,
            body=self.body,
            signer_cert_pem=self.signer_cert_pem,
            signature=self.signature,
            record_hash=self.record_hash,
            countersignatures=(*self.countersignatures, cs),
        )

    def verify_countersignatures(
        self,
        ca_pem: bytes | str,
        *,
        expect_role: str | None = "coordinator",
        expect_name: str | None = None,
    ) -> list[Peer]:
        """Check every countersignature; require at least one by ``expect_role``/``expect_name``.

        The countersignatures are checked against the stored ``record_hash``; pair
        this with :meth:`verify`, which ties that hash to the body.
        """
        peers = [
            cs.verify(self.kind, self.record_hash, ca_pem, expect_role=None)
            for cs in self.countersignatures
        ]
        for peer in peers:
            if (expect_role is None or peer.role == expect_role) and (
                expect_name is None or peer.name == expect_name
            ):
                return peers
        who = (expect_role or "any party") + (f" {expect_name!r}" if expect_name else "")
        raise RecordError(f"{self.kind} has no countersignature by {who}")

    # -- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "body": self.body,
            "countersignatures": [cs.to_dict() for cs in self.countersignatures],
            "kind": self.kind,
            "record_hash": self.record_hash,
            "signature": _b64(self.signature),
            "signer_cert_pem": self.signer_cert_pem.decode("ascii"),
        }

    def to_json(self) -> str:
        """Canonical JSON (one line), for storage, the wire and product bundles."""
        return canonical_json(self.to_dict()).decode("utf-8")

    @classmethod
    def from_dict(cls, raw: Any) -> SignedRecord:
        b = _Body("signed record", raw)
        kind = b.text("kind")
        body = b.raw("body")
        if not isinstance(body, dict):
            raise RecordError("signed record body must be a JSON object")
        record_hash = b.text("record_hash", _HEX64)
        sig = _unb64(b.raw("signature"), "signature")
        pem = _pem_field(b.raw("signer_cert_pem"), "signer_cert_pem")
        css_raw = b.raw("countersignatures") if "countersignatures" in raw else []
        if not isinstance(css_raw, list):
            raise RecordError("countersignatures must be a list")
        b.done()
        return cls(
            kind=kind,
            body=body,
            signer_cert_pem=pem,
            signature=sig,
            record_hash=record_hash,
            countersignatures=tuple(Countersignature.from_dict(c) for c in css_raw),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedRecord:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"signed record is not valid JSON: {exc}") from None
        return cls.from_dict(raw)


def _countersign(
    kind: str, record_hash: str, signer: Signer, now: float | None
) -> Countersignature:
    at = time.time() if now is None else float(now)
    sig = signer.sign(_countersign_message(kind, record_hash, at))
    return Countersignature(
        signer_cert_pem=bytes(signer.cert_pem), signature=sig, countersigned_at=at
    )


# --------------------------------------------------------------------------- typed records


class _Record:
    """What every record kind shares: its kind, body form, signing and verification."""

    KIND: ClassVar[str]
    SIGNER_ROLE: ClassVar[str] = "node"
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        raise NotImplementedError

    def subject(self) -> str:
        """The party the record speaks for; it must be the signer."""
        raise NotImplementedError

    def expires(self) -> float | None:
        return None

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def record_hash(self) -> str:
        return body_hash(self.to_dict())

    def sign(self, signer: Signer) -> SignedRecord:
        """Validate the body (as a verifier would) and sign it."""
        body = self.to_dict()
        type(self).from_dict(body)  # never sign what a verifier would reject
        digest = body_hash(body)
        return SignedRecord(
            kind=self.KIND,
            body=body,
            signer_cert_pem=bytes(signer.cert_pem),
            signature=signer.sign(_record_message(self.KIND, digest)),
            record_hash=digest,
        )

    @classmethod
    def from_record(cls, signed: SignedRecord) -> Self:
        """The typed body of ``signed`` (kind checked, **not** verified)."""
        if signed.kind != cls.KIND:
            raise RecordError(f"expected a {cls.KIND} record, got {signed.kind!r}")
        return cls.from_dict(signed.body)

    @classmethod
    def verified(
        cls,
        signed: SignedRecord,
        ca_pem: bytes | str,
        *,
        expect_name: str | None = None,
        now: float | None = None,
    ) -> Self:
        """Verify ``signed`` (see :meth:`SignedRecord.verify`) and return its typed body."""
        if signed.kind != cls.KIND:
            raise RecordError(f"expected a {cls.KIND} record, got {signed.kind!r}")
        signed.verify(ca_pem, expect_name=expect_name, now=now)
        return cls.from_dict(signed.body)


class DescriptionLike(Protocol):
    """What :meth:`RegistrationCertificate.describe` reads from a dataset description
    (``wharf.node.datasets.DatasetDescription`` fits; ``wharf`` does not import ``node``)."""

    @property
    def num_rows(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def features(self) -> Sequence[str]: ...
    @property
    def schema(self) -> Sequence[Sequence[str]]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def schema_hash(self) -> str: ...


def _schema_hash(schema: Sequence[Sequence[str]]) -> str:
    # Same bytes as wharf.node.datasets.schema_hash: compact JSON list of [column, dtype].
    return hashlib.sha256(canonical_json([[c, t] for c, t in schema])).hexdigest()


@dataclass(frozen=True)
class RegistrationCertificate(_Record):
    """A node's signed statement about one dataset: metadata only, never rows.

    Levels: the dataset's ``classification`` applies to every column; an entry in
    ``column_levels`` can only raise a column above it (:meth:`level_of`). An empty
    ``allowed_purposes`` adds no restriction beyond the node's policy. Columns in
    ``prohibited_columns`` (the negative list) are never usable by any job.
    """

    KIND: ClassVar[str] = "registration"

    node: str
    dataset: str
    fingerprint: str
    schema: tuple[tuple[str, str], ...]
    schema_hash: str
    row_count: int
    label: str
    features: tuple[str, ...]
    classification: str = "general"
    column_levels: tuple[tuple[str, str], ...] = ()
    allowed_purposes: tuple[str, ...] = ()
    prohibited_columns: tuple[str, ...] = ()
    issued_at: float = field(default_factory=time.time)

    @classmethod
    def describe(
        cls,
        node: str,
        dataset: str,
        description: DescriptionLike,
        *,
        classification: str = "general",
        column_levels: Mapping[str, str] | None = None,
        allowed_purposes: Iterable[str] = (),
        prohibited_columns: Iterable[str] = (),
        issued_at: float | None = None,
    ) -> RegistrationCertificate:
        """Build (and validate) a certificate from a dataset description."""
        cert = cls(
            node=node,
            dataset=dataset,
            fingerprint=description.fingerprint,
            schema=tuple((str(c), str(t)) for c, t in description.schema),
            schema_hash=description.schema_hash,
            row_count=int(description.num_rows),
            label=description.label,
            features=tuple(description.features),
            classification=classification,
            column_levels=tuple(sorted((column_levels or {}).items())),
            allowed_purposes=tuple(allowed_purposes),
            prohibited_columns=tuple(prohibited_columns),
            issued_at=time.time() if issued_at is None else issued_at,
        )
        cls.from_dict(cert.to_dict())
        return cert

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.schema)

    def level_of(self, column: str) -> str:
        """The effective level of ``column``: its own level, never below the dataset's."""
        return max_level(
            [dict(self.column_levels).get(column, self.classification)], floor=self.classification
        )

    def subject(self) -> str:
        return self.node

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_purposes": list(self.allowed_purposes),
            "classification": self.classification,
            "column_levels": dict(self.column_levels),
            "dataset": self.dataset,
            "features": list(self.features),
            "fingerprint": self.fingerprint,
            "issued_at": float(self.issued_at),
            "label": self.label,
            "node": self.node,
            "prohibited_columns": list(self.prohibited_columns),
            "row_count": self.row_count,
            "schema": [[c, t] for c, t in self.schema],
            "schema_hash": self.schema_hash,
        }

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        b = _Body(cls.KIND, body)
        schema_raw = b.raw("schema")
        if not isinstance(schema_raw, list) or any(
            not isinstance(p, list) or len(p) != 2 or not all(isinstance(s, str) for s in p)
            for p in schema_raw
        ):
            raise RecordError(f"{cls.KIND}.schema must be a list of [column, dtype] pairs")
        schema = tuple((c, t) for c, t in schema_raw)
        columns = [c for c, _ in schema]
        if len(set(columns)) != len(columns) or not columns:
            raise RecordError(f"{cls.KIND}.schema must list each column once")
        schema_hash = b.hex64("schema_hash")
        if schema_hash != _schema_hash(schema):
            raise RecordError(f"{cls.KIND}.schema_hash does not match the schema")
        label = b.text("label")
        features = b.texts("features")
        for c in (label, *features):
            if c not in columns:
                raise RecordError(f"{cls.KIND}: column {c!r} is not in the schema")
        classification = b.text("classification")
        level_rank(classification)
        levels_raw = b.raw("column_levels")
        if not isinstance(levels_raw, dict):
            raise RecordError(f"{cls.KIND}.column_levels must map column names to levels")
        for col, lvl in levels_raw.items():
            if col not in columns:
                raise RecordError(f"{cls.KIND}.column_levels names {col!r}, not in the schema")
            if not isinstance(lvl, str):
                raise RecordError(f"{cls.KIND}.column_levels[{col!r}] must be a level name")
            level_rank(lvl)
        prohibited = b.texts("prohibited_columns")
        for col in prohibited:
            if col not in columns:
                raise RecordError(f"{cls.KIND}.prohibited_columns names {col!r}, not in the schema")
        out = cls(
            node=b.text("node", NAME_RE),
            dataset=b.text("dataset", NAME_RE),
            fingerprint=b.hex64("fingerprint"),
            schema=schema,
            schema_hash=schema_hash,
            row_count=b.integer("row_count"),
            label=label,
            features=features,
            classification=classification,
            column_levels=tuple(sorted(levels_raw.items())),
            allowed_purposes=b.texts("allowed_purposes", PURPOSE_RE),
            prohibited_columns=prohibited,
            issued_at=b.number("issued_at"),
        )
        b.done()
        return out


@dataclass(frozen=True)
class Quotas:
    """How much a job may use at one node: rounds, local epochs per round, and sample
    visits (rows x epochs, summed over the job's tasks)."""

    rounds: int
    epochs: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "rounds": self.rounds, "samples": self.samples}

    @classmethod
    def from_body(cls, b: _Body) -> Quotas:
        out = cls(
            rounds=b.integer("rounds", 1),
            epochs=b.integer("epochs", 1),
            samples=b.integer("samples"),
        )
        b.done()
        return out


@dataclass(frozen=True)
class Protections:
    """The protections the job runs under: secure aggregation, and DP if any.

    ``dp_epsilon``/``dp_delta`` are what the job costs the dataset's privacy budget;
    ``dp_plan`` is the node's full DP plan for the job on that dataset — the
    guarantees with their accountant and mechanism parameters, and the Skellam plan
    for participant-level noise (``wharf.algorithms.privacy.plan.JobPrivacy.to_dict``)
    — so anyone holding the signed grant can recompute the stated epsilon.
    """

    secure_aggregation: bool
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_plan: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        dp: dict[str, Any] | None = None
        if self.dp_epsilon is not None:
            dp = {"delta": float(self.dp_delta or 0.0), "epsilon": float(self.dp_epsilon)}
            if self.dp_plan is not None:
                dp["plan"] = dict(self.dp_plan)
        return {"dp": dp, "secure_aggregation": self.secure_aggregation}

    @classmethod
    def from_body(cls, b: _Body) -> Protections:
        secure = b.flag("secure_aggregation")
        dp = b.raw("dp")
        eps = delta = None
        plan = None
        if dp is not None:
            d = _Body(f"{b.kind}.dp", dp)
            eps = d.number("epsilon")
            delta = d.number("delta")
            if "plan" in dp:
                plan = d.raw("plan")
                if not isinstance(plan, Mapping) or not isinstance(plan.get("guarantees"), list):
                    raise RecordError(f"{b.kind}.dp.plan must be an object listing guarantees")
            d.done()
            if eps <= 0 or delta >= 1:
                raise RecordError(f"{b.kind}.dp needs epsilon > 0 and 0 <= delta < 1")
        b.done()
        return cls(secure_aggregation=secure, dp_epsilon=eps, dp_delta=delta, dp_plan=plan)


@dataclass(frozen=True)
class Grant(_Record):
    """One scenario, one authorisation: a node's signed permission for exactly one job.

    It binds the job's canonical hash (spec and code), the requester's certified
    name, purpose, datasets and columns, quotas, protections and an expiry. The node
    checks it (:meth:`check`) before every task and every upload; a changed spec
    hashes differently and so is not covered.
    """

    KIND: ClassVar[str] = "grant"

    node: str
    job_id: str
    job_hash: str
    requester: str
    purpose: str
    datasets: tuple[str, ...]
    columns: tuple[str, ...]
    quotas: Quotas
    protections: Protections
    expires_at: float
    bundle_sha256: str = ""
    grant_id: str = field(default_factory=new_id)
    issued_at: float = field(default_factory=time.time)

    def subject(self) -> str:
        return self.node

    def expires(self) -> float | None:
        return self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_sha256": self.bundle_sha256,
            "columns": list(self.columns),
            "datasets": list(self.datasets),
            "expires_at": float(self.expires_at),
            "grant_id": self.grant_id,
            "issued_at": float(self.issued_at),
            "job_hash": self.job_hash,
            "job_id": self.job_id,
            "node": self.node,
            "protections": self.protections.to_dict(),
            "purpose": self.purpose,
            "quotas": self.quotas.to_dict(),
            "requester": self.requester,
        }

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        b = _Body(cls.KIND, body)
        out = cls(
            grant_id=b.text("grant_id", NAME_RE),
            node=b.text("node", NAME_RE),
            job_id=b.text("job_id", NAME_RE),
            job_hash=b.hex64("job_hash"),
            requester=b.text("requester", NAME_RE),
            purpose=b.text("purpose", PURPOSE_RE),
            datasets=b.texts("datasets", NAME_RE),
            columns=b.texts("columns"),
            quotas=Quotas.from_body(b.table("quotas")),
            protections=Protections.from_body(b.table("protections")),
            expires_at=b.number("expires_at"),
            bundle_sha256=b.hex64("bundle_sha256", empty=True),
            issued_at=b.number("issued_at"),
        )
        b.done()
        if not out.datasets:
            raise RecordError("grant.datasets must name at least one dataset")
        if out.expires_at <= out.issued_at:
            raise RecordError("grant.expires_at must be after issued_at")
        return out

    def check(
        self,
        job_id: str,
        job_hash: str,
        now: float | None = None,
        *,
        revoked: bool = False,
        node: str | None = None,
        dataset: str | None = None,
        columns: Iterable[str] | None = None,
        round: int | None = None,
        epochs: int | None = None,
        samples: int | None = None,
        bundle_sha256: str | None = None,
    ) -> list[str]:
        """Why this grant does **not** authorise the task described; empty if it does.

        ``revoked`` is the node's own revocation flag (revocation is a later ledger
        entry, not a property of the signed grant). ``round`` is the 1-based round
        about to run (0 = the statistics pass before round 1). ``samples`` is the
        job's total sample visits *including* this task (sum of receipts plus
        rows x epochs planned).
        """
        current = time.time() if now is None else now
        why: list[str] = []
        if node is not None and node != self.node:
            why.append(f"grant is for node {self.node!r}, not {node!r}")
        if job_id != self.job_id:
            why.append(f"grant is for job {self.job_id!r}, not {job_id!r}")
        if job_hash != self.job_hash:
            why.append(
                f"job hash changed: the grant covers {self.job_hash[:12]}…, the job now hashes "
                f"to {job_hash[:12]}… (its spec or code changed; a new grant is needed)"
            )
        if revoked:
            why.append("grant was revoked by the node's operator")
        if current > self.expires_at:
            why.append(f"grant expired at {_iso(self.expires_at)}")
        if self.issued_at > current + CLOCK_SKEW_S:
            why.append(f"grant claims to be issued in the future ({_iso(self.issued_at)})")
        if bundle_sha256 is not None and bundle_sha256 != self.bundle_sha256:
            why.append(
                f"code bundle {bundle_sha256[:12] or 'none'}… is not the granted "
                f"{self.bundle_sha256[:12] or 'none'}…"
            )
        if dataset is not None and dataset not in self.datasets:
            why.append(f"dataset {dataset!r} is not granted (granted: {', '.join(self.datasets)})")
        if columns is not None:
            extra = sorted(set(columns) - set(self.columns))
            if extra:
                why.append(f"column(s) {', '.join(extra)} not granted")
        if round is not None and round > self.quotas.rounds:
            why.append(f"round {round} is beyond the {self.quotas.rounds} granted round(s)")
        if epochs is not None and epochs > self.quotas.epochs:
            why.append(f"{epochs} epochs exceed the granted {self.quotas.epochs} per round")
        if samples is not None and samples > self.quotas.samples:
            why.append(f"sample quota exhausted: {samples} needed, {self.quotas.samples} granted")
        return why

    def ensure(self, job_id: str, job_hash: str, now: float | None = None, **kw: Any) -> None:
        """:meth:`check`, raising :class:`GrantError` with every reason if not authorised."""
        why = self.check(job_id, job_hash, now, **kw)
        if why:
            raise GrantError("; ".join(why))


@dataclass(frozen=True)
class UsageReceipt(_Record):
    """What one task used and sent, signed by the node and countersigned by the coordinator.

    ``coordinator_chain_seq``/``coordinator_chain_head`` are the coordinator ledger
    head the node last saw: once signed into a receipt, the coordinator cannot later
    present a ledger without that entry (and the node's own ledger holds the
    receipt), so neither side can rewrite history alone.
    """

    KIND: ClassVar[str] = "receipt"

    grant_id: str
    job_id: str
    round: int
    node: str
    rows_used: int
    epochs: int
    compute_seconds: float
    bytes_sent: int
    sent_sha256: str
    coordinator_chain_head: str = ""
    coordinator_chain_seq: int = 0
    receipt_id: str = field(default_factory=new_id)
    issued_at: float = field(default_factory=time.time)

    @property
    def samples(self) -> int:
        """Sample visits this task made (rows x epochs), the unit of the samples quota."""
        return self.rows_used * self.epochs

    def subject(self) -> str:
        return self.node

    def countersign(self, signer: Signer, *, now: float | None = None) -> Countersignature:
        """The coordinator's countersignature over this receipt's kind and record hash."""
        return _countersign(self.KIND, self.record_hash(), signer, now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "compute_seconds": float(self.compute_seconds),
            "coordinator_chain_head": self.coordinator_chain_head,
            "coordinator_chain_seq": self.coordinator_chain_seq,
            "epochs": self.epochs,
            "grant_id": self.grant_id,
            "issued_at": float(self.issued_at),
            "job_id": self.job_id,
            "node": self.node,
            "receipt_id": self.receipt_id,
            "round": self.round,
            "rows_used": self.rows_used,
            "sent_sha256": self.sent_sha256,
        }

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        b = _Body(cls.KIND, body)
        out = cls(
            receipt_id=b.text("receipt_id", NAME_RE),
            grant_id=b.text("grant_id", NAME_RE),
            job_id=b.text("job_id", NAME_RE),
            round=b.integer("round"),
            node=b.text("node", NAME_RE),
            rows_used=b.integer("rows_used"),
            epochs=b.integer("epochs"),
            compute_seconds=b.number("compute_seconds"),
            bytes_sent=b.integer("bytes_sent"),
            sent_sha256=b.hex64("sent_sha256", empty=True),
            coordinator_chain_head=b.hex64("coordinator_chain_head", empty=True),
            coordinator_chain_seq=b.integer("coordinator_chain_seq"),
            issued_at=b.number("issued_at"),
        )
        b.done()
        return out


@dataclass(frozen=True)
class DeletedFile:
    """One file a node deleted: its path (relative to the workspace), hash and size."""

    path: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "path": self.path, "sha256": self.sha256}


def inventory(root: Path) -> tuple[DeletedFile, ...]:
    """Hash every regular file under ``root`` (symlinks not followed), sorted by path.

    Call it on a job workspace just before deleting the workspace, and attest the
    result with a :class:`DestructionAttestation`.
    """
    found: list[DeletedFile] = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            digest, size = hashlib.sha256(), 0
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            rel = path.relative_to(root).as_posix()
            found.append(DeletedFile(path=rel, sha256=digest.hexdigest(), bytes=size))
    return tuple(sorted(found, key=lambda f: f.path))


@dataclass(frozen=True)
class DestructionAttestation(_Record):
    """A node's signed statement that it deleted a job's workspace, listing each file."""

    KIND: ClassVar[str] = "destruction"

    node: str
    job_id: str
    deleted: tuple[DeletedFile, ...]
    workspace: str = ""
    issued_at: float = field(default_factory=time.time)

    def subject(self) -> str:
        return self.node

    def to_dict(self) -> dict[str, Any]:
        return {
            "deleted": [f.to_dict() for f in self.deleted],
            "issued_at": float(self.issued_at),
            "job_id": self.job_id,
            "node": self.node,
            "workspace": self.workspace,
        }

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        b = _Body(cls.KIND, body)
        raw = b.raw("deleted")
        if not isinstance(raw, list):
            raise RecordError(f"{cls.KIND}.deleted must be a list of files")
        deleted = []
        for i, item in enumerate(raw):
            f = _Body(f"{cls.KIND}.deleted[{i}]", item)
            deleted.append(
                DeletedFile(path=f.text("path"), sha256=f.hex64("sha256"), bytes=f.integer("bytes"))
            )
            f.done()
        out = cls(
            node=b.text("node", NAME_RE),
            job_id=b.text("job_id", NAME_RE),
            deleted=tuple(deleted),
            workspace=b.text("workspace", empty=True),
            issued_at=b.number("issued_at"),
        )
        b.done()
        return out


AnyRecord = RegistrationCertificate | Grant | UsageReceipt | DestructionAttestation

_KINDS: dict[str, type[RegistrationCertificate | Grant | UsageReceipt | DestructionAttestation]] = {
    c.KIND: c for c in (RegistrationCertificate, Grant, UsageReceipt, DestructionAttestation)
}
RECORD_KINDS: tuple[str, ...] = tuple(_KINDS)


def parse_record(signed: SignedRecord) -> AnyRecord:
    """The typed body of any signed record (strictly validated, not verified)."""
    cls = _KINDS.get(signed.kind)
    if cls is None:
        raise RecordError(f"unknown record kind {signed.kind!r}")
    return cls.from_dict(signed.body)
