"""Signed model products: package a real dossier, verify offline, catch every tampering.

Everything is real: node-signed registration certificates, grants and usage
receipts (countersigned by the coordinator), a coordinator ledger in SQLite signed
by the coordinator identity, a safetensors model, and a record-level DP guarantee
from the real accountant. Only the revenue split may be a stand-in (see
``_StandInRevenue``) while ``wharf.algorithms.revenue`` is being written.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import Pki
from wharf import product
from wharf import spec as spec_mod
from wharf.algorithms import models
from wharf.algorithms.privacy.accounting import record_level_guarantee
from wharf.algorithms.privacy.plan import JobPrivacy
from wharf.identity import Identity, canonical_json
from wharf.ledger import LEDGER_DOMAIN, Ledger, entry_hash, sqlite_engine
from wharf.product import (
    ProductError,
    build_passport,
    ledger_entry_to_dict,
    model_card_markdown,
    package_product,
    show_product,
    sign_passport,
    verify_product,
    write_product,
)
from wharf.product_cli import product_app
from wharf.records import Grant, Protections, Quotas, RegistrationCertificate, UsageReceipt

runner = CliRunner()

JOB = "job-7f3a"
OTHER_JOB = "job-0000"
FEATURES = tuple(f"f{i}" for i in range(30))
ROWS = {"hospital-a": 100, "hospital-b": 120}
NODES = tuple(sorted(ROWS))
PRICE = 1000
SCORES = {"hospital-a": 0.4, "hospital-b": 0.6}


# --------------------------------------------------------------------------- a real dossier


@dataclass(frozen=True)
class Description:
    num_rows: int
    label: str
    features: tuple[str, ...]
    schema: tuple[tuple[str, str], ...]
    fingerprint: str
    schema_hash: str


def _description(node: str) -> Description:
    schema = (*((f, "float64") for f in FEATURES), ("y", "int64"))
    return Description(
        num_rows=ROWS[node],
        label="y",
        features=FEATURES,
        schema=schema,
        fingerprint=hashlib.sha256(node.encode()).hexdigest(),
        schema_hash=hashlib.sha256(canonical_json([[c, t] for c, t in schema])).hexdigest(),
    )


def _spec() -> spec_mod.JobSpec:
    return spec_mod.from_dict(
        {
            "name": "cancer-model",
            "purpose": "medical-research",
            "data": {"dataset": "cancer", "features": list(FEATURES)},
            "model": {"kind": "mlp", "num_classes": 2, "hidden": [8], "standardize": False},
            "training": {"batch_size": 10, "epochs": 1, "optimizer": "sgd", "lr": 0.1},
            "federation": {"rounds": 2, "min_nodes": 2, "secure": True},
            "privacy": {"record_level": {"noise_multiplier": 1.0, "delta": 1e-5, "clip": 1.0}},
        }
    )


def _weights() -> bytes:
    torch.manual_seed(0)
    net = models.build_model("mlp", (len(FEATURES),), 2, {"hidden": [8]})
    return models.weights_to_bytes(models.model_to_arrays(net))


def make_dossier(pki: Pki, db: Path) -> tuple[dict[str, Any], bytes]:
    """What the coordinator will hand over for a finished two-node, two-round DP job."""
    spec = _spec()
    job_hash = spec.job_hash()
    weights = _weights()
    model_sha = hashlib.sha256(weights).hexdigest()
    coordinator = pki.coordinator.signer()
    ledger = Ledger(sqlite_engine(db), coordinator)
    t0 = time.time()
    ledger.append("job_submitted", OTHER_JOB, {"job_hash": "0" * 64, "owner": "bob"})
    ledger.append(
        "job_submitted",
        JOB,
        {"job_hash": job_hash, "owner": "alice", "name": spec.name, "secure": True},
    )
    guarantees = {
        node: record_level_guarantee(
            noise_multiplier=1.0,
            delta=1e-5,
            clip=1.0,
            num_rows=rows,
            batch_size=10,
            epochs=1,
            rounds=2,
        )
        for node, rows in ROWS.items()
    }
    participants: dict[str, Any] = {}
    grants: dict[str, Grant] = {}
    for node in NODES:
        signer = pki[node].signer()
        reg = RegistrationCertificate.describe(
            node, "cancer", _description(node), allowed_purposes=("medical-research",)
        ).sign(signer)
        g = guarantees[node]
        grant = Grant(
            node=node,
            job_id=JOB,
            job_hash=job_hash,
            requester="alice",
            purpose="medical-research",
            datasets=("cancer",),
            columns=(*FEATURES, "y"),
            quotas=Quotas(rounds=2, epochs=1, samples=ROWS[node] * 2),
            protections=Protections(
                secure_aggregation=True,
                dp_epsilon=g.epsilon,
                dp_delta=g.delta,
                dp_plan=JobPrivacy(record_level=g).to_dict(),
            ),
            expires_at=t0 + 3600,
        )
        signed_grant = grant.sign(signer)
        ledger.append_record(signed_grant)
        grants[node] = grant
        participants[node] = {"registration": reg.to_dict(), "grant": signed_grant.to_dict()}
    receipts = []
    rounds = []
    for rnd in (1, 2):
        started = time.time()
        ledger.append("round_started", JOB, {"round": rnd, "attempt": 0, "nodes": list(NODES)})
        for node in NODES:
            seq, head = ledger.head()
            receipt = UsageReceipt(
                grant_id=grants[node].grant_id,
                job_id=JOB,
                round=rnd,
                node=node,
                rows_used=ROWS[node],
                epochs=1,
                compute_seconds=0.25 * rnd + (0.1 if node == "hospital-b" else 0.0),
                bytes_sent=4096,
                sent_sha256=hashlib.sha256(f"{node}{rnd}".encode()).hexdigest(),
                coordinator_chain_head=head,
                coordinator_chain_seq=seq,
            )
            receipts.append(receipt.sign(pki[node].signer()).countersign(coordinator).to_dict())
        # Another job's entry: the job's own entries are not contiguous in the chain.
        ledger.append("round_started", OTHER_JOB, {"round": rnd, "attempt": 0, "nodes": ["x"]})
        ledger.append(
            "round_finished",
            JOB,
            {"round": rnd, "model_sha256": model_sha, "secure": True, "nodes": list(NODES)},
        )
        rounds.append(
            {
                "round": rnd,
                "attempt": 0,
                "nodes": list(NODES),
                "metrics": {"loss": 0.7 / rnd, "accuracy": 0.8 + 0.05 * rnd},
                "started": started,
                "finished": time.time(),
            }
        )
    ledger.append("model_stored", JOB, {"model_sha256": model_sha, "size": len(weights)})
    privacy = {
        "participant_level": None,
        "record_level": {n: g.to_dict() for n, g in guarantees.items()},
        "dataset_spend": {
            n: {"epsilon": g.epsilon, "delta": g.delta} for n, g in guarantees.items()
        },
        "worst_epsilon": max(g.epsilon for g in guarantees.values()),
        "metrics_released": False,
    }
    ledger.append("privacy_guarantee", JOB, privacy)
    ledger.append("dossier_exported", JOB, {"model_sha256": model_sha})
    seq, head = ledger.head()
    dossier = {
        "format": "wharf-dossier/1",
        "job": {
            "job_id": JOB,
            "name": spec.name,
            "owner": "alice",
            "job_hash": job_hash,
            "spec": spec.to_dict(),
            "state": "completed",
            "created": t0,
            "updated": time.time(),
            "rounds_completed": 2,
            "model": {"sha256": model_sha, "size": len(weights)},
        },
        "rounds": rounds,
        "participants": participants,
        "receipts": receipts,
        "secure_aggregation": {"enabled": True, "threshold": 2, "modulus_bits": 32},
        "privacy": privacy,
        "ledger": {
            "entries": [ledger_entry_to_dict(e) for e in ledger.entries(job_id=JOB)],
            "head": {"seq": seq, "hash": head},
        },
    }
    return json.loads(json.dumps(dossier)), weights


@dataclass(frozen=True)
class Made:
    path: Path
    dossier: dict[str, Any]
    weights: bytes
    ca_pem: bytes


@pytest.fixture(scope="module")
def made(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    root = tmp_path_factory.mktemp("product")
    dossier, weights = make_dossier(pki, root / "coordinator.db")
    path = package_product(
        dossier,
        weights,
        root / "cancer.wharf",
        pki["admin"],
        licence="Research use only; no redistribution.",
        price_minor_units=PRICE,
        currency="EUR",
        contribution=SCORES,
        contribution_method="leave-one-out validation loss",
    )
    yield Made(path, dossier, weights, pki["admin"].ca_pem)


# --------------------------------------------------------------------------- helpers


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rezip(path: Path, files: Mapping[str, bytes]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def tampered(
    made: Made,
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None],
    *,
    resign: Identity | None = None,
) -> Path:
    """A copy whose passport was edited; re-signed by ``resign`` (a dishonest operator) if
    given, so that the check behind the signature is the one that must catch it."""
    files = members(made.path)
    passport = json.loads(files["passport.json"])
    edit(passport)
    files["passport.json"] = canonical_json(passport)
    if resign is not None:
        files["passport.sig.json"] = canonical_json(sign_passport(passport, resign))
    return rezip(tmp_path / "tampered.wharf", files)


def failure(made: Made, path: Path) -> tuple[str, str]:
    result = verify_product(path, made.ca_pem)
    assert not result.ok, "tampering was not detected"
    assert result.message == f"{result.part}: {result.problem}"
    return result.part, result.problem


# --------------------------------------------------------------------------- the happy path


def test_package_then_verify(made: Made) -> None:
    result = verify_product(made.path, made.ca_pem)
    assert result.ok, result.failure
    s = result.summary
    assert s["job_id"] == JOB and s["operator"] == "admin" and s["coordinator"] == "coordinator"
    assert s["participants"] == list(NODES) and s["receipts"] == 4
    assert s["secure_aggregation"] is True and s["revenue_recomputed"] is True
    assert s["dp_worst_epsilon"] == pytest.approx(made.dossier["privacy"]["worst_epsilon"])
    assert result.message.startswith("OK: job job-7f3a")

    files = members(made.path)
    assert sorted(files) == ["model.safetensors", "passport.json", "passport.sig.json"]
    assert files["model.safetensors"] == made.weights
    passport = json.loads(files["passport.json"])
    assert canonical_json(passport) == files["passport.json"]
    assert passport["format"] == "wharf-passport/1"
    assert passport["model"]["architecture"]["input_shape"] == [30]
    assert passport["model"]["tensors"]["fc1.weight"] == {"dtype": "F32", "shape": [8, 30]}
    # The nodes' records are embedded verbatim, signatures included.
    for node in NODES:
        assert (
            passport["participants"][node]["grant"] == made.dossier["participants"][node]["grant"]
        )
        reg = passport["participants"][node]["registration"]
        assert reg == made.dossier["participants"][node]["registration"]
    assert passport["usage"]["receipts"] == made.dossier["receipts"]
    assert passport["usage"]["summary"]["hospital-b"]["samples"] == 240
    assert passport["usage"]["summary"]["hospital-a"]["rounds"] == [1, 2]
    assert sum(passport["revenue"]["shares"].values()) == PRICE
    assert passport["revenue"]["usage"] == {"hospital-a": 200, "hospital-b": 240}
    assert passport["contribution"]["method"] == "leave-one-out validation loss"
    env = json.loads(files["passport.sig.json"])
    assert env["algorithm"] == "ECDSA-P256-SHA256" and "BEGIN CERTIFICATE" in env["signer_cert_pem"]


def test_archive_is_deterministic(made: Made, tmp_path: Path) -> None:
    files = members(made.path)
    passport = json.loads(files["passport.json"])
    env = json.loads(files["passport.sig.json"])
    a = write_product(tmp_path / "a.wharf", passport, env, made.weights)
    b = write_product(tmp_path / "b.wharf", passport, env, made.weights)
    assert a.read_bytes() == b.read_bytes() == made.path.read_bytes()
    with zipfile.ZipFile(a) as zf:
        assert [i.filename for i in zf.infolist()] == sorted(files)
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_refuses_to_overwrite(made: Made, tmp_path: Path) -> None:
    files = members(made.path)
    passport, env = json.loads(files["passport.json"]), json.loads(files["passport.sig.json"])
    out = tmp_path / "p.wharf"
    out.write_bytes(b"precious")
    with pytest.raises(ProductError, match="already exists"):
        write_product(out, passport, env, made.weights)
    assert out.read_bytes() == b"precious"
    write_product(out, passport, env, made.weights, overwrite=True)
    assert verify_product(out, made.ca_pem).ok


def test_verify_needs_no_network(made: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("verification tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    result = verify_product(made.path, made.ca_pem)
    assert result.ok, result.failure


_OFFLINE_VERIFY = """
import socket, sys

