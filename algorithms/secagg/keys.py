"""Per-round key material, key agreement and share encryption.

Why two X25519 key pairs per node per round (Bonawitz et al. CCS'17): one
(``c``) only encrypts Shamir shares between neighbours, the other (``s``)
only seeds pairwise masks. When a node drops out its *mask* private key is
reconstructed by the coordinator; if the same key also protected share
traffic, reconstructing it would expose every share that node ever received.
Keys are fresh every round, so a reconstructed key is worthless afterwards.

Key agreement is X25519 (RFC 7748); the raw shared secret is never used
directly but run through HKDF-SHA256 (RFC 5869) whose ``info`` binds the
protocol version, job, round, both node identities in a fixed order and the
purpose (``share-encryption`` vs ``mask-seed``): the same pair of nodes gets
unrelated keys for different purposes, jobs and rounds. An all-zero shared
secret (a small-order public key) is refused.

Shares travel encrypted with AES-256-GCM (NIST SP 800-38D) under a random
96-bit nonce, with sender, receiver, job, round and round context as
associated data, so the coordinator can neither read them nor move a
ciphertext to another pair, round or job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .canonical import encode_fields
from .errors import AbortReason, SecAggAborted
from .params import PROTOCOL_VERSION
from .prg import derive_prg_key, hkdf

PUBLIC_KEY_BYTES = 32
SECRET_BYTES = 32
NONCE_BYTES = 12

PURPOSE_SHARE_ENCRYPTION = b"share-encryption"
PURPOSE_MASK_SEED = b"mask-seed"
PURPOSE_SELF_MASK = b"self-mask"


@dataclass(frozen=True)
class Party:
    """A node as key derivation sees it: roster index and certified name."""

    index: int
    node_id: str


@dataclass
class RoundKeys:
    """A node's secrets for one round (never persisted, never reused)."""

    encryption_key: X25519PrivateKey = field(repr=False)
    mask_key: X25519PrivateKey = field(repr=False)
    self_mask_seed: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> RoundKeys:
        """Fresh key pairs and a fresh 32-byte self-mask seed (``os.urandom``)."""
        return cls(
            X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(SECRET_BYTES)
        )

    @property
    def encryption_public(self) -> bytes:
        return self.encryption_key.public_key().public_bytes_raw()

    @property
    def mask_public(self) -> bytes:
        return self.mask_key.public_key().public_bytes_raw()

    @property
    def mask_secret(self) -> bytes:
        """The 32 raw bytes of the mask private key: the secret that is Shamir-shared."""
        return self.mask_key.private_bytes_raw()


def _pair_info(purpose: bytes, job_id: str, round_number: int, a: Party, b: Party) -> bytes:
    lo, hi = (a, b) if a.index < b.index else (b, a)
    return encode_fields(
        b"wharf/secagg/kdf",
        PROTOCOL_VERSION,
        purpose,
        job_id,
        round_number,
        lo.index,
        lo.node_id,
        hi.index,
        hi.node_id,
    )


def agree(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    job_id: str,
    round_number: int,
    me: Party,
    peer: Party,
    length: int,
) -> bytes:
    """HKDF(X25519(private, peer_public)) bound to purpose, job, round and both parties."""
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise SecAggAborted(AbortReason.BAD_MESSAGE, f"node {peer.index}: bad public key size")
    if me.index == peer.index:
        raise SecAggAborted(AbortReason.BAD_MESSAGE, "key agreement with oneself")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggAborted(
            AbortReason.BAD_MESSAGE, f"node {peer.index}: small-order X25519 public key"
        ) from None
    if shared == bytes(len(shared)):  # pragma: no cover - OpenSSL already refuses
        raise SecAggAborted(AbortReason.BAD_MESSAGE, f"node {peer.index}: zero shared secret")
    return hkdf(shared, _pair_info(purpose, job_id, round_number, me, peer), length)


def share_encryption_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    job_id: str,
    round_number: int,
    me: Party,
    peer: Party,
) -> bytes:
    """The AES-256-GCM key protecting shares between ``me`` and ``peer``."""
    return agree(
        private,
        peer_public,
        purpose=PURPOSE_SHARE_ENCRYPTION,
        job_id=job_id,
        round_number=round_number,
        me=me,
        peer=peer,
        length=32,
    )


def pairwise_mask_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    job_id: str,
    round_number: int,
    me: Party,
    peer: Party,
) -> bytes:
    """The 16-byte AES-128-CTR key of the pairwise mask between ``me`` and ``peer``.

    Symmetric: both ends (and the coordinator, after reconstructing a dropped
    node's mask key) derive the same key.
    """
    seed = agree(
        private,
        peer_public,
        purpose=PURPOSE_MASK_SEED,
        job_id=job_id,
        round_number=round_number,
        me=me,
        peer=peer,
        length=SECRET_BYTES,
    )
    return derive_prg_key(seed, b"pairwise")


def self_mask_key(seed: bytes, *, job_id: str, round_number: int, owner: Party) -> bytes:
    """The 16-byte AES-128-CTR key of ``owner``'s self mask, from its 32-byte seed."""
    if len(seed) != SECRET_BYTES:
        raise ValueError("self-mask seeds are 32 bytes")
    info = encode_fields(
        b"self",
        PROTOCOL_VERSION,
        PURPOSE_SELF_MASK,
        job_id,
        round_number,
        owner.index,
        owner.node_id,
    )
    return derive_prg_key(seed, info)


def mask_public_from_secret(secret: bytes) -> bytes:
    """The X25519 public key of a (reconstructed) mask private key."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def mask_key_from_secret(secret: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(secret)


def _share_ad(
    job_id: str, round_number: int, context_hash: bytes, sender: int, receiver: int
) -> bytes:
    return encode_fields(
        b"wharf/secagg/share",
        PROTOCOL_VERSION,
        job_id,
        round_number,
        context_hash,
        sender,
        receiver,
    )


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    *,
    job_id: str,
    round_number: int,
    context_hash: bytes,
    sender: int,
    receiver: int,
) -> tuple[bytes, bytes]:
    """AES-256-GCM encrypt ``plaintext``; returns ``(nonce, ciphertext_with_tag)``."""
    nonce = os.urandom(NONCE_BYTES)
    ad = _share_ad(job_id, round_number, context_hash, sender, receiver)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(
    key: bytes,
    nonce: bytes,
    ciphertext: bytes,
    *,
    job_id: str,
    round_number: int,
    context_hash: bytes,
    sender: int,
    receiver: int,
) -> bytes:
    """Decrypt and authenticate; raise ``BAD_MESSAGE`` if anything was altered or moved."""
    if len(nonce) != NONCE_BYTES:
        raise SecAggAborted(AbortReason.BAD_MESSAGE, f"share from node {sender}: bad nonce")
    ad = _share_ad(job_id, round_number, context_hash, sender, receiver)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except Exception:
        raise SecAggAborted(
            AbortReason.BAD_MESSAGE,
            f"share from node {sender} failed authentication (altered, replayed or misrouted)",
        ) from None
