"""The node's side of one-scenario-one-authorisation: offers, grants, the check before
every task and upload, usage receipts, destruction attestations and the node ledger.

Real parts throughout: a real SQLite node database, real keys from the test
deployment CA (``conftest.pki``), real dataset files, the real CLI (typer's
CliRunner, in-process) and, for one task, the real training worker process.
The only stand-in is :class:`StubCoordinator`, which plays the coordinator's
NodeService stub — the other side of the wire — so the daemon's handlers can be
driven call by call; end-to-end runs with real processes live in ``test_e2e*``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import Pki
from typer.testing import CliRunner

from wharf import spec as spec_mod
from wharf.algorithms import models
from wharf.bundle import pack
from wharf.chunks import iter_file_chunks
from wharf.identity import Signer
from wharf.ledger import verify_path
from wharf.node import config as node_config
from wharf.node import daemon as daemon_mod
from wharf.node.cli import node_app
from wharf.node.daemon import NodeDaemon
from wharf.node.grants import NO_POLICY_REASON, GrantBook, GrantCheckError, Offer, Usage
from wharf.node.state import NodeState, grants
from wharf.proto import wharf_pb2 as pb
from wharf.records import (
    DestructionAttestation,
    Grant,
    Protections,
    Quotas,
    SignedRecord,
    UsageReceipt,
)

runner = CliRunner()
ROWS = 40

POLICY = """
allowed_purposes = ["medical-research"]

[levels.general]
secure_aggregation = false

