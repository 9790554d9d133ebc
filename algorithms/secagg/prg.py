"""AES-128-CTR as the pseudo-random generator for masks and public derivations.

Why AES-CTR: with AES-NI it is the fastest PRG ``cryptography`` offers (about
8 GB/s on one core here), it is a standard PRF (NIST SP 800-38A) and its
counter mode gives random access: the keystream at byte offset ``o`` is
simply AES-CTR started at counter block ``o // 16``, which lets two threads
mask the two halves of a vector independently and still produce exactly the
stream a single thread would.

Every key is 16 bytes derived with HKDF-SHA256 (RFC 5869) from a full-entropy
32-byte secret plus a context string, so no two (secret, purpose, job, round)
combinations ever share a keystream. The counter block starts at zero for
offset zero; reuse is impossible because keys are never reused.

Nothing here uses a NumPy random generator: NumPy's generators are not
cryptographic and (as in Flower's ``pseudo_rand_gen``) are typically seeded
with 32 bits.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

AES_BLOCK_BYTES = 16
PRG_KEY_BYTES = 16
WORD_DTYPE = np.dtype("<u4")
"""Mask words are little-endian uint32 on every platform."""

_HKDF_SALT = b"wharf-secagg-prg-salt-v1"


def hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) with the protocol's fixed salt."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info).derive(secret)


def derive_prg_key(secret: bytes, info: bytes) -> bytes:
    """The 16-byte AES-128 key that expands ``secret`` for the purpose named by ``info``."""
    if len(secret) < 16:
        raise ValueError("a PRG secret needs at least 128 bits of entropy")
    return hkdf(secret, b"wharf/secagg/prg-key|" + info, PRG_KEY_BYTES)


class KeyStream:
    """An AES-128-CTR keystream positioned at a byte offset (a multiple of 16).

    One ``Cipher`` encryptor lives for the whole walk over a vector; each call
    to :meth:`fill` writes the next ``len(out)`` keystream bytes into a caller
    buffer by encrypting zeros with ``update_into`` (no allocation; the GIL is
    released inside OpenSSL).
    """

    __slots__ = ("_enc",)

    def __init__(self, key: bytes, start_byte: int = 0) -> None:
        if len(key) != PRG_KEY_BYTES:
            raise ValueError("AES-128-CTR keys are 16 bytes")
        if start_byte < 0 or start_byte % AES_BLOCK_BYTES:
            raise ValueError("keystream offsets must be non-negative multiples of 16 bytes")
        counter = (start_byte // AES_BLOCK_BYTES).to_bytes(AES_BLOCK_BYTES, "big")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()

    def fill(self, zeros: memoryview, out: memoryview) -> None:
        """Write ``len(zeros)`` keystream bytes into ``out`` (``out`` at least as long)."""
        self._enc.update_into(zeros, out)


def keystream_words(key: bytes, count: int, start_word: int = 0) -> NDArray[np.uint32]:
    """``count`` keystream words from word offset ``start_word`` (reference, allocates)."""
    if start_word % 4:
        raise ValueError("start_word must be a multiple of 4 (one AES block)")
    nbytes = 4 * count
    buf = bytearray(nbytes)
    KeyStream(key, 4 * start_word).fill(memoryview(bytes(nbytes)), memoryview(buf))
    return np.frombuffer(buf, dtype=WORD_DTYPE).astype(np.uint32)


class DeterministicRandom:
    """A public, reproducible random source: uniform integers from a seed.

    Used where everyone must derive the *same* randomness and be able to check
    it (the neighbour graph from the coordinator's public seed). Never used for
    secrets. The draw procedure is fixed and documented so any implementation
    can reproduce it: read the AES-CTR keystream of
    ``derive_prg_key(seed, label)`` as consecutive little-endian uint64 words;
    ``randbelow(m)`` takes the next word ``w``, rejects it while
    ``w >= 2**64 - (2**64 % m)`` and returns ``w % m``. :meth:`shuffle` is the
    Durstenfeld Fisher–Yates shuffle on ``randbelow`` (vectorised, with the
    same output).
    """

    _BATCH_WORDS = 1024

    def __init__(self, seed: bytes, label: bytes) -> None:
        self._key = derive_prg_key(seed, b"public-random|" + label)
        self._index = 0  # words consumed
        self._buf_start = 0
        self._buf: list[int] = []

    def _words(self, start: int, count: int) -> NDArray[np.uint64]:
        """Keystream words ``[start, start + count)`` (random access via the counter)."""
        first = start - start % 2  # keystream offsets are whole 16-byte blocks
        nbytes = 8 * (count + start - first)
        buf = bytearray(nbytes)
        KeyStream(self._key, 8 * first).fill(memoryview(bytes(nbytes)), memoryview(buf))
        return np.frombuffer(buf, dtype="<u8")[start - first :]

    def _next_word(self) -> int:
        pos = self._index - self._buf_start
        if not 0 <= pos < len(self._buf):
            self._buf_start = self._index
            self._buf = self._words(self._index, self._BATCH_WORDS).tolist()
            pos = 0
        self._index += 1
        return self._buf[pos]

    def randbelow(self, m: int) -> int:
        """A uniform integer in ``[0, m)`` (``1 <= m <= 2**64``)."""
        if not 1 <= m <= 1 << 64:
            raise ValueError("randbelow needs 1 <= m <= 2**64")
        limit = (1 << 64) - ((1 << 64) % m)
        while True:
            word = self._next_word()
            if word < limit:
                return word % m

    def shuffle(self, items: list[int]) -> None:
        """Fisher–Yates shuffle in place (from the last index down), as ``randbelow`` defines."""
        n = len(items)
        if n < 2:
            return
        words = self._words(self._index, n - 1)
        bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
        rem = (np.uint64(0xFFFFFFFFFFFFFFFF) % bounds + np.uint64(1)) % bounds  # 2**64 % m
        accepted = (rem == 0) | (words < (np.uint64(0) - rem))
        if not bool(accepted.all()):  # pragma: no cover - probability below n**2 / 2**64
            for i in range(n - 1, 0, -1):
                j = self.randbelow(i + 1)
                items[i], items[j] = items[j], items[i]
            return
        self._index += n - 1
        for i, j in zip(range(n - 1, 0, -1), (words % bounds).tolist(), strict=True):
            items[i], items[j] = items[j], items[i]
