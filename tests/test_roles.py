"""Every RPC checks the caller's role, read from its certificate, before doing anything.

RPCs are enumerated from the service descriptors in ``wharf.proto.wharf_pb2``, so a
new RPC must be added to :data:`ALLOWED` (and carry a role check) or these tests
fail. Real gRPC, real mutual TLS, an in-process coordinator (see ``conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import (
    DEADLINE,
    Harness,
    dataset_info,
    expect_status,
    rpc_error,
    spec_dict,
    submit,
)
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from wharf.coordinator.job_service import JobServicer
from wharf.coordinator.node_service import NodeServicer
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc

ROLES = ("node", "developer", "operator")
SERVICES: dict[str, ServiceDescriptor] = dict(pb.DESCRIPTOR.services_by_name)
SERVICERS: dict[str, type] = {"NodeService": NodeServicer, "JobService": JobServicer}

ALLOWED: dict[tuple[str, str], frozenset[str]] = {
    ("NodeService", "Hello"): frozenset({"node"}),
    ("NodeService", "TaskStream"): frozenset({"node"}),
    ("NodeService", "UploadResult"): frozenset({"node"}),
    ("NodeService", "DownloadBlob"): frozenset({"node"}),
    ("NodeService", "Heartbeat"): frozenset({"node"}),
    ("NodeService", "Decide"): frozenset({"node"}),
    ("NodeService", "Attest"): frozenset({"node"}),
    ("JobService", "SubmitJob"): frozenset({"developer"}),
    ("JobService", "GetJob"): frozenset({"developer", "operator"}),
    ("JobService", "ListJobs"): frozenset({"developer", "operator"}),
    ("JobService", "WatchJob"): frozenset({"developer", "operator"}),
    ("JobService", "CancelJob"): frozenset({"developer", "operator"}),
    ("JobService", "DownloadModel"): frozenset({"developer", "operator"}),
    ("JobService", "ListNodes"): frozenset({"developer", "operator"}),
    ("JobService", "GetLedger"): frozenset({"developer", "operator"}),
    ("JobService", "GetDossier"): frozenset({"operator"}),
    ("JobService", "GetValuation"): frozenset({"operator"}),
}
"""Who may call what. A role not listed must get PERMISSION_DENIED."""

CALLER = {"node": "hospital-a", "developer": "alice", "operator": "admin"}

SHA = hashlib.sha256(b"x").hexdigest()

SAMPLE: dict[str, Message] = {
    # Requests that would store something if a wrong-role caller got through.
    "Hello": pb.HelloRequest(version="t", datasets=[dataset_info()]),
    "UploadResult": pb.UploadChunk(
        header=pb.ResultHeader(task_id="t", job_id="j", ok=True, kind=pb.TASK_STATS)
    ),
    "DownloadBlob": pb.BlobRequest(sha256=SHA, job_id="j"),
    "SubmitJob": pb.SubmitJobRequest(spec_json=json.dumps(spec_dict())),
    "GetJob": pb.JobRef(job_id="nope"),
    "WatchJob": pb.WatchJobRequest(job_id="nope"),
    "CancelJob": pb.JobRef(job_id="nope"),
    "DownloadModel": pb.JobRef(job_id="nope"),
    "GetDossier": pb.JobRef(job_id="nope"),
    "GetValuation": pb.JobRef(job_id="nope"),
}


def all_methods() -> Iterator[tuple[ServiceDescriptor, MethodDescriptor]]:
    for service in SERVICES.values():
        yield from ((service, m) for m in service.methods)


def call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor) -> Any:
    """Invoke any RPC generically from its descriptor, with a sample or empty request."""
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    request = SAMPLE.get(method.name) or req_cls()
    path = f"/{service.full_name}/{method.name}"
    ser = {
        "request_serializer": req_cls.SerializeToString,
        "response_deserializer": resp_cls.FromString,
    }
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path, **ser)(iter([request]), timeout=DEADLINE))
    if method.client_streaming:
        return channel.stream_unary(path, **ser)(iter([request]), timeout=DEADLINE)
    if method.server_streaming:
        return list(channel.unary_stream(path, **ser)(request, timeout=DEADLINE))
    return channel.unary_unary(path, **ser)(request, timeout=DEADLINE)


WRONG_ROLE_CASES = [
    pytest.param(s, m, role, id=f"{s.name}.{m.name}-as-{role}")
    for s, m in all_methods()
    for role in ROLES
    if role not in ALLOWED.get((s.name, m.name), frozenset())
]


def test_every_rpc_has_a_role_table_entry() -> None:
    listed = {(s.name, m.name) for s, m in all_methods()}
    assert listed == set(ALLOWED), (
        "RPCs in wharf.proto and ALLOWED differ; give every new RPC a role check and list it: "
        f"{listed ^ set(ALLOWED)}"
    )


@pytest.mark.parametrize(
    ("service", "method"), [pytest.param(s, m, id=f"{s.name}.{m.name}") for s, m in all_methods()]
)
def test_every_handler_is_wrapped_by_the_rpc_decorator(
    service: ServiceDescriptor, method: MethodDescriptor
) -> None:
    servicer = SERVICERS[service.name]
    handler = getattr(servicer, method.name, None)
    assert handler is not None, f"{servicer.__name__} does not implement {method.name}"
    base = getattr(pb_grpc, f"{service.name}Servicer")
    assert handler is not getattr(base, method.name), f"{method.name} is not implemented"
    roles = getattr(handler, "__wharf_roles__", None)
    assert roles is not None, f"{servicer.__name__}.{method.name} lacks @rpc(...role...)"
    assert frozenset(roles) == ALLOWED[(service.name, method.name)]


@pytest.mark.parametrize(("service", "method", "role"), WRONG_ROLE_CASES)
def test_wrong_role_is_denied_and_nothing_happens(
    coord: Harness, service: ServiceDescriptor, method: MethodDescriptor, role: str
) -> None:
    before = coord.counts()
    channel = coord.channel(coord.pki[CALLER[role]])
    exc = rpc_error(call, channel, service, method)
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    assert f"role '{role}' may not call {method.name}" in details
    assert coord.counts() == before
    assert coord.blob_files() == set()
    assert coord.ctx.sessions.online() == []


@pytest.mark.parametrize(
    ("service", "method", "role"),
    [
        pytest.param(s, m, role, id=f"{s.name}.{m.name}-as-{role}")
        for s, m in all_methods()
        for role in sorted(ALLOWED.get((s.name, m.name), frozenset()))
        if m.name != "TaskStream"  # stays open by design; admitted in the test below
    ],
)
def test_right_role_passes_the_role_check(
    coord: Harness, service: ServiceDescriptor, method: MethodDescriptor, role: str
) -> None:
    """The role check lets the right party through (it may still fail validation)."""
    channel = coord.channel(coord.pki[CALLER[role]])
    try:
        call(channel, service, method)
    except grpc.RpcError as exc:
        assert "may not call" not in (exc.details() or "")  # type: ignore[attr-defined]
        assert exc.code() not in (  # type: ignore[attr-defined]
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
        ), exc.details()  # type: ignore[attr-defined]


def test_node_task_stream_admits_a_node_and_not_a_developer(coord: Harness) -> None:
    as_developer = pb_grpc.NodeServiceStub(coord.channel(coord.pki["alice"]))
    expect_status(
        grpc.StatusCode.PERMISSION_DENIED,
        as_developer.TaskStream,
        pb.TaskStreamRequest(),
        match="may not call TaskStream",
    )
    assert coord.ctx.sessions.online() == []
    stream = coord.node("hospital-a").TaskStream(pb.TaskStreamRequest(), timeout=DEADLINE)
    try:
        deadline = time.monotonic() + DEADLINE
        while coord.ctx.sessions.get("hospital-a") is None:
            assert stream.is_active(), "the coordinator closed a node's task stream"
            assert time.monotonic() < deadline, "the node never came online"
            time.sleep(0.02)
    finally:
        stream.cancel()


# --------------------------------------------------------------------------- TLS refusals


def _no_cert(coord: Harness) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=coord.pki.coordinator.ca_pem)


def _foreign(coord: Harness, name: str) -> grpc.ChannelCredentials:
    impostor = coord.pki.foreign[name]
    return grpc.ssl_channel_credentials(
        root_certificates=coord.pki.coordinator.ca_pem,  # trusts the real coordinator
        private_key=impostor.key_pem,
        certificate_chain=impostor.cert_pem,
    )


def _server_cert(coord: Harness) -> grpc.ChannelCredentials:
    """The coordinator's own certificate: right CA, but serverAuth only."""
    me = coord.pki.coordinator
    return grpc.ssl_channel_credentials(me.ca_pem, me.key_pem, me.cert_pem)


