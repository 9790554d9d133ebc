"""Deployment CA, role certificates and signatures.

Every party in a Wharf deployment holds a certificate issued by the deployment's
own CA. The certificate *is* the identity: its subject CN is the party's name and
its role (``coordinator``, ``node``, ``developer`` or ``operator``) is carried in
a private X.509 extension (:data:`ROLE_OID`, a DER ``UTF8String``) and, belt and
braces, in the subject OU. A reader trusts the extension and requires the OU to
agree. Nothing a peer says in a request field can change who it is.

Keys are ECDSA P-256: gRPC's TLS stack (BoringSSL) accepts them for mTLS and the
same key signs protocol messages and records (ECDSA/SHA-256, DER signatures).

:func:`canonical_json` is the one serialisation used to hash and sign JSON-shaped
records anywhere in Wharf.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_COORDINATOR_HOSTS",
    "ROLES",
    "ROLE_OID",
    "CAFiles",
    "Identity",
    "IdentityArgumentError",
    "IdentityError",
    "IdentityExistsError",
    "IdentityFiles",
    "Peer",
    "Signer",
    "canonical_json",
    "init_ca",
    "issue",
    "peer_from_pem",
    "sign",
    "validate_name",
    "validate_role",
    "verify_signature",
]

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("coordinator", "node", "developer", "operator")

ROLE_OID = ObjectIdentifier("2.25.226807351365021518162210770239471142226")
"""Private, non-critical extension holding the role as a DER UTF8String.

An OID under the ITU-T/ISO ``2.25`` arc (derived from a random UUID, X.667), which
anyone may use without registration and which cannot collide with an OID that
belongs to somebody else's private enterprise number."""

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
DEFAULT_COORDINATOR_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are back-dated by this much so a peer whose clock is slightly
behind still accepts a freshly issued certificate."""


# --------------------------------------------------------------------------- errors


class IdentityError(Exception):
    """A user-facing identity problem; the message is one line that says what to do."""


class IdentityArgumentError(IdentityError, ValueError):
    """An invalid role, name, host or validity period."""


class IdentityExistsError(IdentityError, FileExistsError):
    """Refused to overwrite an existing key or certificate."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class CAFiles:
    """Paths written by :func:`init_ca`."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class IdentityFiles:
    """Paths written by :func:`issue`."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Peer:
    """A verified peer: who the CA says it is.

    ``fingerprint`` is the lowercase hex SHA-256 of the certificate's DER bytes.
    """

    name: str
    role: str
    fingerprint: str


def validate_role(role: str) -> str:
    """Return ``role`` if it is one of :data:`ROLES`, else raise."""
    if role not in ROLES:
        raise IdentityArgumentError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid identity name, else raise.

    1–64 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit (so a
    name is never a hidden file, ``..``, or mistaken for a command-line option).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise IdentityArgumentError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------- DER helpers


def _der_utf8string(text: str) -> bytes:
    data = text.encode("utf-8")
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + data


