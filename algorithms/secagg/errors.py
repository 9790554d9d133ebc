"""Error types of the secure-aggregation protocol.

Why one exception with a reason code: a round either completes with the exact
sum over its survivors or it stops, and whoever stops it (a node refusing a
request, the coordinator falling below threshold) must say why in a form that
can be logged, audited and shown to an operator. ``SecAggAborted.reason`` is a
stable machine-readable code; ``detail`` is the one-line human explanation.
Nothing partial is ever returned alongside it.
"""

from __future__ import annotations

from enum import StrEnum


class AbortReason(StrEnum):
    """Why a party stopped a round. Values are stable strings (logged, audited, sent)."""

    WRONG_CONTEXT = "wrong_context"
    """A message for another job, round, phase or protocol version (replay / cross-round)."""
    BAD_PARAMETERS = "bad_parameters"
    """Degree, threshold, bit width or roster do not follow the protocol rules."""
    BAD_GRAPH = "bad_graph"
    """The neighbour graph is not the one derived from the public seed."""
    BAD_SIGNATURE = "bad_signature"
    """A message signature did not verify against the sender's certified key."""
    BAD_MESSAGE = "bad_message"
    """A malformed message: wrong sizes, duplicates, unknown senders, bad ciphertext."""
    OUT_OF_ORDER = "out_of_order"
    """A message arrived in the wrong phase for the receiving state machine."""
    BELOW_THRESHOLD = "below_threshold"
    """Too few nodes remain to finish the round without revealing anything."""
    INCONSISTENT_SURVIVORS = "inconsistent_survivors"
    """The consistency check failed: too few nodes signed the survivor set this node saw."""
    FORBIDDEN_REVEAL = "forbidden_reveal"
    """A request to reveal a share that would unmask an individual input."""
    RECONSTRUCTION_FAILED = "reconstruction_failed"
    """Revealed shares do not reconstruct the committed secret (a node lied or data is corrupt)."""
    BAD_INPUT = "bad_input"
    """The local input does not fit the agreed vector layout."""


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggAborted(SecAggError):
    """The round is over for this party; ``reason`` says why, ``detail`` in words.

    A client that raises this has moved to its terminal ``ABORTED`` state and
    will answer no further message of the round. A server that raises it from
    ``finish`` returns no sum at all.
    """

    def __init__(self, reason: AbortReason, detail: str) -> None:
        super().__init__(f"secure aggregation aborted ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


class MessageRejected(SecAggError):
    """The coordinator refused one node message; the round goes on without it.

    The sending node is treated as having dropped out of the current phase.
    """

    def __init__(self, reason: AbortReason, detail: str) -> None:
        super().__init__(f"secure-aggregation message rejected ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail
