"""The fused, chunked masking kernel (client masking and server unmasking).

Why fused and chunked: a naive implementation materialises every mask as a
full-length array and adds arrays pairwise (Flower: one int64 array per mask,
then ``+``/``-``/``%``), so each of the ``k + 1`` masks costs a DRAM write and
two DRAM reads. Here the output vector is walked in cache-sized chunks
(default 128 KiB); for each chunk the values are encoded in place, then every
key's AES-CTR keystream for that chunk is written into *one* preallocated
buffer and added to / subtracted from the chunk in place. Mask material never
leaves the cache, no per-chunk allocation happens (one ``Cipher`` encryptor
per key fed zeros via ``update_into``), and ``uint32`` arithmetic wraps for
free, which is exactly the ring Z_2^32.

Large vectors may be split between threads: AES-CTR has random access (the
keystream at word ``w`` starts at counter block ``w // 4``), OpenSSL and NumPy
release the GIL, and each thread owns its encryptors and buffers, so the
result is bit-identical to the single-threaded one. Threads gain little,
though: every one of the some twenty short calls per chunk retakes the GIL.
The client and the coordinator therefore use :mod:`.parallel`, which splits
large vectors with a helper *process* (no shared GIL) through
:func:`mask_range`, and fall back to this module's kernel otherwise.

The same kernel unmasks at the coordinator: start from the sum of masked
vectors and subtract the survivors' self masks and the dropped nodes'
pairwise masks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from .prg import PRG_KEY_BYTES, KeyStream

DEFAULT_CHUNK_WORDS = 32768
"""128 KiB of uint32 per chunk for one thread: the keystream buffer and the output chunk
stay in L2 (an AMD EPYC with 512 KiB L2 per core here). The two-process path of
:mod:`.parallel` uses its own, larger ``CHUNK_WORDS`` instead: with scratch buffers reused
(see :func:`_scratch`) per-call overhead outweighs L2 locality when both cores work."""

THREADED_CHUNK_WORDS = 131072
"""Chunk when two threads share the work: each chunk costs some twenty calls that
must retake the GIL, so fewer, larger chunks let the threads overlap better (the
benchmark suite measured 32 Ki-word chunks to gain little from a second thread)."""

THREAD_MIN_WORDS = 1 << 19
"""Below about half a million values a second thread did not pay for itself here."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _scratch(chunk_words: int) -> tuple[memoryview, NDArray[np.uint32], memoryview]:
    """This thread's keystream buffer (as bytes and words) and zeros, reused across calls.

    Fresh 128 KiB buffers cost a page fault per 4 KiB on every call; a thread runs one
    :func:`mask_range` at a time, so one set per thread and chunk size is enough (a few
    sizes at most: the one-thread and the threaded chunk).
    """
    cache: dict[int, tuple[memoryview, NDArray[np.uint32], memoryview]] | None
    cache = getattr(_local, "scratch", None)
    if cache is None or len(cache) > 4:
        cache = _local.scratch = {}
    found = cache.get(chunk_words)
    if found is None:
        raw = bytearray(4 * chunk_words)
        found = cache[chunk_words] = (
            memoryview(raw),
            np.frombuffer(raw, dtype=np.uint32),
            memoryview(bytes(4 * chunk_words)),
        )
    return found


