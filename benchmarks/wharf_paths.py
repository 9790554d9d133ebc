"""Wharf's secure-aggregation paths, driven only through public ``wharf.algorithms.secagg`` API.

Why only public functions: the benchmark must measure what the coordinator and
node actually call, and keep working while the kernels behind those functions
are rewritten. Nothing here reaches into a private helper of the secagg
package.

Why a recorded protocol for the server side: the coordinator's state machine
is single-use, yet the timing needs ≥ 5 samples of the *same* round. A round
is therefore run once in process with real clients (real X25519, AES-GCM,
ECDSA P-256 signatures, protobuf bytes at every hop) and every node message is
kept as serialized bytes. Each timed sample builds a fresh ``SecAggServer``
with the same public seed (hence the same round context, so the recorded
signatures stay valid), replays the key phases untimed, and times the part
issue 4 asks about: receiving and summing the masked vectors, then removing
the masks (Shamir reconstruction, re-derived pairwise keys, AES unmasking).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from numpy.typing import NDArray

from wharf.algorithms.secagg import (
    AggregateResult,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    Segment,
    VectorLayout,
    choose_params,
    parallel,
)
from wharf.algorithms.secagg import shamir as wshamir
from wharf.algorithms.secagg.keys import (
    Party,
    RoundKeys,
    pairwise_mask_key,
    self_mask_key,
    share_encryption_key,
)
from wharf.algorithms.secagg.mask import apply_masks, default_threads
from wharf.algorithms.secagg.parallel import apply_masks_parallel
from wharf.proto import secagg_pb2 as pb

JOB_ID = "bench-job"
ROUND = 1
CLIP = 8.0
"""Same clipping range as Flower's SecAgg+ default, so both quantise the same values."""

_ECDSA = ec.ECDSA(hashes.SHA256())


# ------------------------------------------------------------------ identities


@cache
def _identity(name: str) -> ec.EllipticCurvePrivateKey:
    """A node's certified key: ECDSA P-256, as ``wharf.identity`` issues them."""
    return ec.generate_private_key(ec.SECP256R1())


def verify(name: str, data: bytes, signature: bytes) -> bool:
    try:
        _identity(name).public_key().verify(signature, data, _ECDSA)
    except Exception:
        return False
    return True


def signer(name: str) -> Callable[[bytes], bytes]:
    key = _identity(name)
    return lambda data: key.sign(data, _ECDSA)


# ------------------------------------------------------------- client masking


@dataclass
class MaskingSetup:
    """One node's round keys, already agreed, and the layout of its vector.

    ``k`` pairwise keys plus one self-mask key: the key agreement itself is
    measured separately (section 5), here only quantise-and-mask is timed.
    """

    layout: VectorLayout
    add_keys: list[bytes]
    sub_keys: list[bytes]
    rounding_key: bytes
    params: SecAggParams


def masking_setup(num_values: int, k: int = 8) -> MaskingSetup:
    """Keys of one node in a complete graph of ``k + 1`` nodes (so exactly ``k`` pairwise masks)."""
    params = choose_params(k + 1, clip=CLIP)
    layout = VectorLayout([Segment.real("update", num_values, CLIP, params.value_bits)], k + 1)
    me_index = k // 2 + 1  # mid-roster: about half the pairwise masks add, half subtract
    me = Party(me_index, f"node-{me_index:03d}")
    mine = RoundKeys.generate()
    add = [self_mask_key(mine.self_mask_seed, job_id=JOB_ID, round_number=ROUND, owner=me)]
    sub: list[bytes] = []
    for j in range(1, k + 2):
        if j == me_index:
            continue
        peer = RoundKeys.generate()
        key = pairwise_mask_key(
            mine.mask_key,
            peer.mask_public,
            job_id=JOB_ID,
            round_number=ROUND,
            me=me,
            peer=Party(j, f"node-{j:03d}"),
        )
        (add if me.index < j else sub).append(key)
    return MaskingSetup(layout, add, sub, os.urandom(16), params)


def start_helper() -> dict[str, Any]:
    """Start this process's masking helper (as a node or coordinator does on first use).

    Started before any timing so no sample pays the process start; returns what
    the report shows about it.
    """
    t0 = time.perf_counter()
    running = parallel.start_helper(wait=True)
    return {
        "running": running,
        "start_s": time.perf_counter() - t0,
        "min_words": parallel.PARALLEL_MIN_WORDS,
        "usable_cpus": parallel.usable_cpus(),
    }


def stop_helper() -> None:
    """Stop this process's masking helper (it would also stop at interpreter exit)."""
    parallel.shutdown_helper()


