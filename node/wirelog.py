"""An audit record of every message this node sends to the coordinator.

A data holder can switch it on (``[node] wire_log = "sent.log"``) to check
for itself that nothing but metadata and masked updates ever left: each
request message is appended, serialized exactly as gRPC sends it (before
TLS), as ``[u32 method length][method][u32 message length][message]``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc


class WireLog:
    """Append-only file of outgoing request messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, method: str, message: Any) -> None:
        data = message.SerializeToString()
        name = method.encode()
        with self._lock, self.path.open("ab") as fh:
            fh.write(struct.pack("<I", len(name)) + name + struct.pack("<I", len(data)) + data)


def read_wire_log(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (method, serialized message) records."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        method = data[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        (m,) = struct.unpack_from("<I", data, pos)
        yield method, data[pos + 4 : pos + 4 + m]
        pos += 4 + m


class WireLogInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Client interceptor that records every request message before it is sent."""

    def __init__(self, log: WireLog) -> None:
        self.log = log

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        self.log.record(details.method, request)
        return continuation(details, request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        self.log.record(details.method, request)
        return continuation(details, request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        def logged() -> Iterator[Any]:
            for req in request_iterator:
                self.log.record(details.method, req)
                yield req

        return continuation(details, logged())