class NoSocket(socket.socket):  # a subclass: ssl subclasses socket.socket on import
    def __init__(self, *args, **kwargs):
        raise OSError("network is disabled in this test")

def no_network(*args, **kwargs):
    raise OSError("network is disabled in this test")

socket.socket = NoSocket
socket.create_connection = no_network
socket.getaddrinfo = no_network
from wharf.product_cli import product_app
product_app(["verify", sys.argv[1], "--ca", sys.argv[2]])
"""


def test_verify_offline_in_a_fresh_process(made: Made, pki: Pki) -> None:
    """Sockets are gone before anything is imported: lazy imports are covered too."""
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_VERIFY, str(made.path), str(pki.root / "ca" / "ca.pem")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: job job-7f3a")


# --------------------------------------------------------------------------- tampering


def test_tampered_weights(made: Made, tmp_path: Path) -> None:
    files = members(made.path)
    w = bytearray(files["model.safetensors"])
    w[-5] ^= 0x01  # one byte of a tensor's data
    files["model.safetensors"] = bytes(w)
    part, problem = failure(made, rezip(tmp_path / "t.wharf", files))
    assert part == "weights" and "does not match the passport's model hash" in problem


def test_tampered_round_metric(made: Made, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["training"]["rounds"][1]["metrics"]["accuracy"] = 0.99

    part, problem = failure(made, tampered(made, tmp_path, edit))
    assert part == "passport signature" and "does not verify" in problem


def test_tampered_signature(made: Made, tmp_path: Path) -> None:
    files = members(made.path)
    env = json.loads(files["passport.sig.json"])
    sig = bytearray(base64.b64decode(env["signature"]))
    sig[len(sig) // 2] ^= 0x01
    env["signature"] = base64.b64encode(bytes(sig)).decode()
    files["passport.sig.json"] = canonical_json(env)
    part, problem = failure(made, rezip(tmp_path / "t.wharf", files))
    assert part == "passport signature" and "does not verify" in problem


def test_grant_columns_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["participants"]["hospital-b"]["grant"]["body"]["columns"].append("ssn")

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "grant of hospital-b" and "hash mismatch" in problem


def test_grant_for_another_job_hash(made: Made, pki: Pki, tmp_path: Path) -> None:
    """A genuine, validly signed grant — but for a different spec — does not cover the job."""

    def edit(p: dict[str, Any]) -> None:
        body = p["participants"]["hospital-b"]["grant"]["body"]
        other = Grant.from_dict({**body, "job_hash": "ab" * 32})
        p["participants"]["hospital-b"]["grant"] = other.sign(pki["hospital-b"].signer()).to_dict()

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "grant of hospital-b" and "binds job hash abab" in problem


def test_grant_signed_by_another_node(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        body = p["participants"]["hospital-b"]["grant"]["body"]
        forged = Grant.from_dict(body).sign(pki["hospital-a"].signer())
        p["participants"]["hospital-b"]["grant"] = forged.to_dict()

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "grant of hospital-b" and "wrong signer" in problem


def test_receipt_rows_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["usage"]["receipts"][2]["body"]["rows_used"] = 1

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "receipt 3 (hospital-a, round 2)" and "hash mismatch" in problem


def test_receipt_without_countersignature(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["usage"]["receipts"][3]["countersignatures"] = []

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "receipt 4 (hospital-b, round 2)" and "no countersignature" in problem


def test_usage_summary_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["usage"]["summary"]["hospital-a"]["samples"] = 1

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "usage" and "hospital-a.samples: stated 1, actual 200" in problem


def test_registration_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["participants"]["hospital-a"]["registration"]["body"]["row_count"] = 10**6

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "registration of hospital-a" and "hash mismatch" in problem


def test_certificate_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    """The certificate a node's signature is checked with: one byte of it changed, or
    replaced by another node's (re-signed by a dishonest operator both times)."""

    def flip(p: dict[str, Any]) -> None:
        env = p["participants"]["hospital-a"]["grant"]
        lines = env["signer_cert_pem"].splitlines()
        body = bytearray(lines[5].encode())
        body[10] = ord("A") if body[10] != ord("A") else ord("B")
        lines[5] = body.decode()
        env["signer_cert_pem"] = "\n".join(lines) + "\n"

    part, problem = failure(made, tampered(made, tmp_path, flip, resign=pki["admin"]))
    assert part == "grant of hospital-a" and "not from the CA" in problem

    def swap(p: dict[str, Any]) -> None:
        env = p["participants"]["hospital-a"]["registration"]
        env["signer_cert_pem"] = pki["hospital-b"].cert_pem.decode()

    part, problem = failure(made, tampered(made, tmp_path, swap, resign=pki["admin"]))
    assert part == "registration of hospital-a" and "signed by 'hospital-b'" in problem


