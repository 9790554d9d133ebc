"""The coordinator side of one SecAgg+ round: collect, route, and unmask.

Why the coordinator tracks survivor sets per phase (Bonawitz et al.'s
``U1 ⊇ U2 ⊇ U3 ⊇ U4 ⊇ U5``): what must be removed from the sum depends on
*when* a node dropped.

* dropped before sharing keys (in ``U1`` only): nobody masked with it —
  nothing to remove;
* dropped after sharing keys but before sending its masked input (in ``U2``,
  not ``U3``): its surviving neighbours added pairwise masks with it, so its
  mask private key is rebuilt from ``t`` shares and those masks re-derived and
  cancelled;
* sent its masked input (in ``U3``), whether or not it is still there during
  unmasking: its input is in the sum, so its self-mask seed is rebuilt from
  ``t`` shares and its self mask subtracted.

Every reconstruction is checked (a self-mask seed against the commitment the
node signed, a mask key against the public key it advertised); a failing
share set is retried with other shares when there are spare ones. If any
secret cannot be rebuilt the round raises :class:`~.errors.SecAggAborted`
(``BELOW_THRESHOLD`` or ``RECONSTRUCTION_FAILED``) and returns no sum at all.

Messages that fail a check (signature, context, duplicates, late) raise
:class:`~.errors.MessageRejected`; the round continues with that node counted
as dropped.

Message flow (coordinator side)::

    setup_messages()                       -> {index: SecAggSetup}
    receive_advertisement(SecAggAdvertiseKeys)          (until deadline)
    key_directories()                      -> {index: SecAggKeyDirectory}
    receive_share_keys(SecAggShareKeys)
    share_deliveries()                     -> {index: SecAggShareDelivery}
    receive_masked_input(SecAggMaskedInput[, vector])
    survivor_messages()                    -> {index: SecAggSurvivors}
    receive_consistency_signature(SecAggConsistencySignature)
    unmask_requests()                      -> {index: SecAggUnmaskRequest}
    receive_unmask_response(SecAggUnmaskResponse)
    finish()                               -> AggregateResult  (or SecAggAborted)

Each ``key_directories`` / ``share_deliveries`` / ... call closes a phase: the
coordinator calls it when all expected messages arrived or the phase deadline
passed; later messages of the closed phase are rejected (the node has
dropped). A server is used from one thread at a time.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from wharf.proto import secagg_pb2 as pb

from . import shamir
from .canonical import Field, Phase, context_hash, transcript
from .client import self_mask_commitment, share_keys_body, unmask_body
from .encoding import VectorLayout
from .errors import AbortReason, MessageRejected, SecAggAborted
from .graph import derive_graph, new_graph_seed
from .keys import (
    PUBLIC_KEY_BYTES,
    Party,
    mask_key_from_secret,
    mask_public_from_secret,
    pairwise_mask_key,
    self_mask_key,
)
from .mask import sum_into
from .parallel import apply_masks_parallel
from .params import SecAggParams
from .wire import COORDINATOR, check_header, make_header, params_to_proto, roster_to_proto

Verify = Callable[[str, bytes, bytes], bool]

MAX_RECONSTRUCTION_ATTEMPTS = 256
"""Share subsets tried per secret when the first reconstruction fails its check."""


def _subsets(xs: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """Distinct ``t``-subsets of ``xs``, leaving out ever more holders (0, then 1, 2 ...).

    With one lying holder among ``m`` shares the honest subset is found within
    ``m + 1`` attempts, whichever holder lied.
    """
    tried: set[tuple[int, ...]] = set()
    for r in range(len(xs) - t + 1):
        for excluded in itertools.combinations(xs, r):
            subset = tuple(x for x in xs if x not in excluded)[:t]
            if subset in tried:
                continue
            tried.add(subset)
            yield subset
            if len(tried) >= MAX_RECONSTRUCTION_ATTEMPTS:
                return


class ServerState(Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked sum over ``contributors`` (U3) and who dropped when."""

    summed: NDArray[np.uint32]
    contributors: tuple[int, ...]
    dropped_before_sharing: tuple[int, ...]
    dropped_before_input: tuple[int, ...]
    silent_in_unmask: tuple[int, ...]
    """Contributors whose input is in the sum but who did not answer the unmask request."""

    def decode(self, layout: VectorLayout) -> dict[str, NDArray[np.float64] | NDArray[np.int64]]:
        """Per-segment sums (see :meth:`VectorLayout.decode`)."""
        return layout.decode(self.summed, len(self.contributors))


