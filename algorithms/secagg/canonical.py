"""Canonical byte strings for key derivation, signatures and the round context.

Why not sign serialized protobuf: protobuf encoding is not canonical (field
order, unknown fields and default values may differ between encoders), so two
honest implementations could disagree about what was signed. Everything that
is signed, hashed into the round context or fed to HKDF is therefore built
here from typed, tagged, length-prefixed fields: distinct field lists can
never produce the same bytes.

Every signed transcript starts with a domain tag, the protocol version, the
job id, the round, the phase, the sender and the round-context hash, so a
signature is valid for exactly one message of one phase of one round of one
job under one set of parameters — the basis of replay and cross-round
refusal.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum

import numpy as np

from .params import PROTOCOL_VERSION, SecAggParams

_TAG_BYTES = b"\x01"
_TAG_STR = b"\x02"
_TAG_UINT = b"\x03"
_TAG_LIST = b"\x04"
_TAG_FLOAT = b"\x05"
_TAG_BOOL = b"\x06"

Field = bytes | str | int | float | bool | Sequence[int]


class Phase(IntEnum):
    """Protocol phases; the numbers equal the ``SecAggPhase`` proto enum."""

    SETUP = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS = 3
    MASKED_INPUT = 4
    CONSISTENCY_CHECK = 5
    UNMASK = 6


def _uint(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"integer field out of range: {value}")
    return _TAG_UINT + value.to_bytes(8, "big")


def _one(value: Field) -> bytes:
    if isinstance(value, bool):
        return _TAG_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _uint(value)
    if isinstance(value, float):
        return _TAG_FLOAT + struct.pack(">d", value)
    if isinstance(value, bytes):
        return _TAG_BYTES + len(value).to_bytes(4, "big") + value
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _TAG_STR + len(raw).to_bytes(4, "big") + raw
    items = [int(i) for i in value]
    try:
        packed = np.asarray(items, dtype=">u8").tobytes()  # fixed width: count + 8 bytes each
    except OverflowError:
        raise ValueError("integer list field out of range") from None
    return _TAG_LIST + len(items).to_bytes(4, "big") + packed


def encode_fields(*fields: Field) -> bytes:
    """Injective encoding of a sequence of typed fields."""
    return b"".join(_one(f) for f in fields)


def context_hash(
    *,
    job_id: str,
    round_number: int,
    params: SecAggParams,
    roster: Sequence[str],
    graph_seed: bytes,
    num_values: int,
    certificates: Sequence[bytes] = (),
) -> bytes:
    """SHA-256 of everything a round's participants must agree on.

    ``roster[i]`` is the certified name of the node with index ``i + 1`` and
    ``certificates[i]`` (if relayed, else empty) its certificate.
    Every signed message carries this hash, so an honest node never accepts a
    message produced under a different view of the round.
    """
    data = encode_fields(
        b"wharf/secagg/context",
        PROTOCOL_VERSION,
        job_id,
        round_number,
        params.num_nodes,
        params.degree,
        params.threshold,
        params.value_bits,
        params.clip,
        params.max_nodes,
        params.malicious,
        graph_seed,
        num_values,
        len(roster),
        *roster,
        len(certificates),
        *(hashlib.sha256(c).digest() for c in certificates),
    )
    return hashlib.sha256(data).digest()


def transcript(
    phase: Phase,
    *,
    job_id: str,
    round_number: int,
    sender: int,
    context: bytes,
    body: Iterable[Field] = (),
) -> bytes:
    """The exact bytes a node signs for one message of ``phase``."""
    return encode_fields(
        b"wharf/secagg/signed",
        PROTOCOL_VERSION,
        job_id,
        round_number,
        int(phase),
        sender,
        context,
        *body,
    )