def helper_status() -> dict[str, Any]:
    """Calls served and the current split of this process's helper."""
    h = parallel.default_helper()
    return {"alive": h.alive, "calls": h.calls, "helper_share": round(h.share, 3)}


def mask_update(
    setup: MaskingSetup,
    update: NDArray[np.float32],
    threads: int | None = None,
    chunk_words: int | None = None,
) -> NDArray[np.uint32]:
    """Quantise + self mask + pairwise masks.

    With the defaults this is exactly what ``SecAggClient.masked_input`` runs:
    ``apply_masks_parallel`` (this core plus the helper process for vectors of
    at least ``PARALLEL_MIN_WORDS`` values, else the in-process kernel). Setting
    ``threads`` or ``chunk_words`` measures the in-process kernel
    (``apply_masks``) with those settings instead.
    """
    out = np.empty(setup.layout.length, dtype=np.uint32)
    source = setup.layout.source({"update": update}, setup.rounding_key)
    if threads is None and chunk_words is None:
        apply_masks_parallel(out, setup.add_keys, setup.sub_keys, source=source)
    elif chunk_words is None:
        apply_masks(out, setup.add_keys, setup.sub_keys, source=source, threads=threads)
    else:
        apply_masks(
            out,
            setup.add_keys,
            setup.sub_keys,
            source=source,
            threads=threads,
            chunk_words=chunk_words,
        )
    return out


def masking_is_exact(setup: MaskingSetup, update: NDArray[np.float32]) -> bool:
    """The production path's output is bit-identical to the one-thread in-process kernel, and
    removing the masks again gives exactly the plain encoding of ``update``."""
    masked = mask_update(setup, update)
    if not np.array_equal(masked, mask_update(setup, update, threads=1)):
        return False
    apply_masks(masked, setup.sub_keys, setup.add_keys)
    return bool(np.array_equal(masked, setup.layout.encode({"update": update}, setup.rounding_key)))


def path_used(num_values: int) -> str:
    """How the production path masks a vector of this size here (for the report)."""
    h = parallel.default_helper()
    if (num_values >= parallel.PARALLEL_MIN_WORDS and h.alive
            and parallel.usable_cpus() >= 2):  # fmt: skip
        return "2 processes"
    threads = default_threads(num_values)
    return f"{threads} thread{'s' if threads > 1 else ''}"


def unmask_only(out: NDArray[np.uint32], setup: MaskingSetup, threads: int | None = None) -> None:
    """The mask-and-add kernel without quantisation, as the coordinator runs it to unmask
    (``apply_masks_parallel``; an explicit ``threads`` measures the in-process kernel)."""
    if threads is None:
        apply_masks_parallel(out, setup.add_keys, setup.sub_keys)
    else:
        apply_masks(out, setup.add_keys, setup.sub_keys, threads=threads)


# ------------------------------------------------------------------ shamir


def shamir_split(secret: bytes, threshold: int, holders: int) -> dict[int, bytes]:
    return wshamir.split(secret, threshold, range(1, holders + 1))


def shamir_reconstruct(shares: dict[int, bytes], threshold: int, cold: bool = True) -> bytes:
    """Rebuild a secret; ``cold`` first forgets cached Lagrange coefficients (worst case)."""
    if cold:
        wshamir.lagrange_at_zero.cache_clear()
    return wshamir.reconstruct(shares, threshold)


def shamir_threshold(holders: int) -> int:
    """DESIGN.md §5 against a malicious coordinator: ``ceil(2(k+1)/3)`` for ``k+1`` holders."""
    return math.ceil(2 * holders / 3)


# --------------------------------------------------------------- key agreement


@dataclass
class PeerKeys:
    """Neighbours' advertised public keys (encryption, mask)."""

    publics: list[tuple[bytes, bytes]]


def peer_keys(k: int) -> PeerKeys:
    out = []
    for _ in range(k):
        r = RoundKeys.generate()
        out.append((r.encryption_public, r.mask_public))
    return PeerKeys(out)


def key_agreement_round(peers: PeerKeys) -> int:
    """One node's key work per round: two X25519 key pairs, then per neighbour an
    AES-GCM share key and a pairwise mask key (X25519 + HKDF each), plus the self-mask key."""
    keys = RoundKeys.generate()
    _ = keys.encryption_public, keys.mask_public  # advertised: public bytes computed
    me = Party(1, "node-001")
    made = 1
    self_mask_key(keys.self_mask_seed, job_id=JOB_ID, round_number=ROUND, owner=me)
    for j, (enc_pk, mask_pk) in enumerate(peers.publics, 2):
        peer = Party(j, f"node-{j:03d}")
        share_encryption_key(
            keys.encryption_key, enc_pk, job_id=JOB_ID, round_number=ROUND, me=me, peer=peer
        )
        pairwise_mask_key(
            keys.mask_key, mask_pk, job_id=JOB_ID, round_number=ROUND, me=me, peer=peer
        )
        made += 2
    return made


