"""Masking on two cores: the fused kernel split with one persistent helper process.

Why a process and not a thread: OpenSSL releases the GIL inside
``update_into``, but the fused kernel (:mod:`.mask`) makes some twenty short
calls per chunk — encoding ufuncs, one keystream and one add per key — and a
second *thread* must retake the GIL for every one of them, so two threads
gain little (the benchmark suite measured it). A second *process* has its own
interpreter and shares no GIL: quantise + self mask + 8 pairwise masks then
runs at the rate of the AES keystream, not below it.

How it works:

* **One helper per Python process**, started with the ``spawn`` start method
  (a fresh interpreter: it inherits none of the parent's memory — other
  rounds' keys, gRPC threads — and starting it is safe from a process that
  already runs threads), the first time a large vector is masked, and reused
  for the life of the process (:func:`default_helper`). Its start-up message
  from ``multiprocessing`` names the entry function and carries the pipe, and
  nothing else. It exits when the parent closes the pipe
  (:meth:`MaskHelper.close`, at interpreter exit, or when the parent dies).
* **Data in shared memory** (:mod:`multiprocessing.shared_memory`): one
  segment holds the helper's part of the output and of the input. Its name is
  unlinked as soon as the helper has mapped it and *before* anything is
  written, so the clear update never has a name in ``/dev/shm`` or on disk;
  only the two processes map it. The helper zeroes the input part after every
  call.
* **Control over a pipe**: per call the parent sends the mask keys, the
  rounding key, the range ``[mid, n)`` and where each input slice lies in the
  segment (offset, dtype, scale, bound) as fixed binary records
  (:mod:`struct`) — *first*, so the helper wakes up while the parent copies
  its input into the segment in growing blocks, each announced by a progress
  message; the helper starts on the first block. It reports finished output
  blocks the same way (the parent copies them back while it waits) and ends
  with a status and its clock readings. No object serialisation is used by
  this protocol in either direction, and a pipe read or write is a system
  call, so each announced block is visible to the other process.
  **Secrets (the 16-byte mask and rounding keys) cross only this pipe, to our
  own child process**, and are never written anywhere else.
* **The split**: the parent masks ``[0, mid)`` in place while the helper masks
  ``[mid, n)``; ``mid`` moves after every call so that both sides finish
  together (from each side's measured speed, the helper's start-up delay and
  the parent's copying), so a busy core gets less work. On a 4096-value grid.
* **Scratch memory is reused** (:mod:`.mask` and :mod:`.encoding` keep one
  set of chunk buffers per thread; the helper keeps its segment): fresh
  buffers would cost a page fault per 4 KiB on every call.
* **Bit-identical** to :func:`.mask.apply_masks`: AES-CTR has random access
  (the keystream at word ``w`` starts at counter block ``w // 4``) and the
  encoding draws one rounding word per value at the value's own offset, so
  neither the split point nor the chunking changes a single bit
  (``tests/test_secagg_parallel.py``).
* **Fallback**: vectors below :data:`PARALLEL_MIN_WORDS`, a machine with one
  usable CPU, an explicit ``threads=`` request, ``WHARF_SECAGG_HELPER=0``, a
  helper that is still starting, busy with another call, or failed to start,
  no room in ``/dev/shm`` (a container's default is 64 MiB) — all run the
  in-process kernel. A helper that dies or misbehaves during a
  call is discarded and its range is masked in process, so a call never fails
  because of the helper.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import signal
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from .encoding import EncodingCursor, EncodingSource, Segment, _Piece
from .mask import (
    ChunkSource,
    apply_masks,
    check_mask_arguments,
    mask_range,
)
from .prg import PRG_KEY_BYTES

PARALLEL_MIN_WORDS = 1 << 18
"""Below about a quarter of a million values the pipe round trip and the copies
cost more than the second core saves (measured: benchmarks/results)."""

CHUNK_WORDS = 1 << 18
"""Chunk of both sides (256 Ki values, 1 MiB): with scratch buffers reused, per-call
overhead outweighs L2 locality here. Measured on this machine (two processes, masking
with quantisation, fraction of the AES limit at 10^6 / 10^7 values): 32 Ki 70 / 65 %,
64 Ki 67 / 80 %, 128 Ki 62–67 / 74–79 %, 256 Ki 73–81 / 74–80 %."""

SPLIT_ALIGN = 4096
"""The split point is a multiple of this many values (a multiple of 4: one AES block)."""

STAGE_FIRST_WORDS = CHUNK_WORDS
"""The first block of the helper's input staged before it can start (one chunk); blocks
then double up to :data:`STAGE_MAX_WORDS`, so the helper starts at once and the pipe
carries only a few dozen progress messages even at 10^7 values."""

STAGE_MAX_WORDS = 1 << 20

REPORT_WORDS = 1 << 16
"""The helper reports finished output every this many values: a parent done with its own
part copies those blocks back while it waits (copying them *between* its own chunks was
measured slower: it evicts the chunk working set) and knows how far the helper has got."""

STEAL_WORDS = CHUNK_WORDS
"""Values the parent takes back per steal from the end of a helper that has fallen behind
(a busy core, a late start); it steals while the helper has twice that left."""

START_TIMEOUT_S = 60.0
"""How long a starting helper may take to say it is ready."""

REPLY_TIMEOUT_S = 120.0
"""How long the parent waits for the helper's answer before discarding it."""

