"""Protobuf helpers shared by the client and server state machines.

Why a separate module: both sides build and check the same ``SecAggHeader``
and parameter messages, and the header check is the first line of replay and
cross-round defence — it must be identical on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from wharf.proto import secagg_pb2 as pb

from .canonical import Phase
from .errors import AbortReason, SecAggAborted
from .params import PROTOCOL_VERSION, SecAggParams

COORDINATOR = 0
"""``sender`` value of coordinator-originated messages."""


def make_header(
    phase: Phase, *, job_id: str, round_number: int, sender: int, context: bytes
) -> pb.SecAggHeader:
    return pb.SecAggHeader(
        protocol_version=PROTOCOL_VERSION,
        job_id=job_id,
        round=round_number,
        phase=int(phase),
        sender=sender,
        context_hash=context,
    )


def check_header(
    header: pb.SecAggHeader,
    *,
    phase: Phase,
    job_id: str,
    round_number: int,
    context: bytes | None,
    sender: int | None = None,
    what: str = "message",
) -> None:
    """Raise ``WRONG_CONTEXT`` unless ``header`` belongs to this job, round and phase."""
    problems = []
    if header.protocol_version != PROTOCOL_VERSION:
        problems.append(f"protocol version {header.protocol_version} != {PROTOCOL_VERSION}")
    if header.job_id != job_id:
        problems.append(f"job {header.job_id!r} != {job_id!r}")
    if header.round != round_number:
        problems.append(f"round {header.round} != {round_number}")
    if header.phase != int(phase):
        problems.append(f"phase {header.phase} != {int(phase)} ({phase.name})")
    if context is not None and header.context_hash != context:
        problems.append("round context hash differs")
    if sender is not None and header.sender != sender:
        problems.append(f"sender {header.sender} != {sender}")
    if problems:
        raise SecAggAborted(
            AbortReason.WRONG_CONTEXT,
            f"{what} refused (replayed or misrouted): " + "; ".join(problems),
        )


def params_to_proto(params: SecAggParams) -> pb.SecAggParameters:
    return pb.SecAggParameters(
        num_nodes=params.num_nodes,
        degree=params.degree,
        threshold=params.threshold,
        value_bits=params.value_bits,
        clip=params.clip,
        max_nodes=params.max_nodes,
        malicious_coordinator=params.malicious,
    )


def params_from_proto(msg: pb.SecAggParameters) -> SecAggParams:
    if not math.isfinite(msg.clip):
        raise SecAggAborted(AbortReason.BAD_PARAMETERS, "clip is not finite")
    return SecAggParams(
        num_nodes=msg.num_nodes,
        degree=msg.degree,
        threshold=msg.threshold,
        value_bits=msg.value_bits,
        clip=msg.clip,
        max_nodes=msg.max_nodes,
        malicious=msg.malicious_coordinator,
    )


def roster_from_proto(
    entries: Sequence[pb.SecAggRosterEntry],
) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    """Names (``names[i - 1]`` for index ``i``) and relayed certificates (empty if none).

    Refuses gaps, repeated indices or names, and a roster where only some
    entries carry a certificate.
    """
    by_index: dict[int, pb.SecAggRosterEntry] = {}
    for entry in entries:
        if entry.index in by_index:
            raise SecAggAborted(AbortReason.BAD_PARAMETERS, f"roster repeats index {entry.index}")
        by_index[entry.index] = entry
    n = len(by_index)
    if sorted(by_index) != list(range(1, n + 1)):
        raise SecAggAborted(AbortReason.BAD_PARAMETERS, "roster indices must be exactly 1..n")
    names = tuple(by_index[i].node_id for i in range(1, n + 1))
    if len(set(names)) != n or any(not name for name in names):
        raise SecAggAborted(AbortReason.BAD_PARAMETERS, "roster names must be unique, non-empty")
    certs = tuple(by_index[i].certificate for i in range(1, n + 1))
    if any(certs) and not all(certs):
        raise SecAggAborted(AbortReason.BAD_PARAMETERS, "roster certificates must be all or none")
    return names, (certs if any(certs) else ())


def roster_to_proto(
    roster: Sequence[str], certificates: Sequence[bytes] = ()
) -> list[pb.SecAggRosterEntry]:
    certs = list(certificates) or [b""] * len(roster)
    return [
        pb.SecAggRosterEntry(index=i, node_id=name, certificate=cert)
        for i, (name, cert) in enumerate(zip(roster, certs, strict=True), 1)
    ]
