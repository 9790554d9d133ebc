"""A node's side of secure aggregation, one session per (job, round).

The round's TRAIN (or STATS) task carries the SecAgg+ setup: the node checks
it and answers at once with signed key advertisements while its training
worker runs in the background. The phase tasks that follow are answered from
the session; the update itself leaves the node only masked, in the answer to
the share delivery, after training has finished. Every secret (keys, seeds,
shares) stays in this process's memory and is dropped when the round ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError, Message

from wharf.algorithms import models, secure_vectors
from wharf.algorithms.secagg import SecAggAborted, SecAggClient, VectorLayout
from wharf.identity import peer_verifier
from wharf.proto import secagg_pb2 as sa
from wharf.proto import wharf_pb2 as pb


class SecureTaskError(Exception):
    """This node cannot take part in the secure round; the message is reported."""


@dataclass
class LocalResult:
    """What the training (or statistics) worker produced, still on this node."""

    num_examples: int
    metrics: dict[str, float]
    payload: Path
    compute_seconds: float = 0.0
    """The training (or statistics) worker's wall time, for the usage receipt."""


@dataclass
class _Session:
    client: SecAggClient
    kind: int
    weight_scale: int
    work: Future[LocalResult]
    task_dir: Path
    lock: threading.Lock = field(default_factory=threading.Lock)
    contributed: LocalResult | None = None
    """The local result this node masked and sent (set at the share delivery)."""


def _parse(cls: type[Message], data: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise SecureTaskError(f"malformed {what} from the coordinator") from None
    return msg


class SecureSessions:
    """All secure rounds this node is taking part in."""

    def __init__(self, name: str, sign: Callable[[bytes], bytes], ca_pem: bytes) -> None:
        self.name = name
        self.sign = sign
        self.ca_pem = ca_pem
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._revealed: set[tuple[str, int]] = set()
        """(job, round) pairs whose aggregate this node already helped unmask."""
        self._lock = threading.Lock()

    def start(
        self, task: pb.Task, work: Future[LocalResult], task_dir: Path
    ) -> sa.SecAggAdvertiseKeys:
        """Check the setup carried by a TRAIN/STATS task; return signed key advertisements."""
        if task.weight_scale < 1:
            raise SecureTaskError("secure task lacks its public weight scale")
        with self._lock:
            if (task.job_id, task.round) in self._revealed:
                # Two unmasked sums of the same update over different survivor
                # sets would let a coordinator subtract its way to one node's update.
                raise SecureTaskError(
                    f"this node already contributed to the unmasked aggregate of round "
                    f"{task.round}; it will not contribute to a second one"
                )
        setup = _parse(sa.SecAggSetup, task.secagg, "secure-aggregation setup")
        holder: dict[str, SecAggClient] = {}

        def certificate(name: str) -> bytes | None:
            return holder["client"].certificates.get(name) if "client" in holder else None

        client = SecAggClient(
            node_id=self.name,
            job_id=task.job_id,
            round_number=task.round,
            sign=self.sign,
            verify=peer_verifier(certificate, self.ca_pem),
        )
        holder["client"] = client
        advert = client.setup(setup)  # raises SecAggAborted on a bad setup
        with self._lock:
            # A retried round replaces the earlier attempt's session (fresh keys).
            self._sessions[(task.job_id, task.round)] = _Session(
                client=client,
                kind=task.kind,
                weight_scale=int(task.weight_scale),
                work=work,
                task_dir=task_dir,
            )
        return advert

    def _session(self, task: pb.Task) -> _Session:
        with self._lock:
            session = self._sessions.get((task.job_id, task.round))
        if session is None:
            raise SecureTaskError("no secure-aggregation session for this job and round")
        return session

    def contribution(self, task: pb.Task) -> tuple[int, LocalResult] | None:
        """``(task kind, local result)`` this node masked into the round of ``task``, once
        it answered the share delivery (what its usage receipt accounts for)."""
        with self._lock:
            session = self._sessions.get((task.job_id, task.round))
        if session is None or session.contributed is None:
            return None
        return session.kind, session.contributed

    def end(self, job_id: str, rnd: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._sessions if k[0] == job_id and rnd in (None, k[1])]:
                del self._sessions[key]
            if rnd is None:  # the job is over
                self._revealed = {k for k in self._revealed if k[0] != job_id}

    def phase(self, task: pb.Task, timeout: float) -> tuple[bytes, np.ndarray | None]:
        """Answer one phase; returns the response bytes and, for the masked input, the vector."""
        session = self._session(task)
        client = session.client
        try:
            with session.lock:
                if task.secagg_kind == "key_directory":
                    msg = client.share_keys(_parse(sa.SecAggKeyDirectory, task.secagg, "directory"))
                    return msg.SerializeToString(), None
                if task.secagg_kind == "share_delivery":
                    client.receive_shares(_parse(sa.SecAggShareDelivery, task.secagg, "shares"))
                    return self._masked_input(session, timeout)
                if task.secagg_kind == "survivors":
                    msg = client.consistency_check(
                        _parse(sa.SecAggSurvivors, task.secagg, "survivors")
                    )
                    return msg.SerializeToString(), None
                if task.secagg_kind == "unmask":
                    request = _parse(sa.SecAggUnmaskRequest, task.secagg, "unmask request")
                    with self._lock:
                        self._revealed.add((task.job_id, task.round))
                    msg = client.unmask(request)
                    self.end(task.job_id, task.round)
                    return msg.SerializeToString(), None
        except SecAggAborted:
            self.end(task.job_id, task.round)
            raise
        raise SecureTaskError(f"unknown secure-aggregation phase {task.secagg_kind!r}")

    def _masked_input(self, session: _Session, timeout: float) -> tuple[bytes, np.ndarray]:
        client = session.client
        try:
            local = session.work.result(timeout=timeout)
        except TimeoutError:
            raise SecureTaskError("local training did not finish before the deadline") from None
        data = models.weights_from_bytes(local.payload.read_bytes())
        assert client.params is not None
        if session.kind == pb.TASK_STATS:
            n_features = int(data["sum"].size)
            layout: VectorLayout = secure_vectors.stats_layout(
                client.params, n_features, session.weight_scale
            )
            inputs: dict[str, Any] = secure_vectors.stats_inputs(
                client.params, data["sum"], data["sumsq"], local.num_examples
            )
        else:
            flat, _ = models.flatten(data)
            layout = secure_vectors.update_layout(client.params, flat.size, session.weight_scale)
            inputs = secure_vectors.update_inputs(
                flat, local.num_examples, local.metrics, session.weight_scale
            )
        msg = client.masked_input(inputs, layout, inline=False)
        local.payload.unlink(missing_ok=True)  # the clear update is no longer needed
        session.contributed = local
        vector = client.masked_vector
        assert vector is not None
        return msg.SerializeToString(), vector
