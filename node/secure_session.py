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
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError, Message

from wharf.algorithms import models, secure_vectors
from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.plan import JobPrivacy
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


class Releases(Protocol):
    """Where a node remembers, across restarts, which rounds' aggregates it let be revealed."""

    def add_release(self, job_id: str, rnd: int) -> bool: ...

    def released_rounds(self, job_id: str) -> list[int]: ...


class _MemoryReleases:
    """Releases kept in memory only (tests and tools without a node database)."""

    def __init__(self) -> None:
        self._done: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def add_release(self, job_id: str, rnd: int) -> bool:
        with self._lock:
            if (job_id, rnd) in self._done:
                return False
            self._done.add((job_id, rnd))
            return True

    def released_rounds(self, job_id: str) -> list[int]:
        with self._lock:
            return sorted(r for j, r in self._done if j == job_id)


@dataclass
class _Session:
    client: SecAggClient
    kind: int
    weight_scale: int
    work: Future[LocalResult]
    task_dir: Path
    privacy: JobPrivacy | None = None
    """The node's own DP plan for this job (from its grant), if the job has DP."""
    coalitions: bool = False
    """Secure valuation: also send one noised leave-one-out sum per roster node."""
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

    def __init__(
        self,
        name: str,
        sign: Callable[[bytes], bytes],
        ca_pem: bytes,
        releases: Releases | None = None,
    ) -> None:
        self.name = name
        self.sign = sign
        self.ca_pem = ca_pem
        self._sessions: dict[tuple[str, int], _Session] = {}
        self.releases: Releases = releases if releases is not None else _MemoryReleases()
        """(job, round) pairs whose aggregate this node already helped unmask (the node
        daemon keeps them in its database, so a restart does not forget them)."""
        self._lock = threading.Lock()

    def start(
        self,
        task: pb.Task,
        work: Future[LocalResult],
        task_dir: Path,
        privacy: JobPrivacy | None = None,
        *,
        coalitions: bool = False,
    ) -> sa.SecAggAdvertiseKeys:
        """Check the setup carried by a TRAIN/STATS task; return signed key advertisements.

        ``coalitions`` (the granted spec's ``valuation.mode = "secure"``, only with a
        participant-level plan) adds the leave-one-out sums to the masked vector.
        """
        if coalitions and (privacy is None or privacy.skellam is None):
            raise SecureTaskError("secure valuation needs this node's participant-level plan")
        if task.weight_scale < 1:
            raise SecureTaskError("secure task lacks its public weight scale")
        if task.round in self.releases.released_rounds(task.job_id):
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
                privacy=privacy,
                coalitions=coalitions and task.kind == pb.TASK_TRAIN,
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
                    self._check_release(session, task, len(request.survivors))
                    if not self.releases.add_release(task.job_id, task.round):
                        raise SecureTaskError(
                            f"this node already contributed to the unmasked aggregate of "
                            f"round {task.round}; it will not reveal a second one"
                        )
                    msg = client.unmask(request)
                    self.end(task.job_id, task.round)
                    return msg.SerializeToString(), None
        except SecAggAborted:
            self.end(task.job_id, task.round)
            raise
        raise SecureTaskError(f"unknown secure-aggregation phase {task.secagg_kind!r}")

    @staticmethod
    def _check_release(session: _Session, task: pb.Task, survivors: int) -> None:
        """Before revealing: a participant-level DP sum needs enough noise shares in it."""
        privacy = session.privacy
        if privacy is None or privacy.skellam is None or session.kind != pb.TASK_TRAIN:
            return
        need = privacy.skellam.min_contributors
        if survivors < need:
            raise SecureTaskError(
                f"only {survivors} nodes contributed to round {task.round}; this node's DP "
                f"plan needs at least {need} noise shares in a revealed sum, so it will not "
                "help unmask it"
            )

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
            privacy = session.privacy
            if privacy is not None and privacy.skellam is not None:
                plan = privacy.skellam
                if flat.size != plan.num_params:
                    raise SecureTaskError(
                        f"the update has {flat.size} values but this node's DP plan was made "
                        f"for {plan.num_params}"
                    )
                if session.coalitions:
                    try:
                        layout = secure_vectors.dp_coalition_layout(
                            client.params, plan, client.roster
                        )
                        inputs = secure_vectors.dp_coalition_inputs(
                            flat, plan, client.roster, self.name
                        )
                    except ValueError as exc:  # VectorError, or an update the plan refuses
                        raise SecureTaskError(str(exc)) from None
                else:
                    layout = secure_vectors.dp_update_layout(client.params, plan)
                    noisy, _ = skellam.encode_update(flat, plan)
                    inputs = {"update": noisy}
            else:
                layout = secure_vectors.update_layout(
                    client.params, flat.size, session.weight_scale, metrics=privacy is None
                )
                inputs = secure_vectors.update_inputs(
                    flat,
                    local.num_examples,
                    local.metrics if privacy is None else None,
                    session.weight_scale,
                )
        msg = client.masked_input(inputs, layout, inline=False)
        local.payload.unlink(missing_ok=True)  # the clear update is no longer needed
        session.contributed = local
        vector = client.masked_vector
        assert vector is not None
        return msg.SerializeToString(), vector