[[auto_approve]]
requester = "alice"
purpose = "medical-research"
max_level = "general"
"""


# --------------------------------------------------------------------------- the node


def write_csv(path: Path) -> Path:
    rng = np.random.default_rng(1)
    pd.DataFrame(
        {
            "age": rng.normal(50, 10, ROWS),
            "bmi": rng.normal(25, 3, ROWS),
            "ssn": rng.integers(1_000_000, 9_999_999, ROWS),
            "y": rng.integers(0, 2, ROWS),
        }
    ).to_csv(path, index=False)
    return path


def make_node(pki: Pki, home: Path, *, policy: str | None = POLICY) -> Path:
    """A node home: config (with a policy file unless ``policy`` is None) and a dataset
    'cancer' registered through the CLI (bmi important, ssn prohibited)."""
    home.mkdir(parents=True, exist_ok=True)
    certs = pki.root / "certs"
    if policy is not None:
        (home / "policy.toml").write_text(policy, encoding="utf-8")
    config = home / "node.toml"
    node_config.write(
        config,
        coordinator="127.0.0.1:9",
        state_dir="state",
        cert=str(certs / "hospital-a.pem"),
        key=str(certs / "hospital-a.key"),
        ca=str(pki.root / "ca" / "ca.pem"),
        policy="policy.toml" if policy is not None else None,
    )
    csv = write_csv(home / "cancer.csv")
    res = runner.invoke(
        node_app,
        [
            "dataset",
            "add",
            "cancer",
            str(csv),
            "--label",
            "y",
            "--column-level",
            "bmi=important",
            "--purpose",
            "medical-research",
            "--prohibit",
            "ssn",
            "--config",
            str(config),
        ],
    )
    assert res.exit_code == 0, res.output
    return config


@pytest.fixture
def config(pki: Pki, tmp_path: Path) -> Path:
    return make_node(pki, tmp_path / "node")


@pytest.fixture
def daemon(config: Path) -> Iterator[NodeDaemon]:
    d = NodeDaemon(node_config.load(config))
    yield d
    d.stop()


def cli(config: Path, *args: str) -> Any:
    return runner.invoke(node_app, [*args, "--config", str(config)])


# --------------------------------------------------------------------------- jobs and tasks


def job_spec(**sections: Any) -> spec_mod.JobSpec:
    raw: dict[str, Any] = {
        "name": "study",
        "purpose": "medical-research",
        "data": {"dataset": "cancer", "features": ["age"]},
        "model": {"kind": "mlp", "num_classes": 2, "hidden": [3]},
        "training": {"epochs": 1, "batch_size": 8},
        "federation": {"rounds": 2, "min_nodes": 1, "secure": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return spec_mod.from_dict(raw)


def offer_task(job_id: str, spec: spec_mod.JobSpec, requester: str = "alice") -> pb.Task:
    return pb.Task(
        task_id=f"offer-{job_id}",
        job_id=job_id,
        kind=pb.TASK_OFFER,
        job_spec_json=spec.canonical_json(),
        job_hash=spec.job_hash(),
        requester=requester,
        dataset=spec.data.dataset,
        bundle=pb.BlobRef(sha256=spec.bundle.sha256),
        ledger_seq=3,
        ledger_head="ab" * 32,
    )


def offer_of(job_id: str, spec: spec_mod.JobSpec, requester: str = "alice") -> Offer:
    return Offer(
        job_id=job_id,
        job_hash=spec.job_hash(),
        spec_json=spec.canonical_json(),
        requester=requester,
        dataset=spec.data.dataset,
        bundle_sha256=spec.bundle.sha256,
    )


def train_task(job_id: str, spec: spec_mod.JobSpec, rnd: int, model: pb.BlobRef) -> pb.Task:
    return pb.Task(
        task_id=f"{job_id}-train-{rnd}",
        job_id=job_id,
        round=rnd,
        kind=pb.TASK_TRAIN,
        job_spec_json=spec.canonical_json(),
        job_hash=spec.job_hash(),
        model=model,
        dataset="cancer",
        deadline_unix=time.time() + 300,
        ledger_seq=11 + rnd,
        ledger_head=hashlib.sha256(f"head-{rnd}".encode()).hexdigest(),
    )


class StubCoordinator:
    """Plays the coordinator's side of NodeService for the daemon's handlers: records
    every call and answers as the coordinator does (it verifies a usage receipt and
    returns it countersigned; it serves blobs it holds)."""

    def __init__(self, pki: Pki, blobs: dict[str, Path] | None = None) -> None:
        self.ca = pki.coordinator.ca_pem
        self.signer: Signer = pki.coordinator.signer()
        self.blobs = dict(blobs or {})
        self.decisions: list[pb.Decision] = []
        self.attestations: list[pb.Attestation] = []
        self.uploads: list[tuple[pb.ResultHeader, bytes]] = []
        self.downloads: list[str] = []
        self.countersign = True

    def Decide(self, request: pb.Decision, **_: Any) -> pb.DecisionAck:
        self.decisions.append(request)
        return pb.DecisionAck(accepted=True)

    def Attest(self, request: pb.Attestation, **_: Any) -> pb.DecisionAck:
        self.attestations.append(request)
        return pb.DecisionAck(accepted=True)

    def DownloadBlob(self, request: pb.BlobRequest, **_: Any) -> Iterator[pb.BlobChunk]:
        self.downloads.append(request.sha256)
        return iter_file_chunks(self.blobs[request.sha256])

    def UploadResult(self, chunks: Iterable[pb.UploadChunk], **_: Any) -> pb.UploadAck:
        header, data = pb.ResultHeader(), b""
        for chunk in chunks:
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                data += chunk.data
        self.uploads.append((header, data))
        receipt = ""
        if header.receipt_json and self.countersign:
            signed = SignedRecord.from_json(header.receipt_json)
            signed.verify(self.ca)
            receipt = signed.countersign(self.signer).to_json()
        return pb.UploadAck(
            accepted=True, sha256=hashlib.sha256(data).hexdigest(), receipt_json=receipt
        )


def model_blob(tmp_path: Path, n_features: int = 1) -> tuple[Path, pb.BlobRef]:
    net = models.build_model("mlp", (n_features,), 2, {"hidden": [3]})
    path = tmp_path / "global.safetensors"
    path.write_bytes(models.weights_to_bytes(models.model_to_arrays(net)))
    data = path.read_bytes()
    return path, pb.BlobRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read of a dataset file by the daemon (a spy around the real reader)."""
    seen: list[str] = []
    real = daemon_mod.ds.load_arrays

    def spy(path: Any, *args: Any, **kw: Any) -> Any:
        seen.append(str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(daemon_mod.ds, "load_arrays", spy)
    return seen


def book_for(state: NodeState, pki: Pki, policy: Path | None = None) -> GrantBook:
    return GrantBook(
        state,
        "hospital-a",
        signer=pki["hospital-a"].signer(),
        ca_pem=pki.coordinator.ca_pem,
        policy_path=policy,
    )


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("sections", "reasons"),
    [
        (
            {"purpose": "marketing"},
            [
                "purpose 'marketing' is not allowed by this node's policy (medical-research)",
                "purpose 'marketing' is not allowed for dataset 'cancer' (medical-research)",
            ],
        ),
        ({"data": {"features": ["age", "ssn"]}}, ["column 'ssn' prohibited (negative list)"]),
        (
            {"data": {"features": ["age", "bmi"]}},
            [
                "column 'bmi' (level 'important') require secure aggregation",
                "column 'bmi' (level 'important') require differential privacy",
            ],
        ),
    ],
)
def test_an_offer_against_policy_is_refused_with_its_reasons_and_no_data_is_read(
    pki: Pki,
    config: Path,
    daemon: NodeDaemon,
    reads: list[str],
    tmp_path: Path,
    sections: dict[str, Any],
    reasons: list[str],
) -> None:
    spec = job_spec(**sections)
    stub = StubCoordinator(pki)
    daemon._handle(stub, offer_task("job1", spec))  # type: ignore[arg-type]
    (decision,) = stub.decisions
    assert decision.outcome == "refused" and decision.job_hash == spec.job_hash()
    assert not decision.grant_json
    for reason in reasons:
        assert reason in decision.reason, decision.reason
    row = daemon.state.get_grant("job1")
    assert row is not None and row.outcome == "refused" and row.reported
    (entry,) = daemon.state.ledger.entries(kind="grant_refused")
    assert entry.job_id == "job1" and "; ".join(entry.payload["reasons"]) == decision.reason
    # The coordinator sends a task anyway: it fails, and the data is never read.
    _, ref = model_blob(tmp_path)
    daemon._handle(stub, train_task("job1", spec, 1, ref))  # type: ignore[arg-type]
    ((header, payload),) = stub.uploads
    assert not header.ok and payload == b""
    assert header.error.startswith("no valid grant for job job1: this node refused it")
    assert reads == [] and not (daemon.state.work_dir / "job1").exists()


