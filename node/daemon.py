"""The node daemon: dials out to the coordinator, runs tasks, sends back updates.

The node opens no listening port. It keeps one long-lived TaskStream; each
task runs in its own worker process (see :mod:`wharf.node.worker`) from a
per-job workspace, and results go back on a separate UploadResult call.
When the coordinator is away it reconnects with exponential backoff.
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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from wharf import __version__
from wharf import spec as spec_mod
from wharf.algorithms import models
from wharf.algorithms.secagg import SecAggAborted
from wharf.bundle import unpack
from wharf.chunks import blob_ref_for_file, iter_file_parts, receive_chunks
from wharf.identity import Identity
from wharf.node import datasets as ds
from wharf.node.config import NodeConfig
from wharf.node.secure_session import LocalResult, SecureSessions, SecureTaskError
from wharf.node.state import NodeState, RegisteredDataset
from wharf.node.wirelog import WireLog, WireLogInterceptor
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc
from wharf.tls import insecure_channel, secure_channel

log = logging.getLogger("wharf.node")

STREAM_DEADLINE_S = 3600.0
"""The task stream is re-opened hourly: every call has a deadline."""
CALL_DEADLINE_S = 30.0
INSECURE_IDENTITY_HEADER = "x-wharf-insecure-identity"


class TaskError(Exception):
    """A task could not be run; the message is reported to the coordinator."""


@dataclass
class _JobCache:
    """Per-job files kept between rounds (spec check, unpacked bundle)."""

    job_hash: str
    workspace: Path
    tasks: set[str] = field(default_factory=set)


class NodeDaemon:
    """One node: its identity, its datasets, and its connection loop."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state = NodeState(config.state_dir)
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
            self.secure: SecureSessions | None = SecureSessions(
                self.name, self.identity.signer().sign, self.identity.ca_pem
            )
        else:
            assert config.insecure_name
            self.name = config.insecure_name
            self.secure = None
            log.warning("PLAINTEXT MODE: no TLS; this node's identity is not authenticated")
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
            )
            for d in self.state.list_datasets()
        ]

    # -- tasks ---------------------------------------------------------------------
    def _handle(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> None:
        if task.kind == pb.TASK_END_JOB:
            self._end_job(task.job_id)
            return
        self._running.add(task.task_id)
        try:
            header, payload = self._execute(stub, task)
        except (TaskError, SecureTaskError) as exc:
            header, payload = self._failure(task, str(exc)), None
        except SecAggAborted as exc:
            header, payload = self._failure(task, f"secure aggregation aborted: {exc}"), None
        except Exception as exc:  # never let a task take the daemon down
            log.exception("task %s failed", task.task_id)
            header, payload = self._failure(task, f"node error: {type(exc).__name__}: {exc}"), None
        finally:
            self._running.discard(task.task_id)
        try:
            self._upload(stub, header, payload, task.deadline_unix)
        except grpc.RpcError as exc:
            log.warning("upload of task %s refused: %s", task.task_id, exc.details())
        finally:
            if payload is not None and payload.name.startswith("masked-"):
                payload.unlink(missing_ok=True)

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
    ) -> None:
        def parts() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=header)
            if payload is not None:
                for data in iter_file_parts(payload):
                    yield pb.UploadChunk(data=data)

        timeout = max(CALL_DEADLINE_S, deadline_unix - time.time() + 5.0)
        stub.UploadResult(parts(), timeout=timeout, metadata=self._metadata())

    def _job_workspace(self, task: pb.Task) -> _JobCache:
        with self._jobs_lock:
            cache = self._jobs.get(task.job_id)
            if cache is None:
                ws = self.state.work_dir / task.job_id
                ws.mkdir(parents=True, exist_ok=True)
                cache = _JobCache(job_hash=task.job_hash, workspace=ws)
                self._jobs[task.job_id] = cache
            elif cache.job_hash != task.job_hash:
                raise TaskError("job hash changed since the job's first task; refusing")
            return cache

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

    def _secure_start(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> pb.ResultHeader:
        """Begin a secure round: advertise keys now, train in the background."""
        if self.secure is None:
            raise TaskError("this node runs in plaintext mode and cannot do secure aggregation")
        task_dir = self._prepare(stub, task)
        work: Future[LocalResult] = Future()
        advert = self.secure.start(task, work, task_dir)

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

    def _secure_phase(self, task: pb.Task) -> tuple[pb.ResultHeader, Path | None]:
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
            return header, None
        path = self.state.work_dir / task.job_id / f"masked-{task.task_id}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(vector.astype("<u4", copy=False).tobytes())
        header.blob.CopyFrom(blob_ref_for_file(path))
        return header, path

    def _execute(
        self, stub: pb_grpc.NodeServiceStub, task: pb.Task
    ) -> tuple[pb.ResultHeader, Path | None]:
        if task.kind == pb.TASK_SECAGG:
            return self._secure_phase(task)
        if task.secure:
            return self._secure_start(stub, task), None
        task_dir = self._prepare(stub, task)
        local = self._run_local(task, task_dir)
        header = pb.ResultHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round,
            kind=task.kind,
            ok=True,
            num_examples=local.num_examples,
            metrics=local.metrics,
            blob=blob_ref_for_file(local.payload),
        )
        return header, local.payload

    def _prepare(self, stub: pb_grpc.NodeServiceStub, task: pb.Task) -> Path:
        """Check the task against its spec and lay out the worker's task directory."""
        # The node recomputes the job hash from the spec it is shown.
        try:
            spec = spec_mod.from_json(task.job_spec_json)
        except spec_mod.SpecError as exc:
            raise TaskError(f"invalid job spec: {exc}") from None
        if spec.job_hash() != task.job_hash:
            raise TaskError("job hash does not match the job spec; refusing")
        cache = self._job_workspace(task)
        registered = self.state.get_dataset(task.dataset)
        if registered is None or task.dataset != spec.data.dataset:
            raise TaskError(f"dataset {task.dataset!r} is not registered at this node")
        task_dir = cache.workspace / task.task_id
        task_dir.mkdir(parents=True, exist_ok=True)
        cache.tasks.add(task.task_id)
        self._write_data(registered, list(spec.data.features), task_dir)
        if task.kind == pb.TASK_TRAIN:
            self._download(stub, task.job_id, task.model, task_dir / "model.safetensors")
            if spec.uses_bundle:
                bundle_dir = cache.workspace / "bundle"
                if not bundle_dir.exists():
                    blob = cache.workspace / "bundle.zip"
                    self._download(stub, task.job_id, task.bundle, blob)
                    unpack(blob.read_bytes(), bundle_dir)
                shutil.copytree(bundle_dir, task_dir / "bundle", dirs_exist_ok=True)
            kind = "train"
        elif task.kind == pb.TASK_STATS:
            kind = "stats"
        else:
            raise TaskError(f"unsupported task kind {pb.TaskKind.Name(task.kind)}")
        (task_dir / "task.json").write_text(
            json.dumps({"kind": kind, "round": task.round, "spec": spec.to_dict()}),
            encoding="utf-8",
        )
        return task_dir

    def _run_local(self, task: pb.Task, task_dir: Path) -> LocalResult:
        """Run the worker process; its result stays in the task directory."""
        try:
            self._run_worker(task, task_dir)
        finally:
            (task_dir / "data.safetensors").unlink(missing_ok=True)
        result = json.loads((task_dir / "result.json").read_text(encoding="utf-8"))
        return LocalResult(
            num_examples=int(result["num_examples"]),
            metrics={k: float(v) for k, v in result["metrics"].items()},
            payload=task_dir / "result.safetensors",
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

    def _end_job(self, job_id: str) -> None:
        if self.secure is not None:
            self.secure.end(job_id)
        with self._jobs_lock:
            cache = self._jobs.pop(job_id, None)
        ws = cache.workspace if cache else self.state.work_dir / job_id
        if ws.exists():
            shutil.rmtree(ws, ignore_errors=True)
            log.info("job %s over: workspace deleted", job_id[:8])