@pytest.mark.parametrize(
    "credentials", ["none", "foreign-node", "foreign-developer", "server-cert"]
)
def test_untrusted_clients_are_refused_and_the_server_keeps_serving(
    coord: Harness, credentials: str
) -> None:
    creds = {
        "none": lambda: _no_cert(coord),
        "foreign-node": lambda: _foreign(coord, "hospital-a"),
        "foreign-developer": lambda: _foreign(coord, "alice"),
        "server-cert": lambda: _server_cert(coord),
    }[credentials]()
    channel = coord.raw_channel(creds)
    node, job = pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel)
    # The TLS handshake is refused (see wharf/tls.py): UNAVAILABLE, and no handler runs.
    for fn, request in [
        (node.Hello, pb.HelloRequest(datasets=[dataset_info()])),
        (node.TaskStream, pb.TaskStreamRequest()),
        (job.SubmitJob, pb.SubmitJobRequest(spec_json=json.dumps(spec_dict()))),
        (job.ListNodes, pb.ListNodesRequest()),
    ]:
        expect_status(grpc.StatusCode.UNAVAILABLE, fn, request)
    assert coord.counts() == dict.fromkeys(coord.counts(), 0)
    assert coord.ctx.sessions.online() == []
    # A valid client right after is served.
    coord.assert_serving()
    resp = coord.node("hospital-a").Hello(pb.HelloRequest(), timeout=DEADLINE)
    assert resp.node_name == "hospital-a"