# ------------------------------------------------------- recorded protocol round


def _wire(msg: Any) -> Any:
    """Serialize and parse, as the transport would."""
    return type(msg).FromString(msg.SerializeToString())


@dataclass
class RecordedRound:
    """Every node message of one round, as bytes, plus what is needed to check the sum."""

    params: SecAggParams
    layout: VectorLayout
    roster: list[str]
    graph_seed: bytes
    dropped: list[int]
    """Nodes that shared keys but never sent a masked input (their pairwise masks must go)."""
    adverts: list[bytes] = field(default_factory=list)
    share_keys: list[bytes] = field(default_factory=list)
    masked: list[bytes] = field(default_factory=list)
    consistency: list[bytes] = field(default_factory=list)
    unmask: list[bytes] = field(default_factory=list)
    expected: NDArray[np.uint32] | None = None
    plain_sum: NDArray[np.float64] | None = None
    neighbours: dict[int, list[int]] = field(default_factory=dict)

    @property
    def survivors(self) -> list[int]:
        return [i for i in range(1, len(self.roster) + 1) if i not in self.dropped]

    def masked_input_bytes(self) -> int:
        """Serialized size of one node's masked-input message (vector inline)."""
        return len(self.masked[0])


def layout_for(num_values: int, params: SecAggParams) -> VectorLayout:
    """The update plus the extras a real round carries inside the masked vector."""
    return VectorLayout.for_update(
        num_values,
        params,
        [Segment.integer("num_examples", 1, 1 << 20), Segment.real("metrics", 3, 1e6, 20)],
    )


def record_round(
    num_nodes: int, num_values: int, drop_fraction: float = 0.1, seed: int = 0
) -> RecordedRound:
    """Run one full round in process and keep every node message (see module docstring)."""
    params = choose_params(num_nodes, clip=CLIP)
    layout = layout_for(num_values, params)
    roster = [f"node-{i:03d}" for i in range(1, num_nodes + 1)]
    graph_seed = os.urandom(32)
    rng = np.random.default_rng(seed)  # benchmark data and drop choice, not secrets
    server = SecAggServer(
        job_id=JOB_ID,
        round_number=ROUND,
        params=params,
        roster=roster,
        num_values=layout.length,
        verify=verify,
        graph_seed=graph_seed,
    )
    n_drop = max(1, round(num_nodes * drop_fraction)) if drop_fraction > 0 else 0
    dropped = _choose_dropped(server, n_drop, rng)
    rec = RecordedRound(params, layout, roster, graph_seed, dropped)
    rec.neighbours = {i: sorted(server.graph.neighbours(i)) for i in range(1, num_nodes + 1)}
    clients = {
        i: SecAggClient(
            node_id=name, job_id=JOB_ID, round_number=ROUND, sign=signer(name), verify=verify
        )
        for i, name in enumerate(roster, 1)
    }
    for i, m in server.setup_messages().items():
        raw = clients[i].setup(_wire(m)).SerializeToString()
        rec.adverts.append(raw)
        server.receive_advertisement(pb.SecAggAdvertiseKeys.FromString(raw))
    for i, m in server.key_directories().items():
        raw = clients[i].share_keys(_wire(m)).SerializeToString()
        rec.share_keys.append(raw)
        server.receive_share_keys(pb.SecAggShareKeys.FromString(raw))
    deliveries = server.share_deliveries()
    for i, m in deliveries.items():
        clients[i].receive_shares(_wire(m))
    total = np.zeros(layout.length, dtype=np.uint32)
    plain = np.zeros(num_values, dtype=np.float64)
    for i in deliveries:
        if i in dropped:
            continue
        update = rng.uniform(-1.0, 1.0, num_values).astype(np.float32)
        inputs = {
            "update": update,
            "num_examples": [int(rng.integers(1, 1000))],
            "metrics": rng.uniform(0, 100, 3),
        }
        rounding = os.urandom(16)
        raw = clients[i].masked_input(inputs, layout, rounding_key=rounding).SerializeToString()
        clients[i].masked_vector = None  # keep memory flat at N = 100
        rec.masked.append(raw)
        server.receive_masked_input(pb.SecAggMaskedInput.FromString(raw))
        total += layout.encode(inputs, rounding_key=rounding)
        plain += update
    rec.expected, rec.plain_sum = total, plain
    for i, m in server.survivor_messages().items():
        raw = clients[i].consistency_check(_wire(m)).SerializeToString()
        rec.consistency.append(raw)
        server.receive_consistency_signature(pb.SecAggConsistencySignature.FromString(raw))
    for i, m in server.unmask_requests().items():
        raw = clients[i].unmask(_wire(m)).SerializeToString()
        rec.unmask.append(raw)
        server.receive_unmask_response(pb.SecAggUnmaskResponse.FromString(raw))
    result = server.finish()
    if not np.array_equal(result.summed, total):
        raise AssertionError("recorded round did not unmask to the plain sum")
    return rec


