"""SecAgg+ secure aggregation: pure, typed protocol functions and state machines.

No gRPC, no I/O: the coordinator and node wire these to their transports.
Modules, bottom up:

* :mod:`.params` — protocol version, the degree/threshold/headroom rules,
  :class:`SecAggParams`, :func:`choose_params`;
* :mod:`.graph` — the neighbour graph derived from a public seed;
* :mod:`.prg` — AES-128-CTR keystreams from HKDF-derived keys;
* :mod:`.encoding` — centred fixed point in Z_2^32 with stochastic rounding;
* :mod:`.mask` — the fused, chunked encode-and-mask / unmask kernel;
* :mod:`.keys` — X25519 + HKDF key agreement, AES-256-GCM share encryption;
* :mod:`.shamir` — Shamir sharing of 32-byte secrets over GF(2^127 - 1);
* :mod:`.canonical` — signed transcripts and the round-context hash;
* :mod:`.client` / :mod:`.server` — one round's state machines.

The threat model and parameter sources are in ``docs/security.md``.
"""

from .client import ClientState, SecAggClient
from .encoding import Segment, VectorLayout
from .errors import AbortReason, MessageRejected, SecAggAborted, SecAggError
from .params import PROTOCOL_VERSION, SecAggParams, choose_params
from .server import AggregateResult, SecAggServer, ServerState

__all__ = [
    "PROTOCOL_VERSION",
    "AbortReason",
    "AggregateResult",
    "ClientState",
    "MessageRejected",
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "Segment",
    "ServerState",
    "VectorLayout",
    "choose_params",
]
