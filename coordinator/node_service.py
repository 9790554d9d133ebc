"""NodeService: what node daemons call (they dial out; nodes open no port)."""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import sqlalchemy as sa

from wharf import __version__
from wharf.chunks import Spool, TransferError
from wharf.coordinator.auth import Abort, Authenticator, Caller, rpc
from wharf.coordinator.runner import Context
from wharf.coordinator.sessions import is_close
from wharf.coordinator.store import jobs, rounds, tasks
from wharf.coordinator.tasks import ResultRejected, TaskResult
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc

log = logging.getLogger("wharf.coordinator")

HEARTBEAT_INTERVAL_S = 10.0
MAX_DATASETS = 256
MAX_FEATURE_DIMS = 8
MAX_FEATURE_VALUES = 1 << 24
"""Per-row feature tensor bounds: the coordinator builds models from announced shapes."""


def dataset_to_dict(d: pb.DatasetInfo) -> dict[str, Any]:
    """Validated metadata of one dataset (the certificate is checked by the caller)."""
    if not d.name or len(d.name) > 64:
        raise ValueError("dataset name must be 1-64 characters")
    if d.rows < 0 or any(x <= 0 for x in d.feature_shape):
        raise ValueError(f"dataset {d.name!r}: row count and feature shape must be positive")
    if len(d.feature_shape) > MAX_FEATURE_DIMS or math.prod(d.feature_shape) > MAX_FEATURE_VALUES:
        raise ValueError(
            f"dataset {d.name!r}: feature shape {list(d.feature_shape)} is too large (at most "
            f"{MAX_FEATURE_DIMS} dimensions and {MAX_FEATURE_VALUES} values per row)"
        )
    return {
        "name": d.name,
        "rows": int(d.rows),
        "label": d.label,
        "features": list(d.features),
        "feature_shape": [int(x) for x in d.feature_shape],
        "schema_json": d.schema_json,
        "schema_hash": d.schema_hash,
        "fingerprint": d.fingerprint,
        "format": d.format,
    }


