"""gRPC credentials and channels built from Wharf identities (mutual TLS).

The coordinator listens with :func:`server_credentials`; nodes, developers and
operators dial it with :func:`secure_channel`. Both sides present a certificate
issued by the deployment CA (see :mod:`wharf.identity`); handlers learn who is
calling with :func:`peer_identity`, never from a request field.

Measured behaviour of the server configuration (grpcio 1.85, BoringSSL, TLS 1.3;
``tests/test_tls.py`` pins it):

- client presents **no certificate** → the server aborts the TLS handshake
  (``PEER_DID_NOT_RETURN_A_CERTIFICATE``); the client's RPC fails with
  ``grpc.StatusCode.UNAVAILABLE`` ("failed to connect to all addresses … Socket
  closed"); no handler runs.
- client presents **a certificate from another CA** → same, handshake refused
  (``CERTIFICATE_VERIFY_FAILED``), ``UNAVAILABLE``.
- client presents a deployment-CA certificate **without the clientAuth purpose**
  (e.g. the coordinator's serverAuth certificate) → same, ``UNAVAILABLE``.
- client presents **a valid client certificate** → the RPC proceeds and
  ``context.auth_context()["x509_pem_cert"]`` holds its PEM for
  :func:`peer_identity`.

A refused client does not hurt the server; the next valid client is served.

With ``require_client_auth=False`` gRPC does not even *request* a client
certificate (``GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE``): every client gets in
and the auth context carries no certificate, so no handler could authenticate
anyone. Python's grpc exposes no "request and verify but do not require" mode
that would let a handler answer ``UNAUTHENTICATED`` instead, so Wharf uses
``require_client_auth=True`` and refused clients see ``UNAVAILABLE``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import grpc

from wharf.identity import Identity, IdentityError, Peer, peer_from_pem

__all__ = [
    "KEEPALIVE_TIME_MS",
    "MAX_MESSAGE_BYTES",
    "MIN_RECV_PING_INTERVAL_MS",
    "channel_credentials",
    "channel_options",
    "insecure_channel",
    "peer_identity",
    "secure_channel",
    "server_credentials",
    "server_options",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
"""8 MiB per gRPC message in both directions; larger payloads are chunked."""

KEEPALIVE_TIME_MS = 30_000
"""Clients ping an idle connection every 30 s so a long-lived task stream survives
NATs and firewalls that drop quiet TCP flows, and a dead coordinator is noticed."""

KEEPALIVE_TIMEOUT_MS = 10_000

MIN_RECV_PING_INTERVAL_MS = 10_000
"""The server tolerates client pings this far apart (must stay below KEEPALIVE_TIME_MS)."""

_FORBIDDEN_OPTIONS = frozenset({"grpc.ssl_target_name_override"})

Option = tuple[str, Any]


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


# --------------------------------------------------------------------------- options


def _merge(defaults: list[Option], extra: Iterable[Option] | None) -> list[Option]:
    merged = dict(defaults)
    for key, value in extra or ():
        if key in _FORBIDDEN_OPTIONS:
            raise ValueError(
                f"{key} is not allowed: issue the coordinator a certificate with the right "
                "--host names instead of overriding TLS name checks"
            )
        merged[key] = value
    return list(merged.items())


def channel_options(extra: Iterable[Option] | None = None) -> list[Option]:
    """Client channel options: 8 MiB message limits and keepalive for a long-lived stream.

    ``extra`` entries override the defaults by key.
    """
    defaults: list[Option] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Default 2: after two pings without data the client stops pinging, which
        # would silently disable keepalive on an idle task stream.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return _merge(defaults, extra)


def server_options(extra: Iterable[Option] | None = None) -> list[Option]:
    """Server options: 8 MiB message limits and a ping policy that admits client keepalive.

    gRPC servers by default treat pings closer than 5 minutes apart on an idle
    connection as abuse and close it with GOAWAY ``too_many_pings``; here pings
    every 10 s or slower are allowed, so the clients' 30 s keepalive is fine. The
    server also pings idle clients every 60 s to drop connections of vanished
    nodes. ``extra`` entries override the defaults by key.
    """
    defaults: list[Option] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # This key is GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: on a server
        # it bounds *received* pings. "grpc.http2.min_recv_ping_interval_without_data_ms"
        # is not a gRPC argument and is silently ignored (tests/test_tls.py checks this).
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_RECV_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return _merge(defaults, extra)


# --------------------------------------------------------------------------- credentials


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials: the server's certificate plus mandatory client auth.

    Clients must present a certificate that chains to the deployment CA and has
    the clientAuth purpose, or the TLS handshake is refused; such a client sees
    ``grpc.StatusCode.UNAVAILABLE`` and no handler runs (see the module docstring
    for the measured behaviour and why not ``require_client_auth=False``).
    Handlers still call :func:`peer_identity` to read the verified role and name.
    """
    if identity.role != "coordinator":
        log.warning(
            "serving with a %r certificate: clients check for serverAuth and the "
            "host name, which only coordinator certificates carry",
            identity.role,
        )
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Client credentials: trust only the deployment CA and present ``identity``'s cert."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def secure_channel(
    target: str, identity: Identity, options: Iterable[Option] | None = None
) -> grpc.Channel:
    """An mTLS channel to ``target`` (``host:port``) with :func:`channel_options`.

    The coordinator's host name is checked against its certificate's SANs;
    ``grpc.ssl_target_name_override`` is refused.
    """
    return grpc.secure_channel(target, channel_credentials(identity), channel_options(options))


def insecure_channel(target: str, options: Iterable[Option] | None = None) -> grpc.Channel:
    """A plaintext channel for local experiments only: no authentication, no encryption."""
    log.warning(
        "INSECURE plaintext gRPC channel to %s: no TLS, no authentication, no roles. "
        "Use only for local experiments, never with real data.",
        target,
    )
    return grpc.insecure_channel(target, channel_options(options))


# --------------------------------------------------------------------------- peers


def peer_identity(context: _HasAuthContext, ca_pem: bytes) -> Peer | None:
    """The verified caller of an RPC, or None if the connection carries no certificate.

    Reads ``x509_pem_cert`` from ``context.auth_context()`` (sync or asyncio
    ``ServicerContext``) and re-verifies it against ``ca_pem`` with
    :func:`~wharf.identity.peer_from_pem` (cached), so a handler never trusts a
    certificate the TLS layer did not check against this CA. Raises
    :class:`~wharf.identity.IdentityError` if a certificate is present but is not
    a valid Wharf identity (e.g. no role extension); callers answer
    ``UNAUTHENTICATED`` for None or an error.
    """
    values = list(context.auth_context().get("x509_pem_cert", ()))
    if not values:
        return None
    if len(values) != 1:
        raise IdentityError("connection carries more than one peer certificate")
    pem = values[0]
    if isinstance(pem, str):
        pem = pem.encode("ascii")
    return peer_from_pem(pem, ca_pem)