def test_revenue_table_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        shares = p["revenue"]["shares"]
        shares["hospital-a"] += 50
        shares["hospital-b"] -= 50

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert (
        part == "revenue" and "recomputed split" in problem and "differs from the stated" in problem
    )


def test_price_without_matching_rule(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["licence"]["price_minor_units"] = 5

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "revenue" and "the price is 5 EUR" in problem


def test_dp_epsilon_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["privacy"]["record_level"]["hospital-a"]["epsilon"] /= 2

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "privacy" and "the accountant recomputes" in problem


def test_dp_report_not_the_coordinators(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["privacy"]["metrics_released"] = True

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "privacy" and "differs from the coordinator's" in problem


def test_participant_level_guarantee_not_in_any_grant(made: Made, pki: Pki, tmp_path: Path) -> None:
    """A recomputable participant-level guarantee that no holder signed (here: the job's
    grants carry record-level plans only) is refused, whatever the rest says."""
    from wharf.algorithms.privacy.accounting import participant_level_guarantee
    from wharf.algorithms.privacy.skellam import make_plan

    invented = participant_level_guarantee(make_plan(1.0, 100, 2, 4, 2.0), 2, 1e-5)

    def edit(p: dict[str, Any]) -> None:
        p["privacy"]["participant_level"] = invented.to_dict()

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "privacy" and "no data holder signed into its grant" in problem, problem


def test_spec_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["job"]["spec"]["training"]["lr"] = 0.5

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "job" and "the spec was altered" in problem


def test_model_tensors_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["model"]["tensors"]["fc1.weight"]["shape"] = [16, 30]

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "model" and "fc1.weight.shape" in problem


def test_ledger_entry_altered(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        entry = next(e for e in p["ledger"]["entries"] if e["kind"] == "model_stored")
        entry["payload"]["size"] += 1

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part.startswith("ledger entry ") and "entry hash mismatch" in problem


def test_ledger_head_not_among_entries(made: Made, pki: Pki, tmp_path: Path) -> None:
    def edit(p: dict[str, Any]) -> None:
        p["ledger"]["entries"].pop()

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "ledger" and "stated head" in problem


def test_coordinator_rewrote_a_witnessed_entry(made: Made, pki: Pki, tmp_path: Path) -> None:
    """Even re-signed with the coordinator's own key, an entry the nodes signed into their
    receipts as the coordinator's head cannot be changed."""

    def edit(p: dict[str, Any]) -> None:
        first = p["usage"]["receipts"][0]["body"]
        e = next(e for e in p["ledger"]["entries"] if e["seq"] == first["coordinator_chain_seq"])
        assert e["kind"] == "round_started" and e["entry_hash"] == first["coordinator_chain_head"]
        e["payload"]["nodes"] = ["hospital-a"]
        e["entry_hash"] = entry_hash(
            e["seq"], e["time"], e["kind"], e["job_id"], e["payload"], e["prev_hash"]
        )
        message = canonical_json({"domain": LEDGER_DOMAIN, "entry_hash": e["entry_hash"]})
        e["signature"] = base64.b64encode(pki.coordinator.signer().sign(message)).decode()

    part, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
    assert part == "ledger" and "that hospital-a signed into receipt 1" in problem


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda f: f.pop("passport.sig.json"), "missing member passport.sig.json"),
        (lambda f: f.update({"README.txt": b"hi"}), "unexpected member 'README.txt'"),
        (lambda f: f.update({"../model.safetensors": b"x"}), "is not a plain file name"),
    ],
    ids=["missing", "extra", "path-trick"],
)
def test_archive_members(
    made: Made, tmp_path: Path, edit: Callable[[dict[str, bytes]], Any], expected: str
) -> None:
    files = members(made.path)
    edit(files)
    part, problem = failure(made, rezip(tmp_path / "t.wharf", files))
    assert part == "archive" and expected in problem


