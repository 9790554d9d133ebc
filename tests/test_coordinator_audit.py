"""The coordinator's checks on records nodes send: receipts and grants."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from wharf.coordinator.audit import Audit
from wharf.identity import Identity, init_ca, issue
from wharf.ledger import verify_entries
from wharf.records import Grant, Protections, Quotas, SignedRecord, UsageReceipt

SHA = "ab" * 32


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Identity]:
    init_ca(tmp_path / "ca")
    init_ca(tmp_path / "other")
    out = {}
    for role, name, ca in (
        ("coordinator", "coordinator", "ca"),
        ("node", "hospital-a", "ca"),
        ("node", "hospital-b", "ca"),
        ("node", "hospital-a", "other"),
    ):
        d = tmp_path / f"certs-{ca}"
        issue(tmp_path / ca, role, name, d)
        out[f"{name}@{ca}"] = Identity.load(
            d / f"{name}.pem", d / f"{name}.key", tmp_path / ca / "ca.pem"
        )
    return out


@pytest.fixture
def audit(pki: dict[str, Identity], tmp_path: Path) -> Audit:
    coord = pki["coordinator@ca"]
    return Audit(sa.create_engine(f"sqlite:///{tmp_path / 'c.db'}"), coord.signer(), coord.ca_pem)


def receipt(signer_id: Identity, **kw: object) -> SignedRecord:
    fields: dict[str, object] = dict(
        grant_id="g" * 32,
        job_id="job1",
        round=3,
        node="hospital-a",
        rows_used=100,
        epochs=1,
        compute_seconds=1.5,
        bytes_sent=4000,
        sent_sha256=SHA,
    )
    fields.update(kw)
    return UsageReceipt(**fields).sign(signer_id.signer())  # type: ignore[arg-type]


def test_receipt_is_verified_countersigned_and_logged(
    audit: Audit, pki: dict[str, Identity]
) -> None:
    usage, countersigned = audit.receipt(
        receipt(pki["hospital-a@ca"]).to_json(), "hospital-a", "job1", 3
    )
    assert usage.rows_used == 100
    peers = countersigned.verify_countersignatures(pki["coordinator@ca"].ca_pem)
    assert [p.name for p in peers] == ["coordinator"]
    audit.log_record(countersigned)
    assert audit.ledger is not None
    report = verify_entries(audit.ledger.entries(), pki["coordinator@ca"].ca_pem)
    assert report.ok and report.count == 1


@pytest.mark.parametrize(
    ("make", "node", "job", "rnd", "problem"),
    [
        (
            lambda p: receipt(p["hospital-b@ca"], node="hospital-b"),
            "hospital-a",
            "job1",
            3,
            "refused",
        ),
        (lambda p: receipt(p["hospital-a@other"]), "hospital-a", "job1", 3, "refused"),
        (lambda p: receipt(p["hospital-a@ca"]), "hospital-a", "job2", 3, "another job"),
        (lambda p: receipt(p["hospital-a@ca"]), "hospital-a", "job1", 4, "another job or round"),
    ],
)
def test_bad_receipts_are_refused(audit, pki, make, node, job, rnd, problem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=problem):
        audit.receipt(make(pki).to_json(), node, job, rnd)


def test_tampered_receipt_hash_or_signature_is_refused(
    audit: Audit, pki: dict[str, Identity]
) -> None:
    raw = json.loads(receipt(pki["hospital-a@ca"]).to_json())
    raw["body"]["rows_used"] = 1  # the hash no longer matches
    with pytest.raises(ValueError, match=r"refused|malformed"):
        audit.receipt(json.dumps(raw), "hospital-a", "job1", 3)
    raw = json.loads(receipt(pki["hospital-a@ca"]).to_json())
    sig = raw["signature"]
    raw["signature"] = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    with pytest.raises(ValueError, match=r"refused|malformed"):
        audit.receipt(json.dumps(raw), "hospital-a", "job1", 3)


def grant(signer_id: Identity, **kw: object) -> SignedRecord:
    fields: dict[str, object] = dict(
        node="hospital-a",
        job_id="job1",
        job_hash=SHA,
        requester="alice",
        purpose="medical-research",
        datasets=("bc",),
        columns=(),
        quotas=Quotas(rounds=10, epochs=1, samples=10_000),
        protections=Protections(secure_aggregation=True),
        expires_at=time.time() + 3600,
    )
    fields.update(kw)
    return Grant(**fields).sign(signer_id.signer())  # type: ignore[arg-type]


def test_forged_grants_are_refused_by_the_coordinator(
    audit: Audit, pki: dict[str, Identity]
) -> None:
    good = grant(pki["hospital-a@ca"])
    assert audit.grant(good.to_json(), "hospital-a", "job1", SHA) is not None
    cases = [
        (grant(pki["hospital-a@other"]), SHA),  # wrong key (another CA)
        (grant(pki["hospital-b@ca"], node="hospital-b"), SHA),  # another node's grant
        (good, "cd" * 32),  # another job hash
        (
            grant(pki["hospital-a@ca"], expires_at=time.time() - 10, issued_at=time.time() - 100),
            SHA,
        ),  # expired
    ]
    for signed, job_hash in cases:
        with pytest.raises(ValueError, match="grant"):
            audit.grant(signed.to_json(), "hospital-a", "job1", job_hash)
