"""Mutual TLS on real gRPC over loopback with certificates from a real deployment CA.

Pins the measured behaviour documented in :mod:`wharf.tls`: clients without a
certificate, with a foreign-CA certificate, an expired one, or one lacking the
clientAuth purpose are refused in the TLS handshake and see UNAVAILABLE; no
handler runs; valid clients are served and identified by role and name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from wharf import tls
from wharf.identity import Identity, IdentityError, init_ca, issue

DEADLINE = 5.0
SERVICE = "wharf.test.Probe"


def _load(d: Path, ca: str, sub: str, name: str) -> Identity:
    return Identity.load(d / sub / f"{name}.pem", d / sub / f"{name}.key", d / ca / "ca.pem")


@dataclass
class Pki:
    coordinator: Identity
    node: Identity
    developer: Identity
    foreign: Identity
    expired_cert: bytes
    expired_key: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("tls")
    init_ca(d / "ca")
    init_ca(d / "evil", name="Wharf deployment CA")  # same name, different key
    issue(d / "ca", "coordinator", "coord", d / "ids")
    issue(d / "ca", "node", "hospital-a", d / "ids")
    issue(d / "ca", "developer", "dev-1", d / "ids")
    issue(d / "evil", "node", "hospital-a", d / "evil-ids")
    past = datetime.now(UTC) - timedelta(days=10)
    issue(
        d / "ca",
        "node",
        "stale",
        d / "ids",
        _not_valid_before=past,
        _not_valid_after=past + timedelta(days=1),
    )
    return Pki(
        coordinator=_load(d, "ca", "ids", "coord"),
        node=_load(d, "ca", "ids", "hospital-a"),
        developer=_load(d, "ca", "ids", "dev-1"),
        foreign=_load(d, "evil", "evil-ids", "hospital-a"),
        expired_cert=(d / "ids/stale.pem").read_bytes(),
        expired_key=(d / "ids/stale.key").read_bytes(),
    )


@dataclass
class Probe:
    port: int
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _start_server(
    identity: Identity, options: list[tuple[str, object]] | None = None
) -> tuple[grpc.Server, Probe]:
    probe = Probe(port=0)

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            peer = tls.peer_identity(context, identity.ca_pem)
        except IdentityError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if peer is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            raise AssertionError("abort raises")
        with probe.lock:
            probe.calls.append(peer.name)
        return f"{peer.role}:{peer.name}".encode()

    def echo_size(request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(len(request)).encode()

    def idle_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        time.sleep(float(request.decode()))
        yield b"still here"

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
            "EchoSize": grpc.unary_unary_rpc_method_handler(echo_size),
            "IdleStream": grpc.unary_stream_rpc_method_handler(idle_stream),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=options or tls.server_options()
    )
    server.add_generic_rpc_handlers([handler])
    probe.port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(identity))
    assert probe.port > 0
    server.start()
    return server, probe


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Probe]:
    srv, probe = _start_server(pki.coordinator)
    yield probe
    srv.stop(grace=None)


def _whoami(channel: grpc.Channel) -> bytes:
    result: bytes = channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", timeout=DEADLINE)
    return result


def _raw_channel(port: int, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(f"localhost:{port}", creds, tls.channel_options())


def _refused_code(port: int, creds: grpc.ChannelCredentials) -> grpc.RpcError:
    with _raw_channel(port, creds) as ch, pytest.raises(grpc.RpcError) as exc:
        _whoami(ch)
    return exc.value


def test_valid_node_is_identified(server: Probe, pki: Pki) -> None:
    with tls.secure_channel(f"localhost:{server.port}", pki.node) as ch:
        assert _whoami(ch) == b"node:hospital-a"
    with tls.secure_channel(f"127.0.0.1:{server.port}", pki.developer) as ch:
        assert _whoami(ch) == b"developer:dev-1"


def test_client_without_certificate_is_refused_unavailable(server: Probe, pki: Pki) -> None:
    before = list(server.calls)
    err = _refused_code(
        server.port, grpc.ssl_channel_credentials(root_certificates=pki.node.ca_pem)
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls == before  # no handler ran


def test_foreign_ca_certificate_is_refused_unavailable(server: Probe, pki: Pki) -> None:
    before = list(server.calls)
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.node.ca_pem,  # trusts the real coordinator
        private_key=pki.foreign.key_pem,
        certificate_chain=pki.foreign.cert_pem,
    )
    err = _refused_code(server.port, creds)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls == before


def test_expired_certificate_is_refused_unavailable(server: Probe, pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.node.ca_pem,
        private_key=pki.expired_key,
        certificate_chain=pki.expired_cert,
    )
    err = _refused_code(server.port, creds)
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_server_auth_only_certificate_cannot_be_a_client(server: Probe, pki: Pki) -> None:
    err = _refused_code(server.port, tls.channel_credentials(pki.coordinator))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_server_from_foreign_ca(pki: Pki) -> None:
    # A node that trusts only its deployment CA refuses an impostor coordinator.
    srv, probe = _start_server(pki.foreign)
    try:
        with tls.secure_channel(f"localhost:{probe.port}", pki.node) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                _whoami(ch)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert probe.calls == []
    finally:
        srv.stop(grace=None)


def test_server_still_serves_after_refusals(server: Probe, pki: Pki) -> None:
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.node.ca_pem)
    foreign = grpc.ssl_channel_credentials(
        pki.node.ca_pem, pki.foreign.key_pem, pki.foreign.cert_pem
    )
    for creds in (no_cert, foreign, no_cert):
        err = _refused_code(server.port, creds)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    with tls.secure_channel(f"localhost:{server.port}", pki.node) as ch:
        assert _whoami(ch) == b"node:hospital-a"


def test_plaintext_client_is_refused(server: Probe) -> None:
    with (
        tls.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        _whoami(ch)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_insecure_channel_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="wharf.tls"):
        tls.insecure_channel("127.0.0.1:1").close()
    assert "INSECURE" in caplog.text


def test_message_limit_is_8_mib(server: Probe, pki: Pki) -> None:
    with tls.secure_channel(f"localhost:{server.port}", pki.node) as ch:
        call = ch.unary_unary(f"/{SERVICE}/EchoSize")
        payload = tls.MAX_MESSAGE_BYTES - 64 * 1024
        assert call(b"x" * payload, timeout=DEADLINE) == str(payload).encode()
        with pytest.raises(grpc.RpcError) as exc:
            call(b"x" * (tls.MAX_MESSAGE_BYTES + 1), timeout=DEADLINE)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_target_name_override_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="ssl_target_name_override"):
        tls.secure_channel("localhost:1", pki.node, [("grpc.ssl_target_name_override", "x")])


def test_keepalive_options_are_consistent() -> None:
    client = dict(tls.channel_options())
    srv = dict(tls.server_options())
    assert client["grpc.keepalive_time_ms"] == tls.KEEPALIVE_TIME_MS
    assert srv["grpc.http2.min_ping_interval_without_data_ms"] < tls.KEEPALIVE_TIME_MS
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert srv["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.ssl_target_name_override" not in client
    for opts in (client, srv):
        assert opts["grpc.max_send_message_length"] == 8 * 1024 * 1024
        assert opts["grpc.max_receive_message_length"] == 8 * 1024 * 1024


def test_server_ping_policy_key_is_honoured(pki: Pki) -> None:
    # Scaled-down keepalive: the client pings an idle stream every ~1 s (gRPC's
    # floor). gRPC's default server policy (5 min) would answer with GOAWAY
    # too_many_pings after a few pings; the stream survives only because the
    # server's ping-policy key is one gRPC actually reads.
    srv, probe = _start_server(
        pki.coordinator, tls.server_options([("grpc.http2.min_ping_interval_without_data_ms", 200)])
    )
    try:
        with tls.secure_channel(
            f"localhost:{probe.port}", pki.node, [("grpc.keepalive_time_ms", 200)]
        ) as ch:
            stream = ch.unary_stream(f"/{SERVICE}/IdleStream")(b"6", timeout=15)
            assert list(stream) == [b"still here"]
    finally:
        srv.stop(grace=None)