def test_offers_that_do_not_add_up_are_refused(pki: Pki, config: Path) -> None:
    state = NodeState(config.parent / "state")
    book = book_for(state, pki, config.parent / "policy.toml")
    spec = job_spec()
    bad_hash = Offer("j1", "0" * 64, spec.canonical_json(), "alice", "cancer")
    assert "does not match its spec" in book.offer(bad_hash).reason
    other = Offer("j2", spec.job_hash(), spec.canonical_json(), "alice", "genome")
    assert "the offer names dataset 'genome'" in book.offer(other).reason
    unknown = job_spec(data={"dataset": "genome"})
    row = book.offer(offer_of("j3", unknown))
    assert row.outcome == "refused" and "'genome' is not registered" in row.reason
    anonymous = Offer("j4", spec.job_hash(), spec.canonical_json(), "", "cancer")
    assert "requester" in book.offer(anonymous).reason
    assert all(r.outcome == "refused" for r in state.list_grants())


# --------------------------------------------------------------------------- grants


def test_a_standing_rule_auto_approves_and_the_grant_binds_the_job(
    pki: Pki, config: Path, daemon: NodeDaemon
) -> None:
    spec = job_spec()
    stub = StubCoordinator(pki)
    daemon._handle(stub, offer_task("job2", spec))  # type: ignore[arg-type]
    (decision,) = stub.decisions
    assert decision.outcome == "granted" and "auto_approve[0]" in decision.reason
    grant = Grant.verified(
        SignedRecord.from_json(decision.grant_json),
        pki.coordinator.ca_pem,
        expect_name="hospital-a",
    )
    assert grant.job_id == "job2" and grant.job_hash == spec.job_hash()
    assert grant.requester == "alice" and grant.purpose == "medical-research"
    assert grant.datasets == ("cancer",) and grant.columns == ("age", "y")
    assert grant.quotas == Quotas(rounds=2, epochs=1, samples=ROWS * 2)
    assert grant.protections == Protections(secure_aggregation=False)
    assert grant.expires_at == pytest.approx(grant.issued_at + 720 * 3600)
    (entry,) = daemon.state.ledger.entries(kind="grant_issued")
    assert entry.record() == SignedRecord.from_json(decision.grant_json)
    # A re-sent offer (say after a reconnect) gets the same answer and no new entry.
    daemon._handle(stub, offer_task("job2", spec))  # type: ignore[arg-type]
    assert stub.decisions[1] == decision
    assert len(daemon.state.ledger.entries()) == 2  # registration + grant_issued
    # The same job id with another spec is refused; the stored grant stands.
    changed = job_spec(training={"epochs": 3})
    daemon._handle(stub, offer_task("job2", changed))  # type: ignore[arg-type]
    assert stub.decisions[2].outcome == "refused"
    assert "cannot change under the same id" in stub.decisions[2].reason
    row = daemon.state.get_grant("job2")
    assert row is not None and row.outcome == "granted" and row.job_hash == spec.job_hash()


