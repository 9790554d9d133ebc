"""Deployment CA, role certificates, signatures and canonical JSON (real files, real crypto)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from wharf.ca_cli import ca_app
from wharf.identity import (
    ROLE_OID,
    ROLES,
    Identity,
    IdentityArgumentError,
    IdentityError,
    IdentityExistsError,
    Signer,
    canonical_json,
    init_ca,
    issue,
    peer_from_pem,
    sign,
    verify_signature,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    init_ca(root / "other", name="Someone else's CA")
    for role, name in [("node", "hospital-a"), ("developer", "dev.1"), ("coordinator", "coord")]:
        issue(root / "ca", role, name, root / "ids")
    issue(root / "other", "node", "hospital-a", root / "foreign")
    return root


def _load(pki: Path, name: str) -> Identity:
    return Identity.load(
        pki / "ids" / f"{name}.pem", pki / "ids" / f"{name}.key", pki / "ca/ca.pem"
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------- CA and issuance


def test_init_ca_writes_files_with_safe_modes(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "ca", days=30)
    assert files.cert == tmp_path / "ca" / "ca.pem"
    assert files.key == tmp_path / "ca" / "ca.key"
    assert _mode(files.key) == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Wharf deployment CA"
    )


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    files = init_ca(tmp_path)
    before = files.key.read_bytes()
    with pytest.raises(IdentityExistsError, match=r"already exists.*--force"):
        init_ca(tmp_path)
    assert files.key.read_bytes() == before
    init_ca(tmp_path, force=True)
    assert files.key.read_bytes() != before
    assert _mode(files.key) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_issue_refuses_to_overwrite(pki: Path) -> None:
    with pytest.raises(IdentityExistsError):
        issue(pki / "ca", "node", "hospital-a", pki / "ids")


def test_issue_round_trip_reads_role_and_name(pki: Path) -> None:
    ident = _load(pki, "hospital-a")
    assert (ident.name, ident.role) == ("hospital-a", "node")
    assert _mode(pki / "ids" / "hospital-a.key") == 0o600
    assert b"PRIVATE KEY" in ident.key_pem
    assert "PRIVATE" not in repr(ident)
    peer = peer_from_pem(ident.cert_pem, ident.ca_pem)
    assert (peer.name, peer.role) == ("hospital-a", "node")
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    import hashlib

    assert peer.fingerprint == hashlib.sha256(der).hexdigest() == ident.fingerprint
    # Role is in the private extension and in the OU; name is the CN.
    ext = cert.extensions.get_extension_for_oid(ROLE_OID)
    assert not ext.critical
    assert ext.value.value == b"\x0c\x04node"  # type: ignore[attr-defined]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "node"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_coordinator_cert_has_sans_and_server_auth(pki: Path) -> None:
    ident = _load(pki, "coord")
    assert ident.role == "coordinator"
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_coordinator_custom_hosts(tmp_path: Path, pki: Path) -> None:
    files = issue(
        pki / "ca", "coordinator", "c2", tmp_path, hosts=["wharf.example.org", "10.1.2.3"]
    )
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["wharf.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "x/y", "../etc", ".hidden", "-rf", "é"])
def test_issue_rejects_bad_names(tmp_path: Path, pki: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        issue(pki / "ca", "node", name, tmp_path)
    assert not list(tmp_path.iterdir())


def test_issue_rejects_bad_role_and_hosts(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(IdentityArgumentError, match="unknown role 'admin'"):
        issue(pki / "ca", "admin", "n", tmp_path)
    with pytest.raises(IdentityArgumentError, match="only to coordinator"):
        issue(pki / "ca", "node", "n", tmp_path, hosts=["example.org"])
    with pytest.raises(IdentityArgumentError, match="invalid host"):
        issue(pki / "ca", "coordinator", "c", tmp_path, hosts=["not a host"])


def test_issue_without_ca_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="wharf ca init"):
        issue(tmp_path / "missing", "node", "n", tmp_path / "out")


def test_every_role_round_trips(tmp_path: Path, pki: Path) -> None:
    for role in ROLES:
        files = issue(pki / "ca", role, f"{role}-x", tmp_path)
        ident = Identity.load(files.cert, files.key, pki / "ca/ca.pem")
        assert (ident.name, ident.role) == (f"{role}-x", role)


# ----------------------------------------------------------------- load errors


def test_load_missing_file_is_one_clear_line(pki: Path) -> None:
    with pytest.raises(IdentityError, match="key file not found") as exc:
        Identity.load(pki / "ids/hospital-a.pem", pki / "ids/nope.key", pki / "ca/ca.pem")
    assert "\n" not in str(exc.value)


def test_load_key_not_matching_cert(pki: Path) -> None:
    with pytest.raises(IdentityError, match="does not match certificate"):
        Identity.load(pki / "ids/hospital-a.pem", pki / "ids/coord.key", pki / "ca/ca.pem")


def test_load_cert_from_other_ca(pki: Path) -> None:
    with pytest.raises(IdentityError, match="not signed by this deployment's CA"):
        Identity.load(
            pki / "foreign/hospital-a.pem", pki / "foreign/hospital-a.key", pki / "ca/ca.pem"
        )


def test_load_garbage_cert(tmp_path: Path, pki: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(IdentityError, match="not a valid PEM certificate"):
        Identity.load(bad, pki / "ids/hospital-a.key", pki / "ca/ca.pem")


def test_load_expired(tmp_path: Path, pki: Path) -> None:
    past = datetime.now(UTC) - timedelta(days=30)
    files = issue(
        pki / "ca",
        "node",
        "old",
        tmp_path,
        _not_valid_before=past,
        _not_valid_after=past + timedelta(days=1),
    )
    with pytest.raises(IdentityError, match="expired"):
        Identity.load(files.cert, files.key, pki / "ca/ca.pem")
    with pytest.raises(IdentityError, match="expired"):
        peer_from_pem(files.cert.read_bytes(), (pki / "ca/ca.pem").read_bytes())


def test_not_yet_valid(tmp_path: Path, pki: Path) -> None:
    future = datetime.now(UTC) + timedelta(days=30)
    files = issue(
        pki / "ca",
        "node",
        "future",
        tmp_path,
        _not_valid_before=future,
        _not_valid_after=future + timedelta(days=1),
    )
    with pytest.raises(IdentityError, match="not valid until"):
        peer_from_pem(files.cert.read_bytes(), (pki / "ca/ca.pem").read_bytes())


# ----------------------------------------------------------------- peer_from_pem


def test_peer_from_pem_rejects_foreign_ca(pki: Path) -> None:
    foreign = (pki / "foreign/hospital-a.pem").read_bytes()
    with pytest.raises(IdentityError, match="not signed"):
        peer_from_pem(foreign, (pki / "ca/ca.pem").read_bytes())
    # ...but it is fine against its own CA.
    assert peer_from_pem(foreign, (pki / "other/ca.pem").read_bytes()).role == "node"


def test_peer_from_pem_accepts_ca_bundle(pki: Path) -> None:
    bundle = (pki / "other/ca.pem").read_bytes() + (pki / "ca/ca.pem").read_bytes()
    assert peer_from_pem((pki / "ids/coord.pem").read_bytes(), bundle).name == "coord"


def test_peer_from_pem_rejects_tampered_cert(pki: Path) -> None:
    cert = x509.load_pem_x509_certificate((pki / "ids/hospital-a.pem").read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"hospital-a") == 1
    forged = der.replace(b"hospital-a", b"hospital-b")
    forged_pem = x509.load_der_x509_certificate(forged).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="not signed"):
        peer_from_pem(forged_pem, (pki / "ca/ca.pem").read_bytes())
    with pytest.raises(IdentityError):
        peer_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", der)


def test_peer_from_pem_rejects_ca_cert_itself(pki: Path) -> None:
    ca = (pki / "ca/ca.pem").read_bytes()
    with pytest.raises(IdentityError, match="CA certificate is not a Wharf identity"):
        peer_from_pem(ca, ca)


def test_peer_from_pem_rejects_ou_disagreeing_with_role_extension(pki: Path) -> None:
    from cryptography.hazmat.primitives import hashes

    ca_cert = x509.load_pem_x509_certificate((pki / "ca/ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca/ca.key").read_bytes(), None)
    leaf = x509.load_pem_x509_certificate((pki / "ids/hospital-a.pem").read_bytes())
    now = datetime.now(UTC)

    def make(ou: str, role_der: bytes | None) -> bytes:
        b = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                        x509.NameAttribute(NameOID.COMMON_NAME, "sneaky"),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(leaf.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
        )
        if role_der is not None:
            b = b.add_extension(x509.UnrecognizedExtension(ROLE_OID, role_der), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]

    ca_pem = (pki / "ca/ca.pem").read_bytes()
    with pytest.raises(IdentityError, match="disagrees"):
        peer_from_pem(make("coordinator", b"\x0c\x04node"), ca_pem)
    with pytest.raises(IdentityError, match="no Wharf role extension"):
        peer_from_pem(make("coordinator", None), ca_pem)
    with pytest.raises(IdentityError, match="unknown role"):
        peer_from_pem(make("root", b"\x0c\x04root"), ca_pem)
    assert peer_from_pem(make("node", b"\x0c\x04node"), ca_pem).name == "sneaky"


# ----------------------------------------------------------------- signatures


def test_sign_and_verify(pki: Path) -> None:
    node = _load(pki, "hospital-a")
    dev = _load(pki, "dev.1")
    data = canonical_json({"job": "abc", "round": 3})
    sig = sign(node.key_pem, data)
    assert verify_signature(node.cert_pem, data, sig)
    assert not verify_signature(dev.cert_pem, data, sig)
    assert not verify_signature(node.cert_pem, data + b" ", sig)
    assert not verify_signature(node.cert_pem, data, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_signature(node.cert_pem, data, b"")
    assert not verify_signature(b"not a cert", data, sig)

    signer = node.signer()
    assert signer.cert_pem == node.cert_pem
    sig2 = signer.sign(data)
    assert verify_signature(node.cert_pem, data, sig2)
    assert "PRIVATE" not in repr(signer)


def test_signer_refuses_mismatched_key(pki: Path) -> None:
    node = _load(pki, "hospital-a")
    dev = _load(pki, "dev.1")
    with pytest.raises(IdentityError, match="does not match"):
        Signer(node.key_pem, dev.cert_pem)


# ----------------------------------------------------------------- canonical JSON


def test_canonical_json_is_key_order_independent_and_compact() -> None:
    a = {"b": 1, "a": [1, 2, {"y": "é", "x": None}], "c": True}
    b = {"c": True, "a": [1, 2, {"x": None, "y": "é"}], "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":[1,2,{"x":null,"y":"é"}],"b":1,"c":true}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), {"x": [float("nan")]}])
def test_canonical_json_rejects_non_finite(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_canonical_json_rejects_non_string_keys() -> None:
    with pytest.raises(TypeError):
        canonical_json({1: "a"})


# ----------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_init_and_issue(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "ids"
    r = runner.invoke(ca_app, ["init", "--dir", str(ca_dir)])
    assert r.exit_code == 0, r.output
    assert "ca.pem" in r.stdout
    r = runner.invoke(
        ca_app, ["issue", "--role", "node", "n1", "--dir", str(ca_dir), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "n1.pem" in r.stdout
    r = runner.invoke(
        ca_app,
        [
            "issue",
            "--role",
            "coordinator",
            "coord",
            "--dir",
            str(ca_dir),
            "--out",
            str(out),
            "--host",
            "wharf.internal",
            "--host",
            "192.168.1.5",
        ],
    )
    assert r.exit_code == 0, r.output
    ident = Identity.load(out / "n1.pem", out / "n1.key", ca_dir / "ca.pem")
    assert (ident.role, ident.name) == ("node", "n1")
    coord = x509.load_pem_x509_certificate((out / "coord.pem").read_bytes())
    san = coord.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["wharf.internal"]


def test_cli_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert runner.invoke(ca_app, ["init", "--dir", str(ca_dir)]).exit_code == 0
    cases = [
        ["init", "--dir", str(ca_dir)],  # exists, no --force
        ["issue", "--role", "node", "bad name", "--dir", str(ca_dir), "--out", str(tmp_path)],
        ["issue", "--role", "node", "n", "--dir", str(tmp_path / "nope"), "--out", str(tmp_path)],
        ["issue", "--role", "node", "n", "--dir", str(ca_dir), "--host", "x.org"],
    ]
    for args in cases:
        r = runner.invoke(ca_app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit)
        assert "Traceback" not in r.output
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    r = runner.invoke(ca_app, ["init", "--dir", str(ca_dir), "--force"])
    assert r.exit_code == 0, r.output


def test_cli_rejects_unknown_role(tmp_path: Path) -> None:
    r = runner.invoke(ca_app, ["issue", "--role", "admin", "n", "--dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "admin" in r.stderr
