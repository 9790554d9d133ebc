"""The node daemon: dials out to the coordinator, runs tasks, sends back updates.

The node opens no listening port. It keeps one long-lived TaskStream; each
task runs in its own worker process (see :mod:`wharf.node.worker`) from a
per-job workspace, and results go back on a separate UploadResult call.
When the coordinator is away it reconnects with exponential backoff.

The data holder stays sovereign (:mod:`wharf.node.grants`):

* a TASK_OFFER is decided by the node's policy — refused, granted by a standing
  rule, or left pending for the operator — and answered with a Decide call; the
  offered code bundle is fetched for the operator to read (``wharf node grant
  show``);
* operator decisions made with ``wharf node grant …`` (which only edit the node's
  database) are reported by a background loop, once a second;
* every TRAIN/STATS/SECAGG task, and every upload, is checked against an active
  grant for exactly that job hash, dataset, columns, round and quota first; a task
  without one fails with ``no valid grant for job …`` and no data is read;
* each upload carrying this node's contribution (a plaintext result, or the
  masked input of a secure round) carries a signed usage receipt; the
  coordinator's countersigned copy comes back in the upload's ack and is logged;
* at TASK_END_JOB the job workspace is deleted and a signed destruction
  attestation is logged and sent with Attest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from wharf import __version__
from wharf import spec as spec_mod
from wharf.algorithms import models
from wharf.algorithms.privacy.plan import JobPrivacy
from wharf.algorithms.secagg import SecAggAborted
from wharf.bundle import unpack
from wharf.chunks import blob_ref_for_file, iter_file_parts, receive_chunks
from wharf.identity import Identity
from wharf.node import datasets as ds
from wharf.node.config import NodeConfig
from wharf.node.grants import GrantBook, GrantCheckError, Offer, Usage
from wharf.node.policy import load_policy
from wharf.node.secure_session import LocalResult, SecureSessions, SecureTaskError
from wharf.node.state import AttestationRow, GrantRow, NodeState, RegisteredDataset
from wharf.node.wirelog import WireLog, WireLogInterceptor
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc
from wharf.records import Grant
from wharf.spec import JobSpec
from wharf.tls import insecure_channel, secure_channel

log = logging.getLogger("wharf.node")

STREAM_DEADLINE_S = 3600.0
"""The task stream is re-opened hourly: every call has a deadline."""
CALL_DEADLINE_S = 30.0
INSECURE_IDENTITY_HEADER = "x-wharf-insecure-identity"
REPORT_INTERVAL_S = 1.0
"""How often decisions and attestations not yet delivered are sent again."""
_RETRY_LATER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
"""Errors after which a Decide/Attest call is tried again; any other answer is final."""


class TaskError(Exception):
    """A task could not be run; the message is reported to the coordinator."""


@dataclass
class _JobCache:
    """Per-job files kept between rounds (spec check, unpacked bundle)."""

    job_hash: str
    workspace: Path
    tasks: set[str] = field(default_factory=set)
    spec: JobSpec | None = None
    dataset: str = ""


@dataclass
class _Result:
    """A task's answer: the upload header, its payload file, and what it used (if the
    answer carries this node's contribution, which then gets a usage receipt)."""

    header: pb.ResultHeader
    payload: Path | None = None
    usage: Usage | None = None