def test_the_operator_sees_that_a_job_keeps_updates_for_valuation(
    pki: Pki, config: Path, daemon: NodeDaemon, tmp_path: Path
) -> None:
    """Granting is consenting to the spec's valuation mode, so the review screen says it."""
    path, ref = model_blob(tmp_path)
    stub = StubCoordinator(pki, {ref.sha256: path})
    clear = job_spec(valuation={"mode": "clear"})
    daemon._handle(stub, offer_task("jobv3c1c", clear, requester="bob"))  # type: ignore[arg-type]
    assert stub.decisions[0].outcome == "pending"
    shown = cli(config, "grant", "show", "jobv")
    assert shown.exit_code == 0, shown.output
    assert "valuation" in shown.output and "contribution" in shown.output


def test_pending_job_approved_by_the_operator_then_revoked_stops_the_next_task(
    pki: Pki, config: Path, daemon: NodeDaemon, reads: list[str], tmp_path: Path
) -> None:
    spec = job_spec()
    path, ref = model_blob(tmp_path)
    stub = StubCoordinator(pki, {ref.sha256: path})
    daemon._handle(stub, offer_task("job3b0b", spec, requester="bob"))  # type: ignore[arg-type]
    assert stub.decisions[0].outcome == "pending"
    assert "requester 'bob' is not 'alice'" in stub.decisions[0].reason
    # Listed for the operator, who reads it and approves it by a job-id prefix.
    res = cli(config, "grants")
    assert res.exit_code == 0 and "job3b0b" in res.output and "pending" in res.output
    res = cli(config, "grant", "show", "job3")
    assert res.exit_code == 0, res.output
    for text in ("bob", "medical-research", "age (general), y (general)", "no code bundle"):
        assert text in res.output
    assert "valuation" not in res.output  # the job keeps nothing for valuation
    # Nothing runs while the job is pending.
    daemon._handle(stub, train_task("job3b0b", spec, 1, ref))  # type: ignore[arg-type]
    assert "awaits the decision of the node's operator" in stub.uploads[-1][0].error
    res = cli(config, "grant", "approve", "job3")
    assert res.exit_code == 0, res.output
    row = daemon.state.get_grant("job3b0b")
    assert row is not None and row.outcome == "granted" and not row.reported
    grant = Grant.verified(
        SignedRecord.from_json(row.grant_json), pki.coordinator.ca_pem, expect_name="hospital-a"
    )
    assert grant.requester == "bob" and grant.job_hash == spec.job_hash()
    # The daemon's reporter tells the coordinator (the CLI only edits the database).
    daemon.report_pending(stub)  # type: ignore[arg-type]
    assert stub.decisions[-1].outcome == "granted"
    assert stub.decisions[-1].grant_json == row.grant_json
    reported = daemon.state.get_grant("job3b0b")
    assert reported is not None and reported.reported
    daemon.report_pending(stub)  # type: ignore[arg-type]
    assert len(stub.decisions) == 2  # nothing new to say

    # Round 1 runs for real: the worker trains, the upload carries a signed receipt.
    daemon._handle(stub, train_task("job3b0b", spec, 1, ref))  # type: ignore[arg-type]
    header, payload = stub.uploads[-1]
    assert header.ok, header.error
    assert len(reads) == 1
    sent = SignedRecord.from_json(header.receipt_json)
    receipt = UsageReceipt.verified(sent, pki.coordinator.ca_pem, expect_name="hospital-a")
    assert receipt.grant_id == grant.grant_id and receipt.job_id == "job3b0b"
    assert receipt.round == 1 and receipt.rows_used == ROWS and receipt.epochs == 1
    assert receipt.bytes_sent == len(payload) == header.blob.size
    assert receipt.sent_sha256 == hashlib.sha256(payload).hexdigest() == header.blob.sha256
    assert receipt.coordinator_chain_seq == 12
    assert receipt.coordinator_chain_head == hashlib.sha256(b"head-1").hexdigest()
    assert receipt.compute_seconds > 0
    # The countersigned copy from the ack is stored and logged.
    (stored,) = daemon.state.receipts_for("job3b0b")
    assert stored.countersigned and stored.samples == ROWS
    back = SignedRecord.from_json(stored.json)
    assert back.record_hash == sent.record_hash
    back.verify_countersignatures(pki.coordinator.ca_pem, expect_role="coordinator")
    (entry,) = daemon.state.ledger.entries(kind="receipt")
    assert entry.record() == back

    # The operator revokes mid-job: round 2 fails at the check, before any data is read.
    assert cli(config, "grant", "revoke", "job3b0b").exit_code == 0
    daemon.report_pending(stub)  # type: ignore[arg-type]
    assert stub.decisions[-1].outcome == "revoked"
    assert stub.decisions[-1].reason == "revoked by the operator"
    daemon._handle(stub, train_task("job3b0b", spec, 2, ref))  # type: ignore[arg-type]
    header, _ = stub.uploads[-1]
    assert not header.ok and not header.receipt_json
    assert (
        header.error
        == "no valid grant for job job3b0b: the grant was revoked by the node's operator"
    )
    assert len(reads) == 1
    (revoked,) = daemon.state.ledger.entries(kind="grant_revoked")
    assert revoked.payload["grant_id"] == grant.grant_id
    # Operator mistakes are one-line errors.
    res = cli(config, "grant", "approve", "job3b0b")
    assert res.exit_code == 2 and "cannot be approved: it is revoked" in res.output
    res = cli(config, "grant", "deny", "nope")
    assert res.exit_code == 2 and "no job 'nope' was offered" in res.output


