"""Driving one SecAgg+ round over the node task streams.

The protocol itself is pure (:mod:`wharf.algorithms.secagg`); this module maps
its phases onto tasks: the round's TRAIN (or STATS) task carries the setup and
is answered at once with signed key advertisements while training runs at the
node; then one TASK_SECAGG per phase — key directory, share delivery (answered
with the masked vector once training is done), survivor set, unmask request.
A node that fails or times out in a phase is simply absent from the next;
the protocol recovers its masks or, below threshold, the round fails with the
protocol's stated reason and nothing is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError, Message

from wharf.algorithms.secagg import (
    MessageRejected,
    SecAggAborted,
    SecAggParams,
    SecAggServer,
    VectorLayout,
    choose_params,
)
from wharf.coordinator.sessions import NodeSession
from wharf.coordinator.tasks import ResultRejected, TaskResult
from wharf.identity import peer_verifier
from wharf.proto import secagg_pb2 as sa
from wharf.proto import wharf_pb2 as pb

PHASE_TIMEOUT_S = 60.0
"""Deadline for the short phases after the masked input (consistency, unmask)."""


class SecureRoundFailed(Exception):
    """The secure round could not complete; the message says why."""


class Dispatch(Protocol):
    def __call__(
        self,
        rnd: int,
        attempt: int,
        kind: int,
        nodes: list[NodeSession],
        model_sha: str,
        validator: Callable[[TaskResult], object],
        *,
        customize: Callable[[pb.Task, str], None] | None = ...,
        deadline: float | None = ...,
    ) -> list[TaskResult]: ...


@dataclass
class SecureOutcome:
    """Decoded per-segment sums over the contributors, and who contributed."""

    sums: dict[str, Any]
    contributors: list[str]
    params: SecAggParams
    timings: dict[str, float]
    """Seconds per phase (``secagg_<phase>_s``); the masked-input phase includes training."""


def _parse(cls: type[Message], data: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise ResultRejected(f"{what} is not a valid protocol message") from None
    return msg


class SecureRound:
    """One secure-aggregation round for ``nodes``, vector layout from ``make_layout``."""

    def __init__(
        self,
        *,
        dispatch: Dispatch,
        job_id: str,
        rnd: int,
        attempt: int,
        kind: int,
        nodes: list[NodeSession],
        model_sha: str,
        ca_pem: bytes,
        make_layout: Callable[[SecAggParams], VectorLayout],
        weight_scale: int,
        deadline: float,
    ) -> None:
        self.dispatch = dispatch
        self.rnd, self.attempt, self.kind = rnd, attempt, kind
        self.nodes = sorted(nodes, key=lambda s: s.name)
        self.model_sha = model_sha
        self.weight_scale = weight_scale
        self.deadline = deadline
        roster = [s.name for s in self.nodes]
        certs = {s.name: s.cert_pem for s in self.nodes}
        if not all(certs.values()):
            raise SecureRoundFailed(
                "secure aggregation needs every node's certificate (mTLS); "
                "plaintext mode supports only secure = false"
            )
        self.params = choose_params(len(roster), malicious=True)
        try:
            self.layout = make_layout(self.params)
        except ValueError as exc:  # e.g. a round larger than the DP plan was sized for
            raise SecureRoundFailed(f"cannot lay out the secure vector: {exc}") from None
        self.server = SecAggServer(
            job_id=job_id,
            round_number=rnd,
            params=self.params,
            roster=roster,
            num_values=self.layout.length,
            verify=peer_verifier(certs.get, ca_pem),
            certificates=[certs[n] for n in roster],
        )
        self.index = {name: i + 1 for i, name in enumerate(roster)}
        self.by_index = {i + 1: s for i, s in enumerate(self.nodes)}
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    def _receive(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            try:
                fn(*args)
            except MessageRejected as exc:
                raise ResultRejected(f"secure aggregation: {exc}") from None

    def _phase(
        self,
        messages: Mapping[int, Message],
        secagg_kind: str,
        validator: Callable[[TaskResult], object],
        deadline: float,
    ) -> None:
        nodes = [self.by_index[i] for i in sorted(messages)]

        def customize(task: pb.Task, name: str) -> None:
            task.kind = pb.TASK_SECAGG
            task.secagg_kind = secagg_kind
            task.secagg = messages[self.index[name]].SerializeToString()

        self.dispatch(
            self.rnd,
            self.attempt,
            pb.TASK_SECAGG,
            nodes,
            self.model_sha,
            validator,
            customize=customize,
            deadline=deadline,
        )

    def run(self) -> SecureOutcome:
        try:
            return self._run()
        except SecAggAborted as exc:
            raise SecureRoundFailed(f"secure aggregation aborted: {exc}") from None

    def _run(self) -> SecureOutcome:
        server = self.server
        setups = server.setup_messages()

        def on_advert(r: TaskResult) -> object:
            msg = _parse(sa.SecAggAdvertiseKeys, r.secagg, "key advertisement")
            self._check_sender(msg, r)
            self._receive(server.receive_advertisement, msg)
            return msg

        def customize_setup(task: pb.Task, name: str) -> None:
            task.secure = True
            task.weight_scale = self.weight_scale
            task.secagg = setups[self.index[name]].SerializeToString()

        clock = time.perf_counter()
        self.dispatch(
            self.rnd,
            self.attempt,
            self.kind,
            self.nodes,
            self.model_sha,
            on_advert,
            customize=customize_setup,
            deadline=self.deadline,
        )
        self._tick("advertise_keys", clock)
        clock = time.perf_counter()
        with self._lock:
            directories = server.key_directories()

        def on_shares(r: TaskResult) -> object:
            msg = _parse(sa.SecAggShareKeys, r.secagg, "share-keys message")
            self._check_sender(msg, r)
            self._receive(server.receive_share_keys, msg)
            return msg

        self._phase(directories, "key_directory", on_shares, self.deadline)
        self._tick("share_keys", clock)
        clock = time.perf_counter()
        with self._lock:
            deliveries = server.share_deliveries()

        def on_masked(r: TaskResult) -> object:
            msg = _parse(sa.SecAggMaskedInput, r.secagg, "masked input")
            self._check_sender(msg, r)
            if r.blob_path is None:
                raise ResultRejected("the masked vector must follow as the payload")
            raw = r.blob_path.read_bytes()
            if len(raw) != 4 * self.layout.length:
                raise ResultRejected(
                    f"masked vector has {len(raw)} bytes, expected {4 * self.layout.length}"
                )
            vector = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
            self._receive(server.receive_masked_input, msg, vector)
            r.discard()  # summed already; keep nothing of it
            return None

        self._phase(deliveries, "share_delivery", on_masked, self.deadline)
        self._tick("masked_input", clock)
        clock = time.perf_counter()
        short = time.time() + PHASE_TIMEOUT_S
        with self._lock:
            survivors = server.survivor_messages()

        def on_consistency(r: TaskResult) -> object:
            msg = _parse(sa.SecAggConsistencySignature, r.secagg, "consistency signature")
            self._check_sender(msg, r)
            self._receive(server.receive_consistency_signature, msg)
            return None

        self._phase(survivors, "survivors", on_consistency, short)
        self._tick("consistency", clock)
        clock = time.perf_counter()
        short = time.time() + PHASE_TIMEOUT_S
        with self._lock:
            requests = server.unmask_requests()

        def on_unmask(r: TaskResult) -> object:
            msg = _parse(sa.SecAggUnmaskResponse, r.secagg, "unmask response")
            self._check_sender(msg, r)
            self._receive(server.receive_unmask_response, msg)
            return None

        self._phase(requests, "unmask", on_unmask, short)
        with self._lock:
            result = server.finish()
        self._tick("unmask", clock)
        try:
            sums = result.decode(self.layout)
        except ValueError as exc:
            raise SecureRoundFailed(f"aggregate failed its range check: {exc}") from None
        contributors = [self.by_index[i].name for i in result.contributors]
        self.timings["secagg_dropped"] = float(len(self.nodes) - len(contributors))
        return SecureOutcome(
            sums=dict(sums), contributors=contributors, params=self.params, timings=self.timings
        )

    def _tick(self, phase: str, since: float) -> None:
        self.timings[f"secagg_{phase}_s"] = time.perf_counter() - since

    def _check_sender(self, msg: Any, r: TaskResult) -> None:
        """The protocol sender index must be the uploading node's own."""
        if msg.header.sender != self.index.get(r.node):
            raise ResultRejected("secure-aggregation message claims another sender")
