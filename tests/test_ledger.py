"""The audit ledger: real SQLite files, real keys, tampering by hand, the CLI end to end."""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Pki
from typer.testing import CliRunner

from wharf.audit_cli import audit_app
from wharf.ledger import (
    GENESIS,
    FileAnchor,
    Ledger,
    LedgerError,
    LedgerUnreadable,
    entry_hash,
    load_entries,
    sqlite_engine,
    verify_entries,
    verify_path,
)

runner = CliRunner()


def make_ledger(pki: Pki, db: Path, name: str = "hospital-a", n: int = 6) -> Ledger:
    ident = pki.coordinator if name == "coordinator" else pki[name]
    ledger = Ledger(sqlite_engine(db), ident.signer())
    kinds = ["registration", "grant_issued", "round_started", "receipt", "round_finished"]
    for i in range(n):
        ledger.append(kinds[i % len(kinds)], "" if i == 0 else f"job-{i % 2}", {"i": i})
    return ledger


def ca(pki: Pki) -> bytes:
    return pki.coordinator.ca_pem


def raw_sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    with con:
        for s in statements:
            con.execute(s)
    con.close()


def rehash_from(db: Path, seq: int) -> None:
    """What a forger without the key does after an edit: recompute every hash from seq on."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT seq, time, kind, job_id, payload, prev_hash FROM ledger ORDER BY seq"
    ).fetchall()
    prev = GENESIS
    with con:
        for s, t, kind, job, payload, _old_prev in rows:
            if s < seq:
                prev = con.execute("SELECT entry_hash FROM ledger WHERE seq=?", (s,)).fetchone()[0]
                continue
            h = entry_hash(s, t, kind, job, json.loads(payload), prev)
            con.execute("UPDATE ledger SET prev_hash=?, entry_hash=? WHERE seq=?", (prev, h, s))
            prev = h
    con.close()


# --------------------------------------------------------------------------- chain


def test_append_head_entries_and_verify(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    ledger = make_ledger(pki, db)
    seq, head = ledger.head()
    entries = ledger.entries()
    assert seq == 6 and head == entries[-1].entry_hash
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.entry_hash for a, b in itertools.pairwise(entries))
    assert [e.seq for e in ledger.entries(job_id="job-1")] == [2, 4, 6]
    assert [e.seq for e in ledger.entries(kind="receipt")] == [4]
    report = ledger.verify(ca(pki))
    assert report.ok and report.count == 6 and report.head_hash == head
    assert report.owner == "node hospital-a"
    assert verify_path(db, ca(pki), expect_name="hospital-a", expect_role="node").ok
    wrong = verify_path(db, ca(pki), expect_role="coordinator")
    assert not wrong.ok and wrong.first_bad_seq == 1 and "not a coordinator" in wrong.problem
    empty = Ledger(sqlite_engine(tmp_path / "empty.db"), pki["hospital-b"].signer())
    assert empty.head() == (0, GENESIS) and empty.verify(ca(pki)).ok


def test_edited_entry_is_detected(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_ledger(pki, db)
    raw_sql(db, """UPDATE ledger SET payload='{"i":99}' WHERE seq=3""")
    report = verify_path(db, ca(pki))
    assert (report.ok, report.first_bad_seq, report.count) == (False, 3, 2)
    assert "hash mismatch" in report.problem
    # Recomputing the hashes does not help without the owner's key.
    rehash_from(db, 3)
    report = verify_path(db, ca(pki))
    assert (report.first_bad_seq, report.problem) == (3, "bad signature")


def test_deleted_entry_is_detected(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_ledger(pki, db)
    raw_sql(db, "DELETE FROM ledger WHERE seq=4")
    report = verify_path(db, ca(pki))
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "entry 4 is missing" in report.problem
    # Renumbering to close the gap breaks the hashes instead.
    raw_sql(db, "UPDATE ledger SET seq=seq-1 WHERE seq>4")
    report = verify_path(db, ca(pki))
    assert report.first_bad_seq == 4 and "hash mismatch" in report.problem


def test_reordered_entries_are_detected(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_ledger(pki, db)
    raw_sql(
        db,
        "UPDATE ledger SET seq=-1 WHERE seq=3",
        "UPDATE ledger SET seq=3 WHERE seq=4",
        "UPDATE ledger SET seq=4 WHERE seq=-1",
    )
    report = verify_path(db, ca(pki))
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "hash mismatch" in report.problem


def test_jsonl_export_verifies_and_detects_tampering(pki: Pki, tmp_path: Path) -> None:
    ledger = make_ledger(pki, tmp_path / "node.db")
    out = tmp_path / "ledger.jsonl"
    assert ledger.export_jsonl(out) == 6
    report = verify_path(out, ca(pki))
    assert report.ok and report.count == 6 and report.head_hash == ledger.head()[1]
    header, *lines = out.read_text(encoding="utf-8").splitlines()

    def write(body: list[str]) -> Path:
        path = tmp_path / "t.jsonl"
        path.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
        return path

    swapped = [lines[0], lines[1], lines[3], lines[2], lines[4], lines[5]]
    report = verify_path(write(swapped), ca(pki))
    assert report.first_bad_seq == 3 and "deleted or moved" in report.problem
    assert verify_path(write(lines[:2] + lines[3:]), ca(pki)).first_bad_seq == 3
    replayed = verify_path(write([*lines[:3], lines[2], *lines[3:]]), ca(pki))
    assert replayed.first_bad_seq == 4 and "entry 3 appears after entry 3" in replayed.problem
    edited = json.loads(lines[4])
    edited["kind"] = "grant_revoked"
    report = verify_path(write([*lines[:4], json.dumps(edited), lines[5]]), ca(pki))
    assert (report.first_bad_seq, report.count) == (5, 4) and "hash mismatch" in report.problem
    mangled = verify_path(write([*lines[:2], "{not json", *lines[3:]]), ca(pki))
    assert mangled.first_bad_seq == 3 and "malformed entry" in mangled.problem
    (tmp_path / "junk.jsonl").write_text("hello\n", encoding="utf-8")
    with pytest.raises(LedgerUnreadable, match="neither an SQLite database nor"):
        verify_path(tmp_path / "junk.jsonl", ca(pki))


def test_foreign_and_mixed_signers(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_ledger(pki, db, n=3)
    # Another CA's "hospital-a" continues the chain: a correct chain, a wrong certificate.
    Ledger(sqlite_engine(db), pki.foreign["hospital-a"].signer()).append("receipt", "j", {})
    report = verify_path(db, ca(pki))
    assert report.first_bad_seq == 4 and "not from the CA" in report.problem
    db2 = tmp_path / "node2.db"
    make_ledger(pki, db2, n=3)
    Ledger(sqlite_engine(db2), pki["hospital-b"].signer()).append("receipt", "j", {})
    report = verify_path(db2, ca(pki))
    assert report.first_bad_seq == 4 and "belongs to node 'hospital-a'" in report.problem


def test_concurrent_appends_stay_one_chain(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    shared = Ledger(sqlite_engine(db), pki.coordinator.signer())
    # A second Ledger on its own engine: serialised only by the database.
    other = Ledger(sqlite_engine(db), pki.coordinator.signer())
    errors: list[BaseException] = []

    def work(ledger: Ledger, t: int) -> None:
        try:
            for i in range(15):
                ledger.append("round_started", f"job-{t}", {"t": t, "i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(shared if t % 2 else other, t)) for t in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    report = verify_path(db, ca(pki))
    assert report.ok and report.count == 120
    assert sorted((e.payload["t"], e.payload["i"]) for e in load_entries(db)) == [
        (t, i) for t in range(8) for i in range(15)
    ]


def test_append_inside_a_callers_transaction(pki: Pki, tmp_path: Path) -> None:
    ledger = make_ledger(pki, tmp_path / "c.db", name="coordinator", n=2)
    with pytest.raises(RuntimeError), ledger.engine.begin() as conn:
        ledger.append("job_submitted", "job-9", {"owner": "alice"}, conn=conn)
        raise RuntimeError("the job row failed")
    assert ledger.head()[0] == 2
    with ledger.engine.begin() as conn:
        ledger.append("job_submitted", "job-9", {"owner": "alice"}, conn=conn)
    assert ledger.head()[0] == 3 and ledger.verify(ca(pki)).ok


def test_bad_appends_are_refused(pki: Pki, tmp_path: Path) -> None:
    ledger = make_ledger(pki, tmp_path / "n.db", n=1)
    with pytest.raises(LedgerError, match="invalid entry kind"):
        ledger.append("Drop Table", "", {})
    with pytest.raises(ValueError, match="cannot hold nan"):
        ledger.append("receipt", "", {"x": float("nan")})
    with pytest.raises(LedgerError, match="read-only"):
        Ledger(ledger.engine).append("receipt", "", {})
    assert ledger.head()[0] == 1


def test_anchors_catch_a_truncated_tail(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    ledger = make_ledger(pki, db, n=4)
    sink = FileAnchor(tmp_path / "anchors.log")
    receipt = ledger.anchor(sink)
    assert receipt.startswith("file:")
    assert sink.heads() == [(4, ledger.entries()[3].entry_hash)]
    assert ledger.entries(kind="anchored")[0].payload["seq"] == 4
    assert verify_path(db, ca(pki), expect_heads=sink.heads()).ok
    raw_sql(db, "DELETE FROM ledger WHERE seq>=4")
    assert verify_path(db, ca(pki)).ok  # a chain alone cannot see a cut tail ...
    report = verify_path(db, ca(pki), expect_heads=sink.heads())  # ... an anchor can
    assert report.first_bad_seq == 4 and "removed from the end" in report.problem


def test_verify_entries_on_objects(pki: Pki, tmp_path: Path) -> None:
    entries = make_ledger(pki, tmp_path / "n.db").entries()
    assert verify_entries(entries, ca(pki)).ok
    report = verify_entries([*entries[:2], entries[3]], ca(pki))
    assert report.first_bad_seq == 3 and report.head_seq == 2


# --------------------------------------------------------------------------- CLI


def test_cli_verify(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_ledger(pki, db)
    ca_file = pki.root / "ca" / "ca.pem"
    ok = runner.invoke(audit_app, ["verify", str(db), "--ca", str(ca_file)])
    assert ok.exit_code == 0, ok.output
    assert "OK 6 entries" in ok.output and "node hospital-a" in ok.output

    raw_sql(db, "DELETE FROM ledger WHERE seq=2")
    bad = runner.invoke(audit_app, ["verify", str(db), "--ca", str(ca_file)])
    assert bad.exit_code == 1
    assert "FAILED at entry 2: entry 2 is missing" in bad.output

    missing = runner.invoke(audit_app, ["verify", str(tmp_path / "no.db"), "--ca", str(ca_file)])
    assert missing.exit_code == 2 and "ledger file not found" in missing.output
    no_ca = runner.invoke(audit_app, ["verify", str(db), "--ca", str(tmp_path / "x.pem")])
    assert no_ca.exit_code == 2 and "CA certificate file not found" in no_ca.output
    (tmp_path / "junk.pem").write_text("junk", encoding="utf-8")
    junk = runner.invoke(audit_app, ["verify", str(db), "--ca", str(tmp_path / "junk.pem")])
    assert junk.exit_code == 2 and "not a PEM certificate" in junk.output
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    other = runner.invoke(audit_app, ["verify", str(tmp_path / "other.db"), "--ca", str(ca_file)])
    assert other.exit_code == 2 and "no ledger table 'ledger'" in other.output
    assert (tmp_path / "no.db").exists() is False  # read-only: nothing created


def test_cli_log(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    ledger = make_ledger(pki, db)
    table = runner.invoke(audit_app, ["log", str(db), "--job", "job-1"])
    assert table.exit_code == 0, table.output
    assert "grant_issued" in table.output and "receipt" in table.output
    assert "round_started" not in table.output  # seq 3 is job-0
    out = tmp_path / "l.jsonl"
    ledger.export_jsonl(out)
    as_json = runner.invoke(audit_app, ["log", str(out), "--kind", "receipt", "--json"])
    assert as_json.exit_code == 0
    (line,) = as_json.output.strip().splitlines()
    assert json.loads(line)["seq"] == 4 and json.loads(line)["payload"] == {"i": 3}
    none = runner.invoke(audit_app, ["log", str(db), "--job", "nope"])
    assert none.exit_code == 0 and "no matching entries" in none.output
    assert runner.invoke(audit_app, ["log", str(tmp_path / "x.db")]).exit_code == 2


def test_embedded_records_are_verified_too(pki: Pki, tmp_path: Path) -> None:
    from wharf.records import UsageReceipt

    receipt = UsageReceipt(
        grant_id="g1",
        job_id="job-1",
        round=1,
        node="hospital-a",
        rows_used=100,
        epochs=1,
        compute_seconds=0.5,
        bytes_sent=10,
        sent_sha256="ab" * 32,
    )
    signed = receipt.sign(pki["hospital-a"].signer()).countersign(pki.coordinator.signer())
    db = tmp_path / "coordinator.db"
    ledger = Ledger(sqlite_engine(db), pki.coordinator.signer())
    entry = ledger.append_record(signed, extra={"accepted": True})
    assert (entry.kind, entry.job_id, entry.payload["accepted"]) == ("receipt", "job-1", True)
    assert entry.record() == signed
    assert verify_path(db, ca(pki)).ok
    # The coordinator logs a "receipt" that hospital-b signed in hospital-a's name.
    forged = receipt.sign(pki["hospital-b"].signer())
    ledger.append_record(forged)
    report = verify_path(db, ca(pki))
    assert report.first_bad_seq == 2
    assert "embedded receipt record is invalid: wrong signer" in report.problem
    assert verify_entries(ledger.entries(), ca(pki), check_records=False).ok