def _parse_der_utf8string(der: bytes) -> str:
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    first = der[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        k = first & 0x7F
        if k == 0 or k > 4 or len(der) < 2 + k:
            raise ValueError("bad DER length")
        length, offset = int.from_bytes(der[2 : 2 + k], "big"), 2 + k
    if offset + length != len(der):
        raise ValueError("DER length does not match the value")
    return der[offset:].decode("utf-8")


# --------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, never via a wider mode.

    Without ``force`` the file is created with O_EXCL (no race with an existing
    file, no following a planted symlink); with ``force`` a temporary file in the
    same directory atomically replaces it.
    """
    try:
        if force:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            target = Path(tmp)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd, target = os.open(path, flags, mode), path
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(target, path)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    except FileExistsError:
        raise IdentityExistsError(
            f"{path} already exists; refusing to overwrite it (use --force to replace it)"
        ) from None
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from None


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if p.exists() or p.is_symlink():
            raise IdentityExistsError(
                f"{p} already exists; refusing to overwrite it (use --force to replace it)"
            )


def _make_dir(directory: Path, mode: int) -> None:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {directory}: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise IdentityError(f"{directory} is not a directory")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} path is a directory, not a file: {path}") from None
    except PermissionError:
        raise IdentityError(f"cannot read {what} file {path}: permission denied") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- parsing


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise IdentityError(f"{what} is not a valid PEM certificate") from None


def _load_ca_bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise IdentityError("CA certificate is not a valid PEM certificate") from None
    if not certs:
        raise IdentityError("CA certificate file holds no certificate")
    return certs


def _load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise IdentityError(
            f"{what} is encrypted; Wharf expects an unencrypted PEM key (protected by mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(f"{what} is not a valid PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{what} is not an ECDSA P-256 key")
    return key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _single_attr(cert: x509.Certificate, oid: ObjectIdentifier, label: str) -> str:
    attrs = cert.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise IdentityError(f"certificate subject must have exactly one {label}")
    return attrs[0].value


def _read_role_and_name(cert: x509.Certificate) -> tuple[str, str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        raise IdentityError("certificate carries no Wharf role extension") from None
    except ValueError:
        raise IdentityError("certificate has malformed or duplicate extensions") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise IdentityError("certificate role extension is malformed")
    try:
        role = _parse_der_utf8string(value.value)
    except (ValueError, UnicodeDecodeError):
        raise IdentityError("certificate role extension is not a UTF8String") from None
    if role not in ROLES:
        raise IdentityError(f"certificate carries an unknown role {role!r}")
    ou = _single_attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
    if ou != role:
        raise IdentityError(f"certificate OU {ou!r} disagrees with its role extension {role!r}")
    name = _single_attr(cert, NameOID.COMMON_NAME, "CN")
    if not _NAME_RE.fullmatch(name):
        raise IdentityError(f"certificate CN {name!r} is not a valid Wharf name")
    return role, name


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class _Verified:
    peer: Peer
    not_before: datetime
    not_after: datetime


def _check_time(not_before: datetime, not_after: datetime, what: str, now: datetime) -> None:
    if now < not_before:
        raise IdentityError(f"{what} is not valid until {not_before.isoformat()}")
    if now > not_after:
        raise IdentityError(f"{what} expired on {not_after.isoformat()}")


@functools.lru_cache(maxsize=1024)
def _verify_static(cert_pem: bytes, ca_pem: bytes) -> _Verified:
    """Everything about a certificate that does not depend on the clock (cached).

    Returns the tightest validity window of the certificate and its issuing CA
    so that the (uncached) time check covers both.
    """
    cert = _load_cert(cert_pem, "peer certificate")
    cas = _load_ca_bundle(ca_pem)
    if _is_ca(cert):
        raise IdentityError("a CA certificate is not a Wharf identity")
    issuer: x509.Certificate | None = None
    for ca in cas:
        if not _is_ca(ca):
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        raise IdentityError("certificate is not signed by this deployment's CA")
    role, name = _read_role_and_name(cert)
    fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return _Verified(
        peer=Peer(name=name, role=role, fingerprint=fp),
        not_before=max(cert.not_valid_before_utc, issuer.not_valid_before_utc),
        not_after=min(cert.not_valid_after_utc, issuer.not_valid_after_utc),
    )


def peer_from_pem(cert_pem: bytes, ca_pem: bytes) -> Peer:
    """Verify ``cert_pem`` against the CA (or CA bundle) ``ca_pem`` and read who it is.

    Checks: the certificate is directly signed by a CA certificate in ``ca_pem``,
    is not itself a CA, is within its (and its CA's) validity period now, and
    carries a known role in the role extension with a matching OU and a valid CN.
    Raises :class:`IdentityError` otherwise.

    Signature and structure checks are cached by ``(cert_pem, ca_pem)`` because
    this runs on every RPC; the validity period is re-checked on every call, so a
    cached certificate still stops being accepted when it expires.
    """
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("ascii")
    if isinstance(ca_pem, str):
        ca_pem = ca_pem.encode("ascii")
    verified = _verify_static(bytes(cert_pem), bytes(ca_pem))
    _check_time(verified.not_before, verified.not_after, "certificate", datetime.now(UTC))
    return verified.peer


# --------------------------------------------------------------------------- CA and issuance


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial() -> int:
    return secrets.randbits(159) | 1 << 158


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise IdentityArgumentError(f"days must be a positive whole number, got {days!r}")


def init_ca(
    directory: Path,
    name: str = "Wharf deployment CA",
    days: int = 3650,
    *,
    force: bool = False,
) -> CAFiles:
    """Create a deployment CA: ``directory/ca.pem`` and ``directory/ca.key`` (mode 0600).

    The directory is created with mode 0700 if missing. Existing files are never
    overwritten unless ``force=True``.
    """
    _check_days(days)
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise IdentityArgumentError("CA name must be 1-64 characters")
    directory = Path(directory)
    files = CAFiles(cert=directory / CA_CERT_FILE, key=directory / CA_KEY_FILE)
    _make_dir(directory, 0o700)
    _refuse_existing([files.cert, files.key], force)

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves no certificate without its key.
    _write_file(files.key, _key_pem(key), 0o600, force=force)
    _write_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, force=force)
    return files


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    if not cert_path.exists() and not key_path.exists():
        raise IdentityError(f"no CA in {ca_dir}: run `wharf ca init --dir {ca_dir}` first")
    cert = _load_cert(_read(cert_path, "CA certificate"), f"CA certificate {cert_path}")
    key = _load_key(_read(key_path, "CA key"), f"CA key {key_path}")
    if not _same_public_key(cert, key):
        raise IdentityError(f"CA key {key_path} does not match CA certificate {cert_path}")
    if not _is_ca(cert):
        raise IdentityError(f"{cert_path} is not a CA certificate")
    _check_time(cert.not_valid_before_utc, cert.not_valid_after_utc, "CA certificate", _now())
    return cert, key


def _now() -> datetime:
    return datetime.now(UTC)


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise IdentityArgumentError("empty host name")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(host) > 253 or not re.fullmatch(rf"(\*\.)?{label}(\.{label})*\.?", host):
        raise IdentityArgumentError(
            f"invalid host {host!r}: expected a DNS name or an IP address (IDNA names in ASCII)"
        )
    return x509.DNSName(host)


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    out_dir: Path,
    hosts: Sequence[str] = (),
    days: int = 825,
    *,
    force: bool = False,
    _not_valid_before: datetime | None = None,
    _not_valid_after: datetime | None = None,
) -> IdentityFiles:
    """Issue a role certificate: ``out_dir/<name>.pem`` and ``out_dir/<name>.key`` (0600).

    ``coordinator`` certificates carry DNS/IP subject alternative names for
    ``hosts`` (default :data:`DEFAULT_COORDINATOR_HOSTS`) and ExtendedKeyUsage
    serverAuth; all other roles get clientAuth and take no hosts. The validity is
    ``days`` from now, clipped to the CA's own expiry. Existing files are never
    overwritten unless ``force=True``.

    ``_not_valid_before``/``_not_valid_after`` override the validity period and
    exist only so tests can make expired or not-yet-valid certificates.
    """
    validate_role(role)
    validate_name(name)
    _check_days(days)
    if isinstance(hosts, str):
        hosts = [hosts]
    if role == "coordinator":
        sans = [_general_name(h) for h in (hosts or DEFAULT_COORDINATOR_HOSTS)]
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        if hosts:
            raise IdentityArgumentError(
                f"hosts apply only to coordinator certificates, not to role {role!r}"
            )
        sans = []
        eku = ExtendedKeyUsageOID.CLIENT_AUTH

    ca_cert, ca_key = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    files = IdentityFiles(cert=out_dir / f"{name}.pem", key=out_dir / f"{name}.key")
    _make_dir(out_dir, 0o700)
    _refuse_existing([files.cert, files.key], force)

    now = _now()
    not_before = _not_valid_before or (now - _CLOCK_SKEW)
    not_after = _not_valid_after or min(now + timedelta(days=days), ca_cert.not_valid_after_utc)

    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(ROLE_OID, _der_utf8string(role)), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_file(files.key, _key_pem(key), 0o600, force=force)
    _write_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, force=force)
    return files


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Identity:
    """A loaded, checked identity: certificate, private key and the CA that vouches for it.

    ``key_pem`` is excluded from ``repr`` so the private key never lands in a log.
    """

    name: str
    role: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path, ca_path: str | Path) -> Identity:
        """Read and check an identity; raise :class:`IdentityError` with a one-line reason.

        Checks that all files are readable, the key is an unencrypted P-256 key
        that matches the certificate, and the certificate is signed by the CA,
        valid now, and carries a role and name.
        """
        cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "key")
        ca_pem = _read(ca_path, "CA certificate")
        cert = _load_cert(cert_pem, f"certificate {cert_path}")
        key = _load_key(key_pem, f"key {key_path}")
        _load_ca_bundle(ca_pem)
        if not _same_public_key(cert, key):
            raise IdentityError(f"key {key_path} does not match certificate {cert_path}")
        try:
            peer = peer_from_pem(cert_pem, ca_pem)
        except IdentityError as exc:
            raise IdentityError(f"{cert_path}: {exc} (CA {ca_path})") from None
        try:
            mode = stat.S_IMODE(key_path.stat().st_mode)
        except OSError:
            mode = 0
        if mode & 0o077:
            log.warning("key file %s is readable by others (mode %o); chmod 600 it", key_path, mode)
        return cls(
            name=peer.name, role=peer.role, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem
        )

    @property
    def peer(self) -> Peer:
        """This identity as its peers see it (re-verified against the CA, cached)."""
        return peer_from_pem(self.cert_pem, self.ca_pem)

    @property
    def fingerprint(self) -> str:
        """Lowercase hex SHA-256 of the certificate's DER bytes."""
        return self.peer.fingerprint

    def signer(self) -> Signer:
        """A :class:`Signer` holding this identity's parsed key."""
        return Signer(self.key_pem, self.cert_pem)


# --------------------------------------------------------------------------- signatures

_ECDSA = ec.ECDSA(hashes.SHA256())


class Signer:
    """Signs with a parsed P-256 key (parse once, sign many).

    ``cert_pem`` is the certificate whose public key verifies the signatures; the
    constructor refuses a key that does not match it.
    """

    __slots__ = ("_key", "cert_pem")

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = _load_key(key_pem, "signing key")
        cert = _load_cert(cert_pem, "signer certificate")
        if not _same_public_key(cert, key):
            raise IdentityError("signing key does not match the signer certificate")
        self._key = key
        self.cert_pem = cert_pem

    @classmethod
    def from_identity(cls, identity: Identity) -> Signer:
        return cls(identity.key_pem, identity.cert_pem)

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature over ``data``, DER-encoded."""
        return self._key.sign(data, _ECDSA)

    def __repr__(self) -> str:
        return "Signer(<P-256 key>)"


def sign(key_pem: bytes, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature over ``data`` (DER). Prefer :class:`Signer` in loops."""
    return _load_key(key_pem, "signing key").sign(data, _ECDSA)


def verify_signature(cert_pem: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid ECDSA P-256/SHA-256 signature by ``cert_pem``'s key.

    Never raises: a malformed certificate, a non-P-256 key or a bad signature all
    give False. This checks the mathematics only; whether the certificate belongs
    to the deployment (and to whom) is :func:`peer_from_pem`'s job.
    """
    try:
        key = _cert_public_key(bytes(cert_pem))
        key.verify(bytes(signature), bytes(data), _ECDSA)
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _cert_public_key(cert_pem: bytes) -> ec.EllipticCurvePublicKey:
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 certificate")
    return key


# --------------------------------------------------------------------------- canonical JSON


def _check_canonical(obj: Any, path: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"canonical JSON keys must be strings, got {type(k).__name__} {path}"
                )
            _check_canonical(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_canonical(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"canonical JSON cannot hold {obj!r} (at {path})")


def canonical_json(obj: Any) -> bytes:
    """The canonical serialisation Wharf hashes and signs.

    Sorted keys, no whitespace (``","``/``":"``), UTF-8 without ASCII escaping.
    NaN and ±Infinity are rejected (ValueError); dictionary keys must be strings
    (TypeError), because ``json`` would otherwise turn ``{1: …}`` into ``{"1": …}``
    sorted numerically, which does not survive a round trip.
    """
    _check_canonical(obj, "$")
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


# --------------------------------------------------------------------------- peer signatures


def peer_verifier(
    certificates: Callable[[str], bytes | None], ca_pem: bytes, role: str = "node"
) -> Callable[[str, bytes, bytes], bool]:
    """A ``verify(name, data, signature)`` that trusts only CA-issued certs of ``name``.

    ``certificates(name)`` looks up the PEM the caller holds for ``name`` (the
    coordinator: from the node's mTLS session; a node: as relayed in a secure
    aggregation setup). The certificate must chain to the deployment CA, name
    exactly ``name`` and carry ``role``; only then is the signature checked, so
    a coordinator cannot substitute a key of its own for a node's.
    """

    def verify(name: str, data: bytes, signature: bytes) -> bool:
        pem = certificates(name)
        if not pem:
            return False
        try:
            peer = peer_from_pem(pem, ca_pem)
        except Exception:
            return False
        if peer.name != name or peer.role != role:
            return False
        return verify_signature(pem, data, signature)

    return verify
