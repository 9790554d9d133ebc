"""Measured prototypes of kernel changes proposed to the secagg owner (not used by Wharf).

Status: the two-process masker below was adopted, hardened, as
``wharf.algorithms.secagg.parallel`` (``spawn`` start method,
``multiprocessing.shared_memory`` unlinked before use, binary pipe protocol,
pipelined staging, adaptive split, in-process fallback). The benchmark suite
still runs this prototype beside the production path (``--no-prototypes``
skips it) so the two can be compared on the same inputs.

What the measurements say (see ``benchmarks/README.md`` for the numbers):

* ``cryptography`` releases the GIL inside ``update_into``: two threads each
  generating AES-128-CTR keystream reach about twice the one-core rate
  (section 1, ``aes_1MiB_2threads``). The AES part parallelises.
* The fused kernel, though, makes some twenty short calls per chunk
  (encoding ufuncs, slicing, one ``update_into`` and one add per key), and
  each must take the GIL back. With two threads and 32 Ki-word chunks the
  threads queue for the GIL at every call and ``threads=2`` gains little over
  ``threads=1``; 128 Ki-word chunks (fewer calls per byte) recover part of it.
* Quantisation alone costs about as much as four to five keystreams, so one
  core tops out near 50 % of the one-core AES rate; ≥ 70 % needs the second
  core *without* sharing a GIL, i.e. a second process.

:class:`TwoProcessMasker` is that proposal in its smallest form: a helper
process started once (``forkserver``, so it is safe in a process that already
runs gRPC threads) and kept for the life of the node; one anonymous shared
mapping (``memfd_create``: no file path, so the plain update never has a
name on disk) holding the input and the output; per call the parent sends the
keys and the range ``[mid, n)`` over a pipe and masks ``[0, mid)`` itself.
AES-CTR's random access (keystream at word ``w`` starts at counter block
``w // 4``) and the encoding's per-position rounding stream make the result
bit-identical to the one-process kernel — checked by :func:`is_bit_identical`
in every benchmark run.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wharf.algorithms.secagg import Segment, VectorLayout
from wharf.algorithms.secagg.mask import apply_masks
from wharf.algorithms.secagg.prg import KeyStream

CHUNK_WORDS = 32768


def mask_range(
    out: NDArray[np.uint32],
    lo: int,
    hi: int,
    add_keys: Sequence[bytes],
    sub_keys: Sequence[bytes],
    layout: VectorLayout,
    update: NDArray[np.float32],
    rounding_key: bytes,
    chunk: int = CHUNK_WORDS,
) -> None:
    """Fused encode-and-mask of ``out[lo:hi]``, streams positioned at ``lo`` (public API only)."""
    adders = [KeyStream(k, 4 * lo) for k in add_keys]
    subbers = [KeyStream(k, 4 * lo) for k in sub_keys]
    cursor = layout.source({"update": update}, rounding_key).cursor(lo)
    raw = bytearray(4 * chunk)
    view = memoryview(raw)
    words = np.frombuffer(raw, dtype=np.uint32)
    zeros = memoryview(bytes(4 * chunk))
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        m = stop - start
        part = out[start:stop]
        cursor.fill(part)
        z, w = zeros[: 4 * m], words[:m]
        for stream in adders:
            stream.fill(z, view)
            np.add(part, w, out=part)
        for stream in subbers:
            stream.fill(z, view)
            np.subtract(part, w, out=part)


def _layout(n: int, clip: float, value_bits: int, max_nodes: int) -> VectorLayout:
    return VectorLayout([Segment.real("update", n, clip, value_bits)], max_nodes)


def _helper_main(conn: Connection) -> None:
    """The helper process: map the shared buffer, mask the ranges it is sent."""
    mm: mmap.mmap | None = None
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "map":
            fd = recv_handle(conn)
            if mm is not None:
                mm.close()
            mm = mmap.mmap(fd, msg[1])
            os.close(fd)
            conn.send(True)
            continue
        _, n, lo, hi, add, sub, rkey, clip, bits, nmax = msg
        assert mm is not None
        update = np.frombuffer(mm, dtype=np.float32, count=n)
        out = np.frombuffer(mm, dtype=np.uint32, count=n, offset=4 * n)
        mask_range(out, lo, hi, add, sub, _layout(n, clip, bits, nmax), update, rkey)
        del update, out
        conn.send(True)
    if mm is not None:
        mm.close()


class TwoProcessMasker:
    """Quantise-and-mask split between this process and one persistent helper process."""

    def __init__(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "wharf.algorithms.secagg", "benchmarks.prototypes"])
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_helper_main, args=(child,), daemon=True, name="wharf-mask-helper"
        )
        self._proc.start()
        child.close()
        self._mm: mmap.mmap | None = None
        self._capacity = 0

    def _ensure(self, n: int) -> mmap.mmap:
        if self._mm is None or self._capacity < n:
            size = 8 * n  # float32 input then uint32 output
            fd = os.memfd_create("wharf-mask", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            if self._mm is not None:
                self._mm.close()
            self._mm = mmap.mmap(fd, size)
            self._conn.send(("map", size))
            pid = self._proc.pid
            assert pid is not None
            send_handle(self._conn, fd, pid)
            os.close(fd)
            self._conn.recv()
            self._capacity = n
        return self._mm

    def mask(
        self,
        update: NDArray[np.float32],
        add_keys: Sequence[bytes],
        sub_keys: Sequence[bytes],
        rounding_key: bytes,
        clip: float,
        value_bits: int,
        max_nodes: int,
    ) -> NDArray[np.uint32]:
        """Masked encoding of ``update`` (a view into the shared buffer, valid until next call)."""
        n = int(update.size)
        mm = self._ensure(n)
        shared_in = np.frombuffer(mm, dtype=np.float32, count=n)
        out = np.frombuffer(mm, dtype=np.uint32, count=n, offset=4 * n)
        mid = ((n // 2) // CHUNK_WORDS) * CHUNK_WORDS
        shared_in[mid:] = update.reshape(-1)[mid:]
        self._conn.send(
            (
                "mask",
                n,
                mid,
                n,
                list(add_keys),
                list(sub_keys),
                rounding_key,
                clip,
                value_bits,
                max_nodes,
            )
        )
        mask_range(
            out,
            0,
            mid,
            add_keys,
            sub_keys,
            _layout(n, clip, value_bits, max_nodes),
            update.reshape(-1),
            rounding_key,
        )
        self._conn.recv()
        return out

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> TwoProcessMasker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_bit_identical(masker: TwoProcessMasker, update: NDArray[np.float32], setup: Any) -> bool:
    """The prototype's output equals Wharf's ``apply_masks`` bit for bit."""
    ref = np.empty(setup.layout.length, dtype=np.uint32)
    apply_masks(
        ref,
        setup.add_keys,
        setup.sub_keys,
        source=setup.layout.source({"update": update}, setup.rounding_key),
    )
    return bool(np.array_equal(prototype_mask(masker, setup, update), ref))


def prototype_mask(
    masker: TwoProcessMasker, setup: Any, update: NDArray[np.float32]
) -> NDArray[np.uint32]:
    """The prototype on a :class:`benchmarks.wharf_paths.MaskingSetup`."""
    return masker.mask(
        update,
        setup.add_keys,
        setup.sub_keys,
        setup.rounding_key,
        setup.params.clip,
        setup.params.value_bits,
        setup.layout.max_nodes,
    )
