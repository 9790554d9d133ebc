"""Who is calling, and may they? Applied to every RPC handler.

The caller's name and role come from its mTLS certificate (verified against
the deployment CA), never from request fields. In the explicit plaintext
experiment mode there is no certificate; the caller's claimed identity is read
from metadata and the server says loudly at start-up that nothing is checked.

The decorator also turns errors into clear gRPC statuses so a handler never
crashes the server: user errors become INVALID_ARGUMENT / NOT_FOUND /
PERMISSION_DENIED / FAILED_PRECONDITION, anything unexpected INTERNAL (logged).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from wharf.chunks import TransferError
from wharf.spec import SpecError
from wharf.tensors import TensorError

log = logging.getLogger("wharf.coordinator")

F = TypeVar("F", bound=Callable[..., Any])

INSECURE_IDENTITY_HEADER = "x-wharf-insecure-identity"

MAX_DETAILS = 1000
"""Status details are clipped: they may echo caller input, and gRPC refuses trailing
metadata above 8 KiB (the caller would see RESOURCE_EXHAUSTED instead of the reason)."""


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


class Authenticator:
    """Resolves the caller of an RPC."""

    def __init__(self, ca_pem: bytes | None) -> None:
        self.ca_pem = ca_pem

    def caller(self, context: grpc.ServicerContext) -> Caller | None:
        if self.ca_pem is None:
            for key, value in context.invocation_metadata():
                if key == INSECURE_IDENTITY_HEADER and isinstance(value, str) and ":" in value:
                    role, _, name = value.partition(":")
                    return Caller(name=name, role=role)
            return None
        from wharf.tls import peer_identity

        try:
            peer = peer_identity(context, self.ca_pem)
        except Exception:
            return None
        return Caller(name=peer.name, role=peer.role) if peer is not None else None


class Abort(Exception):
    """Raise inside a handler to answer with a given status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _clip(message: str) -> str:
    """Shorten a long message in the middle, keeping how it starts and how it ends."""
    if len(message) <= MAX_DETAILS:
        return message
    half = (MAX_DETAILS - 5) // 2
    return f"{message[:half]} […] {message[-half:]}"


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, Abort):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError):
        # Reading the request stream failed: the client cancelled or gRPC already
        # ended the call (e.g. a message above the size limit). Not a server fault.
        return grpc.StatusCode.CANCELLED, "the call ended before its request was complete"
    if isinstance(exc, SpecError | TensorError | TransferError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND, str(exc).strip("'\"")
    return None


def rpc(*roles: str, streaming: bool = False) -> Callable[[F], F]:
    """Authorise the caller by role, pass it as ``caller=``, and map errors to statuses."""

    def decorate(fn: F) -> F:
        def authorise(self: Any, context: grpc.ServicerContext) -> Caller:
            caller = self.auth.caller(context)
            if caller is None:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no valid client certificate from this deployment's CA",
                )
            assert caller is not None
            if caller.role not in roles:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"role '{caller.role}' may not call {fn.__name__}; allowed: {', '.join(roles)}",
                )
            return caller

        def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
            mapped = _status_for(exc)
            if mapped is None:
                log.exception("internal error in %s", fn.__name__)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}")
            else:
                context.abort(mapped[0], _clip(mapped[1]))

        if streaming:

            @functools.wraps(fn)
            def stream_wrapper(
                self: Any, request: Any, context: grpc.ServicerContext
            ) -> Iterator[Any]:
                caller = authorise(self, context)
                try:
                    yield from fn(self, request, context, caller=caller)
                except Exception as exc:  # handlers raise Abort, never context.abort
                    fail(context, exc)

            stream_wrapper.__wharf_roles__ = roles  # type: ignore[attr-defined]
            return stream_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            caller = authorise(self, context)
            try:
                return fn(self, request, context, caller=caller)
            except Exception as exc:  # handlers raise Abort, never context.abort
                fail(context, exc)

        wrapper.__wharf_roles__ = roles  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