ENV_SWITCH = "WHARF_SECAGG_HELPER"
"""Set to ``0`` to never start a helper process (in-process kernel only)."""

_log = logging.getLogger(__name__)

# Parent -> helper: b"A" + segment name (map it) | b"Q" (exit) |
#                   b"J" + job, then b"P" + position ... (input staged up to position; the
#                   last one is the end of the helper's range), then b"S" + position ...
#                   (stop before position: the parent masks from there on itself).
# Helper -> parent: b"R" (ready) | b"A" (mapped) | b"O" + position (output final up to
#                   position) ... then exactly one of b"D" + times (done) |
#                   b"E" + message (the input was refused: ValueError) |
#                   b"X" + message (helper fault); then b"C" (input zeroed, idle).
_JOB = struct.Struct("<QQQIHH?16sI")
"""lo, hi, input-region end, chunk words, #add keys, #sub keys, has source, rounding key,
#pieces."""
_PIECE = struct.Struct("<QQQdq?cH")
"""start, count, segment offset, scale, bound, exact, dtype code, name length (then name)."""
_POS = struct.Struct("<Q")
_DONE = struct.Struct("<dddQ")
"""Helper's clock (``perf_counter``, system-wide monotonic): job received, done; the
seconds it spent waiting for staged input; where it stopped (the end of its output)."""
_DTYPES: dict[bytes, np.dtype[Any]] = {
    b"f": np.dtype(np.float32),
    b"d": np.dtype(np.float64),
    b"q": np.dtype(np.int64),
}
_CODES: dict[np.dtype[Any], bytes] = {dt: code for code, dt in _DTYPES.items()}
_ALIGN_BYTES = 64


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def _aligned(x: int) -> int:
    return -(-x // _ALIGN_BYTES) * _ALIGN_BYTES


def _room_for(nbytes: int) -> bool:
    """Whether ``/dev/shm`` (where POSIX shared memory lives on Linux) has ``nbytes`` free."""
    try:
        st = os.statvfs("/dev/shm")  # noqa: S108 - only reads free space, creates nothing
    except OSError:
        return True  # not Linux-like: let creating the segment decide
    return st.f_bavail * st.f_frsize >= nbytes + (16 << 20)


def _buffer(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # closed
        raise RuntimeError("shared segment is closed")
    return buf


# ------------------------------------------------------------------ the helper


class _ShippedSource:
    """The helper's view of an :class:`EncodingSource`: the pieces of its range only.

    :class:`EncodingCursor` reads nothing but ``pieces`` and ``rounding_key``.
    """

    def __init__(self, pieces: tuple[_Piece, ...], rounding_key: bytes) -> None:
        self.pieces = pieces
        self.rounding_key = rounding_key

    def cursor(self, start: int) -> EncodingCursor:
        return EncodingCursor(cast(EncodingSource, self), start)


class _Stopped(Exception):
    """The parent took over the rest of the helper's range from ``pos`` on."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class _Pipeline:
    """The helper's side of one job's progress messages.

    Before each chunk: take in the parent's messages (staging progress, stop
    positions), stop if the parent has taken over from here, report the output
    finished so far (every :data:`REPORT_WORDS` values), and wait until the
    chunk's input is staged. A pipe read or write is a system call, hence a
    full memory barrier: the staged bytes are visible once announced.
    """

    def __init__(self, conn: Connection, lo: int, hi: int) -> None:
        self.conn, self.hi = conn, hi
        self.staged = lo
        self.reported = lo
        self.stop = hi
        self.waited = 0.0

    def _take(self, msg: bytes) -> None:
        if len(msg) != 1 + _POS.size or msg[:1] not in (b"P", b"S"):
            raise RuntimeError("expected a staging or stop message")
        (pos,) = _POS.unpack_from(msg, 1)
        if msg[:1] == b"P":
            self.staged = pos
        else:
            self.stop = min(self.stop, pos)

    def poll(self) -> None:
        while self.conn.poll(0):
            self._take(self.conn.recv_bytes())

    def wait_input(self, upto: int) -> None:
        if self.staged >= upto:
            return
        t0 = time.perf_counter()
        while self.staged < upto:
            self._take(self.conn.recv_bytes())
        self.waited += time.perf_counter() - t0

    def report(self, done: int) -> None:
        if done - self.reported >= REPORT_WORDS:
            self.conn.send_bytes(b"O" + _POS.pack(done))
            self.reported = done

    def drain(self) -> None:
        """Read the staging messages still due, whatever happened to the job."""
        self.wait_input(self.hi)


class _PipelinedSource:
    """Wraps the helper's source (or none, when unmasking) with :class:`_Pipeline` steps."""

    def __init__(self, pipeline: _Pipeline, inner: _ShippedSource | None) -> None:
        self.pipeline, self.inner = pipeline, inner

    def cursor(self, start: int) -> _PipelinedCursor:
        return _PipelinedCursor(self, start)


class _PipelinedCursor:
    def __init__(self, source: _PipelinedSource, start: int) -> None:
        self.pipeline = source.pipeline
        self.inner = source.inner.cursor(start) if source.inner is not None else None
        self.pos = start

    def fill(self, out: NDArray[np.uint32]) -> None:
        pipeline, pos = self.pipeline, self.pos
        pipeline.poll()
        if pos >= pipeline.stop:
            raise _Stopped(pos)  # before touching this chunk: the parent masks it
        pipeline.report(pos)  # every value before pos is final
        end = pos + out.shape[0]
        pipeline.wait_input(end)
        if self.inner is not None:
            self.inner.fill(out)  # encode; without a source the staged values stay
        self.pos = end


def _input_region(msg: bytes, size: int) -> tuple[int, int]:
    """Byte range of the clear input a job put in the segment (to zero after the job)."""
    lo, hi, in_end = struct.unpack_from("<QQQ", msg, 1)
    start = _aligned(4 * max(hi - lo, 0))
    return min(start, size), min(in_end, size)


def _run_job(conn: Connection, buf: memoryview, msg: bytes) -> tuple[float, float, int]:
    """Mask the helper's range as ``msg`` describes.

    Returns the finish time, the seconds spent waiting for staged input, and where the
    output ends (the range's end, or where the parent took over).
    """
    lo, hi, in_end, chunk_words, n_add, n_sub, has_source, rkey, n_pieces = _JOB.unpack_from(msg, 1)
    pipeline = _Pipeline(conn, lo, hi)
    try:
        pos = 1 + _JOB.size
        n_keys = n_add + n_sub
        keys = [msg[pos + PRG_KEY_BYTES * i : pos + PRG_KEY_BYTES * (i + 1)] for i in range(n_keys)]
        pos += PRG_KEY_BYTES * n_keys
        m = hi - lo
        in_start = _aligned(4 * m)
        if lo % 4 or hi < lo or 4 * m > len(buf) or in_end > len(buf) or chunk_words % 4:
            raise RuntimeError("malformed job")
        pieces: list[_Piece] = []
        for _ in range(n_pieces):
            start, count, off, scale, bound, exact, code, name_len = _PIECE.unpack_from(msg, pos)
            pos += _PIECE.size
            name = msg[pos : pos + name_len].decode("utf-8")
            pos += name_len
            dtype = _DTYPES[code]
            if off < in_start or off + count * dtype.itemsize > in_end:
                raise RuntimeError("piece outside the input region")
            view = np.frombuffer(buf, dtype=dtype, count=count, offset=off)
            pieces.append(_Piece(start, view, Segment(name, count, scale, bound, exact)))
        inner = _ShippedSource(tuple(pieces), rkey) if has_source else None
        source = _PipelinedSource(pipeline, inner)
        out = np.frombuffer(buf, dtype=np.uint32, count=m)
        end = hi
        try:
            mask_range(out, lo, hi, keys[:n_add], keys[n_add:], source, chunk_words, offset=lo)
        except _Stopped as stopped:
            end = stopped.pos
        return time.perf_counter(), pipeline.waited, end
    finally:
        pipeline.drain()


def _helper_main(conn: Connection) -> None:
    """The helper process: map the segment it is sent, mask the ranges it is asked to."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    shm: SharedMemory | None = None
    try:
        conn.send_bytes(b"R")
        while True:
            msg = conn.recv_bytes()
            kind = msg[:1]
            if kind == b"Q":
                break
            if kind == b"S":  # a stop that arrived after the job had ended: nothing to do
                continue
            if kind == b"A":
                new = SharedMemory(name=msg[1:].decode("ascii"))
                if shm is not None:
                    shm.close()
                shm = new
                conn.send_bytes(b"A")
                continue
            if kind != b"J" or shm is None or len(msg) < 1 + _JOB.size:
                raise RuntimeError("unexpected message")  # out of step: exit, be replaced
            received = time.perf_counter()
            in_start, in_end = _input_region(msg, shm.size)
            try:
                done, waited, end = _run_job(conn, _buffer(shm), msg)
                reply = b"D" + _DONE.pack(received, done, waited, end)
            except ValueError as exc:  # refused input (NaN): the parent raises it
                reply = b"E" + str(exc).encode("utf-8")
            except (EOFError, OSError):
                raise
            except Exception as exc:
                reply = b"X" + f"{type(exc).__name__}: {exc}".encode()[:500]
            try:
                conn.send_bytes(reply)
            finally:
                if in_end > in_start:  # the clear input must not linger
                    np.frombuffer(_buffer(shm), np.uint8, in_end - in_start, in_start).fill(0)
            conn.send_bytes(b"C")
    except (EOFError, OSError):
        pass  # the parent closed the pipe or is gone: nothing left to do
    finally:
        if shm is not None:
            shm.close()
        conn.close()


# ------------------------------------------------------------------ the parent


@dataclass
class _Planned:
    """One input slice to copy into the segment for the helper."""

    src: NDArray[Any]
    start: int
    offset: int
    dtype: np.dtype[Any]
    segment: Segment


class HelperFailed(RuntimeError):
    """The helper process did not answer as it should (it is discarded)."""


class _Collector:
    """The parent's side of one job's answers: copies reported output, keeps the final one.

    :meth:`finish` waits for the final answer (``D``, ``E`` or ``X``), copying the
    output blocks the helper reports finished meanwhile.
    """

    def __init__(
        self, conn: Connection, shared: NDArray[np.uint32], out: NDArray[np.uint32], mid: int
    ) -> None:
        self.conn, self.shared, self.out, self.mid = conn, shared, out, mid
        self.copied = mid
        self.helper_pos = mid
        self.limit = out.shape[0]  # the parent masks [limit, n) itself
        self.copy_s = 0.0
        self.copying = True
        self.final: bytes | None = None

    def _take(self, msg: bytes) -> None:
        if msg[:1] != b"O" or len(msg) != 1 + _POS.size:
            self.final = msg
            return
        (pos,) = _POS.unpack_from(msg, 1)
        self.helper_pos = max(self.helper_pos, pos)
        self.copy_to(pos)

    def copy_to(self, pos: int) -> None:
        """Copy the helper's output back up to ``pos`` (never past what the parent masks)."""
        pos = min(pos, self.limit, self.out.shape[0])
        if self.copying and self.copied < pos:
            t0 = time.perf_counter()
            self.out[self.copied : pos] = self.shared[self.copied - self.mid : pos - self.mid]
            self.copy_s += time.perf_counter() - t0
            self.copied = pos

    def poll(self) -> None:
        """Take in whatever the helper has sent, without waiting."""
        try:
            while self.final is None and self.conn.poll(0):
                self._take(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self.final = b"X" + f"pipe closed: {exc!r}".encode()

    def finish(self, timeout: float) -> bytes:
        while self.final is None:
            try:
                if not self.conn.poll(timeout):
                    raise HelperFailed(f"no answer within {timeout:.0f} s")
                self._take(self.conn.recv_bytes())
            except (EOFError, OSError, HelperFailed) as exc:
                self.final = b"X" + str(exc).encode()
        return self.final


class MaskHelper:
    """A persistent helper process that masks part of each large vector (see module doc).

    Use :func:`default_helper` (one per process, started on demand) rather than
    creating one per call: starting a process costs about half a second.
    Thread-safe: one call at a time uses the helper; a concurrent call is told
    to run in process (:meth:`apply` returns ``False``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._shm: SharedMemory | None = None
        self._pid = 0
        self._failed = False
        self._closed = False
        self._starting = False
        self._dirty = False  # a job's "input zeroed" answer is still to be read
        self.share = 0.5
        """Fraction of each vector given to the helper (adapts to measured speeds)."""
        self.calls = 0
        """Vectors masked with the helper's help (for tests and benchmarks)."""
        self.last_timings: dict[str, float] = {}
        """Where the last call's time went (seconds): staging the helper's input and the job,
        the parent's own part, then the tail (taking blocks back from a lagging helper,
        waiting, copying its output back — of which copying); the helper's compute time and
        start-up delay; how many values the parent took back."""

    # -------------------------------------------------------------- lifecycle

    @property
    def alive(self) -> bool:
        """Started in this process, not failed, not closed."""
        return (
            self._conn is not None
            and not self._failed
            and not self._closed
            and self._pid == os.getpid()
        )

    def start(self) -> bool:
        """Start the helper process and wait until it is ready; ``True`` if it runs."""
        with self._lock:
            try:
                return self._start_locked()
            finally:
                self._starting = False

    def start_in_background(self) -> None:
        """Start the helper on a daemon thread (callers meanwhile mask in process)."""
        with self._lock:
            if self._starting or self._conn is not None or self._failed or self._closed:
                return
            self._starting = True
        threading.Thread(target=self.start, name="secagg-helper-start", daemon=True).start()

    def _start_locked(self) -> bool:
        if self.alive:
            return True
        if self._failed or self._closed:
            return False
        proc = None
        try:
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_helper_main, args=(child,), name="wharf-secagg-helper", daemon=True
            )
            proc.start()
            child.close()
            if not parent.poll(START_TIMEOUT_S) or parent.recv_bytes() != b"R":
                raise HelperFailed("the helper did not report ready")
        except Exception as exc:
            _log.warning(
                "secure-aggregation helper process unavailable (%s); masking in process", exc
            )
            self._failed = True
            if proc is not None and proc.is_alive():
                proc.kill()
            return False
        self._proc, self._conn, self._pid = proc, parent, os.getpid()
        return True

    def close(self) -> None:
        """Stop the helper (idempotent). Later calls mask in process."""
        got = self._lock.acquire(timeout=10)
        try:
            self._closed = True
            self._shutdown(graceful=True)
        finally:
            if got:
                self._lock.release()

    def _shutdown(self, *, graceful: bool) -> None:
        conn, proc, shm = self._conn, self._proc, self._shm
        self._conn = self._proc = self._shm = None
        self._dirty = False
        if conn is not None and self._pid == os.getpid():
            if graceful:
                try:
                    conn.send_bytes(b"Q")
                except OSError:
                    pass
            conn.close()
        if proc is not None and self._pid == os.getpid():
            proc.join(timeout=5 if graceful else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if shm is not None:
            try:
                shm.close()
            except BufferError:  # a view is still referenced somewhere; the OS frees it at exit
                pass

    def _fail(self, why: str) -> None:
        _log.warning("secure-aggregation helper process discarded (%s); masking in process", why)
        self._failed = True
        self._shutdown(graceful=False)

    def __enter__(self) -> MaskHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- pipe

    def _recv(self, timeout: float) -> bytes:
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(timeout):
                raise HelperFailed(f"no answer within {timeout:.0f} s")
            return conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise HelperFailed(f"pipe closed: {exc!r}") from None

    def _await_idle(self) -> None:
        """Read the previous job's "input zeroed" answer before writing new input."""
        if self._dirty:
            if self._recv(REPLY_TIMEOUT_S) != b"C":
                raise HelperFailed("unexpected answer while waiting for the helper to finish")
            self._dirty = False

    def _ensure_capacity(self, size: int) -> SharedMemory | None:
        """The segment, grown to ``size`` bytes if needed; ``None`` if there is no room.

        The new segment's pages are reserved at once (``posix_fallocate``): a full
        ``/dev/shm`` (64 MiB by default in containers) must show up here as "no room",
        not later as a ``SIGBUS`` while writing the vector.
        """
        shm = self._shm
        if shm is not None and shm.size >= size:
            return shm
        grown = max(size, int(1.5 * shm.size) if shm is not None else 0)
        grown = -(-grown // (1 << 20)) * (1 << 20)
        if not _room_for(grown):
            grown = -(-size // (1 << 20)) * (1 << 20)
            if not _room_for(grown):
                return None
        new = SharedMemory(create=True, size=grown)
        try:
            fd = getattr(new, "_fd", -1)
            if fd >= 0 and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, grown)
        except OSError:
            new.close()
            new.unlink()
            return None
        try:
            assert self._conn is not None
            self._conn.send_bytes(b"A" + new.name.encode("ascii"))
            if self._recv(START_TIMEOUT_S) != b"A":
                raise HelperFailed("the helper did not map the shared segment")
        finally:
            new.unlink()  # nameless from here on: nothing is written to it before this
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass
        self._shm = new
        return new

    # ------------------------------------------------------------------ work

    def _split(self, n: int) -> int:
        """First value of the helper's range: a multiple of SPLIT_ALIGN in (0, n)."""
        mid = round(n * (1.0 - self.share) / SPLIT_ALIGN) * SPLIT_ALIGN
        return min(max(mid, SPLIT_ALIGN), (n - 1) // SPLIT_ALIGN * SPLIT_ALIGN)

    def _plan(self, source: EncodingSource, mid: int, n: int) -> tuple[list[_Planned], int]:
        """Input slices of ``[mid, n)`` and their places in the segment (after the output)."""
        offset = _aligned(4 * (n - mid))
        plan = []
        for piece in source.pieces:
            a, b = max(piece.start, mid), min(piece.start + piece.data.size, n)
            if a >= b:
                continue
            src = piece.data[a - piece.start : b - piece.start]
            dtype = src.dtype
            if piece.segment.exact:
                dtype = np.dtype(np.int64)  # exact pieces are int64 already (EncodingSource)
            elif dtype not in _CODES:
                # float16, longdouble, non-native byte order: the kernel computes in
                # float64 anyway, so converting here changes no bit of the result.
                dtype = np.dtype(np.float64)
            plan.append(_Planned(src, a, offset, dtype, piece.segment))
            offset = _aligned(offset + (b - a) * dtype.itemsize)
        return plan, offset

    def apply(
        self,
        out: NDArray[np.uint32],
        add_keys: Sequence[bytes] = (),
        sub_keys: Sequence[bytes] = (),
        *,
        source: ChunkSource | None = None,
        chunk_words: int = CHUNK_WORDS,
    ) -> bool:
        """Like :func:`.mask.apply_masks`, with the helper masking part of ``out``.

        Returns ``False`` without touching ``out`` when the helper cannot take
        the call (not running, busy, vector too short to split, or a source
        that is not an :class:`EncodingSource`); the caller then runs the
        in-process kernel. Arguments are assumed checked
        (:func:`.mask.check_mask_arguments`). Raises ``ValueError`` exactly
        when the in-process kernel would (e.g. NaN in a real segment).
        """
        n = out.shape[0]
        if source is not None and not isinstance(source, EncodingSource):
            return False
        enc: EncodingSource | None = source
        if n < 2 * SPLIT_ALIGN:
            return False
        if chunk_words <= 0 or chunk_words % 4:
            raise ValueError("chunk_words must be a positive multiple of 4")
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if not self.alive:
                return False
            try:
                self._await_idle()
                mid = self._split(n)
                plan, in_end = self._plan(enc, mid, n) if enc is not None else ([], 0)
                shm = self._ensure_capacity(max(in_end, 4 * (n - mid)))
            except (HelperFailed, OSError) as exc:
                self._fail(str(exc))
                return False
            if shm is None:  # no room in shared memory for this vector: mask in process
                return False
            self._run(shm, out, mid, add_keys, sub_keys, enc, chunk_words, plan, in_end)
            self.calls += 1
            return True
        finally:
            self._lock.release()

    def _job(
        self,
        mid: int,
        n: int,
        in_end: int,
        chunk_words: int,
        add_keys: Sequence[bytes],
        sub_keys: Sequence[bytes],
        source: EncodingSource | None,
        plan: list[_Planned],
    ) -> bytes:
        rkey = source.rounding_key if source is not None else bytes(PRG_KEY_BYTES)
        job = bytearray(b"J")
        job += _JOB.pack(
            mid,
            n,
            in_end,
            chunk_words,
            len(add_keys),
            len(sub_keys),
            source is not None,
            rkey,
            len(plan),
        )
        for key in (*add_keys, *sub_keys):
            job += key
        for p in plan:
            name = p.segment.name.encode("utf-8")
            job += _PIECE.pack(
                p.start,
                p.src.size,
                p.offset,
                p.segment.scale,
                p.segment.bound,
                p.segment.exact,
                _CODES[p.dtype],
                len(name),
            )
            job += name
        return bytes(job)

    def _stage(
        self,
        buf: memoryview,
        shared: NDArray[np.uint32],
        out: NDArray[np.uint32],
        mid: int,
        plan: list[_Planned],
        unmasking: bool,
    ) -> None:
        """Copy the helper's input in growing blocks, announcing each over the pipe."""
        assert self._conn is not None
        n = out.shape[0]
        a, block = mid, STAGE_FIRST_WORDS
        while a < n:
            b = min(a + block, n)
            if unmasking:  # the helper's input is the current contents of out
                shared[a - mid : b - mid] = out[a:b]
            for p in plan:
                lo, hi = max(a, p.start), min(b, p.start + p.src.size)
                if lo < hi:
                    off = p.offset + (lo - p.start) * p.dtype.itemsize
                    view = np.frombuffer(buf, dtype=p.dtype, count=hi - lo, offset=off)
                    np.copyto(view, p.src[lo - p.start : hi - p.start], casting="unsafe")
                    del view
            self._conn.send_bytes(b"P" + _POS.pack(b))
            a, block = b, min(2 * block, STAGE_MAX_WORDS)

    def _run(
        self,
        shm: SharedMemory,
        out: NDArray[np.uint32],
        mid: int,
        add_keys: Sequence[bytes],
        sub_keys: Sequence[bytes],
        source: EncodingSource | None,
        chunk_words: int,
        plan: list[_Planned],
        in_end: int,
    ) -> None:
        n = out.shape[0]
        m = n - mid
        buf = _buffer(shm)
        shared = np.frombuffer(buf, dtype=np.uint32, count=m)
        try:
            job = self._job(mid, n, in_end, chunk_words, add_keys, sub_keys, source, plan)
            assert self._conn is not None
            t_send = time.perf_counter()
            try:
                self._conn.send_bytes(job)  # first: the helper wakes up while we stage
                self._dirty = True
                self._stage(buf, shared, out, mid, plan, source is None)
            except BaseException as exc:
                start = _aligned(4 * m)
                if in_end > start:  # the clear input must not linger
                    np.frombuffer(buf, np.uint8, in_end - start, start).fill(0)
                self._fail(f"staging failed: {exc!r}")
                if not isinstance(exc, OSError):
                    raise
                mask_range(out, 0, n, add_keys, sub_keys, source, chunk_words)
                return
            t_staged = time.perf_counter()
            mine: ValueError | None = None
            collector = _Collector(self._conn, shared, out, mid)
            end = n  # the parent masks [end, n) itself once it steals
            try:
                try:
                    mask_range(out, 0, mid, add_keys, sub_keys, source, chunk_words)
                    t_own = time.perf_counter()
                    end = self._steal(collector, out, add_keys, sub_keys, source, chunk_words)
                except ValueError as exc:
                    mine = exc
                    collector.copying = False
                    t_own = time.perf_counter()
                t_stolen = time.perf_counter()
                reply = collector.finish(REPLY_TIMEOUT_S)
            except BaseException:
                self._fail("interrupted during a call")
                raise
            kind, body = reply[:1], reply[1:]
            if kind == b"D" and len(body) == _DONE.size:
                received, done, waited, h_end = _DONE.unpack(body)
                if mine is None:
                    collector.copy_to(h_end)
                    if h_end < end:  # cannot happen (the helper stops only at or past a stop)
                        mask_range(out, h_end, end, add_keys, sub_keys, source, chunk_words)
                    t_end = time.perf_counter()
                    copy_s = collector.copy_s
                    self._adapt(
                        n,
                        mid,
                        max(h_end, mid + 1) - mid,
                        t_staged - t_send,
                        t_own - t_staged,
                        copy_s,
                        done - received - waited,
                        received - t_send + waited,  # when its compute could end
                    )
                    self.last_timings = {
                        "stage_s": t_staged - t_send,
                        "parent_s": t_own - t_staged,
                        "tail_s": t_end - t_own,
                        "stolen_s": t_stolen - t_own,
                        "copy_out_s": copy_s,
                        "helper_s": done - received - waited,
                        "helper_start_s": received - t_send,
                        "helper_values": m,
                        "stolen_values": n - end,
                        "values": n,
                    }
            elif kind == b"E":
                if mine is None:
                    mine = ValueError(body.decode("utf-8", "replace"))
            else:
                self._fail(body.decode("utf-8", "replace") or "unexpected answer")
                if mine is None:  # finish the helper's range here: the same bits
                    mask_range(out, mid, end, add_keys, sub_keys, source, chunk_words)
            if mine is not None:
                raise mine
        finally:
            del shared, buf

    def _steal(
        self,
        collector: _Collector,
        out: NDArray[np.uint32],
        add_keys: Sequence[bytes],
        sub_keys: Sequence[bytes],
        source: EncodingSource | None,
        chunk_words: int,
    ) -> int:
        """Mask the top of a lagging helper's range here, block by block; returns where
        the parent's part of it starts (``n`` if nothing was taken).

        Each block is announced first (``S`` + position): the helper stops at its first
        chunk at or past it. If it had already gone further, both computed the same
        values — the same bits — so an overlap is harmless and a gap impossible.
        """
        assert self._conn is not None
        n = out.shape[0]
        end = n
        while True:
            collector.poll()
            if collector.final is not None:
                return end
            ahead = collector.helper_pos + REPORT_WORDS  # it may be this far already
            if end - ahead < 2 * STEAL_WORDS:
                return end
            start = (end - STEAL_WORDS) // SPLIT_ALIGN * SPLIT_ALIGN
            try:
                self._conn.send_bytes(b"S" + _POS.pack(start))
            except OSError:
                return end  # the helper is gone; finish() reports it
            collector.limit = start
            mask_range(out, start, end, add_keys, sub_keys, source, chunk_words)
            end = start

    def _adapt(
        self,
        n: int,
        mid: int,
        m: int,
        stage_s: float,
        parent_s: float,
        copy_s: float,
        helper_s: float,
        helper_start_s: float,
    ) -> None:
        """Move the split so that both sides finish together next time.

        Measured on the last call (the parent masked ``mid`` values, the helper
        ``m``): per value, the parent computes in ``a_p`` seconds and stages and
        copies the helper's values in ``c``; the helper computes in ``a_h``
        after a delay ``L`` (start-up and waiting for staged input). Both finish
        together when ``c·m + a_p·(n − m) = L + a_h·m``.
        """
        if mid <= 0 or m <= 0 or parent_s <= 0 or helper_s <= 0:
            return
        a_p, a_h, c = parent_s / mid, helper_s / m, (stage_s + copy_s) / m
        lag = max(0.0, helper_start_s)
        denom = a_p + a_h - c
        if denom <= 0 or not math.isfinite(denom + lag):
            return
        target = (a_p * n - lag) / denom / n
        self.share = min(0.85, max(0.15, 0.5 * self.share + 0.5 * target))


# -------------------------------------------------------- the process's helper

_default: MaskHelper | None = None
_default_lock = threading.Lock()


def default_helper() -> MaskHelper:
    """This process's shared helper (created, not started, on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MaskHelper()
        return _default


def start_helper(wait: bool = True) -> bool:
    """Start this process's helper now (e.g. at daemon start-up); ``True`` if it runs."""
    if not _enabled() or usable_cpus() < 2:
        return False
    helper = default_helper()
    if wait:
        return helper.start()
    helper.start_in_background()
    return helper.alive


def shutdown_helper() -> None:
    """Stop this process's helper, if any (registered to run at interpreter exit)."""
    global _default
    with _default_lock:
        helper, _default = _default, None
    if helper is not None:
        helper.close()


def _forget_after_fork() -> None:
    # A forked child must never talk to its parent's helper; it starts its own if needed.
    global _default
    _default = None


atexit.register(shutdown_helper)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def apply_masks_parallel(
    out: NDArray[np.uint32],
    add_keys: Sequence[bytes] = (),
    sub_keys: Sequence[bytes] = (),
    *,
    source: ChunkSource | None = None,
    threads: int | None = None,
    helper: MaskHelper | None = None,
    min_words: int = PARALLEL_MIN_WORDS,
) -> NDArray[np.uint32]:
    """:func:`.mask.apply_masks` that uses the helper process for large vectors.

    Same contract and bit-identical result. With ``threads=None`` (the
    default) a vector of at least ``min_words`` values on a machine with two or
    more usable CPUs is split with ``helper`` (default: this process's
    :func:`default_helper`, started in the background on first need — that
    first call runs in process). An explicit ``threads`` runs the in-process
    kernel with that many threads, as :func:`.mask.apply_masks` does.
    """
    check_mask_arguments(out, add_keys, sub_keys)
    if threads is None and out.shape[0] >= min_words and _enabled() and usable_cpus() >= 2:
        h = helper if helper is not None else default_helper()
        if h.alive:
            if h.apply(out, add_keys, sub_keys, source=source):
                return out
        elif helper is None:
            h.start_in_background()
    return apply_masks(out, add_keys, sub_keys, source=source, threads=threads)
