"""The node side of one SecAgg+ round: a small state machine.

Why a state machine that refuses rather than a set of helper functions: the
protocol's privacy against a malicious coordinator rests on what an honest
node *refuses* to do, and each refusal needs state:

* every message must belong to this job, round, phase and round context
  (replayed and cross-round messages are refused);
* the degree, threshold and bit width must follow the rules and the graph must
  be the one derived from the public seed;
* neighbours' key advertisements must carry valid signatures by their
  certified keys and distinct keys;
* before revealing anything, at least ``t`` members of the node's closed
  neighbourhood must have signed the *same* survivor set the node saw
  (consistency check);
* a self-mask-seed share is revealed only for a survivor and a mask-key share
  only for a node that dropped after sharing keys — never both for one peer,
  and only once (the node answers one unmask request, then forgets its shares).

Any refusal raises :class:`~.errors.SecAggAborted` and moves the client to
``ABORTED``: it answers nothing more in the round. The signing and verifying
of node identities is injected (``sign``/``verify``), so certificate handling
stays in ``wharf``; the node's certified key signs canonical transcripts
(:func:`~.canonical.transcript`).

Message flow (node side)::

    setup(SecAggSetup)                   -> SecAggAdvertiseKeys
    share_keys(SecAggKeyDirectory)       -> SecAggShareKeys
    receive_shares(SecAggShareDelivery)  -> None      (may overlap training)
    masked_input(inputs, layout)         -> SecAggMaskedInput
    consistency_check(SecAggSurvivors)   -> SecAggConsistencySignature
    unmask(SecAggUnmaskRequest)          -> SecAggUnmaskResponse

A client is used from one thread at a time (the node serialises calls).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wharf.proto import secagg_pb2 as pb

from . import shamir
from .canonical import Field, Phase, context_hash, encode_fields, transcript
from .encoding import VectorLayout
from .errors import AbortReason, SecAggAborted
from .graph import check_neighbours, derive_graph
from .keys import (
    PUBLIC_KEY_BYTES,
    Party,
    RoundKeys,
    decrypt_share,
    encrypt_share,
    pairwise_mask_key,
    self_mask_key,
    share_encryption_key,
)
from .parallel import apply_masks_parallel
from .params import SecAggParams
from .wire import COORDINATOR, check_header, make_header, params_from_proto, roster_from_proto

Sign = Callable[[bytes], bytes]
"""Signs bytes with the node's certified key."""
Verify = Callable[[str, bytes, bytes], bool]
"""``verify(node_id, data, signature)``: True iff ``node_id``'s certified key signed ``data``."""

_SHARE_PLAINTEXT = struct.Struct(">II")
SHARE_PLAINTEXT_BYTES = _SHARE_PLAINTEXT.size + 2 * shamir.SHARE_BYTES


