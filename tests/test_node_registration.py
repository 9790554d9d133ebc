"""Dataset registration at a node: the signed registration certificate, through the real CLI.

Real files, a real SQLite node database and real keys from the test deployment CA
(``conftest.pki``); commands run in-process with typer's CliRunner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import Result
from conftest import Pki
from typer.testing import CliRunner

from wharf.ledger import verify_path
from wharf.node import config as node_config
from wharf.node.cli import node_app
from wharf.node.daemon import NodeDaemon
from wharf.node.grants import GrantBook
from wharf.node.state import NodeState, datasets
from wharf.records import RecordError, RegistrationCertificate, SignedRecord

runner = CliRunner()


def write_csv(path: Path, rows: int = 40) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "age": rng.integers(20, 80, rows),
            "bmi": rng.normal(25, 3, rows),
            "ssn": rng.integers(1_000_000, 9_999_999, rows),
            "y": rng.integers(0, 2, rows),
        }
    ).to_csv(path, index=False)
    return path


def make_config(pki: Pki, home: Path, name: str = "hospital-a") -> Path:
    certs, ca = pki.root / "certs", pki.root / "ca" / "ca.pem"
    home.mkdir(parents=True, exist_ok=True)
    path = home / "node.toml"
    node_config.write(
        path,
        coordinator="127.0.0.1:9",
        state_dir="state",
        cert=str(certs / f"{name}.pem"),
        key=str(certs / f"{name}.key"),
        ca=str(ca),
    )
    return path


def add(config: Path, csv: Path, *extra: str, name: str = "cancer") -> Result:
    return runner.invoke(
        node_app,
        ["dataset", "add", name, str(csv), "--label", "y", "--config", str(config), *extra],
    )


@pytest.fixture
def node(pki: Pki, tmp_path: Path) -> tuple[Path, Path]:
    return make_config(pki, tmp_path / "node"), write_csv(tmp_path / "cancer.csv")


FULL = (
    "--level",
    "general",
    "--column-level",
    "bmi=important",
    "--column-level",
    "age=general",
    "--purpose",
    "medical-research",
    "--purpose",
    "public-health",
    "--prohibit",
    "ssn",
)


def test_dataset_add_signs_a_certificate_anyone_with_the_ca_can_verify(
    pki: Pki, node: tuple[Path, Path]
) -> None:
    config, csv = node
    res = add(config, csv, *FULL)
    assert res.exit_code == 0, res.output
    assert "certificate signed by node hospital-a" in res.output
    state = NodeState(config.parent / "state")
    reg = state.get_dataset("cancer")
    assert reg is not None and reg.certificate is not None
    cert = RegistrationCertificate.verified(
        reg.certificate, pki.coordinator.ca_pem, expect_name="hospital-a"
    )
    assert cert.dataset == "cancer" and cert.node == "hospital-a"
    assert cert.row_count == 40 and cert.fingerprint == reg.fingerprint
    assert cert.schema_hash == reg.schema_hash
    assert [c for c, _ in cert.schema] == ["age", "bmi", "ssn", "y"]
    assert cert.classification == "general"
    assert dict(cert.column_levels) == {"age": "general", "bmi": "important"}
    assert cert.level_of("bmi") == "important" and cert.level_of("y") == "general"
    assert cert.allowed_purposes == ("medical-research", "public-health")
    assert cert.prohibited_columns == ("ssn",)
    # Metadata only: no value of the file is in the certificate.
    body = json.dumps(reg.certificate.body)
    first = pd.read_csv(csv).iloc[0]
    assert str(int(first["ssn"])) not in body
    # The registration is in the node's ledger, which verifies.
    entries = state.ledger.entries(kind="registration")
    assert len(entries) == 1 and entries[0].record() == reg.certificate
    report = verify_path(state.db_path, pki.coordinator.ca_pem, expect_name="hospital-a")
    assert report.ok and report.count == 1, report.problem


def test_dataset_show_prints_and_verifies_the_certificate(
    pki: Pki, node: tuple[Path, Path]
) -> None:
    config, csv = node
    assert add(config, csv, *FULL).exit_code == 0
    res = runner.invoke(node_app, ["dataset", "show", "cancer", "--config", str(config)])
    assert res.exit_code == 0, res.output
    for text in ("hospital-a", "medical-research", "public-health", "important", "prohibited"):
        assert text in res.output
    assert "verified: signed by node hospital-a" in res.output
    # --json hands the certificate to anyone; it verifies on its own.
    res = runner.invoke(node_app, ["dataset", "show", "cancer", "--json", "--config", str(config)])
    assert res.exit_code == 0, res.output
    signed = SignedRecord.from_json(res.stdout.strip())
    assert signed.verify(pki.coordinator.ca_pem).name == "hospital-a"


def _edit_certificate(config: Path, edit: object) -> None:
    state = NodeState(config.parent / "state")
    reg = state.get_dataset("cancer")
    assert reg is not None
    raw = json.loads(reg.certificate_json)
    assert callable(edit)
    edit(raw)
    with state.engine.begin() as c:
        c.execute(
            datasets.update()
            .where(datasets.c.name == "cancer")
            .values(certificate_json=json.dumps(raw))
        )


def test_a_tampered_certificate_is_detected_and_refuses_offers(
    pki: Pki, node: tuple[Path, Path]
) -> None:
    config, csv = node
    assert add(config, csv, *FULL).exit_code == 0

    # Someone lifts ssn off the negative list in the database.
    def unprohibit(raw: dict[str, object]) -> None:
        raw["body"]["prohibited_columns"] = []  # type: ignore[index]

    _edit_certificate(config, unprohibit)
    res = runner.invoke(node_app, ["dataset", "show", "cancer", "--config", str(config)])
    assert res.exit_code == 1
    assert "NOT VERIFIED" in res.output and "hash mismatch" in res.output
    # The node will not decide offers on a certificate that does not verify.
    state = NodeState(config.parent / "state")
    book = GrantBook(
        state,
        "hospital-a",
        signer=pki["hospital-a"].signer(),
        ca_pem=pki.coordinator.ca_pem,
    )
    reg = state.get_dataset("cancer")
    assert reg is not None
    with pytest.raises(RecordError, match="hash mismatch"):
        book.registration(reg)


def test_a_certificate_signed_by_another_key_or_for_another_file_is_rejected(
    pki: Pki, node: tuple[Path, Path], tmp_path: Path
) -> None:
    config, csv = node
    assert add(config, csv, *FULL).exit_code == 0
    state = NodeState(config.parent / "state")
    reg = state.get_dataset("cancer")
    assert reg is not None and reg.certificate is not None
    cert = RegistrationCertificate.from_record(reg.certificate)
    for signer, problem in (
        (pki["hospital-b"].signer(), "wrong signer"),
        (pki.foreign["hospital-a"].signer(), "not from the CA"),
    ):
        forged = cert.sign(signer)
        _edit_certificate(config, lambda raw, f=forged: raw.update(f.to_dict()))
        res = runner.invoke(node_app, ["dataset", "show", "cancer", "--config", str(config)])
        assert res.exit_code == 1, res.output
        assert problem in res.output
    # A genuine certificate, but for another file (an older registration swapped in).
    other = write_csv(tmp_path / "other.csv", rows=41)
    other_home = tmp_path / "other-node"
    other_config = make_config(pki, other_home)
    assert add(other_config, other, *FULL).exit_code == 0
    stale = NodeState(other_home / "state").get_dataset("cancer")
    assert stale is not None
    _edit_certificate(config, lambda raw: raw.update(json.loads(stale.certificate_json)))
    res = runner.invoke(node_app, ["dataset", "show", "cancer", "--config", str(config)])
    assert res.exit_code == 1 and "does not describe the registered file" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--level", "secret"), "--level must be one of general, important, core"),
        (("--column-level", "bmi"), "write COLUMN=LEVEL"),
        (("--column-level", "height=core"), "'height' is not a column"),
        (("--column-level", "bmi=top"), "the level must be one of"),
        (("--prohibit", "address"), "--prohibit 'address' is not a column"),
        (("--purpose", "Marketing!"), "is not a purpose code"),
    ],
)
def test_registration_mistakes_get_one_line_errors(
    node: tuple[Path, Path], args: tuple[str, ...], message: str
) -> None:
    config, csv = node
    res = add(config, csv, *args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert NodeState(config.parent / "state").get_dataset("cancer") is None


def test_hello_carries_the_certificates_and_old_registrations_get_one(
    pki: Pki, node: tuple[Path, Path]
) -> None:
    config, csv = node
    assert add(config, csv, *FULL).exit_code == 0
    # A dataset registered before certificates existed: no certificate in its row.
    assert add(config, csv, name="legacy").exit_code == 0
    state = NodeState(config.parent / "state")
    with state.engine.begin() as c:
        c.execute(datasets.update().where(datasets.c.name == "legacy").values(certificate_json=""))
    daemon = NodeDaemon(node_config.load(config))  # signs the missing one at start
    infos = {d.name: d for d in daemon._dataset_infos()}
    assert set(infos) == {"cancer", "legacy"}
    for info in infos.values():
        signed = SignedRecord.from_json(info.certificate_json)
        cert = RegistrationCertificate.verified(
            signed, pki.coordinator.ca_pem, expect_name="hospital-a"
        )
        assert cert.dataset == info.name and cert.fingerprint == info.fingerprint
    assert (
        RegistrationCertificate.from_record(
            SignedRecord.from_json(infos["legacy"].certificate_json)
        ).prohibited_columns
        == ()
    )
    assert verify_path(state.db_path, pki.coordinator.ca_pem).count == 3


def test_a_database_from_before_registration_certificates_is_migrated(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    engine = sa.create_engine(f"sqlite:///{state_dir / 'node.db'}")
    with engine.begin() as c:
        c.exec_driver_sql(
            "CREATE TABLE datasets (name VARCHAR(64) PRIMARY KEY, path TEXT NOT NULL, "
            "format VARCHAR(16) NOT NULL, label VARCHAR(256) NOT NULL, features_json TEXT "
            "NOT NULL, feature_shape_json TEXT NOT NULL, schema_json TEXT NOT NULL, "
            "schema_hash VARCHAR(64) NOT NULL, fingerprint VARCHAR(64) NOT NULL, rows BIGINT "
            "NOT NULL, added FLOAT NOT NULL)"
        )
        c.exec_driver_sql(
            "INSERT INTO datasets VALUES ('old', '/x.csv', 'csv', 'y', '[\"a\"]', '[1]', "
            '\'[["a", "int64"], ["y", "int64"]]\', \'h\', \'f\', 10, 0.0)'
        )
    engine.dispose()
    reg = NodeState(state_dir).get_dataset("old")
    assert reg is not None
    assert reg.classification == "general" and reg.certificate_json == ""
    assert reg.prohibited == [] and reg.purposes == [] and reg.column_levels == {}


def test_plaintext_node_registers_without_signing(tmp_path: Path) -> None:
    home = tmp_path / "node"
    home.mkdir()
    config = home / "node.toml"
    config.write_text(
        '[node]\ncoordinator = "127.0.0.1:9"\nstate_dir = "state"\n\n'
        '[insecure]\nname = "hospital-a"\n',
        encoding="utf-8",
    )
    csv = write_csv(tmp_path / "cancer.csv")
    res = add(config, csv, "--prohibit", "ssn")
    assert res.exit_code == 0, res.output
    assert "not signed" in res.output
    state = NodeState(home / "state")
    reg = state.get_dataset("cancer")
    assert reg is not None and reg.certificate_json == "" and reg.prohibited == ["ssn"]
    assert state.ledger.entries() == []
    res = runner.invoke(node_app, ["dataset", "show", "cancer", "--config", str(config)])
    assert res.exit_code == 0 and "no signed registration certificate" in res.output