def test_operator_deny_is_reported_with_its_reason(
    pki: Pki, config: Path, daemon: NodeDaemon
) -> None:
    stub = StubCoordinator(pki)
    daemon._handle(stub, offer_task("job4", job_spec(), requester="bob"))  # type: ignore[arg-type]
    res = cli(config, "grant", "deny", "job4", "--reason", "not this quarter")
    assert res.exit_code == 0, res.output
    daemon.report_pending(stub)  # type: ignore[arg-type]
    assert stub.decisions[-1].outcome == "refused"
    assert stub.decisions[-1].reason == "denied by the operator: not this quarter"
    assert cli(config, "grant", "revoke", "job4").exit_code == 2


def test_a_revocation_during_training_stops_the_upload(
    pki: Pki, config: Path, daemon: NodeDaemon, tmp_path: Path
) -> None:
    spec = job_spec()
    path, ref = model_blob(tmp_path)
    stub = StubCoordinator(pki, {ref.sha256: path})
    daemon._handle(stub, offer_task("job5", spec))  # type: ignore[arg-type]
    real = daemon._run_worker

    def revoke_meanwhile(task: pb.Task, task_dir: Path) -> None:
        real(task, task_dir)
        daemon.grants.revoke("job5")

    daemon._run_worker = revoke_meanwhile  # type: ignore[method-assign]
    daemon._handle(stub, train_task("job5", spec, 1, ref))  # type: ignore[arg-type]
    header, payload = stub.uploads[-1]
    assert not header.ok and payload == b"" and "revoked" in header.error
    assert daemon.state.receipts_for("job5") == []


# --------------------------------------------------------------------------- forged grants


def _forge(state: NodeState, job_id: str, signed: SignedRecord) -> None:
    with state.engine.begin() as c:
        c.execute(
            grants.update().where(grants.c.job_id == job_id).values(grant_json=signed.to_json())
        )


