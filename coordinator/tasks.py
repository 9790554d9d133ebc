"""Routing task results from the upload RPC to the round waiting for them.

Each round registers the tasks it sent in a :class:`TaskBroker`. An upload is
accepted only for a registered task, from the node it was sent to, of the
kind that was asked; the round's validator checks the payload (shapes,
finiteness) before the upload is acknowledged, so a malformed result is
refused with a clear status and nothing of it is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wharf.proto import wharf_pb2 as pb


class ResultRejected(ValueError):
    """The uploaded result is malformed; the message says why."""


@dataclass
class TaskResult:
    """A node's answer to one task (payload spooled to ``blob_path``)."""

    task_id: str
    node: str
    ok: bool
    error: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    blob_path: Path | None = None
    blob_sha: str = ""
    secagg: bytes = b""
    payload: object = None

    def discard(self) -> None:
        if self.blob_path is not None:
            self.blob_path.unlink(missing_ok=True)


Validator = Callable[[TaskResult], object]


@dataclass
class _Pending:
    job_id: str
    node: str
    kind: int
    collector: RoundCollector


class RoundCollector:
    """Waits for the results of one batch of tasks, or their loss."""

    def __init__(self, expected: dict[str, str], validator: Validator | None = None) -> None:
        self.expected = dict(expected)  # task_id -> node
        self.validator = validator
        self.results: dict[str, TaskResult] = {}
        self._cond = threading.Condition()
        self._closed = False

    def close(self) -> None:
        """The round stopped listening: later uploads are refused, not kept."""
        with self._cond:
            self._closed = True

    def deliver(self, result: TaskResult) -> None:
        """Validate and record; raises ResultRejected for a malformed payload."""
        if result.ok and self.validator is not None:
            result.payload = self.validator(result)
        with self._cond:
            if self._closed:
                raise LookupError(f"task {result.task_id!r} is not active (its round is over)")
            if result.task_id in self.results:
                raise ResultRejected("a result for this task was already received")
            self.results[result.task_id] = result
            self._cond.notify_all()

    def node_lost(self, node: str) -> None:
        with self._cond:
            for task_id, owner in self.expected.items():
                if owner == node and task_id not in self.results:
                    self.results[task_id] = TaskResult(
                        task_id=task_id, node=node, ok=False, error="node disconnected"
                    )
            self._cond.notify_all()

    def wait(self, deadline: float, cancelled: threading.Event | None = None) -> None:
        """Block until every task answered, the deadline passed, or cancellation."""
        with self._cond:
            while len(self.results) < len(self.expected):
                remaining = deadline - time.time()
                if remaining <= 0 or (cancelled is not None and cancelled.is_set()):
                    return
                self._cond.wait(min(remaining, 0.5))

    def missing(self) -> list[str]:
        with self._cond:
            return sorted(self.expected[t] for t in self.expected if t not in self.results)

    def discard_all(self) -> None:
        with self._cond:
            for r in self.results.values():
                r.discard()


class TaskBroker:
    """Registry of tasks in flight, shared by round runners and the node service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def register(
        self, collector: RoundCollector, job_id: str, kind: int, tasks: dict[str, str]
    ) -> None:
        with self._lock:
            for task_id, node in tasks.items():
                self._pending[task_id] = _Pending(job_id, node, kind, collector)

    def unregister(self, task_ids: list[str]) -> None:
        with self._lock:
            gone = [self._pending.pop(t, None) for t in task_ids]
        for p in gone:
            if p is not None:
                p.collector.close()

    def node_lost(self, node: str) -> None:
        with self._lock:
            collectors = {
                id(p.collector): p.collector for p in self._pending.values() if p.node == node
            }
        for c in collectors.values():
            c.node_lost(node)

    def lookup(self, header: pb.ResultHeader, caller: str) -> RoundCollector:
        """Find the round waiting for this result; raise LookupError/PermissionError."""
        with self._lock:
            pending = self._pending.get(header.task_id)
        if pending is None:
            raise LookupError(f"task {header.task_id!r} is not active (unknown or already over)")
        if pending.node != caller:
            raise PermissionError("this task was not sent to you")
        if pending.job_id != header.job_id or pending.kind != header.kind:
            raise ResultRejected("result header does not match the task (job or kind)")
        return pending.collector
