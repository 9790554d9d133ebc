"""Assembling and running the coordinator: store, blobs, scheduler, gRPC server."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from wharf.coordinator.audit import Audit
from wharf.coordinator.auth import Authenticator
from wharf.coordinator.blobs import BlobStore
from wharf.coordinator.job_service import JobServicer
from wharf.coordinator.node_service import NodeServicer
from wharf.coordinator.runner import Context
from wharf.coordinator.scheduler import Scheduler
from wharf.coordinator.sessions import SessionRegistry
from wharf.coordinator.store import Store
from wharf.coordinator.tasks import TaskBroker
from wharf.identity import Identity
from wharf.proto import wharf_pb2_grpc as pb_grpc
from wharf.tls import server_credentials, server_options

log = logging.getLogger("wharf.coordinator")

LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}


@dataclass
class CoordinatorConfig:
    """Where to listen, where to keep state, and who we are."""

    listen: str = "127.0.0.1:7443"
    data_dir: Path = Path("wharf-coordinator")
    db_url: str = ""
    identity: Identity | None = None
    insecure: bool = False
    max_workers: int = 64


class Coordinator:
    """A running coordinator (used by the CLI and by in-process tests)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        if config.identity is None and not config.insecure:
            raise ValueError("the coordinator needs a certificate (or --insecure for experiments)")
        if config.identity is not None and config.identity.role != "coordinator":
            raise ValueError(
                f"certificate role is '{config.identity.role}'; the coordinator needs a "
                "'coordinator' certificate (wharf ca issue --role coordinator NAME)"
            )
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        db_url = config.db_url or f"sqlite:///{config.data_dir / 'coordinator.db'}"
        self.ctx = Context(
            store=Store(db_url),
            blobs=BlobStore(config.data_dir / "blobs"),
            sessions=SessionRegistry(),
            broker=TaskBroker(),
            ca_pem=None if config.insecure else config.identity.ca_pem,  # type: ignore[union-attr]
        )
        self.ctx.audit = Audit(
            self.ctx.store.engine,
            None if config.identity is None else config.identity.signer(),
            self.ctx.ca_pem,
        )
        self.scheduler = Scheduler(self.ctx)
        auth = Authenticator(None if config.insecure else config.identity.ca_pem)  # type: ignore[union-attr]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
            options=server_options(),
            maximum_concurrent_rpcs=config.max_workers * 4,
        )
        pb_grpc.add_NodeServiceServicer_to_server(NodeServicer(self.ctx, auth), self.server)
        pb_grpc.add_JobServiceServicer_to_server(
            JobServicer(self.ctx, auth, self.scheduler), self.server
        )
        if config.insecure and config.listen.rsplit(":", 1)[0] not in LOOPBACK:
            raise ValueError(
                "plaintext mode listens on loopback only (127.0.0.1, localhost, [::1])"
            )
        if config.insecure:
            log.warning(
                "PLAINTEXT MODE: no TLS, no authentication; callers claim any identity. "
                "Use only for local experiments."
            )
            self.port = self.server.add_insecure_port(config.listen)
        else:
            assert config.identity is not None
            self.port = self.server.add_secure_port(
                config.listen, server_credentials(config.identity)
            )
        if self.port == 0:
            raise OSError(f"cannot listen on {config.listen}")

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        resumed = self.scheduler.resume_all()
        log.info("coordinator listening on %s (%d active jobs resumed)", self.address, resumed)

    def stop(self, grace: float = 2.0) -> None:
        self.scheduler.stop()
        self.ctx.sessions.shutdown()
        self.server.stop(grace).wait()

    def serve_forever(self, port_file: Path | None = None) -> None:
        """Run until SIGINT/SIGTERM; write the bound port to ``port_file`` once listening."""
        done = threading.Event()

        def _stop(signum: int, _frame: object) -> None:
            done.set()

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        self.start()
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(port_file)
        done.wait()
        log.info("coordinator shutting down")
        self.stop()
