"""Signed records (registration, grant, receipt, destruction) with real keys from a real CA."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki

from wharf.identity import Signer, init_ca, issue
from wharf.node.datasets import describe, schema_hash
from wharf.records import (
    DestructionAttestation,
    Grant,
    GrantError,
    Protections,
    Quotas,
    RecordError,
    RegistrationCertificate,
    SignedRecord,
    UsageReceipt,
    inventory,
    parse_record,
)

H = "ab" * 32
H2 = "cd" * 32
SCHEMA = (("age", "int64"), ("bmi", "float64"), ("ssn", "int64"), ("y", "int64"))


def signer(pki: Pki, name: str) -> Signer:
    return pki[name].signer() if name in pki.ids else pki.coordinator.signer()


def ca(pki: Pki) -> bytes:
    return pki.coordinator.ca_pem


def registration(node: str = "hospital-a", **kw: Any) -> RegistrationCertificate:
    fields: dict[str, Any] = {
        "node": node,
        "dataset": "cancer",
        "fingerprint": H,
        "schema": SCHEMA,
        "schema_hash": schema_hash(SCHEMA),
        "row_count": 569,
        "label": "y",
        "features": ("age", "bmi", "ssn"),
        "classification": "general",
        "column_levels": (("bmi", "important"),),
        "allowed_purposes": ("medical-research",),
        "prohibited_columns": ("ssn",),
    }
    fields.update(kw)
    return RegistrationCertificate(**fields)


def grant(node: str = "hospital-a", **kw: Any) -> Grant:
    now = time.time()
    fields: dict[str, Any] = {
        "node": node,
        "job_id": "job-1",
        "job_hash": H,
        "requester": "alice",
        "purpose": "medical-research",
        "datasets": ("cancer",),
        "columns": ("age", "y"),
        "quotas": Quotas(rounds=10, epochs=2, samples=10_000),
        "protections": Protections(secure_aggregation=True, dp_epsilon=4.0, dp_delta=1e-5),
        "expires_at": now + 3600,
        "issued_at": now,
    }
    fields.update(kw)
    return Grant(**fields)


def receipt(node: str = "hospital-a", **kw: Any) -> UsageReceipt:
    fields: dict[str, Any] = {
        "grant_id": "g1",
        "job_id": "job-1",
        "round": 3,
        "node": node,
        "rows_used": 569,
        "epochs": 2,
        "compute_seconds": 1.25,
        "bytes_sent": 4096,
        "sent_sha256": H,
        "coordinator_chain_head": H2,
        "coordinator_chain_seq": 17,
    }
    fields.update(kw)
    return UsageReceipt(**fields)


def destruction(node: str = "hospital-a", **kw: Any) -> DestructionAttestation:
    from wharf.records import DeletedFile

    fields: dict[str, Any] = {
        "node": node,
        "job_id": "job-1",
        "deleted": (DeletedFile("model.safetensors", H, 1234), DeletedFile("x.npy", H2, 8)),
        "workspace": "/var/wharf/work/job-1",
    }
    fields.update(kw)
    return DestructionAttestation(**fields)


MAKERS = [registration, grant, receipt, destruction]


def _mutate(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.0
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    if isinstance(value, dict):
        return {} if value else {"x": 1}
    return 1.0  # None


# --------------------------------------------------------------------------- sign / verify


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_each_kind_signs_verifies_and_round_trips(pki: Pki, make: Any) -> None:
    record = make()
    signed = record.sign(signer(pki, "hospital-a"))
    peer = signed.verify(ca(pki))
    assert (peer.name, peer.role) == ("hospital-a", "node")
    back = SignedRecord.from_json(signed.to_json())
    assert back == signed
    assert type(record).verified(back, ca(pki), expect_name="hospital-a") == record
    assert parse_record(back) == record
    assert signed.record_hash == record.record_hash()
    assert json.loads(signed.to_json())["signature"]  # base64 text in JSON


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_every_field_tampered_is_a_hash_mismatch(pki: Pki, make: Any) -> None:
    signed = make().sign(signer(pki, "hospital-a"))
    for key in signed.body:
        raw = json.loads(signed.to_json())
        raw["body"][key] = _mutate(raw["body"][key])
        forged = SignedRecord.from_dict(raw)
        with pytest.raises(RecordError, match="hash mismatch"):
            forged.verify(ca(pki))


@pytest.mark.parametrize(
    ("make", "key", "value"),
    [
        (registration, "row_count", 10),
        (registration, "prohibited_columns", []),
        (grant, "job_hash", H2),
        (grant, "requester", "bob"),
        (receipt, "rows_used", 1),
        (receipt, "sent_sha256", H2),
        (destruction, "deleted", []),
    ],
)
def test_tampered_field_with_recomputed_hash_is_a_bad_signature(
    pki: Pki, make: Any, key: str, value: Any
) -> None:
    signed = make().sign(signer(pki, "hospital-a"))
    body = {**signed.body, key: value}
    forged = replace(signed, body=body, record_hash=type(make()).from_dict(body).record_hash())
    with pytest.raises(RecordError, match="bad signature"):
        forged.verify(ca(pki))


def test_foreign_ca_is_rejected(pki: Pki) -> None:
    impostor = pki.foreign["hospital-a"].signer()  # same name and role, another CA
    signed = grant().sign(impostor)
    with pytest.raises(RecordError, match="not from the CA"):
        signed.verify(ca(pki))


def test_wrong_role_and_wrong_name(pki: Pki) -> None:
    by_developer = grant(node="alice").sign(signer(pki, "alice"))
    with pytest.raises(RecordError, match=r"wrong role.*developer 'alice'.*expected a node"):
        by_developer.verify(ca(pki))
    signed = grant().sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match=r"wrong signer.*'hospital-a', expected 'hospital-b'"):
        signed.verify(ca(pki), expect_name="hospital-b")
    # A node cannot vouch for another node.
    for_other = grant(node="hospital-a").sign(signer(pki, "hospital-b"))
    with pytest.raises(RecordError, match="speaks for 'hospital-a' but is signed by 'hospital-b'"):
        for_other.verify(ca(pki))
    # Explicitly asking for any role still checks the rest.
    assert by_developer.verify(ca(pki), expect_role=None).name == "alice"


def test_expired_and_future_records(pki: Pki) -> None:
    now = time.time()
    expired = grant(issued_at=now - 120, expires_at=now - 60).sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="grant expired at"):
        expired.verify(ca(pki))
    assert expired.verify(ca(pki), now=now - 90).name == "hospital-a"  # in force back then
    future = receipt(issued_at=now + 86400).sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="issued in the future"):
        future.verify(ca(pki))


def test_certificate_validity_is_judged_at_issue_time(tmp_path: Path) -> None:
    # A CA of its own: its validity starts 5 minutes before now, room for a short-lived cert.
    files = init_ca(tmp_path / "ca")
    now = datetime.now(UTC)
    issue(
        tmp_path / "ca",
        "node",
        "hospital-old",
        tmp_path,
        _not_valid_before=now - timedelta(seconds=240),
        _not_valid_after=now - timedelta(seconds=60),
    )
    old = Signer(
        (tmp_path / "hospital-old.key").read_bytes(), (tmp_path / "hospital-old.pem").read_bytes()
    )
    ca_pem = files.cert.read_bytes()
    back_then = (now - timedelta(seconds=120)).timestamp()
    historic = receipt(node="hospital-old", issued_at=back_then).sign(old)
    assert historic.verify(ca_pem).name == "hospital-old"  # evidence outlives the certificate
    fresh = receipt(node="hospital-old").sign(old)
    with pytest.raises(RecordError, match="had expired"):
        fresh.verify(ca_pem)
    before = receipt(node="hospital-old", issued_at=(now - timedelta(seconds=270)).timestamp())
    with pytest.raises(RecordError, match="not yet valid"):
        before.sign(old).verify(ca_pem)


def test_another_deployment_ca_file_rejects(pki: Pki, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other")
    signed = registration().sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="not from the CA"):
        signed.verify(other.cert.read_bytes())


# --------------------------------------------------------------------------- countersignatures


def test_receipt_countersignature(pki: Pki) -> None:
    r = receipt()
    signed = r.sign(signer(pki, "hospital-a"))
    signed.verify(ca(pki))
    with pytest.raises(RecordError, match="no countersignature by coordinator"):
        signed.verify_countersignatures(ca(pki))
    accepted = signed.countersign(pki.coordinator.signer())
    back = SignedRecord.from_json(accepted.to_json())
    peers = back.verify_countersignatures(ca(pki), expect_name="coordinator")
    assert [(p.name, p.role) for p in peers] == [("coordinator", "coordinator")]
    back.verify(ca(pki))  # the node's signature is untouched

    standalone = r.countersign(pki.coordinator.signer())
    assert standalone.verify("receipt", r.record_hash(), ca(pki)).name == "coordinator"
    with pytest.raises(RecordError, match="bad countersignature"):
        standalone.verify("receipt", receipt(rows_used=1).record_hash(), ca(pki))

    by_node = signed.countersign(signer(pki, "hospital-b"))
    with pytest.raises(RecordError, match="no countersignature by coordinator"):
        by_node.verify_countersignatures(ca(pki))

    cs = accepted.countersignatures[0]
    forged = replace(
        accepted, countersignatures=(replace(cs, countersigned_at=cs.countersigned_at + 1),)
    )
    with pytest.raises(RecordError, match="bad countersignature"):
        forged.verify_countersignatures(ca(pki))
    foreign = signed.countersign(pki.foreign["alice"].signer())
    with pytest.raises(RecordError, match="not from the CA"):
        foreign.verify_countersignatures(ca(pki))


# --------------------------------------------------------------------------- grant checks


def test_grant_check_names_each_reason() -> None:
    g = grant(bundle_sha256=H2)
    now = g.issued_at + 10
    assert (
        g.check("job-1", H, now, node="hospital-a", dataset="cancer", round=10, bundle_sha256=H2)
        == []
    )
    cases = {
        "job hash changed": {"job_hash": H2},
        "grant is for job 'job-1', not 'job-2'": {"job_id": "job-2"},
    }
    for reason, override in cases.items():
        args = {"job_id": "job-1", "job_hash": H, **override}
        (why,) = g.check(args["job_id"], args["job_hash"], now)
        assert reason in why
    assert g.check("job-1", H, now, revoked=True) == ["grant was revoked by the node's operator"]
    assert "grant expired" in g.check("job-1", H, g.expires_at + 1)[0]
    assert "node 'hospital-a', not 'hospital-b'" in g.check("job-1", H, now, node="hospital-b")[0]
    assert "round 11 is beyond the 10" in g.check("job-1", H, now, round=11)[0]
    assert "3 epochs exceed" in g.check("job-1", H, now, epochs=3)[0]
    assert "sample quota exhausted" in g.check("job-1", H, now, samples=10_001)[0]
    assert "code bundle" in g.check("job-1", H, now, bundle_sha256="")[0]
    assert "dataset 'other' is not granted" in g.check("job-1", H, now, dataset="other")[0]
    assert "'ssn'" not in str(g.check("job-1", H, now, columns=["age"]))
    assert "ssn not granted" in g.check("job-1", H, now, columns=["age", "ssn"])[0]
    with pytest.raises(GrantError, match=r"job hash changed.*revoked"):
        g.ensure("job-1", H2, now, revoked=True)


def test_forged_grant_is_refused(pki: Pki) -> None:
    """A grant from the wrong key, for another job hash, or expired, never authorises."""
    g = grant()
    wrong_key = g.sign(pki.foreign["hospital-a"].signer())
    with pytest.raises(RecordError, match="not from the CA"):
        Grant.verified(wrong_key, ca(pki), expect_name="hospital-a")
    good = Grant.verified(g.sign(signer(pki, "hospital-a")), ca(pki), expect_name="hospital-a")
    assert good.check("job-1", H2)  # the job changed since the grant
    with pytest.raises(RecordError, match="expected a grant record"):
        Grant.verified(receipt().sign(signer(pki, "hospital-a")), ca(pki))


# --------------------------------------------------------------------------- shapes


def test_registration_from_a_real_description(pki: Pki, tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("age,bmi,ssn,y\n50,22.5,123,0\n61,30.1,456,1\n", encoding="utf-8")
    desc = describe(csv, "y")
    cert = RegistrationCertificate.describe(
        "hospital-a",
        "cancer",
        desc,
        classification="general",
        column_levels={"bmi": "important"},
        allowed_purposes=["medical-research"],
        prohibited_columns=["ssn"],
    )
    assert cert.schema_hash == desc.schema_hash and cert.row_count == 2
    assert cert.level_of("bmi") == "important" and cert.level_of("age") == "general"
    assert replace(cert, classification="important").level_of("age") == "important"
    assert "rows" not in json.dumps(cert.to_dict()).replace("row_count", "")
    RegistrationCertificate.verified(cert.sign(signer(pki, "hospital-a")), ca(pki))
    with pytest.raises(RecordError, match="column_levels names 'nope'"):
        RegistrationCertificate.describe(
            "hospital-a", "cancer", desc, column_levels={"nope": "core"}
        )
    with pytest.raises(RecordError, match="prohibited_columns names 'nope'"):
        RegistrationCertificate.describe("hospital-a", "cancer", desc, prohibited_columns=["nope"])
    with pytest.raises(RecordError, match="unknown classification level 'secret'"):
        RegistrationCertificate.describe("hospital-a", "cancer", desc, classification="secret")
    with pytest.raises(RecordError, match="schema_hash does not match"):
        registration(schema_hash=H).sign(signer(pki, "hospital-a"))


def test_malformed_records(pki: Pki) -> None:
    signed = receipt().sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="not valid JSON"):
        SignedRecord.from_json("{nope")
    raw = json.loads(signed.to_json())
    raw["signature"] = "***"
    with pytest.raises(RecordError, match="signature is not valid base64"):
        SignedRecord.from_dict(raw)
    raw = json.loads(signed.to_json())
    raw["extra"] = 1
    with pytest.raises(RecordError, match="unknown field 'extra'"):
        SignedRecord.from_dict(raw)
    unknown_kind = replace(signed, kind="invoice")
    with pytest.raises(RecordError, match="unknown record kind 'invoice'"):
        unknown_kind.verify(ca(pki))
    body = {**signed.body, "bonus": 1}
    sneaky = replace(signed, body=body, record_hash=signed.record_hash)
    with pytest.raises(RecordError, match="hash mismatch"):
        sneaky.verify(ca(pki))
    with pytest.raises(RecordError, match="unknown field 'bonus'"):
        UsageReceipt.from_dict(body)
    with pytest.raises(RecordError, match="missing field 'round'"):
        UsageReceipt.from_dict({k: v for k, v in signed.body.items() if k != "round"})
    with pytest.raises(RecordError, match=r"rows_used must be an integer >= 0"):
        receipt(rows_used=-1).sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="expires_at must be after issued_at"):
        grant(expires_at=0.0).sign(signer(pki, "hospital-a"))


def test_destruction_inventory(pki: Pki, tmp_path: Path) -> None:
    work = tmp_path / "job-1"
    (work / "round-1").mkdir(parents=True)
    (work / "round-1" / "update.bin").write_bytes(b"\x01" * 100)
    (work / "data.npy").write_bytes(b"abc")
    (work / "link").symlink_to(tmp_path)
    files = inventory(work)
    assert [(f.path, f.bytes) for f in files] == [("data.npy", 3), ("round-1/update.bin", 100)]
    att = destruction(deleted=files, workspace=str(work))
    signed = att.sign(signer(pki, "hospital-a"))
    assert DestructionAttestation.verified(signed, ca(pki)).deleted == files


def test_absurd_times_are_record_errors(pki: Pki) -> None:
    r = receipt(issued_at=1e300).sign(signer(pki, "hospital-a"))
    with pytest.raises(RecordError, match="out of range"):
        r.verify(ca(pki))
