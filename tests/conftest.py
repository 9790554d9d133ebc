"""Shared fixtures: a real deployment CA, role certificates and an in-process coordinator.

Everything is real: certificates from :func:`wharf.identity.init_ca`/:func:`issue`,
a :class:`wharf.coordinator.server.Coordinator` serving gRPC with mutual TLS on
127.0.0.1 (port 0), and stubs dialled with :func:`wharf.tls.secure_channel`. Every
RPC made through these helpers carries a short deadline.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from wharf import spec as spec_mod
from wharf.coordinator.server import Coordinator, CoordinatorConfig
from wharf.coordinator.store import events, jobs, nodes, rounds, tasks
from wharf.identity import Identity, init_ca, issue
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc
from wharf.records import Grant, Protections, Quotas
from wharf.tls import MAX_MESSAGE_BYTES, secure_channel

DEADLINE = 10.0
"""Deadline of every unary call and short stream in the tests."""

STREAM_DEADLINE = 60.0
"""Deadline of a driven node's long-lived task stream (a whole job runs inside it)."""

NODES = ("hospital-a", "hospital-b")
DEVELOPERS = ("alice", "bob")
OPERATORS = ("admin",)


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Pki:
    """A deployment CA with one identity per test party, plus impostors from another CA."""

    root: Path
    coordinator: Identity
    ids: dict[str, Identity]
    foreign: dict[str, Identity]

    def __getitem__(self, name: str) -> Identity:
        return self.ids[name]


