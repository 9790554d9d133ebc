"""JobService: what model developers (and operators) call.

Developers see and control only their own jobs; operators see all of them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import numpy as np

from wharf import bundle as bundle_mod
from wharf import spec as spec_mod
from wharf.algorithms import models
from wharf.chunks import sha256_bytes
from wharf.coordinator.auth import Abort, Authenticator, Caller, rpc
from wharf.coordinator.runner import Context
from wharf.coordinator.scheduler import Scheduler
from wharf.coordinator.store import TERMINAL_STATES, JobRow
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc

WATCH_IDLE_S = 1.0
MAX_JOB_ID = 64
MAX_DOSSIER_BYTES = (8 << 20) - (64 << 10)
"""A dossier travels in one message, below the 8 MiB limit (wharf.tls.MAX_MESSAGE_BYTES)."""


def job_info(ctx: Context, job: JobRow, *, with_rounds: bool = True) -> pb.JobInfo:
    info = pb.JobInfo(
        job_id=job.job_id,
        name=job.name,
        owner=job.owner,
        state=job.state,
        reason=job.reason,
        rounds_total=job.rounds_total,
        rounds_completed=job.rounds_completed,
        job_hash=job.job_hash,
        spec_json=job.spec_json,
        created=job.created,
        updated=job.updated,
        privacy_json=ctx.store.privacy(job.job_id),
    )
    if job.model_sha:
        info.model.CopyFrom(pb.BlobRef(sha256=job.model_sha, size=job.model_size))
    if with_rounds:
        participants: set[str] = set()
        for r in ctx.store.list_rounds(job.job_id):
            info.rounds.append(
                pb.RoundInfo(
                    round=r.round,
                    state=r.state,
                    metrics=r.metrics,
                    nodes=r.nodes,
                    started=r.started,
                    finished=r.finished,
                    attempt=r.attempt,
                )
            )
            if r.state == "completed":
                participants.update(r.nodes)
        info.nodes.extend(sorted(participants))
        for node, d in ctx.store.decisions(job.job_id).items():
            info.grants.append(
                pb.GrantInfo(
                    node=node,
                    outcome=d["outcome"],
                    reason=d["reason"],
                    grant_json=d["grant_json"],
                    updated=d["updated"],
                )
            )
    return info


class JobServicer(pb_grpc.JobServiceServicer):
    """Handlers for developers and operators."""

    def __init__(self, ctx: Context, auth: Authenticator, scheduler: Scheduler) -> None:
        self.ctx = ctx
        self.auth = auth
        self.scheduler = scheduler

    def _job(self, job_id: str, caller: Caller) -> JobRow:
        if not job_id:
            raise ValueError("job_id is required")
        if len(job_id) > MAX_JOB_ID:
            raise ValueError(f"job_id is at most {MAX_JOB_ID} characters; got {len(job_id)}")
        job = self.ctx.store.get_job(job_id)
        if job is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        if caller.role != "operator" and job.owner != caller.name:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, f"job {job_id!r} is not yours")
        return job

    @rpc("developer")
    def SubmitJob(  # noqa: N802
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.JobInfo:
        if len(request.bundle) > bundle_mod.MAX_BUNDLE_SIZE:
            raise ValueError(
                f"bundle is {len(request.bundle)} bytes; the limit is "
                f"{bundle_mod.MAX_BUNDLE_SIZE} (ship data through datasets, not the bundle)"
            )
        spec = spec_mod.from_json(request.spec_json)
        bundle_sha = ""
        if spec.uses_bundle:
            if not request.bundle:
                raise ValueError("model.kind = 'bundle' needs the packed bundle in the request")
            files = bundle_mod.list_files(request.bundle)
            if bundle_mod.INITIAL_WEIGHTS not in files:
                raise ValueError(
                    f"bundle lacks {bundle_mod.INITIAL_WEIGHTS} (pack it with the SDK)"
                )
            try:
                weights = models.weights_from_bytes(files[bundle_mod.INITIAL_WEIGHTS])
            except Exception as exc:
                raise ValueError(
                    f"bundle initial weights are not valid safetensors: {exc}"
                ) from None
            for name, arr in weights.items():
                if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
                    raise ValueError(f"bundle initial weight {name!r} contains NaN or Inf")
            bundle_sha = sha256_bytes(request.bundle)
            if spec.bundle.sha256 and spec.bundle.sha256 != bundle_sha:
                raise ValueError("bundle.sha256 in the spec does not match the bundle sent")
            spec = spec_mod.with_bundle_hash(spec, bundle_sha)
            self.ctx.blobs.put_bytes(request.bundle)
        elif request.bundle:
            raise ValueError("a bundle was sent but model.kind is not 'bundle'")
        job_id = uuid.uuid4().hex[:16]
        self.ctx.store.create_job(
            job_id=job_id,
            name=spec.name,
            owner=caller.name,
            spec_json=spec.canonical_json(),
            job_hash=spec.job_hash(),
            bundle_sha=bundle_sha,
            rounds_total=spec.federation.rounds,
        )
        if self.ctx.audit is not None:
            self.ctx.audit.log(
                "job_submitted",
                job_id,
                {
                    "job_hash": spec.job_hash(),
                    "owner": caller.name,
                    "name": spec.name,
                    "purpose": spec.purpose,
                    "dataset": spec.data.dataset,
                    "bundle_sha256": bundle_sha,
                    "secure": spec.federation.secure,
                },
            )
        if not spec.federation.secure:
            self.ctx.store.add_event(
                job_id,
                "message",
                message="WARNING: secure aggregation is OFF for this job; the coordinator "
                "sees every node's update",
            )
        self.scheduler.start(job_id)
        job = self.ctx.store.get_job(job_id)
        assert job is not None
        return job_info(self.ctx, job)

    @rpc("developer", "operator")
    def GetJob(  # noqa: N802
        self, request: pb.JobRef, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.JobInfo:
        return job_info(self.ctx, self._job(request.job_id, caller))

    @rpc("developer", "operator")
    def ListJobs(  # noqa: N802
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.ListJobsResponse:
        limit = request.limit if 0 < request.limit <= 1000 else 100
        owner = None if caller.role == "operator" else caller.name
        rows = self.ctx.store.list_jobs(owner=owner, state=request.state or None, limit=limit)
        return pb.ListJobsResponse(jobs=[job_info(self.ctx, j, with_rounds=False) for j in rows])

    @rpc("developer", "operator", streaming=True)
    def WatchJob(  # noqa: N802
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> Iterator[pb.JobEvent]:
        self._job(request.job_id, caller)
        seq = max(0, request.after_seq)
        while context.is_active():
            batch = self.ctx.store.events_after(request.job_id, seq)
            for ev in batch:
                seq = ev.seq
                yield pb.JobEvent(
                    job_id=ev.job_id,
                    seq=ev.seq,
                    time=ev.time,
                    kind=ev.kind,
                    message=ev.message,
                    round=ev.round,
                    metrics=ev.metrics,
                    state=ev.state,
                )
            if batch:
                continue
            job = self.ctx.store.get_job(request.job_id)
            if job is None or job.state in TERMINAL_STATES:
                # One last look so no final event is missed, then end the stream.
                if not self.ctx.store.events_after(request.job_id, seq):
                    return
                continue
            self.ctx.store.wait_for_events(WATCH_IDLE_S)

    @rpc("developer", "operator")
    def CancelJob(  # noqa: N802
        self, request: pb.JobRef, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.JobInfo:
        job = self._job(request.job_id, caller)
        if job.state in TERMINAL_STATES:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} is already {job.state}"
            )
        self.ctx.store.set_state(job.job_id, "cancelled", f"cancelled by {caller.name}")
        self.scheduler.cancel(job.job_id)
        updated = self.ctx.store.get_job(job.job_id)
        assert updated is not None
        return job_info(self.ctx, updated)

    @rpc("developer", "operator", streaming=True)
    def DownloadModel(  # noqa: N802
        self, request: pb.JobRef, context: grpc.ServicerContext, *, caller: Caller
    ) -> Iterator[pb.BlobChunk]:
        job = self._job(request.job_id, caller)
        if job.state != "completed":
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.job_id} is {job.state}; the model is available once it completes",
            )
        yield from self.ctx.blobs.iter_chunks(job.model_sha)

    @rpc("developer", "operator")
    def GetLedger(  # noqa: N802
        self, request: pb.LedgerRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.LedgerResponse:
        """The coordinator's ledger: operators see all of it, developers their jobs' entries."""
        if caller.role != "operator":
            if not request.job_id:
                raise Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "developers may read only their own jobs' ledger entries (give job_id)",
                )
            self._job(request.job_id, caller)
        audit = self.ctx.audit
        if audit is None or audit.ledger is None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, "this coordinator keeps no ledger")
        limit = request.limit if 0 < request.limit <= 10000 else 1000
        out = pb.LedgerResponse()
        for entry in audit.ledger.iter_entries(job_id=request.job_id or None):
            if entry.seq <= request.after_seq:
                continue
            out.entries.append(
                pb.LedgerEntry(seq=entry.seq, entry_json=json.dumps(entry.to_dict()))
            )
            if len(out.entries) >= limit:
                break
        out.head_seq, out.head_hash = audit.head()
        assert audit.signer is not None
        out.signer_cert_pem = bytes(audit.signer.cert_pem).decode("ascii")
        return out

    @rpc("operator")
    def GetDossier(  # noqa: N802
        self, request: pb.JobRef, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.DossierResponse:
        """A completed job's dossier for packaging it as a product (operators only)."""
        from wharf.coordinator.dossier import DossierError, build_dossier, encode

        self._job(request.job_id, caller)
        try:
            dossier = build_dossier(self.ctx, request.job_id)
        except DossierError as exc:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        text = encode(dossier)
        if len(text) > MAX_DOSSIER_BYTES:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the dossier is {len(text):,} bytes, above the {MAX_DOSSIER_BYTES:,} limit",
            )
        return pb.DossierResponse(dossier_json=text)

    @rpc("operator", streaming=True)
    def GetValuation(  # noqa: N802
        self, request: pb.JobRef, context: grpc.ServicerContext, *, caller: Caller
    ) -> Iterator[pb.BlobChunk]:
        """Clear-text valuation material of a consenting job (operators only)."""
        from wharf.coordinator.dossier import DossierError, valuation_bytes

        self._job(request.job_id, caller)
        try:
            data = valuation_bytes(self.ctx, request.job_id)
        except DossierError as exc:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        ref = self.ctx.blobs.put_bytes(data)
        yield from self.ctx.blobs.iter_chunks(ref.sha256)

    @rpc("developer", "operator")
    def ListNodes(  # noqa: N802
        self, request: pb.ListNodesRequest, context: grpc.ServicerContext, *, caller: Caller
    ) -> pb.ListNodesResponse:
        online = {s.name for s in self.ctx.sessions.online()}
        out = pb.ListNodesResponse()
        for n in self.ctx.store.list_nodes():
            info = pb.NodeInfo(name=n["name"], online=n["name"] in online, last_seen=n["last_seen"])
            for d in n["datasets"]:
                info.datasets.append(
                    pb.DatasetInfo(
                        name=d["name"],
                        rows=d["rows"],
                        label=d["label"],
                        features=d["features"],
                        feature_shape=d["feature_shape"],
                        schema_json=d["schema_json"],
                        schema_hash=d["schema_hash"],
                        fingerprint=d["fingerprint"],
                        format=d["format"],
                    )
                )
            out.nodes.append(info)
        return out
