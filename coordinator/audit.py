"""The coordinator's side of traceability: its audit ledger and record checks.

Every decision that matters (job submitted, grant issued/refused/revoked,
round started/finished, usage receipt, model stored, destruction) is appended
to a hash-chained ledger signed with the coordinator's certified key, in the
coordinator's own database (``wharf audit verify coordinator.db --ca ca.pem``).
Records the nodes sign (registration certificates, grants, receipts,
attestations) are verified against the deployment CA and the calling node's
name before they are accepted or logged.

In the plaintext experiment mode there is no key: nothing is signed, the
ledger is off, and records are accepted unverified (the mode says so loudly).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.engine import Engine

from wharf.identity import Signer
from wharf.ledger import Ledger
from wharf.records import (
    DestructionAttestation,
    Grant,
    RecordError,
    RegistrationCertificate,
    SignedRecord,
    UsageReceipt,
)

log = logging.getLogger("wharf.coordinator")


class Audit:
    """Ledger appends and record verification for one coordinator."""

    def __init__(self, engine: Engine, signer: Signer | None, ca_pem: bytes | None) -> None:
        self.signer = signer
        self.ca_pem = ca_pem
        self.ledger = Ledger(engine, signer) if signer is not None else None

    def log(self, kind: str, job_id: str, payload: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.append(kind, job_id, payload)

    def log_record(self, signed: SignedRecord, extra: dict[str, Any] | None = None) -> None:
        if self.ledger is not None:
            self.ledger.append_record(signed, extra=extra)

    def head(self) -> tuple[int, str]:
        if self.ledger is None:
            return 0, ""
        return self.ledger.head()

    # -- records from nodes -----------------------------------------------------------
    def _parse(self, text: str, what: str) -> SignedRecord:
        try:
            return SignedRecord.from_json(text)
        except (RecordError, ValueError) as exc:
            raise ValueError(f"{what} is malformed: {exc}") from None

    def registration(self, text: str, node: str) -> RegistrationCertificate | None:
        """Verify a registration certificate sent by ``node`` (None in plaintext mode)."""
        if self.ca_pem is None:
            return None
        signed = self._parse(text, "registration certificate")
        try:
            return RegistrationCertificate.verified(signed, self.ca_pem, expect_name=node)
        except RecordError as exc:
            raise ValueError(f"registration certificate refused: {exc}") from None

    def grant(self, text: str, node: str, job_id: str, job_hash: str) -> SignedRecord | None:
        """Verify a signed grant for this exact job from ``node``."""
        if self.ca_pem is None:
            return None
        signed = self._parse(text, "grant")
        try:
            grant = Grant.verified(signed, self.ca_pem, expect_name=node)
        except RecordError as exc:
            raise ValueError(f"grant refused: {exc}") from None
        if grant.job_id != job_id or grant.job_hash != job_hash:
            raise ValueError("grant refused: it is for another job or another job hash")
        if grant.expires_at and grant.expires_at < time.time():
            raise ValueError("grant refused: it has expired")
        return signed

    def receipt(
        self, text: str, node: str, job_id: str, rnd: int
    ) -> tuple[UsageReceipt, SignedRecord]:
        """Verify a usage receipt and return it countersigned by the coordinator."""
        signed = self._parse(text, "usage receipt")
        if self.ca_pem is None or self.signer is None:
            return UsageReceipt.from_record(signed), signed
        try:
            receipt = UsageReceipt.verified(signed, self.ca_pem, expect_name=node)
        except RecordError as exc:
            raise ValueError(f"usage receipt refused: {exc}") from None
        if receipt.job_id != job_id or receipt.round != rnd:
            raise ValueError("usage receipt refused: it names another job or round")
        return receipt, signed.countersign(self.signer)

    def attestation(self, text: str, node: str, job_id: str) -> SignedRecord:
        signed = self._parse(text, "destruction attestation")
        if self.ca_pem is None:
            return signed
        try:
            att = DestructionAttestation.verified(signed, self.ca_pem, expect_name=node)
        except RecordError as exc:
            raise ValueError(f"destruction attestation refused: {exc}") from None
        if att.job_id != job_id:
            raise ValueError("destruction attestation names another job")
        return signed
