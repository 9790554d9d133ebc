"""Live node sessions: who is connected now, and the queue feeding each task stream.

A node is online exactly while its TaskStream call is open. Round runners push
tasks into a node's queue; when a stream closes, listeners are told at once so
a round does not wait out its deadline for a node that is gone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wharf.proto import wharf_pb2 as pb

_CLOSE = object()


@dataclass
class NodeSession:
    """One open task stream."""

    name: str
    datasets: dict[str, dict[str, Any]]
    session_id: int
    cert_pem: bytes = b""
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    tasks: queue.Queue[Any] = field(default_factory=queue.Queue)

    def close(self) -> None:
        self.tasks.put(_CLOSE)


class SessionRegistry:
    """Thread-safe registry of connected nodes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, NodeSession] = {}
        self._datasets: dict[str, dict[str, dict[str, Any]]] = {}
        self._next_id = 0
        self._listeners: list[Callable[[str], None]] = []

    def set_datasets(self, name: str, datasets: dict[str, dict[str, Any]]) -> None:
        """Record what a node announced in Hello (used when its stream opens)."""
        with self._lock:
            self._datasets[name] = datasets
            if name in self._sessions:
                self._sessions[name].datasets = datasets

    def open(self, name: str, cert_pem: bytes = b"") -> NodeSession:
        """Open a session for ``name``, closing any older one (a reconnect wins).

        ``cert_pem`` is the node's verified certificate, relayed to its peers in
        secure aggregation so they can check its signatures themselves.
        """
        with self._lock:
            old = self._sessions.get(name)
            self._next_id += 1
            session = NodeSession(
                name=name,
                datasets=self._datasets.get(name, {}),
                session_id=self._next_id,
                cert_pem=cert_pem,
            )
            self._sessions[name] = session
        if old is not None:
            old.close()
            self._fire(name)
        return session

    def close(self, session: NodeSession) -> None:
        with self._lock:
            current = self._sessions.get(session.name)
            if current is session:
                del self._sessions[session.name]
            else:
                return
        self._fire(session.name)

    def add_listener(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _fire(self, name: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(name)

    def get(self, name: str) -> NodeSession | None:
        with self._lock:
            return self._sessions.get(name)

    def online(self) -> list[NodeSession]:
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.name)

    def holding(self, dataset: str) -> list[NodeSession]:
        """Online nodes that registered ``dataset``."""
        return [s for s in self.online() if dataset in s.datasets]

    def send(self, name: str, task: pb.Task) -> bool:
        """Queue a task for a node; False if it is not connected."""
        session = self.get(name)
        if session is None:
            return False
        session.tasks.put(task)
        return True

    def touch(self, name: str) -> None:
        session = self.get(name)
        if session is not None:
            session.last_seen = time.time()

    def shutdown(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()


def is_close(item: object) -> bool:
    return item is _CLOSE