class SecAggServer:
    """Runs one round for ``roster`` (``roster[i - 1]`` is the name of node ``i``).

    ``certificates`` (PEM, one per roster entry) are relayed to the nodes so
    they can verify each other's signatures; ``verify(name, data, signature)``
    checks a node's signature with its certified key.
    """

    def __init__(
        self,
        *,
        job_id: str,
        round_number: int,
        params: SecAggParams,
        roster: Sequence[str],
        num_values: int,
        verify: Verify,
        graph_seed: bytes | None = None,
        certificates: Sequence[bytes] = (),
        threads: int | None = None,
    ) -> None:
        if len(roster) != params.num_nodes or len(set(roster)) != len(roster):
            raise ValueError("roster must list num_nodes distinct node names")
        if certificates and (len(certificates) != len(roster) or not all(certificates)):
            raise ValueError("give one certificate per roster entry, or none")
        params.check_rules(require_malicious=params.malicious)
        if num_values < 1:
            raise ValueError("num_values must be positive")
        self.job_id = job_id
        self.round_number = round_number
        self.params = params
        self.roster = tuple(roster)
        self.certificates = tuple(certificates)
        self.num_values = num_values
        self.threads = threads
        self._verify = verify
        self.graph_seed = new_graph_seed() if graph_seed is None else graph_seed
        self.graph = derive_graph(self.graph_seed, params.num_nodes, params.degree)
        self.context = context_hash(
            job_id=job_id,
            round_number=round_number,
            params=params,
            roster=self.roster,
            graph_seed=self.graph_seed,
            num_values=num_values,
            certificates=self.certificates,
        )
        self.state = ServerState.ADVERTISE
        self._adverts: dict[int, pb.SecAggAdvertiseKeys] = {}
        self._shares: dict[int, pb.SecAggShareKeys] = {}
        self._delivered: dict[int, frozenset[int]] = {}
        self._sum = np.zeros(num_values, dtype=np.uint32)
        self._u3: set[int] = set()
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._requests: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._revealed: dict[int, pb.SecAggUnmaskResponse] = {}

    # ----------------------------------------------------------------- helpers

    def header(self, phase: Phase) -> pb.SecAggHeader:
        return make_header(
            phase,
            job_id=self.job_id,
            round_number=self.round_number,
            sender=COORDINATOR,
            context=self.context,
        )

    def _abort(self, reason: AbortReason, detail: str) -> SecAggAborted:
        self.state = ServerState.ABORTED
        self._sum = np.zeros(0, dtype=np.uint32)
        return SecAggAborted(reason, f"round {self.round_number} of job {self.job_id}: {detail}")

    def _expect(self, state: ServerState, what: str) -> None:
        if self.state is not state:
            raise MessageRejected(
                AbortReason.OUT_OF_ORDER, f"{what} arrived in phase {self.state.value}"
            )

    @contextmanager
    def _rejecting(self) -> Iterator[None]:
        try:
            yield
        except SecAggAborted as exc:
            raise MessageRejected(exc.reason, exc.detail) from None

    def _check_node_message(self, header: pb.SecAggHeader, phase: Phase, what: str) -> int:
        with self._rejecting():
            check_header(
                header,
                phase=phase,
                job_id=self.job_id,
                round_number=self.round_number,
                context=self.context,
                what=what,
            )
        sender = int(header.sender)
        if not 1 <= sender <= len(self.roster):
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"{what} from unknown node {sender}")
        return sender

    def _verified(self, phase: Phase, sender: int, body: Sequence[Field], signature: bytes) -> bool:
        data = transcript(
            phase,
            job_id=self.job_id,
            round_number=self.round_number,
            sender=sender,
            context=self.context,
            body=body,
        )
        try:
            return bool(self._verify(self.roster[sender - 1], data, signature))
        except Exception:
            return False

    def _require_signature(
        self, phase: Phase, sender: int, body: Sequence[Field], signature: bytes, what: str
    ) -> None:
        if not self._verified(phase, sender, body, signature):
            raise MessageRejected(
                AbortReason.BAD_SIGNATURE, f"{what} of node {sender}: signature does not verify"
            )

    def _party(self, index: int) -> Party:
        return Party(index, self.roster[index - 1])

    @property
    def threshold(self) -> int:
        return self.params.threshold

    def _holders(self, owner: int, among: set[int]) -> set[int]:
        """Nodes in ``among`` that hold a share of ``owner``'s secrets."""
        out = {i for i in among if owner in self._delivered.get(i, frozenset())}
        if owner in among and owner in self._delivered:
            out.add(owner)
        return out

    def _partners(self, dropped: int) -> set[int]:
        """Survivors (U3) that added a pairwise mask with ``dropped``."""
        return {j for j in self._u3 if dropped in self._delivered.get(j, frozenset())}

    def _needed(self, among: set[int]) -> list[str]:
        """Why unmasking would fail if only the nodes in ``among`` answered (empty: it won't)."""
        problems = []
        t = self.threshold
        for j in sorted(self._u3):
            have = len(self._holders(j, among))
            if have < t:
                problems.append(f"self-mask seed of node {j}: {have} holders < t={t}")
        for d in sorted(set(self._delivered) - self._u3):
            if self._partners(d):
                have = len(self._holders(d, among) - {d})
                if have < t:
                    problems.append(f"mask key of dropped node {d}: {have} holders < t={t}")
        return problems

    # --------------------------------------------------------------- phase 1-2

    def setup_messages(self) -> dict[int, pb.SecAggSetup]:
        """The setup message for every node in the roster."""
        params = params_to_proto(self.params)
        roster = roster_to_proto(self.roster, self.certificates)
        return {
            i: pb.SecAggSetup(
                header=self.header(Phase.SETUP),
                params=params,
                roster=roster,
                graph_seed=self.graph_seed,
                neighbours=sorted(self.graph.neighbours(i)),
                num_values=self.num_values,
            )
            for i in range(1, len(self.roster) + 1)
        }

    def receive_advertisement(self, msg: pb.SecAggAdvertiseKeys) -> None:
        self._expect(ServerState.ADVERTISE, "key advertisement")
        i = self._check_node_message(msg.header, Phase.ADVERTISE_KEYS, "key advertisement")
        if i in self._adverts:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} advertised twice")
        keys = [msg.encryption_public_key, msg.mask_public_key]
        if any(len(k) != PUBLIC_KEY_BYTES for k in keys):
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i}: bad public key size")
        self._require_signature(Phase.ADVERTISE_KEYS, i, keys, msg.signature, "advertisement")
        self._adverts[i] = msg

    def key_directories(self) -> dict[int, pb.SecAggKeyDirectory]:
        """Close phase 2 (``U1`` fixed): each advertiser gets its neighbours' advertisements."""
        self._expect(ServerState.ADVERTISE, "closing advertise phase")
        u1 = set(self._adverts)
        if len(u1) < self.threshold:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"{len(u1)} nodes advertised keys, threshold is {self.threshold}",
            )
        self.state = ServerState.SHARE_KEYS
        return {
            i: pb.SecAggKeyDirectory(
                header=self.header(Phase.ADVERTISE_KEYS),
                advertisements=[self._adverts[j] for j in sorted(self.graph.neighbours(i) & u1)],
            )
            for i in sorted(u1)
        }

    # ----------------------------------------------------------------- phase 3

    def receive_share_keys(self, msg: pb.SecAggShareKeys) -> None:
        self._expect(ServerState.SHARE_KEYS, "share keys")
        i = self._check_node_message(msg.header, Phase.SHARE_KEYS, "share keys")
        if i not in self._adverts:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} did not advertise keys")
        if i in self._shares:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} shared keys twice")
        allowed = self.graph.neighbours(i) & set(self._adverts)
        receivers = [s.receiver for s in msg.shares]
        if len(set(receivers)) != len(receivers) or not set(receivers) <= allowed:
            raise MessageRejected(
                AbortReason.BAD_MESSAGE, f"node {i} addressed shares outside its neighbourhood"
            )
        if any(s.sender != i for s in msg.shares) or len(msg.self_mask_commitment) != 32:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i}: malformed share message")
        body = share_keys_body(msg.self_mask_commitment, msg.shares)
        self._require_signature(Phase.SHARE_KEYS, i, body, msg.signature, "share keys")
        self._shares[i] = msg

    def share_deliveries(self) -> dict[int, pb.SecAggShareDelivery]:
        """Close phase 3 (``U2`` fixed): each sharer gets the ciphertexts addressed to it."""
        self._expect(ServerState.SHARE_KEYS, "closing share-keys phase")
        u2 = set(self._shares)
        if len(u2) < self.threshold:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"{len(u2)} nodes shared keys, threshold is {self.threshold}",
            )
        inbox: dict[int, list[pb.SecAggEncryptedShare]] = {i: [] for i in u2}
        for i in sorted(u2):
            for s in self._shares[i].shares:
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        self._delivered = {i: frozenset(s.sender for s in inbox[i]) for i in u2}
        self.state = ServerState.MASKED_INPUT
        return {
            i: pb.SecAggShareDelivery(header=self.header(Phase.SHARE_KEYS), shares=inbox[i])
            for i in sorted(u2)
        }

    # ----------------------------------------------------------------- phase 4

    def receive_masked_input(
        self, msg: pb.SecAggMaskedInput, vector: NDArray[np.uint32] | None = None
    ) -> None:
        """Check and add one node's masked vector to the running sum.

        ``vector`` carries the values when they came out of band (chunked
        blob); otherwise they are read from ``msg.masked_vector``. Either way
        the SHA-256 the node signed must match.
        """
        self._expect(ServerState.MASKED_INPUT, "masked input")
        i = self._check_node_message(msg.header, Phase.MASKED_INPUT, "masked input")
        if i not in self._delivered:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} did not share keys")
        if i in self._u3:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} sent two masked inputs")
        if msg.num_values != self.num_values:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} sent {msg.num_values} values")
        body: list[Field] = [msg.num_values, msg.vector_sha256]
        self._require_signature(Phase.MASKED_INPUT, i, body, msg.signature, "masked input")
        if vector is None:
            if len(msg.masked_vector) != 4 * self.num_values:
                raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i}: wrong vector size")
            vec = np.frombuffer(msg.masked_vector, dtype="<u4")
        else:
            vec = np.ascontiguousarray(vector, dtype="<u4")
            if vec.shape != (self.num_values,):
                raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i}: wrong vector shape")
        if hashlib.sha256(vec.data).digest() != msg.vector_sha256:
            raise MessageRejected(
                AbortReason.BAD_MESSAGE, f"node {i}: vector does not match its signed digest"
            )
        sum_into(self._sum, vec.view(np.uint32))
        self._u3.add(i)

    def survivor_messages(self) -> dict[int, pb.SecAggSurvivors]:
        """Close phase 4 (``U3`` fixed): announce the survivor set to every survivor."""
        self._expect(ServerState.MASKED_INPUT, "closing masked-input phase")
        if len(self._u3) < self.threshold:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"{len(self._u3)} masked inputs, threshold is {self.threshold}",
            )
        problems = self._needed(set(self._u3))
        if problems:
            raise self._abort(AbortReason.BELOW_THRESHOLD, "; ".join(problems))
        self._survivors = tuple(sorted(self._u3))
        self.state = ServerState.CONSISTENCY
        return {
            i: pb.SecAggSurvivors(header=self.header(Phase.MASKED_INPUT), survivors=self._survivors)
            for i in self._survivors
        }

    # ----------------------------------------------------------------- phase 5

    def receive_consistency_signature(self, msg: pb.SecAggConsistencySignature) -> None:
        self._expect(ServerState.CONSISTENCY, "consistency signature")
        i = self._check_node_message(msg.header, Phase.CONSISTENCY_CHECK, "consistency signature")
        if i not in self._u3:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} is not a survivor")
        if i in self._signatures:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} signed twice")
        if tuple(msg.survivors) != self._survivors:
            raise MessageRejected(
                AbortReason.INCONSISTENT_SURVIVORS, f"node {i} signed another survivor set"
            )
        body: list[Field] = [self._survivors]
        self._require_signature(Phase.CONSISTENCY_CHECK, i, body, msg.signature, "signature")
        self._signatures[i] = msg.signature

    def unmask_requests(self) -> dict[int, pb.SecAggUnmaskRequest]:
        """Close phase 5 (``U4`` fixed): ask each signer for the shares it must reveal."""
        self._expect(ServerState.CONSISTENCY, "closing consistency phase")
        u4 = set(self._signatures)
        problems = self._needed(u4)
        if len(u4) < self.threshold:
            problems.insert(0, f"{len(u4)} consistency signatures < t={self.threshold}")
        if problems:
            raise self._abort(AbortReason.BELOW_THRESHOLD, "; ".join(problems))
        dropped = {d for d in set(self._delivered) - self._u3 if self._partners(d)}
        out = {}
        for i in sorted(u4):
            held = self._delivered[i] | {i}
            closed = self.graph.closed_neighbourhood(i)
            self_owners = frozenset(held & self._u3)
            key_owners = frozenset(held & dropped)
            self._requests[i] = (self_owners, key_owners)
            out[i] = pb.SecAggUnmaskRequest(
                header=self.header(Phase.CONSISTENCY_CHECK),
                survivors=self._survivors,
                signatures=[
                    pb.SecAggSurvivorSignature(signer=j, signature=self._signatures[j])
                    for j in sorted(u4 & closed)
                ],
                self_mask_share_owners=sorted(self_owners),
                mask_key_share_owners=sorted(key_owners),
            )
        self.state = ServerState.UNMASK
        return out

    # ----------------------------------------------------------------- phase 6

    def receive_unmask_response(self, msg: pb.SecAggUnmaskResponse) -> None:
        self._expect(ServerState.UNMASK, "unmask response")
        i = self._check_node_message(msg.header, Phase.UNMASK, "unmask response")
        if i not in self._requests:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} was not asked to unmask")
        if i in self._revealed:
            raise MessageRejected(AbortReason.BAD_MESSAGE, f"node {i} answered twice")
        self_owners, key_owners = self._requests[i]
        got_self = {s.owner for s in msg.shares if s.kind == pb.SECAGG_SHARE_KIND_SELF_MASK_SEED}
        got_key = {s.owner for s in msg.shares if s.kind == pb.SECAGG_SHARE_KIND_MASK_KEY}
        if (
            got_self != self_owners
            or got_key != key_owners
            or len(msg.shares) != len(self_owners) + len(key_owners)
            or any(len(s.share) != shamir.SHARE_BYTES for s in msg.shares)
        ):
            raise MessageRejected(
                AbortReason.BAD_MESSAGE, f"node {i} did not reveal exactly what was asked"
            )
        body = unmask_body(msg.shares)
        self._require_signature(Phase.UNMASK, i, body, msg.signature, "unmask response")
        self._revealed[i] = msg

    def _collect(self, kind: int) -> dict[int, dict[int, bytes]]:
        by_owner: dict[int, dict[int, bytes]] = {}
        for holder, resp in self._revealed.items():
            for s in resp.shares:
                if s.kind == kind:
                    by_owner.setdefault(s.owner, {})[holder] = s.share
        return by_owner

    def _reconstruct(
        self, owner: int, shares: dict[int, bytes], check: Callable[[bytes], bool], what: str
    ) -> bytes:
        t = self.threshold
        if len(shares) < t:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"{what} of node {owner}: {len(shares)} shares revealed, threshold {t}",
            )
        for subset in _subsets(sorted(shares), t):
            try:
                secret = shamir.reconstruct({x: shares[x] for x in subset}, t)
            except shamir.ShamirError:
                continue
            if check(secret):
                return secret
        raise self._abort(
            AbortReason.RECONSTRUCTION_FAILED,
            f"{what} of node {owner}: revealed shares do not rebuild the committed secret",
        )

    def finish(self) -> AggregateResult:
        """Close phase 6: rebuild the needed secrets, remove all masks, return the exact sum."""
        self._expect(ServerState.UNMASK, "finishing the round")
        answered = set(self._revealed)
        problems = self._needed(answered)
        if problems:
            raise self._abort(AbortReason.BELOW_THRESHOLD, "; ".join(problems))
        self_shares = self._collect(pb.SECAGG_SHARE_KIND_SELF_MASK_SEED)
        key_shares = self._collect(pb.SECAGG_SHARE_KIND_MASK_KEY)
        add_keys: list[bytes] = []
        sub_keys: list[bytes] = []
        for j in sorted(self._u3):
            commitment = self._shares[j].self_mask_commitment

            def seed_ok(seed: bytes, j: int = j, commitment: bytes = commitment) -> bool:
                return self_mask_commitment(self.context, j, seed) == commitment

            seed = self._reconstruct(j, self_shares.get(j, {}), seed_ok, "self-mask seed")
            sub_keys.append(
                self_mask_key(
                    seed, job_id=self.job_id, round_number=self.round_number, owner=self._party(j)
                )
            )
        dropped_before_input = sorted(set(self._delivered) - self._u3)
        for d in dropped_before_input:
            partners = self._partners(d)
            if not partners:
                continue
            mask_pk = self._adverts[d].mask_public_key

            def key_ok(secret: bytes, mask_pk: bytes = mask_pk) -> bool:
                return mask_public_from_secret(secret) == mask_pk

            secret = self._reconstruct(d, key_shares.get(d, {}), key_ok, "mask key")
            private = mask_key_from_secret(secret)
            for j in sorted(partners):
                key = pairwise_mask_key(
                    private,
                    self._adverts[j].mask_public_key,
                    job_id=self.job_id,
                    round_number=self.round_number,
                    me=self._party(d),
                    peer=self._party(j),
                )
                # Survivor j added +PRG if j < d and -PRG if j > d: undo it.
                (sub_keys if j < d else add_keys).append(key)
        total = self._sum
        apply_masks_parallel(total, add_keys, sub_keys, threads=self.threads)  # helper if large
        self._sum = np.zeros(0, dtype=np.uint32)
        self.state = ServerState.DONE
        return AggregateResult(
            summed=total,
            contributors=self._survivors,
            dropped_before_sharing=tuple(sorted(set(self._adverts) - set(self._shares))),
            dropped_before_input=tuple(dropped_before_input),
            silent_in_unmask=tuple(sorted(self._u3 - answered)),
        )