def test_a_forged_grant_is_refused_by_the_node(pki: Pki, config: Path, reads: list[str]) -> None:
    state = NodeState(config.parent / "state")
    book = book_for(state, pki, config.parent / "policy.toml")
    spec = job_spec()
    row = book.offer(offer_of("job6", spec))
    assert row.outcome == "granted"
    real = Grant.from_record(SignedRecord.from_json(row.grant_json))
    book.authorise("job6", spec.job_hash(), spec=spec, dataset="cancer", round=1, epochs=1)
    now = time.time()
    other_hash = job_spec(training={"epochs": 5}).job_hash()
    cases: list[tuple[Grant, Signer, str]] = [
        (real, pki["hospital-b"].signer(), "wrong signer"),
        (real, pki.foreign["hospital-a"].signer(), "not from the CA"),
        (_with(real, job_hash=other_hash), pki["hospital-a"].signer(), "job hash changed"),
        (
            _with(real, issued_at=now - 2, expires_at=now - 1),
            pki["hospital-a"].signer(),
            "expired",
        ),
        (_with(real, node="hospital-b"), pki["hospital-b"].signer(), "wrong signer"),
    ]
    for grant, signer, problem in cases:
        _forge(state, "job6", grant.sign(signer))
        with pytest.raises(GrantCheckError, match=problem) as info:
            book.authorise("job6", spec.job_hash(), spec=spec, dataset="cancer", round=1)
        assert str(info.value).startswith("no valid grant for job job6: ")
    # An edited grant (quota raised, signature kept) is caught too.
    signed = real.sign(pki["hospital-a"].signer())
    raw = signed.to_dict()
    raw["body"]["quotas"]["rounds"] = 1000
    _forge(state, "job6", SignedRecord.from_dict(raw))
    with pytest.raises(GrantCheckError, match="hash mismatch"):
        book.authorise("job6", spec.job_hash(), spec=spec, dataset="cancer", round=1)
    assert reads == []


def _with(grant: Grant, **changes: Any) -> Grant:
    from dataclasses import replace

    return replace(grant, **changes)


def test_a_changed_spec_gets_no_data(
    pki: Pki, config: Path, daemon: NodeDaemon, reads: list[str], tmp_path: Path
) -> None:
    spec = job_spec()
    path, ref = model_blob(tmp_path)
    stub = StubCoordinator(pki, {ref.sha256: path})
    daemon._handle(stub, offer_task("job7", spec))  # type: ignore[arg-type]
    # The coordinator sends a task for a different spec under the granted job id...
    changed = job_spec(training={"epochs": 4})
    daemon._handle(stub, train_task("job7", changed, 1, ref))  # type: ignore[arg-type]
    assert "no valid grant for job job7: job hash changed" in stub.uploads[-1][0].error
    # ... or the granted hash with a different spec.
    forged = train_task("job7", spec, 1, ref)
    forged.job_spec_json = changed.canonical_json()
    daemon._handle(stub, forged)  # type: ignore[arg-type]
    assert "job hash does not match the job spec" in stub.uploads[-1][0].error
    # ... or asks for another dataset, or a secure-aggregation phase of another hash.
    phase = pb.Task(
        task_id="p",
        job_id="job7",
        round=1,
        kind=pb.TASK_SECAGG,
        job_hash=changed.job_hash(),
        secagg_kind="key_directory",
    )
    daemon._handle(stub, phase)  # type: ignore[arg-type]
    assert "no valid grant for job job7: job hash changed" in stub.uploads[-1][0].error
    assert all(not h.ok for h, _ in stub.uploads)
    assert reads == [] and not (daemon.state.work_dir / "job7").exists()


def test_quotas_are_enforced_from_the_receipts(pki: Pki, config: Path) -> None:
    state = NodeState(config.parent / "state")
    book = book_for(state, pki, config.parent / "policy.toml")
    spec = job_spec()  # 2 rounds x 1 epoch x 40 rows = 80 sample visits
    book.offer(offer_of("job8", spec))

    def check(rnd: int, samples: int = ROWS) -> Grant:
        return book.authorise(
            "job8",
            spec.job_hash(),
            spec=spec,
            dataset="cancer",
            round=rnd,
            epochs=1,
            new_samples=samples,
        )

    for rnd in (1, 2):
        grant = check(rnd)
        book.issue_receipt(
            grant, round=rnd, usage=Usage(ROWS, 1, 0.1), bytes_sent=10, sent_sha256="ef" * 32
        )
    assert state.samples_used("job8") == 2 * ROWS
    with pytest.raises(GrantCheckError, match="sample quota exhausted: 120 needed, 80 granted"):
        check(2)
    with pytest.raises(GrantCheckError, match="round 3 is beyond the 2 granted round"):
        check(3, 0)
    with pytest.raises(GrantCheckError, match="5 epochs exceed the granted 1"):
        book.authorise("job8", spec.job_hash(), round=1, epochs=5)
    # Statistics (0 epochs) and protocol phases use no sample visits.
    check(0, 0)