class NodeDaemon:
    """One node: its identity, its datasets, and its connection loop."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        if not config.insecure:
            assert config.cert and config.key and config.ca
            self.identity = Identity.load(config.cert, config.key, config.ca)
            if self.identity.role != "node":
                raise ValueError(
                    f"certificate {config.cert} has role '{self.identity.role}'; "
                    "a node needs a 'node' certificate"
                )
            self.name = self.identity.name
            signer = self.identity.signer()
            self.state = NodeState(config.state_dir, signer)
            self.secure: SecureSessions | None = SecureSessions(
                self.name, signer.sign, self.identity.ca_pem, releases=self.state
            )
            self.grants = GrantBook(
                self.state,
                self.name,
                signer=signer,
                ca_pem=self.identity.ca_pem,
                policy_path=config.policy,
            )
        else:
            assert config.insecure_name
            self.name = config.insecure_name
            self.secure = None
            self.state = NodeState(config.state_dir)
            self.grants = GrantBook(self.state, self.name, policy_path=config.policy)
            log.warning(
                "PLAINTEXT MODE: no TLS; this node's identity is not authenticated and it "
                "signs no grants, receipts or attestations"
            )
        if config.policy is not None:
            load_policy(config.policy)  # a broken policy stops the node here (PolicyError)
        else:
            log.warning("no policy file configured: every offered job waits for the operator")
        for name in self.grants.certify_missing():
            log.info("signed a registration certificate for dataset %s", name)
        self._report_lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=config.task_workers, thread_name_prefix="task")
        self._jobs: dict[str, _JobCache] = {}
        self._jobs_lock = threading.Lock()
        self._running: set[str] = set()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._channel: grpc.Channel | None = None

    # -- connection ----------------------------------------------------------------
    def _metadata(self) -> list[tuple[str, str]]:
        if self.config.insecure:
            return [(INSECURE_IDENTITY_HEADER, f"node:{self.name}")]
        return []

    def _open_channel(self) -> grpc.Channel:
        if self.identity is None:
            channel = insecure_channel(self.config.coordinator)
        else:
            channel = secure_channel(self.config.coordinator, self.identity)
        if self.config.wire_log is not None:
            channel = grpc.intercept_channel(
                channel, WireLogInterceptor(WireLog(self.config.wire_log))
            )
        return channel

    def stop(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
        for proc in list(self._procs.values()):
            proc.kill()

    def run(self) -> None:
        """Serve until stopped, reconnecting with backoff."""
        backoff = 1.0
        while not self._stop.is_set():
            connected_at = time.time()
            try:
                self._serve_once()
                backoff = 1.0
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if self._stop.is_set():
                    break
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the hourly stream renewal
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    log.error("coordinator refused this node: %s", exc.details())
                else:
                    log.warning(
                        "coordinator unreachable (%s); retrying in %.0f s",
                        code.name if code else exc,
                        backoff,
                    )
            if time.time() - connected_at > 60:
                backoff = 1.0
            self._stop.wait(backoff * (0.75 + 0.5 * random.random()))
            backoff = min(backoff * 2, self.config.max_backoff_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.state.close()

    def _serve_once(self) -> None:
        channel = self._open_channel()
        self._channel = channel
        try:
            stub = pb_grpc.NodeServiceStub(channel)
            hello = stub.Hello(
                pb.HelloRequest(version=__version__, datasets=self._dataset_infos()),
                timeout=CALL_DEADLINE_S,
                metadata=self._metadata(),
            )
            log.info("connected to coordinator %s as %s", self.config.coordinator, hello.node_name)
            beat = threading.Thread(
                target=self._heartbeat,
                args=(stub, hello.heartbeat_interval_s or 10.0, channel),
                daemon=True,
            )
            beat.start()
            threading.Thread(
                target=self._reporter, args=(stub, channel), name="reporter", daemon=True
            ).start()
            stream = stub.TaskStream(
                pb.TaskStreamRequest(version=__version__),
                timeout=STREAM_DEADLINE_S,
                metadata=self._metadata(),
            )
            for task in stream:
                if self._stop.is_set():
                    break
                self._pool.submit(self._handle, stub, task)
        finally:
            self._channel = None
            channel.close()

    def _heartbeat(self, stub: pb_grpc.NodeServiceStub, interval: float, channel: object) -> None:
        while not self._stop.wait(interval) and self._channel is channel:
            try:
                stub.Heartbeat(
                    pb.HeartbeatRequest(running_tasks=sorted(self._running)),
                    timeout=CALL_DEADLINE_S,
                    metadata=self._metadata(),
                )
            except grpc.RpcError:
                return

    def _dataset_infos(self) -> list[pb.DatasetInfo]:
        return [
            pb.DatasetInfo(
                name=d.name,
                rows=d.rows,
                label=d.label,
                features=d.features,
                feature_shape=d.feature_shape,
                schema_json=json.dumps(d.schema),
                schema_hash=d.schema_hash,
                fingerprint=d.fingerprint,
                format=d.format,
                certificate_json=d.certificate_json,
            )
            for d in self.state.list_datasets()
        ]

    # -- decisions and attestations --------------------------------------------------------
    def _reporter(self, stub: pb_grpc.NodeServiceStub, channel: object) -> None:
        """Deliver decisions the coordinator has not heard yet (operator approve/deny/revoke
        from the CLI, or a report that failed) and pending attestations, every second."""
        while not self._stop.wait(REPORT_INTERVAL_S) and self._channel is channel:
            try:
                self.report_pending(stub)
            except Exception:
                log.exception("reporting decisions failed")

    def report_pending(self, stub: pb_grpc.NodeServiceStub) -> None:
        """One pass of the reporter: every unreported decision and attestation."""
        for row in self.state.unreported_grants():
            if not self._report(stub, row):
                return  # the coordinator is away; try again later
        for att in self.state.unreported_attestations():
            if not self._attest(stub, att):
                return

    def _call_done(self, what: str, call: Callable[[], Any]) -> bool:
        """Run an RPC; True when it got a final answer (accepted or not), False to retry."""
        try:
            ack = call()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in _RETRY_LATER:
                log.debug("%s: will retry (%s)", what, code)
                return False
            details = exc.details() if hasattr(exc, "details") else exc
            log.warning("coordinator rejected %s: %s", what, details)
            return True
        if not ack.accepted:
            log.warning("coordinator did not accept %s: %s", what, ack.message)
        return True

    def _report(self, stub: pb_grpc.NodeServiceStub, row: GrantRow, force: bool = False) -> bool:
        """Tell the coordinator this node's decision on a job (Decide)."""
        with self._report_lock:
            if not force:
                current = self.state.get_grant(row.job_id)
                if current is None or current.reported:
                    return True
                row = current
            decision = pb.Decision(
                job_id=row.job_id,
                job_hash=row.job_hash,
                outcome=row.outcome,
                reason=row.reason,
                grant_json=row.grant_json if row.outcome == "granted" else "",
            )
            done = self._call_done(
                f"the {row.outcome} decision on job {row.job_id[:8]}",
                lambda: stub.Decide(decision, timeout=CALL_DEADLINE_S, metadata=self._metadata()),
            )
            if done and row.version >= 0:
                self.state.mark_reported(row.job_id, row.version)
            return done

    def _attest(self, stub: pb_grpc.NodeServiceStub, att: AttestationRow) -> bool:
        """Send a signed destruction attestation (Attest); plaintext mode sends none."""
        if not att.signed:
            return True
        message = pb.Attestation(job_id=att.job_id, attestation_json=att.json)
        done = self._call_done(
            f"the destruction attestation of job {att.job_id[:8]}",
            lambda: stub.Attest(message, timeout=CALL_DEADLINE_S, metadata=self._metadata()),
        )
        if done:
            self.state.mark_attestation_reported(att.job_id)
        return done

    def _offer(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> GrantRow:
        """Decide an offered job, answer with Decide, and fetch its bundle for review."""
        row = self.grants.offer(
            Offer(
                job_id=task.job_id,
                job_hash=task.job_hash,
                spec_json=task.job_spec_json,
                requester=task.requester,
                dataset=task.dataset,
                bundle_sha256=task.bundle.sha256,
            )
        )
        log.info(
            "job %s offered by %s: %s%s",
            task.job_id[:8],
            task.requester,
            row.outcome,
            f" ({row.reason})" if row.reason else "",
        )
        self._report(stub, row, force=True)
        if row.outcome != "refused" and row.bundle_sha and row.version >= 0:
            try:
                self._bundle_blob(stub, task.job_id, row.bundle_sha)
            except (grpc.RpcError, TaskError, OSError) as exc:
                details = exc.details() if isinstance(exc, grpc.RpcError) else exc
                log.warning(
                    "could not fetch the code bundle of job %s for review: %s",
                    task.job_id[:8],
                    details,
                )
        return row

    # -- tasks ---------------------------------------------------------------------
    def _handle(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> None:
        if task.kind in (pb.TASK_OFFER, pb.TASK_END_JOB):
            try:
                if task.kind == pb.TASK_OFFER:
                    self._offer(stub, task)
                else:
                    self._end_job(stub, task.job_id)
            except Exception:
                log.exception("%s for job %s failed", pb.TaskKind.Name(task.kind), task.job_id)
            return
        self._running.add(task.task_id)
        produced: Path | None = None
        try:
            result = self._execute(stub, task)
            produced = result.payload
            if result.header.ok:
                self._authorise_upload(task, result)
        except (TaskError, SecureTaskError, GrantCheckError) as exc:
            result = _Result(self._failure(task, str(exc)))
        except SecAggAborted as exc:
            result = _Result(self._failure(task, f"secure aggregation aborted: {exc}"))
        except Exception as exc:  # never let a task take the daemon down
            log.exception("task %s failed", task.task_id)
            result = _Result(self._failure(task, f"node error: {type(exc).__name__}: {exc}"))
        finally:
            self._running.discard(task.task_id)
        ack: pb.UploadAck | None = None
        problem = ""
        try:
            ack = self._upload(stub, result.header, result.payload, task.deadline_unix)
        except grpc.RpcError as exc:
            problem = f"the upload failed: {exc.details()}"
            log.warning("upload of task %s refused: %s", task.task_id, exc.details())
        finally:
            if produced is not None and produced.name.startswith("masked-"):
                produced.unlink(missing_ok=True)
        if result.header.receipt_json:
            try:
                self.grants.settle_receipt(
                    result.header.receipt_json, ack.receipt_json if ack else "", problem
                )
            except Exception:
                log.exception("could not record the receipt of task %s", task.task_id)

    def _authorise_upload(self, task: pb.Task, result: _Result) -> None:
        """The check before every upload (the grant may have been revoked, or expired,
        while the task ran); then the usage receipt for a contribution."""
        cache = self._jobs.get(task.job_id)
        spec = cache.spec if cache else None
        kind = task.kind
        if kind == pb.TASK_SECAGG and result.usage is not None:
            kind = pb.TASK_TRAIN if result.usage.epochs else pb.TASK_STATS
        epochs = spec.training.epochs if spec is not None and kind == pb.TASK_TRAIN else None
        usage = result.usage
        grant = self.grants.authorise(
            task.job_id,
            task.job_hash,
            spec=spec,
            dataset=(cache.dataset if cache else "") or task.dataset,
            round=task.round,
            epochs=epochs,
            new_samples=usage.samples if usage else 0,
        )
        if usage is None:
            return
        if (
            task.kind == pb.TASK_TRAIN
            and spec is not None
            and spec.privacy.enabled
            and not self.state.add_release(task.job_id, task.round)
        ):
            raise TaskError(
                f"this node already released its update for round {task.round}; its DP "
                "guarantee allows one per round"
            )
        row = self.grants.issue_receipt(
            grant,
            round=task.round,
            usage=usage,
            bytes_sent=result.header.blob.size,
            sent_sha256=result.header.blob.sha256,
            ledger_seq=task.ledger_seq,
            ledger_head=task.ledger_head,
        )
        if row.signed:
            result.header.receipt_json = row.json

    def _failure(self, task: pb.Task, error: str) -> pb.ResultHeader:
        log.warning(
            "task %s (%s, round %d) failed: %s",
            task.task_id[:8],
            pb.TaskKind.Name(task.kind),
            task.round,
            error,
        )
        return pb.ResultHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round,
            kind=task.kind,
            ok=False,
            error=error[:500],
        )

    def _upload(
        self,
        stub: pb_grpc.NodeServiceStub,
        header: pb.ResultHeader,
        payload: Path | None,
        deadline_unix: float,
    ) -> pb.UploadAck:
        def parts() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=header)
            if payload is not None:
                for data in iter_file_parts(payload):
                    yield pb.UploadChunk(data=data)

        timeout = max(CALL_DEADLINE_S, deadline_unix - time.time() + 5.0)
        ack: pb.UploadAck = stub.UploadResult(parts(), timeout=timeout, metadata=self._metadata())
        return ack

    def _job_workspace(self, task: pb.Task, spec: JobSpec) -> _JobCache:
        with self._jobs_lock:
            cache = self._jobs.get(task.job_id)
            if cache is None:
                ws = self.state.work_dir / task.job_id
                ws.mkdir(parents=True, exist_ok=True)
                cache = _JobCache(
                    job_hash=task.job_hash, workspace=ws, spec=spec, dataset=task.dataset
                )
                self._jobs[task.job_id] = cache
            elif cache.job_hash != task.job_hash:
                raise TaskError("job hash changed since the job's first task; refusing")
            return cache

    def _bundle_blob(self, stub: pb_grpc.NodeServiceStub, job_id: str, sha256: str) -> Path:
        """The job's code bundle in the node's bundle store (downloaded once, checked)."""
        path = self.state.bundle_path(sha256)
        if path.exists() and blob_ref_for_file(path).sha256 != sha256:
            path.unlink()  # altered on disk: fetch it again
        path.parent.mkdir(parents=True, exist_ok=True)
        self._download(stub, job_id, pb.BlobRef(sha256=sha256), path)
        return path

    def _download(
        self, stub: pb_grpc.NodeServiceStub, job_id: str, ref: pb.BlobRef, dest: Path
    ) -> None:
        if dest.exists():
            return
        chunks = stub.DownloadBlob(
            pb.BlobRequest(sha256=ref.sha256, job_id=job_id),
            timeout=600.0,
            metadata=self._metadata(),
        )
        path, sha = receive_chunks(chunks, dest.parent)
        if sha != ref.sha256:
            path.unlink(missing_ok=True)
            raise TaskError("downloaded blob is not the one the task named")
        os.replace(path, dest)

    def _secure_start(
        self,
        stub: pb_grpc.NodeServiceStub,
        task: pb.Task,
        spec: JobSpec,
        registered: RegisteredDataset,
        privacy: JobPrivacy | None = None,
    ) -> pb.ResultHeader:
        """Begin a secure round: advertise keys now, train in the background."""
        if self.secure is None:
            raise TaskError("this node runs in plaintext mode and cannot do secure aggregation")
        task_dir = self._prepare(stub, task, spec, registered, privacy)
        work: Future[LocalResult] = Future()
        advert = self.secure.start(
            task, work, task_dir, privacy, coalitions=spec.valuation.mode == "secure"
        )

        def train() -> None:
            try:
                work.set_result(self._run_local(task, task_dir))
            except BaseException as exc:
                work.set_exception(exc)

        threading.Thread(target=train, name=f"train-{task.task_id[:8]}", daemon=True).start()
        return pb.ResultHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round,
            kind=task.kind,
            ok=True,
            secagg=advert.SerializeToString(),
        )

    def _secure_phase(self, task: pb.Task) -> _Result:
        if self.secure is None:
            raise TaskError("this node runs in plaintext mode and cannot do secure aggregation")
        timeout = max(1.0, task.deadline_unix - time.time()) if task.deadline_unix else 3600.0
        response, vector = self.secure.phase(task, timeout)
        header = pb.ResultHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round,
            kind=task.kind,
            ok=True,
            secagg=response,
        )
        if vector is None:
            return _Result(header)
        path = self.state.work_dir / task.job_id / f"masked-{task.task_id}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(vector.astype("<u4", copy=False).tobytes())
        header.blob.CopyFrom(blob_ref_for_file(path))
        usage = None
        contribution = self.secure.contribution(task)
        if contribution is not None:
            kind, local = contribution
            cache = self._jobs.get(task.job_id)
            epochs = 0
            if kind == pb.TASK_TRAIN:
                epochs = cache.spec.training.epochs if cache and cache.spec else 1
            usage = Usage(local.num_examples, epochs, local.compute_seconds)
        return _Result(header, path, usage)

    def _task_spec(self, task: pb.Task) -> tuple[JobSpec, RegisteredDataset]:
        """The spec the task carries (its hash recomputed) and the dataset it names."""
        if task.kind not in (pb.TASK_TRAIN, pb.TASK_STATS):
            raise TaskError(f"unsupported task kind {pb.TaskKind.Name(task.kind)}")
        try:
            spec = spec_mod.from_json(task.job_spec_json)
        except spec_mod.SpecError as exc:
            raise TaskError(f"invalid job spec: {exc}") from None
        if spec.job_hash() != task.job_hash:
            raise TaskError("job hash does not match the job spec; refusing")
        registered = self.state.get_dataset(task.dataset)
        if registered is None or task.dataset != spec.data.dataset:
            raise TaskError(f"dataset {task.dataset!r} is not registered at this node")
        return spec, registered

    def _execute(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> _Result:
        """Check the grant, then run the task. No data is read before the check passes."""
        if task.kind == pb.TASK_SECAGG:
            cache = self._jobs.get(task.job_id)
            self.grants.authorise(
                task.job_id,
                task.job_hash,
                spec=cache.spec if cache else None,
                dataset=(cache.dataset if cache else "") or task.dataset,
                round=task.round,
            )
            return self._secure_phase(task)
        spec, registered = self._task_spec(task)
        epochs = spec.training.epochs if task.kind == pb.TASK_TRAIN else 0
        grant = self.grants.authorise(
            task.job_id,
            task.job_hash,
            spec=spec,
            dataset=task.dataset,
            round=task.round,
            epochs=epochs if task.kind == pb.TASK_TRAIN else None,
            new_samples=registered.rows * epochs,
        )
        privacy = self._privacy(task, spec, grant)
        if task.secure:
            return _Result(self._secure_start(stub, task, spec, registered, privacy))
        task_dir = self._prepare(stub, task, spec, registered, privacy)
        local = self._run_local(task, task_dir)
        header = pb.ResultHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round,
            kind=task.kind,
            ok=True,
            num_examples=local.num_examples,
            # Under DP only the update leaves: metrics would be releases outside the guarantee.
            metrics=local.metrics if privacy is None else {},
            blob=blob_ref_for_file(local.payload),
        )
        usage = Usage(local.num_examples, epochs, local.compute_seconds)
        return _Result(header, local.payload, usage)

    def _privacy(self, task: pb.Task, spec: JobSpec, grant: Grant) -> JobPrivacy | None:
        """The node's own DP plan for a task, from its signed grant, after checking that the
        plan still allows another release: at most one per round and ``federation.rounds``
        in all, which is what the accountant composed. The coordinator cannot raise it."""
        if not spec.privacy.enabled:
            return None
        raw = grant.protections.dp_plan
        if raw is None:
            raise TaskError(f"the grant for job {task.job_id} carries no DP plan; refusing")
        try:
            privacy = JobPrivacy.from_dict(raw)
        except ValueError as exc:
            raise TaskError(f"the grant's DP plan is unreadable: {exc}") from None
        if task.kind != pb.TASK_TRAIN:
            raise TaskError("a job with differential privacy has no statistics round")
        rounds = spec.federation.rounds
        released = self.state.released_rounds(task.job_id)
        if task.round > rounds or task.round < 1:
            raise TaskError(f"round {task.round} is outside the job's {rounds} rounds")
        if task.round in released:
            raise TaskError(
                f"this node already released its update for round {task.round}; its DP "
                "guarantee allows one per round"
            )
        if len(released) >= rounds:
            raise TaskError(
                f"this node already released {len(released)} updates for the job; its DP "
                f"guarantee was accounted for {rounds}"
            )
        return privacy

    def _prepare(
        self,
        stub: pb_grpc.NodeServiceStub,
        task: pb.Task,
        spec: JobSpec,
        registered: RegisteredDataset,
        privacy: JobPrivacy | None = None,
    ) -> Path:
        """Lay out the worker's task directory (the grant has been checked)."""
        cache = self._job_workspace(task, spec)
        task_dir = cache.workspace / task.task_id
        task_dir.mkdir(parents=True, exist_ok=True)
        cache.tasks.add(task.task_id)
        self._write_data(registered, list(spec.data.features), task_dir)
        if task.kind == pb.TASK_TRAIN:
            self._download(stub, task.job_id, task.model, task_dir / "model.safetensors")
            if spec.uses_bundle:
                bundle_dir = cache.workspace / "bundle"
                if not bundle_dir.exists():
                    # By the hash the spec binds (and so the grant), not the task's BlobRef.
                    blob = self._bundle_blob(stub, task.job_id, spec.bundle.sha256)
                    unpack(blob.read_bytes(), bundle_dir)
                shutil.copytree(bundle_dir, task_dir / "bundle", dirs_exist_ok=True)
            kind = "train"
        elif task.kind == pb.TASK_STATS:
            kind = "stats"
        else:
            raise TaskError(f"unsupported task kind {pb.TaskKind.Name(task.kind)}")
        job: dict[str, Any] = {"kind": kind, "round": task.round, "spec": spec.to_dict()}
        if privacy is not None and privacy.dpsgd is not None:
            job["dp_sgd"] = dict(privacy.dpsgd)
        (task_dir / "task.json").write_text(json.dumps(job), encoding="utf-8")
        return task_dir

    def _run_local(self, task: pb.Task, task_dir: Path) -> LocalResult:
        """Run the worker process; its result stays in the task directory."""
        started = time.monotonic()
        try:
            self._run_worker(task, task_dir)
        finally:
            (task_dir / "data.safetensors").unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        result = json.loads((task_dir / "result.json").read_text(encoding="utf-8"))
        return LocalResult(
            num_examples=int(result["num_examples"]),
            metrics={k: float(v) for k, v in result["metrics"].items()},
            payload=task_dir / "result.safetensors",
            compute_seconds=elapsed,
        )

    def _write_data(
        self, registered: RegisteredDataset, features: list[str], task_dir: Path
    ) -> None:
        """Hand the worker the selected columns as tensors, after checking the file."""
        path = Path(registered.path)
        if not path.exists():
            raise TaskError(f"dataset file {path} is missing")
        if ds.file_fingerprint(path) != registered.fingerprint:
            raise TaskError(
                f"dataset {registered.name!r} changed on disk since registration; re-register it"
            )
        cols = features or registered.features
        x, y = ds.load_arrays(path, registered.label, cols)
        blob = models.weights_to_bytes({"x": np.ascontiguousarray(x), "y": y})
        (task_dir / "data.safetensors").write_bytes(blob)

    def _run_worker(self, task: pb.Task, task_dir: Path) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(task_dir),
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        # Let the worker import wharf exactly as this process does (editable installs too).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        timeout = max(5.0, task.deadline_unix - time.time()) if task.deadline_unix else 3600.0
        with (task_dir / "worker.log").open("wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wharf.node.worker", str(task_dir)],
                cwd=task_dir,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._procs[task.task_id] = proc
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise TaskError("training did not finish before the round deadline") from None
            finally:
                self._procs.pop(task.task_id, None)
        if code != 0:
            err = task_dir / "error.json"
            if err.exists():
                raise TaskError(json.loads(err.read_text(encoding="utf-8"))["error"])
            raise TaskError(f"training worker exited with code {code}")

    def _end_job(self, stub: pb_grpc.NodeServiceStub, job_id: str) -> AttestationRow:
        """Delete the job's workspace, attest what was deleted, and send the attestation."""
        if self.secure is not None:
            self.secure.end(job_id)
        with self._jobs_lock:
            cache = self._jobs.pop(job_id, None)
        ws = cache.workspace if cache else self.state.work_dir / job_id
        row = self.grants.destroy(job_id, ws)
        log.info("job %s over: workspace deleted and attested", job_id[:8])
        self._attest(stub, row)
        return row