def _executor() -> ThreadPoolExecutor:
    """A small persistent pool (creating threads per call costs ~0.1 ms)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="secagg-mask")
        return _pool


class ChunkWriter(Protocol):
    """Writes the next ``len(out)`` plain values (e.g. an :class:`EncodingCursor`)."""

    def fill(self, out: NDArray[np.uint32]) -> None: ...


class ChunkSource(Protocol):
    """Something that can start writing plain values at any multiple-of-4 offset."""

    def cursor(self, start: int) -> ChunkWriter: ...


def default_threads(num_words: int) -> int:
    """Threads the kernel uses when not told: 2 for large vectors on multi-core CPUs."""
    cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 and num_words >= THREAD_MIN_WORDS else 1


def _split(num_words: int, parts: int, chunk_words: int) -> list[tuple[int, int]]:
    """Split ``[0, num_words)`` into ``parts`` ranges on chunk boundaries."""
    chunks = -(-num_words // chunk_words)
    per = -(-chunks // parts)
    bounds = []
    for p in range(parts):
        lo = min(p * per * chunk_words, num_words)
        hi = min((p + 1) * per * chunk_words, num_words)
        if lo < hi:
            bounds.append((lo, hi))
    return bounds


def mask_range(
    out: NDArray[np.uint32],
    lo: int,
    hi: int,
    add_keys: Sequence[bytes],
    sub_keys: Sequence[bytes],
    source: ChunkSource | None = None,
    chunk_words: int = DEFAULT_CHUNK_WORDS,
    *,
    offset: int = 0,
) -> None:
    """Mask values ``[lo, hi)`` of the vector, one thread, no argument checks (the building block).

    ``out[i]`` holds value ``offset + i``: a caller that owns only a slice of
    the vector (a thread, or the helper process of :mod:`.parallel` working in
    shared memory) passes that slice and its first index. ``lo`` is a multiple
    of 4 (one AES block): every keystream and the encoding cursor start there.
    """
    adders = [KeyStream(k, 4 * lo) for k in add_keys]
    subbers = [KeyStream(k, 4 * lo) for k in sub_keys]
    writer = source.cursor(lo) if source is not None else None
    raw_view, words, zeros = _scratch(chunk_words)
    add, sub = np.add, np.subtract
    for start in range(lo, hi, chunk_words):
        stop = min(start + chunk_words, hi)
        m = stop - start
        chunk = out[start - offset : stop - offset]
        if writer is not None:
            writer.fill(chunk)
        z = zeros[: 4 * m] if m != chunk_words else zeros
        w = words[:m] if m != chunk_words else words
        for stream in adders:
            stream.fill(z, raw_view)
            add(chunk, w, out=chunk)
        for stream in subbers:
            stream.fill(z, raw_view)
            sub(chunk, w, out=chunk)


def check_mask_arguments(
    out: NDArray[np.uint32], add_keys: Sequence[bytes], sub_keys: Sequence[bytes]
) -> None:
    """Refuse what :func:`apply_masks` refuses (shared with :mod:`.parallel`)."""
    if out.dtype != np.uint32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous 1-D uint32 array")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    for key in (*add_keys, *sub_keys):
        if len(key) != PRG_KEY_BYTES:
            raise ValueError("mask keys are 16-byte AES-128 keys")


def apply_masks(
    out: NDArray[np.uint32],
    add_keys: Sequence[bytes] = (),
    sub_keys: Sequence[bytes] = (),
    *,
    source: ChunkSource | None = None,
    chunk_words: int | None = None,
    threads: int | None = None,
) -> NDArray[np.uint32]:
    """In place: ``out = [encode(source)] + sum PRG(add_keys) - sum PRG(sub_keys)`` mod 2^32.

    ``out`` is a contiguous 1-D ``uint32`` array. If ``source`` is given its
    values overwrite ``out`` chunk by chunk before the masks are applied
    (fused encode-and-mask); otherwise the masks are applied to the current
    contents of ``out`` (unmasking). Every key is a 16-byte AES-128 key whose
    keystream, read as little-endian ``uint32`` words, is its mask.

    ``threads`` defaults to :func:`default_threads`; ``chunk_words`` to
    :data:`DEFAULT_CHUNK_WORDS` (one thread) or :data:`THREADED_CHUNK_WORDS`.
    The result does not depend on either.
    """
    check_mask_arguments(out, add_keys, sub_keys)
    n = out.shape[0]
    nthreads = default_threads(n) if threads is None else max(1, threads)
    if chunk_words is None:
        chunk_words = DEFAULT_CHUNK_WORDS if nthreads == 1 else THREADED_CHUNK_WORDS
    if chunk_words <= 0 or chunk_words % 4:
        raise ValueError("chunk_words must be a positive multiple of 4")
    if n == 0:
        return out
    ranges = _split(n, nthreads, chunk_words)
    if len(ranges) == 1:
        mask_range(out, 0, n, add_keys, sub_keys, source, chunk_words)
        return out
    pool = _executor()
    futures = [
        pool.submit(mask_range, out, lo, hi, add_keys, sub_keys, source, chunk_words)
        for lo, hi in ranges[1:]
    ]
    lo, hi = ranges[0]
    mask_range(out, lo, hi, add_keys, sub_keys, source, chunk_words)  # this thread works too
    for fut in futures:
        fut.result()
    return out


def sum_into(total: NDArray[np.uint32], vector: NDArray[np.uint32]) -> None:
    """``total += vector`` in Z_2^32, in place (the coordinator's running sum)."""
    if vector.shape != total.shape:
        raise ValueError(f"vector has shape {vector.shape}, expected {total.shape}")
    np.add(total, vector, out=total)