class NodeServicer(pb_grpc.NodeServiceServicer):
    """Handlers for node daemons; every one requires the ``node`` role."""

    def __init__(self, ctx: Context, auth: Authenticator) -> None:
        self.ctx = ctx
        self.auth = auth

    @rpc("node")
    def Hello(  # noqa: N802
        self, request: pb.HelloRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.HelloResponse:
        if len(request.datasets) > MAX_DATASETS:
            raise ValueError(f"at most {MAX_DATASETS} datasets per node")
        datasets = [dataset_to_dict(d) for d in request.datasets]
        names = [d["name"] for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError("dataset names must be unique")
        audit = self.ctx.audit
        known = {
            d["name"]: d.get("certificate_json", "")
            for n in self.ctx.store.list_nodes()
            if n["name"] == caller.name
            for d in n["datasets"]
        }
        fresh: list[str] = []
        for info, d in zip(request.datasets, datasets, strict=True):
            d["certificate_json"] = info.certificate_json
            if not info.certificate_json or audit is None:
                continue
            cert = audit.registration(info.certificate_json, caller.name)
            if cert is not None and (
                cert.dataset != d["name"]
                or cert.fingerprint != d["fingerprint"]
                or cert.row_count != d["rows"]
            ):
                raise ValueError(
                    f"dataset {d['name']!r}: registration certificate does not match its metadata"
                )
            if known.get(d["name"]) != info.certificate_json:
                fresh.append(info.certificate_json)
        self.ctx.store.upsert_node(caller.name, datasets)
        if audit is not None:
            from wharf.records import SignedRecord

            for text in fresh:
                audit.log_record(SignedRecord.from_json(text))
        self.ctx.sessions.set_datasets(caller.name, {d["name"]: d for d in datasets})
        log.info("node %s says hello with %d datasets", caller.name, len(datasets))
        return pb.HelloResponse(
            node_name=caller.name,
            coordinator_version=__version__,
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        )

    @rpc("node", streaming=True)
    def TaskStream(  # noqa: N802
        self, request: pb.TaskStreamRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> Iterator[pb.Task]:
        certs = context.auth_context().get("x509_pem_cert") or [b""]
        session = self.ctx.sessions.open(caller.name, certs[0])
        context.add_callback(session.close)
        log.info("node %s connected", caller.name)
        try:
            while context.is_active():
                try:
                    item = session.tasks.get(timeout=1.0)
                except queue.Empty:
                    continue
                if is_close(item):
                    break
                yield item
        finally:
            self.ctx.sessions.close(session)
            log.info("node %s disconnected", caller.name)

    @rpc("node")
    def UploadResult(  # noqa: N802
        self,
        request_iterator: Iterator[pb.UploadChunk],
        context: grpc.ServicerContext,
        *,
        caller: Caller,
    ) -> pb.UploadAck:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ValueError("an upload must start with a result header")
        header = first.header
        collector = self.ctx.broker.lookup(header, caller.name)
        result = TaskResult(
            task_id=header.task_id,
            node=caller.name,
            ok=header.ok,
            error=header.error[:500],
            num_examples=int(header.num_examples),
            metrics=dict(header.metrics),
            secagg=bytes(header.secagg),
        )
        spool: Spool | None = None
        try:
            if header.ok and header.blob.sha256:
                spool = Spool(self.ctx.blobs.tmp, header.blob.sha256, header.blob.size)
            for part in request_iterator:
                if part.WhichOneof("part") != "data":
                    raise ValueError("only data chunks may follow the header")
                if spool is None:
                    raise ValueError("this result declares no payload")
                spool.write(part.data)
            if spool is not None:
                result.blob_path = spool.finish()
                result.blob_sha = header.blob.sha256
                spool = None
            elif header.ok and header.kind in (pb.TASK_TRAIN, pb.TASK_STATS) and not header.secagg:
                raise ValueError("a successful result must carry its payload")
            receipt = None
            if header.receipt_json and self.ctx.audit is not None:
                receipt = self.ctx.audit.receipt(
                    header.receipt_json, caller.name, header.job_id, header.round
                )
                if result.blob_sha and receipt[0].sent_sha256 != result.blob_sha:
                    raise ValueError("usage receipt refused: it names another payload")
            collector.deliver(result)
            if receipt is not None:
                usage, countersigned = receipt
                self.ctx.store.add_receipt(
                    usage.receipt_id,
                    header.job_id,
                    header.round,
                    caller.name,
                    countersigned.to_json(),
                )
                self.ctx.audit.log_record(countersigned)  # type: ignore[union-attr]
                return pb.UploadAck(
                    accepted=True, sha256=result.blob_sha, receipt_json=countersigned.to_json()
                )
        except (ResultRejected, TransferError) as exc:
            result.discard()
            raise ValueError(str(exc)) from None
        except BaseException:
            result.discard()
            raise
        finally:
            if spool is not None:
                spool.discard()
        return pb.UploadAck(accepted=True, sha256=result.blob_sha)

    @rpc("node", streaming=True)
    def DownloadBlob(  # noqa: N802
        self, request: pb.BlobRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> Iterator[pb.BlobChunk]:
        self._check_blob_access(caller.name, request.job_id, request.sha256)
        try:
            chunks = self.ctx.blobs.iter_chunks(request.sha256)
        except KeyError as exc:
            raise Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        yield from chunks

    def _check_blob_access(self, node: str, job_id: str, sha: str) -> None:
        """A node may fetch only the models and bundle of jobs it has tasks in."""
        with self.ctx.store.engine.connect() as c:
            has_task = c.execute(
                sa.select(tasks.c.task_id)
                .where(tasks.c.job_id == job_id, tasks.c.node == node)
                .limit(1)
            ).first()
            if has_task is None:
                raise Abort(
                    grpc.StatusCode.PERMISSION_DENIED, "no task of this job was sent to you"
                )
            job = c.execute(
                sa.select(jobs.c.model_sha, jobs.c.bundle_sha).where(jobs.c.job_id == job_id)
            ).first()
            round_models = {
                r[0]
                for r in c.execute(sa.select(rounds.c.model_sha).where(rounds.c.job_id == job_id))
            }
        allowed = round_models | ({job.model_sha, job.bundle_sha} if job else set())
        allowed.discard("")
        if sha not in allowed:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, "that blob does not belong to this job")

    @rpc("node")
    def Decide(  # noqa: N802
        self, request: pb.Decision, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.DecisionAck:
        job = self.ctx.store.get_job(request.job_id)
        if job is None:
            raise LookupError(f"no job {request.job_id!r}")
        if request.job_hash != job.job_hash:
            raise ValueError("decision names another job hash")
        if request.outcome not in ("granted", "refused", "pending", "revoked"):
            raise ValueError("outcome must be granted, refused, pending or revoked")
        reason = request.reason[:2000]
        audit = self.ctx.audit
        if request.outcome == "granted":
            signed = None
            if audit is not None and audit.ca_pem is not None:
                if not request.grant_json:
                    raise ValueError("a grant must carry the signed grant record")
                signed = audit.grant(request.grant_json, caller.name, job.job_id, job.job_hash)
            self.ctx.store.set_decision(job.job_id, caller.name, "granted", "", request.grant_json)
            if signed is not None:
                audit.log_record(signed)  # type: ignore[union-attr]
            message = f"{caller.name} granted the job"
        else:
            self.ctx.store.set_decision(job.job_id, caller.name, request.outcome, reason)
            kind = {"refused": "grant_refused", "revoked": "grant_revoked"}.get(request.outcome)
            if kind and audit is not None:
                audit.log(kind, job.job_id, {"node": caller.name, "reason": reason})
            message = {
                "refused": f"{caller.name} refused the job: {reason}",
                "revoked": f"{caller.name} revoked its grant: {reason}",
                "pending": f"{caller.name}: awaiting its operator's approval",
            }[request.outcome]
        self.ctx.store.answer_offers(job.job_id, caller.name, request.outcome)
        self.ctx.store.add_event(job.job_id, "grant", message=message)
        return pb.DecisionAck(accepted=True)

    @rpc("node")
    def Attest(  # noqa: N802
        self, request: pb.Attestation, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.DecisionAck:
        job = self.ctx.store.get_job(request.job_id)
        if job is None:
            raise LookupError(f"no job {request.job_id!r}")
        if self.ctx.audit is None:
            return pb.DecisionAck(accepted=True)
        signed = self.ctx.audit.attestation(request.attestation_json, caller.name, job.job_id)
        self.ctx.store.add_attestation(job.job_id, caller.name, signed.to_json())
        self.ctx.audit.log_record(signed)
        deleted = signed.body.get("deleted", [])
        self.ctx.store.add_event(
            job.job_id,
            "message",
            message=f"{caller.name} destroyed its job workspace ({len(deleted)} files, attested)",
        )
        return pb.DecisionAck(accepted=True)

    @rpc("node")
    def Heartbeat(  # noqa: N802
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.HeartbeatResponse:
        self.ctx.sessions.touch(caller.name)
        self.ctx.store.touch_node(caller.name)
        return pb.HeartbeatResponse(server_time=time.time())


__all__ = ["NodeServicer", "TransferError"]