def _choose_dropped(server: SecAggServer, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` random nodes whose loss leaves every neighbourhood at least ``t`` survivors.

    A random 10 % of a sparse (k-regular) graph can empty one neighbourhood
    below the threshold, and then no protocol can finish the round; the
    benchmark wants the expensive *recoverable* case.
    """
    n, t = server.params.num_nodes, server.params.threshold
    closed = {i: server.graph.closed_neighbourhood(i) for i in range(1, n + 1)}
    dropped: set[int] = set()
    for cand in rng.permutation(np.arange(1, n + 1)):
        if len(dropped) == count:
            break
        trial = dropped | {int(cand)}
        if all(len(closed[i] - trial) >= t for i in closed):
            dropped = trial
    return sorted(dropped)


@dataclass
class ReplayState:
    """A coordinator replayed up to the masked-input phase, and the parsed node messages.

    Parsing is the gRPC layer's job, done before a handler runs, so it is done
    here untimed; the timed part starts at the first ``receive_masked_input``.
    """

    server: SecAggServer
    masked: list[pb.SecAggMaskedInput]
    consistency: list[pb.SecAggConsistencySignature]
    unmask: list[pb.SecAggUnmaskResponse]


def fresh_server(rec: RecordedRound) -> ReplayState:
    """A new coordinator for the recorded round, replayed up to the masked-input phase."""
    server = SecAggServer(
        job_id=JOB_ID,
        round_number=ROUND,
        params=rec.params,
        roster=rec.roster,
        num_values=rec.layout.length,
        verify=verify,
        graph_seed=rec.graph_seed,
    )
    server.setup_messages()
    for raw in rec.adverts:
        server.receive_advertisement(pb.SecAggAdvertiseKeys.FromString(raw))
    server.key_directories()
    for raw in rec.share_keys:
        server.receive_share_keys(pb.SecAggShareKeys.FromString(raw))
    server.share_deliveries()
    return ReplayState(
        server,
        [pb.SecAggMaskedInput.FromString(raw) for raw in rec.masked],
        [pb.SecAggConsistencySignature.FromString(raw) for raw in rec.consistency],
        [pb.SecAggUnmaskResponse.FromString(raw) for raw in rec.unmask],
    )


def server_aggregate(
    state: ReplayState, phases: dict[str, list[float]] | None = None
) -> AggregateResult:
    """Timed part: sum the masked vectors, run consistency + unmask, remove every mask.

    ``phases`` (if given) collects the split: ``sum`` (SHA-256 and signature
    check, add each vector), ``consistency`` (survivor set, signatures, share
    requests and responses), ``unmask`` (Shamir reconstruction, re-derived
    pairwise keys, mask removal).
    """
    server = state.server
    t0 = time.perf_counter()
    for msg in state.masked:
        server.receive_masked_input(msg)
    t1 = time.perf_counter()
    server.survivor_messages()
    for sig in state.consistency:
        server.receive_consistency_signature(sig)
    server.unmask_requests()
    for resp in state.unmask:
        server.receive_unmask_response(resp)
    t2 = time.perf_counter()
    result = server.finish()
    t3 = time.perf_counter()
    if phases is not None:
        for name, dt in (("sum", t1 - t0), ("consistency", t2 - t1), ("unmask", t3 - t2)):
            phases.setdefault(name, []).append(dt)
    return result


def server_is_exact(rec: RecordedRound, result: AggregateResult) -> bool:
    """The unmasked sum equals the plain sum of the survivors' encodings, and decodes."""
    if rec.expected is None or rec.plain_sum is None:
        return False
    if not np.array_equal(result.summed, rec.expected):
        return False
    decoded = result.decode(rec.layout)
    step = rec.layout.segments[0].resolution
    err = float(np.max(np.abs(decoded["update"] - rec.plain_sum)))
    return err <= len(result.contributors) * step