class ClientState(Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"  # shares received; waiting for the local input
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


_PHASE_OF_STATE = {
    ClientState.NEW: Phase.SETUP,
    ClientState.ADVERTISED: Phase.ADVERTISE_KEYS,
    ClientState.SHARED: Phase.SHARE_KEYS,
    ClientState.READY: Phase.MASKED_INPUT,
    ClientState.MASKED: Phase.CONSISTENCY_CHECK,
    ClientState.SIGNED: Phase.UNMASK,
}
"""The phase whose coordinator message a client in each state is waiting for."""


def self_mask_commitment(context: bytes, index: int, seed: bytes) -> bytes:
    """Hiding, binding commitment to a 256-bit self-mask seed (checked after reconstruction)."""
    return hashlib.sha256(
        encode_fields(b"wharf/secagg/self-mask-commitment", context, index, seed)
    ).digest()


def share_keys_body(commitment: bytes, shares: Sequence[pb.SecAggEncryptedShare]) -> list[Field]:
    body: list[Field] = [commitment, len(shares)]
    for s in shares:
        body += [s.receiver, s.nonce, s.ciphertext]
    return body


def unmask_body(shares: Sequence[pb.SecAggRevealedShare]) -> list[Field]:
    body: list[Field] = [len(shares)]
    for s in shares:
        body += [s.owner, int(s.kind), s.share]
    return body


class SecAggClient:
    """One node's participation in one round of secure aggregation."""

    def __init__(
        self,
        *,
        node_id: str,
        job_id: str,
        round_number: int,
        sign: Sign,
        verify: Verify,
        require_malicious: bool = True,
        threads: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.job_id = job_id
        self.round_number = round_number
        self._sign = sign
        self._verify = verify
        self.require_malicious = require_malicious
        self.threads = threads
        self.state = ClientState.NEW
        self.index = 0
        self.params: SecAggParams | None = None
        self.roster: tuple[str, ...] = ()
        self.certificates: dict[str, bytes] = {}
        """Peers' certificates relayed in the setup (name -> PEM); ``verify`` may use them
        but must check each against the deployment CA and its name first."""
        self.neighbours: frozenset[int] = frozenset()
        self.num_values = 0
        self.context = b""
        self.masked_vector: NDArray[np.uint32] | None = None
        self._keys: RoundKeys | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._enc_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self._mask_partners: frozenset[int] = frozenset()
        self._add_keys: list[bytes] = []
        self._sub_keys: list[bytes] = []
        self._survivors: tuple[int, ...] = ()
        self.aborted_in: Phase | None = None

    # ----------------------------------------------------------------- helpers

    def _abort(self, reason: AbortReason, detail: str) -> SecAggAborted:
        self.aborted_in = _PHASE_OF_STATE.get(self.state, Phase.SETUP)
        self.state = ClientState.ABORTED
        self._forget()
        return SecAggAborted(reason, f"node {self.node_id}: {detail}")

    def _forget(self) -> None:
        self._keys = None
        self._enc_keys = {}
        self._held = {}
        self._add_keys = []
        self._sub_keys = []

    def _expect(self, state: ClientState, what: str) -> None:
        if self.state is not state:
            if self.state is ClientState.ABORTED:
                raise SecAggAborted(
                    AbortReason.OUT_OF_ORDER, f"node {self.node_id}: round already aborted"
                )
            raise self._abort(
                AbortReason.OUT_OF_ORDER, f"{what} received in state {self.state.value}"
            )

    def _check(self, header: pb.SecAggHeader, phase: Phase, what: str, **kw: int) -> None:
        try:
            check_header(
                header,
                phase=phase,
                job_id=self.job_id,
                round_number=self.round_number,
                context=self.context or None,
                what=what,
                **kw,
            )
        except SecAggAborted as exc:
            raise self._abort(exc.reason, exc.detail) from None

    def _me(self) -> Party:
        return Party(self.index, self.node_id)

    def _party(self, index: int) -> Party:
        return Party(index, self.roster[index - 1])

    def _header(self, phase: Phase) -> pb.SecAggHeader:
        return make_header(
            phase,
            job_id=self.job_id,
            round_number=self.round_number,
            sender=self.index,
            context=self.context,
        )

    def _signed(self, phase: Phase, body: Sequence[Field]) -> bytes:
        return self._sign(
            transcript(
                phase,
                job_id=self.job_id,
                round_number=self.round_number,
                sender=self.index,
                context=self.context,
                body=body,
            )
        )

    def _verify_from(
        self, phase: Phase, sender: int, body: Sequence[Field], signature: bytes
    ) -> bool:
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

    @property
    def threshold(self) -> int:
        assert self.params is not None
        return self.params.threshold

    # ------------------------------------------------------------------ phases

    def setup(self, msg: pb.SecAggSetup) -> pb.SecAggAdvertiseKeys:
        """Check the round's parameters and graph; answer with signed fresh public keys."""
        self._expect(ClientState.NEW, "setup")
        self._check(msg.header, Phase.SETUP, "setup", sender=COORDINATOR)
        try:
            params = params_from_proto(msg.params)
            roster, certificates = roster_from_proto(msg.roster)
            if params.num_nodes != len(roster):
                raise SecAggAborted(
                    AbortReason.BAD_PARAMETERS,
                    f"num_nodes {params.num_nodes} != roster size {len(roster)}",
                )
            params.check_rules(require_malicious=self.require_malicious)
            if self.node_id not in roster:
                raise SecAggAborted(AbortReason.BAD_PARAMETERS, "this node is not in the roster")
            index = roster.index(self.node_id) + 1
            if len(msg.graph_seed) != 32:
                raise SecAggAborted(AbortReason.BAD_GRAPH, "graph seed must be 32 bytes")
            graph = derive_graph(msg.graph_seed, params.num_nodes, params.degree)
            neighbours = check_neighbours(graph, index, list(msg.neighbours) or None)
            if msg.num_values < 1:
                raise SecAggAborted(AbortReason.BAD_PARAMETERS, "empty vector")
            ctx = context_hash(
                job_id=self.job_id,
                round_number=self.round_number,
                params=params,
                roster=roster,
                graph_seed=msg.graph_seed,
                num_values=msg.num_values,
                certificates=certificates,
            )
            if msg.header.context_hash != ctx:
                raise SecAggAborted(
                    AbortReason.WRONG_CONTEXT, "setup context hash does not match its contents"
                )
        except SecAggAborted as exc:
            raise self._abort(exc.reason, exc.detail) from None
        self.params, self.roster, self.index = params, roster, index
        self.certificates = dict(zip(roster, certificates, strict=False))
        self.neighbours, self.num_values, self.context = neighbours, msg.num_values, ctx
        self._keys = RoundKeys.generate()
        enc_pk, mask_pk = self._keys.encryption_public, self._keys.mask_public
        self.state = ClientState.ADVERTISED
        return pb.SecAggAdvertiseKeys(
            header=self._header(Phase.ADVERTISE_KEYS),
            encryption_public_key=enc_pk,
            mask_public_key=mask_pk,
            signature=self._signed(Phase.ADVERTISE_KEYS, [enc_pk, mask_pk]),
        )

    def share_keys(self, msg: pb.SecAggKeyDirectory) -> pb.SecAggShareKeys:
        """Verify neighbours' keys; Shamir-share both secrets, encrypted to each neighbour."""
        self._expect(ClientState.ADVERTISED, "key directory")
        self._check(msg.header, Phase.ADVERTISE_KEYS, "key directory", sender=COORDINATOR)
        assert self._keys is not None
        mine = (self._keys.encryption_public, self._keys.mask_public)
        peers: dict[int, tuple[bytes, bytes]] = {}
        for ad in msg.advertisements:
            j = ad.header.sender
            self._check(ad.header, Phase.ADVERTISE_KEYS, f"advertisement of node {j}")
            if j == self.index:
                if (ad.encryption_public_key, ad.mask_public_key) != mine:
                    raise self._abort(AbortReason.BAD_MESSAGE, "own advertisement was altered")
                continue
            if j not in self.neighbours:
                raise self._abort(AbortReason.BAD_MESSAGE, f"node {j} is not a neighbour")
            if j in peers:
                raise self._abort(AbortReason.BAD_MESSAGE, f"node {j} advertised twice")
            keys = (ad.encryption_public_key, ad.mask_public_key)
            if any(len(k) != PUBLIC_KEY_BYTES for k in keys):
                raise self._abort(AbortReason.BAD_MESSAGE, f"node {j}: bad public key size")
            if not self._verify_from(Phase.ADVERTISE_KEYS, j, list(keys), ad.signature):
                raise self._abort(
                    AbortReason.BAD_SIGNATURE, f"advertisement of node {j} is not signed by it"
                )
            peers[j] = keys
        all_keys = [k for pair in [mine, *peers.values()] for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise self._abort(AbortReason.BAD_MESSAGE, "advertised public keys are not distinct")
        holders = sorted({*peers, self.index})
        t = self.threshold
        if len(holders) < t:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"only {len(holders)} of {len(self.neighbours) + 1} neighbourhood nodes "
                f"advertised keys (threshold {t})",
            )
        self._peer_keys = peers
        seed = self._keys.self_mask_seed
        b_shares = shamir.split(seed, t, holders)
        sk_shares = shamir.split(self._keys.mask_secret, t, holders)
        self._held = {self.index: (b_shares[self.index], sk_shares[self.index])}
        out = []
        for j in sorted(peers):
            key = share_encryption_key(
                self._keys.encryption_key,
                peers[j][0],
                job_id=self.job_id,
                round_number=self.round_number,
                me=self._me(),
                peer=self._party(j),
            )
            self._enc_keys[j] = key
            plaintext = _SHARE_PLAINTEXT.pack(self.index, j) + b_shares[j] + sk_shares[j]
            nonce, ct = encrypt_share(
                key,
                plaintext,
                job_id=self.job_id,
                round_number=self.round_number,
                context_hash=self.context,
                sender=self.index,
                receiver=j,
            )
            out.append(
                pb.SecAggEncryptedShare(sender=self.index, receiver=j, nonce=nonce, ciphertext=ct)
            )
        commitment = self_mask_commitment(self.context, self.index, seed)
        self.state = ClientState.SHARED
        return pb.SecAggShareKeys(
            header=self._header(Phase.SHARE_KEYS),
            shares=out,
            self_mask_commitment=commitment,
            signature=self._signed(Phase.SHARE_KEYS, share_keys_body(commitment, out)),
        )

    def receive_shares(self, msg: pb.SecAggShareDelivery) -> None:
        """Decrypt the neighbours' shares; derive pairwise mask keys (may overlap training)."""
        self._expect(ClientState.SHARED, "share delivery")
        self._check(msg.header, Phase.SHARE_KEYS, "share delivery", sender=COORDINATOR)
        assert self._keys is not None and self.params is not None
        received: dict[int, tuple[bytes, bytes]] = {}
        for s in msg.shares:
            j = s.sender
            if s.receiver != self.index:
                raise self._abort(AbortReason.BAD_MESSAGE, f"share for node {s.receiver}")
            if j not in self._peer_keys:
                raise self._abort(
                    AbortReason.BAD_MESSAGE, f"share from node {j}, whose keys were not accepted"
                )
            if j in received:
                raise self._abort(AbortReason.BAD_MESSAGE, f"two shares from node {j}")
            try:
                plain = decrypt_share(
                    self._enc_keys[j],
                    s.nonce,
                    s.ciphertext,
                    job_id=self.job_id,
                    round_number=self.round_number,
                    context_hash=self.context,
                    sender=j,
                    receiver=self.index,
                )
            except SecAggAborted as exc:
                raise self._abort(exc.reason, exc.detail) from None
            if len(plain) != SHARE_PLAINTEXT_BYTES:
                raise self._abort(AbortReason.BAD_MESSAGE, f"share from node {j}: bad length")
            owner, holder = _SHARE_PLAINTEXT.unpack_from(plain)
            if (owner, holder) != (j, self.index):
                raise self._abort(AbortReason.BAD_MESSAGE, f"share from node {j}: wrong parties")
            off = _SHARE_PLAINTEXT.size
            received[j] = (
                plain[off : off + shamir.SHARE_BYTES],
                plain[off + shamir.SHARE_BYTES :],
            )
        t = self.params.threshold
        if len(received) + 1 < t:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"only {len(received)} neighbours shared keys (threshold {t} incl. this node)",
            )
        self._held.update(received)
        self._mask_partners = frozenset(received)
        add = [
            self_mask_key(
                self._keys.self_mask_seed,
                job_id=self.job_id,
                round_number=self.round_number,
                owner=self._me(),
            )
        ]
        sub: list[bytes] = []
        for j in sorted(received):
            k = pairwise_mask_key(
                self._keys.mask_key,
                self._peer_keys[j][1],
                job_id=self.job_id,
                round_number=self.round_number,
                me=self._me(),
                peer=self._party(j),
            )
            (add if self.index < j else sub).append(k)
        self._add_keys, self._sub_keys = add, sub
        self.state = ClientState.READY

    def masked_input(
        self,
        inputs: Mapping[str, ArrayLike | Sequence[ArrayLike]],
        layout: VectorLayout,
        *,
        inline: bool = True,
        rounding_key: bytes | None = None,
    ) -> pb.SecAggMaskedInput:
        """Encode ``inputs`` with ``layout`` and mask them (fused kernel); sign the digest.

        With ``inline=False`` the vector is left out of the message; send
        ``self.masked_vector`` (little-endian ``uint32``) as a blob instead.
        """
        self._expect(ClientState.READY, "masked-input request")
        assert self.params is not None
        if layout.length != self.num_values:
            raise self._abort(
                AbortReason.BAD_INPUT,
                f"layout has {layout.length} values, the round expects {self.num_values}",
            )
        if layout.max_nodes < self.params.num_nodes:
            raise self._abort(AbortReason.BAD_INPUT, "layout headroom is for fewer nodes")
        vec = np.empty(self.num_values, dtype=np.uint32)
        try:
            source = layout.source(inputs, rounding_key)
            # Large vectors: this core and the helper process mask halves (bit-identical).
            apply_masks_parallel(
                vec, self._add_keys, self._sub_keys, source=source, threads=self.threads
            )
        except ValueError as exc:
            raise self._abort(AbortReason.BAD_INPUT, str(exc)) from None
        raw = vec.astype("<u4", copy=False).data
        digest = hashlib.sha256(raw).digest()
        self.masked_vector = vec
        self._add_keys, self._sub_keys = [], []
        self.state = ClientState.MASKED
        return pb.SecAggMaskedInput(
            header=self._header(Phase.MASKED_INPUT),
            num_values=self.num_values,
            vector_sha256=digest,
            masked_vector=bytes(raw) if inline else b"",
            signature=self._signed(Phase.MASKED_INPUT, [self.num_values, digest]),
        )

    def consistency_check(self, msg: pb.SecAggSurvivors) -> pb.SecAggConsistencySignature:
        """Sign the survivor set ``U3`` the coordinator announced."""
        self._expect(ClientState.MASKED, "survivor set")
        self._check(msg.header, Phase.MASKED_INPUT, "survivor set", sender=COORDINATOR)
        survivors = tuple(msg.survivors)
        n = len(self.roster)
        if list(survivors) != sorted(set(survivors)) or any(not 1 <= s <= n for s in survivors):
            raise self._abort(AbortReason.BAD_MESSAGE, "survivor set not sorted, unique, in roster")
        if self.index not in survivors:
            raise self._abort(AbortReason.BAD_MESSAGE, "survivor set omits this node")
        t = self.threshold
        mine = len(set(survivors) & (self.neighbours | {self.index}))
        if mine < t:
            raise self._abort(
                AbortReason.BELOW_THRESHOLD,
                f"only {mine} survivors in this node's neighbourhood (threshold {t})",
            )
        self._survivors = survivors
        self.state = ClientState.SIGNED
        return pb.SecAggConsistencySignature(
            header=self._header(Phase.CONSISTENCY_CHECK),
            survivors=survivors,
            signature=self._signed(Phase.CONSISTENCY_CHECK, [survivors]),
        )

    def unmask(self, msg: pb.SecAggUnmaskRequest) -> pb.SecAggUnmaskResponse:
        """Check the consistency signatures and reveal exactly the allowed shares, once."""
        self._expect(ClientState.SIGNED, "unmask request")
        self._check(msg.header, Phase.CONSISTENCY_CHECK, "unmask request", sender=COORDINATOR)
        survivors = tuple(msg.survivors)
        if survivors != self._survivors:
            raise self._abort(
                AbortReason.INCONSISTENT_SURVIVORS,
                "the unmask request names a different survivor set than the one this node signed",
            )
        closed = self.neighbours | {self.index}
        eligible = set(survivors) & closed
        valid = {self.index}  # this node's own signature over exactly this set
        for sig in msg.signatures:
            signer = sig.signer
            if signer in valid or signer not in eligible:
                continue
            if self._verify_from(Phase.CONSISTENCY_CHECK, signer, [survivors], sig.signature):
                valid.add(signer)
        t = self.threshold
        if len(valid) < t:
            raise self._abort(
                AbortReason.INCONSISTENT_SURVIVORS,
                f"only {len(valid)} neighbourhood nodes signed the survivor set this node saw "
                f"(threshold {t}); the coordinator may be showing nodes different sets",
            )
        self_owners = list(msg.self_mask_share_owners)
        key_owners = list(msg.mask_key_share_owners)
        if len(set(self_owners)) != len(self_owners) or len(set(key_owners)) != len(key_owners):
            raise self._abort(AbortReason.BAD_MESSAGE, "unmask request repeats an owner")
        both = sorted(set(self_owners) & set(key_owners))
        if both:
            raise self._abort(
                AbortReason.FORBIDDEN_REVEAL,
                f"asked for both the self-mask share and the mask-key share of node(s) {both}",
            )
        survivor_set = set(survivors)
        for o in self_owners:
            if o not in survivor_set:
                raise self._abort(
                    AbortReason.FORBIDDEN_REVEAL,
                    f"asked for the self-mask share of node {o}, which did not survive",
                )
            if o not in self._held:
                raise self._abort(AbortReason.BAD_MESSAGE, f"holds no share of node {o}")
        for o in key_owners:
            if o in survivor_set or o == self.index:
                raise self._abort(
                    AbortReason.FORBIDDEN_REVEAL,
                    f"asked for the mask-key share of node {o}, which survived",
                )
            if o not in self._held:
                raise self._abort(AbortReason.BAD_MESSAGE, f"holds no share of node {o}")
        revealed = [
            pb.SecAggRevealedShare(
                owner=o, kind=pb.SECAGG_SHARE_KIND_SELF_MASK_SEED, share=self._held[o][0]
            )
            for o in sorted(self_owners)
        ] + [
            pb.SecAggRevealedShare(
                owner=o, kind=pb.SECAGG_SHARE_KIND_MASK_KEY, share=self._held[o][1]
            )
            for o in sorted(key_owners)
        ]
        signature = self._signed(Phase.UNMASK, unmask_body(revealed))
        self._forget()
        self.state = ClientState.DONE
        return pb.SecAggUnmaskResponse(
            header=self._header(Phase.UNMASK), shares=revealed, signature=signature
        )

    def abort_message(self, exc: SecAggAborted) -> pb.SecAggAbort:
        """A message telling the coordinator why this node stopped."""
        return pb.SecAggAbort(
            header=self._header(self.aborted_in or Phase.SETUP),
            reason=exc.reason.value,
            detail=exc.detail,
        )