# --------------------------------------------------------------------------- job ownership


def test_developers_see_only_their_own_jobs_and_operators_see_all(coord: Harness) -> None:
    alice, bob, admin = coord.jobs("alice"), coord.jobs("bob"), coord.jobs("admin")
    a = submit(alice, spec_dict(name="alice-job"))
    b = submit(bob, spec_dict(name="bob-job"))
    assert (a.owner, b.owner) == ("alice", "bob")  # from the certificate, not the request

    for fn, request in [
        (bob.GetJob, pb.JobRef(job_id=a.job_id)),
        (bob.WatchJob, pb.WatchJobRequest(job_id=a.job_id)),
        (bob.CancelJob, pb.JobRef(job_id=a.job_id)),
        (bob.DownloadModel, pb.JobRef(job_id=a.job_id)),
        (alice.CancelJob, pb.JobRef(job_id=b.job_id)),
    ]:
        expect_status(grpc.StatusCode.PERMISSION_DENIED, fn, request, match="is not yours")
    assert alice.GetJob(pb.JobRef(job_id=a.job_id), timeout=DEADLINE).state != "cancelled"
    assert bob.GetJob(pb.JobRef(job_id=b.job_id), timeout=DEADLINE).state != "cancelled"

    listed = bob.ListJobs(pb.ListJobsRequest(), timeout=DEADLINE).jobs
    assert [j.job_id for j in listed] == [b.job_id]

    everything = admin.ListJobs(pb.ListJobsRequest(), timeout=DEADLINE).jobs
    assert {j.job_id for j in everything} == {a.job_id, b.job_id}
    for job in (a, b):
        got = admin.GetJob(pb.JobRef(job_id=job.job_id), timeout=DEADLINE)
        assert (got.job_id, got.owner) == (job.job_id, job.owner)