# --------------------------------------------------------------------------- no policy


def test_without_a_policy_file_every_offer_waits_for_the_operator(pki: Pki, tmp_path: Path) -> None:
    config = make_node(pki, tmp_path / "node", policy=None)
    assert node_config.load(config).policy is None
    state = NodeState(config.parent / "state")
    book = book_for(state, pki)
    row = book.offer(offer_of("job9", job_spec(purpose="public-health")))
    # The dataset's own certificate still refuses what it forbids ...
    assert row.outcome == "refused" and "not allowed for dataset 'cancer'" in row.reason
    row = book.offer(offer_of("job10", job_spec(data={"features": ["ssn"]})))
    assert row.outcome == "refused" and "prohibited" in row.reason
    # ... and everything else, even what a policy would auto-approve, is the operator's call.
    row = book.offer(offer_of("job11", job_spec(data={"features": ["age", "bmi"]})))
    assert row.outcome == "pending" and row.reason == NO_POLICY_REASON
    assert book.approve("job11").outcome == "granted"


def test_a_broken_policy_file_stops_the_daemon_at_start(pki: Pki, tmp_path: Path) -> None:
    config = make_node(pki, tmp_path / "node", policy="allowed_purposes = 3\n")
    with pytest.raises(ValueError, match="allowed_purposes must be a list of strings"):
        NodeDaemon(node_config.load(config))


# --------------------------------------------------------------------------- bundles


def test_a_bundle_job_waits_for_the_operator_who_can_read_its_code(
    pki: Pki, config: Path, daemon: NodeDaemon, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "net.py").write_text(
        "import torch\n\ndef build_model(shape, classes):\n"
        "    return torch.nn.Linear(shape[0], classes)  # MARKER\n",
        encoding="utf-8",
    )
    data = pack(code)
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "bundle.zip"
    blob.write_bytes(data)
    spec = spec_mod.with_bundle_hash(
        job_spec(
            model={"kind": "bundle", "num_classes": 2, "hidden": [3], "input_shape": [1]},
            bundle={"model": "net:build_model"},
        ),
        sha,
    )
    stub = StubCoordinator(pki, {sha: blob})
    daemon._handle(stub, offer_task("job12", spec))  # type: ignore[arg-type]
    # alice's standing rule covers her jobs, but not code it does not name.
    assert stub.decisions[0].outcome == "pending"
    assert "code bundle" in stub.decisions[0].reason and "is not listed" in stub.decisions[0].reason
    assert stub.downloads == [sha]
    assert daemon.state.bundle_path(sha).read_bytes() == data
    res = cli(config, "grant", "show", "job12")
    assert res.exit_code == 0, res.output
    assert "net.py" in res.output and "MARKER" in res.output and sha in res.output


# --------------------------------------------------------------------------- job end


def test_end_of_job_deletes_the_workspace_and_attests_what_was_deleted(
    pki: Pki, config: Path, daemon: NodeDaemon
) -> None:
    stub = StubCoordinator(pki)
    daemon._handle(stub, offer_task("job13", job_spec()))  # type: ignore[arg-type]
    ws = daemon.state.work_dir / "job13"
    files = {"t1/result.safetensors": b"\x01" * 100, "t1/worker.log": b"ok\n", "masked.bin": b""}
    for rel, content in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(content)
    end = pb.Task(task_id="end", job_id="job13", kind=pb.TASK_END_JOB)
    daemon._handle(stub, end)  # type: ignore[arg-type]
    assert not ws.exists()
    (sent,) = stub.attestations
    signed = SignedRecord.from_json(sent.attestation_json)
    att = DestructionAttestation.verified(signed, pki.coordinator.ca_pem, expect_name="hospital-a")
    assert att.job_id == "job13" and att.workspace == "work/job13"
    assert {f.path: (f.sha256, f.bytes) for f in att.deleted} == {
        rel: (hashlib.sha256(content).hexdigest(), len(content)) for rel, content in files.items()
    }
    (entry,) = daemon.state.ledger.entries(kind="destruction")
    assert entry.record() == signed
    # END_JOB again (a coordinator retry): the same attestation, nothing new.
    daemon._handle(stub, end)  # type: ignore[arg-type]
    assert stub.attestations[1] == sent
    assert len(daemon.state.ledger.entries(kind="destruction")) == 1