def _load(cert_dir: Path, ca_dir: Path, name: str) -> Identity:
    return Identity.load(cert_dir / f"{name}.pem", cert_dir / f"{name}.key", ca_dir / "ca.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, certs = root / "ca", root / "certs"
    init_ca(ca)
    issue(ca, "coordinator", "coordinator", certs)
    roles = {**dict.fromkeys(NODES, "node"), **dict.fromkeys(DEVELOPERS, "developer")}
    roles.update(dict.fromkeys(OPERATORS, "operator"))
    for name, role in roles.items():
        issue(ca, role, name, certs)
    # Same names and roles, signed by a CA this deployment does not trust.
    evil, evil_certs = root / "evil-ca", root / "evil-certs"
    init_ca(evil, name="Wharf deployment CA")
    issue(evil, "node", "hospital-a", evil_certs)
    issue(evil, "developer", "alice", evil_certs)
    return Pki(
        root=root,
        coordinator=_load(certs, ca, "coordinator"),
        ids={name: _load(certs, ca, name) for name in roles},
        foreign={n: _load(evil_certs, evil, n) for n in ("hospital-a", "alice")},
    )


# --------------------------------------------------------------------------- coordinator


@dataclass
class Harness:
    """A running coordinator and helpers to call it as any party."""

    coordinator: Coordinator
    pki: Pki
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.coordinator.address

    @property
    def ctx(self) -> Any:
        return self.coordinator.ctx

    # -- channels and stubs ---------------------------------------------------------
    def channel(
        self, identity: Identity, options: Iterable[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        ch = secure_channel(self.address, identity, options)
        self._channels.append(ch)
        return ch

    def raw_channel(self, credentials: grpc.ChannelCredentials) -> grpc.Channel:
        """A channel with hand-made credentials (no certificate, another CA ...)."""
        ch = grpc.secure_channel(self.address, credentials)
        self._channels.append(ch)
        return ch

    def node(self, name: str = "hospital-a", **kw: Any) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(self.channel(self.pki[name], **kw))

    def jobs(self, name: str = "alice", **kw: Any) -> pb_grpc.JobServiceStub:
        return pb_grpc.JobServiceStub(self.channel(self.pki[name], **kw))

    def oversize_options(self) -> list[tuple[str, Any]]:
        """Client options that let a message above the server's 8 MiB limit leave the client."""
        return [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]

    # -- what the coordinator has stored ---------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.ctx.store.engine.connect() as c:
            return {
                t.name: int(c.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for t in (jobs, rounds, nodes, tasks, events)
            }

    def rows(self, table: sa.Table) -> list[dict[str, Any]]:
        """A table's rows; for ``tasks``, the work tasks only (offers are answered by Decide)."""
        with self.ctx.store.engine.connect() as c:
            out = [dict(r) for r in c.execute(table.select()).mappings()]
        if table is tasks:
            out = [r for r in out if r["kind"] != "TASK_OFFER"]
        return out

    def blob_files(self) -> set[str]:
        """Stored blobs (by relative path), not counting the spool directory."""
        root: Path = self.ctx.blobs.root
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and ".tmp" not in p.relative_to(root).parts
        }

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.ctx.blobs.tmp.rglob("*") if p.is_file())

    def assert_serving(self) -> None:
        """A valid developer, operator and node are all still served."""
        self.jobs("alice").ListJobs(pb.ListJobsRequest(), timeout=DEADLINE)
        self.jobs("admin").ListNodes(pb.ListNodesRequest(), timeout=DEADLINE)
        self.node("hospital-b").Heartbeat(pb.HeartbeatRequest(), timeout=DEADLINE)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()


@pytest.fixture
def coord(pki: Pki, tmp_path: Path) -> Iterator[Harness]:
    """A fresh coordinator (own store and blob directory) serving mTLS on 127.0.0.1:0."""
    coordinator = Coordinator(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "coordinator",
            identity=pki.coordinator,
            max_workers=16,
        )
    )
    coordinator.ctx.poll_s = 0.05  # runners notice nodes sooner; no behaviour depends on it
    coordinator.start()
    harness = Harness(coordinator, pki)
    try:
        yield harness
    finally:
        harness.close()
        coordinator.stop(grace=0.5)


# --------------------------------------------------------------------------- calls


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call ``fn`` (draining a response stream) and return the RpcError it must raise."""
    try:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"expected an RPC error from {getattr(fn, '_method', fn)!r}")


def expect_status(
    code: grpc.StatusCode, fn: Callable[..., Any], *args: Any, match: str = "", **kwargs: Any
) -> str:
    """Assert the call fails with ``code`` (and details containing ``match``); return details."""
    kwargs.setdefault("timeout", DEADLINE)
    exc = rpc_error(fn, *args, **kwargs)
    details = exc.details() or ""  # type: ignore[attr-defined]
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {details}"  # type: ignore[attr-defined]
    assert match.lower() in details.lower(), f"{match!r} not in {details!r}"
    return details


# --------------------------------------------------------------------------- job specs


def spec_dict(**sections: Any) -> dict[str, Any]:
    """A valid spec (one plaintext round of a tiny MLP on 'cancer'), with overrides.

    Each keyword replaces or merges into one section, e.g. ``federation={"rounds": 2}``.
    """
    spec: dict[str, Any] = {
        "name": "probe",
        "purpose": "medical-research",
        "data": {"dataset": "cancer"},
        "model": {"kind": "mlp", "num_classes": 2, "hidden": [3]},
        "federation": {
            "rounds": 1,
            "min_nodes": 1,
            "secure": False,
            "round_timeout_s": STREAM_DEADLINE,
            "wait_for_nodes_s": STREAM_DEADLINE,
            "max_round_retries": 0,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def submit(
    stub: pb_grpc.JobServiceStub, spec: dict[str, Any] | None = None, bundle: bytes = b""
) -> pb.JobInfo:
    request = pb.SubmitJobRequest(spec_json=json.dumps(spec or spec_dict()), bundle=bundle)
    return stub.SubmitJob(request, timeout=DEADLINE)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- a hand-driven node

FEATURES = ("f0", "f1", "f2", "f3")


def dataset_info(name: str = "cancer", **kw: Any) -> pb.DatasetInfo:
    fields: dict[str, Any] = {
        "name": name,
        "rows": 100,
        "label": "y",
        "features": list(FEATURES),
        "feature_shape": [len(FEATURES)],
        "format": "csv",
    }
    fields.update(kw)
    return pb.DatasetInfo(**fields)


class DrivenNode:
    """A node played by the test over real mTLS: Hello, a task stream read in a thread,
    uploads and downloads on demand."""

    def __init__(self, harness: Harness, name: str = "hospital-a") -> None:
        self.name = name
        self.harness = harness
        self.stub = harness.node(name)
        self.tasks: queue.Queue[pb.Task | BaseException] = queue.Queue()
        self._stream: Any = None
        self._reader: threading.Thread | None = None
        self.auto_grant = True

    def hello(self, *datasets: pb.DatasetInfo) -> pb.HelloResponse:
        request = pb.HelloRequest(version="test", datasets=list(datasets) or [dataset_info()])
        return self.stub.Hello(request, timeout=DEADLINE)  # type: ignore[no-any-return]

    def connect(self) -> None:
        """Open the task stream and wait until the coordinator lists this node online."""
        self._stream = self.stub.TaskStream(pb.TaskStreamRequest(), timeout=STREAM_DEADLINE)

        def read() -> None:
            try:
                for task in self._stream:
                    if task.kind == pb.TASK_OFFER and self.auto_grant:
                        self.grant(task)
                        continue
                    self.tasks.put(task)
            except grpc.RpcError as exc:
                self.tasks.put(exc)

        self._reader = threading.Thread(target=read, name=f"stream-{self.name}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + DEADLINE
        while self.harness.ctx.sessions.get(self.name) is None:
            assert time.monotonic() < deadline, f"{self.name} never came online"
            time.sleep(0.02)

    def grant(self, offer: pb.Task) -> pb.DecisionAck:
        """Answer an offer as a consenting node: sign a grant over the offered job."""
        spec = spec_mod.from_json(offer.job_spec_json)
        grant = Grant(
            node=self.name,
            job_id=offer.job_id,
            job_hash=offer.job_hash,
            requester=offer.requester,
            purpose=spec.purpose,
            datasets=(offer.dataset,),
            columns=tuple(spec.data.features),
            quotas=Quotas(rounds=1000, epochs=100, samples=10**9),
            protections=Protections(secure_aggregation=spec.federation.secure),
            expires_at=time.time() + 3600,
        )
        signed = grant.sign(self.harness.pki[self.name].signer())
        return self.stub.Decide(  # type: ignore[no-any-return]
            pb.Decision(
                job_id=offer.job_id,
                job_hash=offer.job_hash,
                outcome="granted",
                grant_json=signed.to_json(),
            ),
            timeout=DEADLINE,
        )

    def next_task(self, kind: int | None = None) -> pb.Task:
        """The next task (of ``kind``, skipping others such as TASK_END_JOB)."""
        deadline = time.monotonic() + DEADLINE
        while True:
            item = self.tasks.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, BaseException):
                raise item
            if kind is None or item.kind == kind:
                return item

    def upload(
        self, header: pb.ResultHeader, parts: Iterable[bytes] = (), **kw: Any
    ) -> pb.UploadAck:
        return self.stub.UploadResult(upload_parts(header, parts), timeout=DEADLINE, **kw)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self._reader is not None:
            self._reader.join(DEADLINE)


def upload_parts(
    header: pb.ResultHeader | None, parts: Iterable[bytes]
) -> Iterator[pb.UploadChunk]:
    if header is not None:
        yield pb.UploadChunk(header=header)
    for data in parts:
        yield pb.UploadChunk(data=data)


@pytest.fixture
def driven_node(coord: Harness) -> Iterator[Callable[[str], DrivenNode]]:
    """Factory of hand-driven nodes, closed at teardown."""
    made: list[DrivenNode] = []

    def make(name: str = "hospital-a") -> DrivenNode:
        node = DrivenNode(coord, name)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()