def test_archive_limits(made: Made, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(product._MEMBER_LIMITS, "model.safetensors", 1000)
    part, problem = failure(made, made.path)
    assert part == "archive" and "above its 1000-byte limit" in problem
    (tmp_path / "junk.wharf").write_bytes(b"not a zip")
    assert failure(made, tmp_path / "junk.wharf")[0] == "archive"


def test_passport_not_canonical(made: Made, tmp_path: Path) -> None:
    files = members(made.path)
    files["passport.json"] = json.dumps(json.loads(files["passport.json"]), indent=1).encode()
    part, problem = failure(made, rezip(tmp_path / "t.wharf", files))
    assert part == "passport" and "canonical" in problem


def test_other_ca_and_other_signers(made: Made, pki: Pki, tmp_path: Path) -> None:
    foreign_ca = pki.foreign["alice"].ca_pem
    part, problem = failure(Made(made.path, made.dossier, made.weights, foreign_ca), made.path)
    assert part == "passport signature" and "not from the CA" in problem

    # A developer's key cannot stand in for the operator's, even when the math checks out.
    files = members(made.path)
    passport = json.loads(files["passport.json"])
    passport["operator"]["name"] = "alice"
    files["passport.json"] = canonical_json(passport)
    message = product._passport_message(files["passport.json"])
    files["passport.sig.json"] = canonical_json(
        {
            "format": product.SIGNATURE_FORMAT,
            "algorithm": product.SIGNATURE_ALGORITHM,
            "signer_cert_pem": pki["alice"].cert_pem.decode(),
            "signature": base64.b64encode(pki["alice"].signer().sign(message)).decode(),
        }
    )
    part, problem = failure(made, rezip(tmp_path / "dev.wharf", files))
    assert part == "passport signature" and "only an operator" in problem


def test_every_tampering_is_reported_never_raised(made: Made, pki: Pki, tmp_path: Path) -> None:
    """Structurally wrong passports (re-signed) give a failure naming the part, no crash."""
    edits: list[tuple[Callable[[dict[str, Any]], None], str]] = [
        (lambda p: p.update({"usage": []}), "usage"),
        (lambda p: p["participants"]["hospital-a"].update({"grant": "x"}), "grant of hospital-a"),
        (lambda p: p["ledger"]["entries"][0].update({"payload": 3}), "ledger entry"),
        (lambda p: p.update({"revenue": {"rule": 1}}), "revenue"),
        (lambda p: p.update({"extra": 1}), "passport"),
    ]
    for edit, part in edits:
        got, problem = failure(made, tampered(made, tmp_path, edit, resign=pki["admin"]))
        assert got.startswith(part), (got, problem)


# --------------------------------------------------------------------------- packaging rules


def test_only_an_operator_can_package(made: Made, pki: Pki, tmp_path: Path) -> None:
    for name in ("alice", "hospital-a"):
        with pytest.raises(ProductError, match="only an operator may package") as exc:
            package_product(
                made.dossier,
                made.weights,
                tmp_path / f"{name}.wharf",
                pki[name],
                licence="x",
                price_minor_units=1,
                currency="EUR",
            )
        assert exc.value.part == "operator"
        assert not (tmp_path / f"{name}.wharf").exists()
    passport = build_passport(
        made.dossier,
        weights=made.weights,
        licence="x",
        price_minor_units=1,
        currency="EUR",
        contribution=None,
        contribution_method="",
        revenue_rule=None,
        revenue=None,
        operator_name="alice",
    )
    with pytest.raises(ProductError, match="alice' is a developer"):
        sign_passport(passport, pki["alice"])


def test_package_refuses_wrong_weights_and_bad_evidence(
    made: Made, pki: Pki, tmp_path: Path
) -> None:
    other = models.weights_to_bytes(
        models.model_to_arrays(models.build_model("mlp", (30,), 2, {"hidden": [4]}))
    )
    with pytest.raises(ProductError, match="is not the job's model") as exc:
        package_product(
            made.dossier,
            other,
            tmp_path / "w.wharf",
            pki["admin"],
            licence="x",
            price_minor_units=1,
            currency="EUR",
        )
    assert exc.value.part == "weights"
    # A dossier whose evidence does not hold up is never signed.
    bad = copy.deepcopy(made.dossier)
    bad["receipts"][0]["body"]["rows_used"] = 7
    with pytest.raises(ProductError, match="refusing to sign") as exc:
        package_product(
            bad,
            made.weights,
            tmp_path / "bad.wharf",
            pki["admin"],
            licence="x",
            price_minor_units=1,
            currency="EUR",
        )
    assert exc.value.part.startswith("receipt 1")
    assert not (tmp_path / "bad.wharf").exists()


def test_package_without_scores_or_revenue(made: Made, pki: Pki, tmp_path: Path) -> None:
    equal = package_product(
        made.dossier,
        made.weights,
        tmp_path / "eq.wharf",
        pki["admin"],
        licence="x",
        price_minor_units=999,
        currency="USD",
    )
    passport = json.loads(members(equal)["passport.json"])
    assert passport["contribution"] == {
        "method": product.EQUAL_CONTRIBUTION,
        "scores": {"hospital-a": 1.0, "hospital-b": 1.0},
    }
    assert sum(passport["revenue"]["shares"].values()) == 999
    assert verify_product(equal, made.ca_pem).ok
    bare = package_product(
        made.dossier,
        made.weights,
        tmp_path / "bare.wharf",
        pki["admin"],
        licence="x",
        price_minor_units=0,
        currency="EUR",
        with_revenue=False,
    )
    passport = json.loads(members(bare)["passport.json"])
    assert passport["revenue"] is None and passport["contribution"] is None
    assert verify_product(bare, made.ca_pem).ok


# --------------------------------------------------------------------------- show, card, CLI


def test_show_and_model_card(made: Made) -> None:
    card = show_product(made.path)
    for text in (
        "cancer-model",
        "job job-7f3a",
        "hospital-a: dataset cancer (100 rows, general)",
        "purpose medical-research",
        "secure aggregation: on",
        "record level at hospital-b: ε=",
        "leave-one-out validation loss",
        "10.00 EUR",
        "Research use only",
        "ledger       head entry",
    ):
        assert text in card, text
    md = model_card_markdown(json.loads(members(made.path)["passport.json"]))
    assert md.startswith("# Model card: cancer-model")
    for text in (
        "## Data holders",
        "| hospital-b | cancer | 120 |",
        "## Protections",
        "| `fc1.weight` | F32 | [8, 30] |",
        "## Licence and price",
    ):
        assert text in md, text


def test_show_is_safe_on_malformed_passports(made: Made) -> None:
    passport = json.loads(members(made.path)["passport.json"])
    passport["participants"] = ["not", "a", "mapping"]
    with pytest.raises(ProductError, match="cannot be displayed") as exc:
        product.show_text(passport)
    assert exc.value.part == "passport"
    passport = json.loads(members(made.path)["passport.json"])
    passport["privacy"]["worst_epsilon"] = "lots"
    passport["licence"].update(price_minor_units=1500, currency="JPY")
    card = product.show_text(passport)
    assert "worst dataset spend: ε=lots" in card and "price        1500 JPY" in card


def test_cli_verify(made: Made, pki: Pki, tmp_path: Path) -> None:
    ca = str(pki.root / "ca" / "ca.pem")
    ok = runner.invoke(product_app, ["verify", str(made.path), "--ca", ca])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("OK: job job-7f3a") and "2 data holders" in ok.output

    as_json = runner.invoke(product_app, ["verify", str(made.path), "--ca", ca, "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["ok"] is True

    files = members(made.path)
    files["model.safetensors"] = files["model.safetensors"][:-1] + b"\x00"
    bad = rezip(tmp_path / "bad.wharf", files)
    failed = runner.invoke(product_app, ["verify", str(bad), "--ca", ca])
    assert failed.exit_code == 1 and "FAILED weights: SHA-256" in failed.output
    failed_json = runner.invoke(product_app, ["verify", str(bad), "--ca", ca, "--json"])
    assert failed_json.exit_code == 1 and json.loads(failed_json.stdout)["part"] == "weights"

    missing = runner.invoke(product_app, ["verify", str(tmp_path / "no.wharf"), "--ca", ca])
    assert missing.exit_code == 2 and "product file not found" in missing.output
    no_ca = runner.invoke(product_app, ["verify", str(made.path), "--ca", str(tmp_path / "x")])
    assert no_ca.exit_code == 2 and "CA certificate file not found" in no_ca.output


def test_cli_show(made: Made, tmp_path: Path) -> None:
    shown = runner.invoke(product_app, ["show", str(made.path)])
    assert shown.exit_code == 0, shown.output
    assert "hospital-b" in shown.output and "secure aggregation: on" in shown.output
    out = tmp_path / "card.md"
    with_md = runner.invoke(product_app, ["show", str(made.path), "--markdown", str(out)])
    assert with_md.exit_code == 0 and out.read_text(encoding="utf-8").startswith("# Model card")
    junk = tmp_path / "junk.wharf"
    junk.write_bytes(b"junk")
    bad = runner.invoke(product_app, ["show", str(junk)])
    assert bad.exit_code == 2 and "archive: not a zip archive" in bad.output


def test_cli_package_dossier(made: Made, pki: Pki, tmp_path: Path) -> None:
    dossier = tmp_path / "dossier.json"
    dossier.write_text(json.dumps(made.dossier), encoding="utf-8")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(made.weights)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"method": "shapley", "scores": SCORES}), encoding="utf-8")
    certs, ca = pki.root / "certs", pki.root / "ca" / "ca.pem"

    def package(name: str, out: Path, *extra: str) -> Any:
        return runner.invoke(
            product_app,
            [
                "package-dossier",
                str(dossier),
                "--weights",
                str(weights),
                "-o",
                str(out),
                "--cert",
                str(certs / f"{name}.pem"),
                "--key",
                str(certs / f"{name}.key"),
                "--ca",
                str(ca),
                "--licence",
                "CC-BY-NC-4.0",
                "--price",
                "1000",
                "--currency",
                "EUR",
                "--contribution",
                str(scores),
                "--floor",
                "0.1",
                "--usage-weight",
                "0.3",
                *extra,
            ],
        )

    out = tmp_path / "cli.wharf"
    done = package("admin", out)
    assert done.exit_code == 0, done.output
    assert verify_product(out, ca.read_bytes()).ok
    passport = json.loads(members(out)["passport.json"])
    assert passport["contribution"]["method"] == "shapley"
    assert passport["revenue"]["rule"]["floor_fraction"] == 0.1
    assert passport["revenue"]["rule"]["usage_weight"] == 0.3

    again = package("admin", out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert package("admin", out, "--force").exit_code == 0

    dev = package("alice", tmp_path / "dev.wharf")
    assert dev.exit_code == 2 and "only an operator may package" in dev.output
    assert not (tmp_path / "dev.wharf").exists()