# --------------------------------------------------------------------------- persistence


def test_state_and_ledger_survive_a_restart_and_the_ledger_verifies(pki: Pki, config: Path) -> None:
    state_dir = config.parent / "state"
    policy = config.parent / "policy.toml"
    book = book_for(NodeState(state_dir), pki, policy)
    spec = job_spec()
    book.offer(offer_of("job14", spec))
    book.offer(offer_of("job15", job_spec(), requester="bob"))
    book.offer(offer_of("job16", job_spec(purpose="marketing")))
    grant = book.authorise("job14", spec.job_hash(), spec=spec, round=1, epochs=1)
    receipt = book.issue_receipt(
        grant, round=1, usage=Usage(ROWS, 1, 0.5), bytes_sent=3, sent_sha256="aa" * 32
    )
    # No countersignature came back: the node logs its own copy, saying so.
    assert not book.settle_receipt(receipt.json, "", "the upload failed: unavailable")
    book.revoke("job14")
    book.deny("job15")

    # A new process on the same directory.
    state = NodeState(state_dir, pki["hospital-a"].signer())
    again = book_for(state, pki, policy)
    outcomes = {r.job_id: r.outcome for r in state.list_grants()}
    assert outcomes == {"job14": "revoked", "job15": "refused", "job16": "refused"}
    assert state.samples_used("job14") == ROWS
    with pytest.raises(GrantCheckError, match="revoked"):
        again.authorise("job14", spec.job_hash())
    kinds = [e.kind for e in state.ledger.entries()]
    assert kinds == [
        "registration",
        "grant_issued",
        "grant_pending",
        "grant_refused",
        "receipt",
        "grant_revoked",
        "grant_refused",
    ]
    assert state.ledger.entries(kind="receipt")[0].payload["countersigned"] is False
    report = verify_path(state.db_path, pki.coordinator.ca_pem, expect_name="hospital-a")
    assert report.ok and report.count == len(kinds), report.problem
    res = cli(config, "ledger", "verify")
    assert res.exit_code == 0 and "OK 7 entries" in res.output
    # Editing one entry in the database is caught.
    with state.engine.begin() as c:
        c.execute(
            sa.text("UPDATE ledger SET payload = replace(payload, 'bob', 'eve') WHERE seq = 3")
        )
    report = verify_path(state.db_path, pki.coordinator.ca_pem)
    assert not report.ok and report.first_bad_seq == 3


def test_plaintext_mode_checks_grants_but_signs_nothing(tmp_path: Path) -> None:
    home = tmp_path / "node"
    home.mkdir()
    (home / "policy.toml").write_text(POLICY, encoding="utf-8")
    config = home / "node.toml"
    config.write_text(
        '[node]\ncoordinator = "127.0.0.1:9"\nstate_dir = "state"\npolicy = "policy.toml"\n\n'
        '[insecure]\nname = "hospital-a"\n',
        encoding="utf-8",
    )
    csv = write_csv(home / "cancer.csv")
    res = runner.invoke(
        node_app,
        [
            "dataset",
            "add",
            "cancer",
            str(csv),
            "--label",
            "y",
            "--prohibit",
            "ssn",
            "-c",
            str(config),
        ],
    )
    assert res.exit_code == 0, res.output
    state = NodeState(home / "state")
    book = GrantBook(state, "hospital-a", policy_path=home / "policy.toml")
    spec = job_spec()
    row = book.offer(offer_of("job17", spec))
    assert row.outcome == "granted" and row.grant_json == "" and row.grant_body_json
    grant = book.authorise("job17", spec.job_hash(), spec=spec, round=1, epochs=1)
    receipt = book.issue_receipt(grant, round=1, usage=Usage(ROWS, 1), bytes_sent=1, sent_sha256="")
    assert not receipt.signed and json.loads(receipt.json)["rows_used"] == ROWS
    assert book.offer(offer_of("job18", job_spec(data={"features": ["ssn"]}))).outcome == "refused"
    book.revoke("job17")
    with pytest.raises(GrantCheckError, match="revoked"):
        book.authorise("job17", spec.job_hash())
    att = book.destroy("job17", state.work_dir / "job17")
    assert not att.signed
    assert state.ledger.entries() == []
