"""Centred fixed-point encoding of real vectors into Z_2^32.

Why this encoding:

* **Centred** (values map to signed integers around zero, stored in two's
  complement in ``uint32``): the sum needs no offset correction, and the sum
  of ``N`` inputs is read back by viewing the ``uint32`` sum as ``int32``.
* **Headroom**: a real segment with ``value_bits`` bits (sign included)
  quantises to ``[-B, B]`` with ``B = 2**(value_bits-1)``. With the default
  ``value_bits = 32 - (ceil(log2 N_max) + 1)`` the sum of ``N_max`` inputs
  stays within ``|sum| <= 2**30``: it never wraps. The general rule, checked
  for every segment, is ``N_max * bound <= 2**31 - 1``.
* **Stochastic rounding** (``floor(y + u)``, ``u`` uniform in ``[0, 1)``) is
  unbiased, so quantisation error averages out over nodes and rounds instead
  of accumulating. ``u`` comes from an AES-128-CTR keystream under a fresh
  ``os.urandom`` key, one 32-bit word ``r`` per value at the value's own
  offset (so chunking, threading and the helper process never change the
  result for a given key). It is computed as ``rint(y + v)`` with
  ``v = int32(r) / 2**32``, uniform on the grid ``k / 2**32`` in
  ``[-1/2, 1/2)``: that is ``floor(y + u)`` with ``u = v + 1/2`` except at an
  exact tie (``y + v`` a half-integer, probability at most ``2**-32`` per
  value), which rounds to even — a bias below ``2**-33`` of one step. One
  NumPy pass cheaper than adding the ``1/2``, and ``int32 -> float64``
  converts faster than ``uint32 -> float64``. The rounding bits are secret:
  with a NumPy generator an observer of the model could learn about the
  rounding noise.
* **Segments**: extra values (sample count, metric sums) travel inside the
  same masked vector so they are revealed only in aggregate. Each segment
  has its own scale: :meth:`Segment.integer` encodes integers *exactly*
  (scale 1, no rounding; non-integers or values beyond the bound are refused,
  never clipped), :meth:`Segment.real` clips and quantises.
* **Bad values**: NaN is refused (``ValueError``); ``±inf`` clips to ``±clip``
  like any other out-of-range value.

Input of a segment may be several arrays (a model's tensors); they are walked
in place, never concatenated, so encoding a 10^7-parameter model allocates
only a few cache-sized scratch buffers.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .params import SecAggParams
from .prg import PRG_KEY_BYTES, KeyStream

INT32_MAX = 2**31 - 1
DEFAULT_CHUNK_WORDS = 32768
QUANTIZE_BLOCK = 32768
"""Values quantised per NumPy call (larger blocks measured faster: call overhead dominates)."""
_I32_TO_UNIT = 2.0**-32


@dataclass(frozen=True)
class Segment:
    """A named run of ``length`` values sharing one scale and bound.

    An input ``v`` becomes the integer ``q`` with ``|q| <= bound``:
    ``q = floor(clip(v * scale) + u)`` for real segments, ``q = v`` for exact
    (integer) ones. A decoded sum is ``sum(q) / scale``.
    """

    name: str
    length: int
    scale: float
    bound: int
    exact: bool = False

    @classmethod
    def real(cls, name: str, length: int, clip: float, value_bits: int) -> Segment:
        """Values clipped to ``[-clip, clip]`` with ``value_bits`` bits including the sign."""
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError("clip must be a positive finite number")
        if not 2 <= value_bits <= 32:
            raise ValueError("value_bits must be in [2, 32]")
        bound = 1 << (value_bits - 1)
        return cls(name, length, bound / clip, bound, exact=False)

    @classmethod
    def integer(cls, name: str, length: int, max_abs: int) -> Segment:
        """Integers in ``[-max_abs, max_abs]`` encoded exactly (scale 1, no rounding)."""
        if max_abs < 1:
            raise ValueError("max_abs must be at least 1")
        return cls(name, length, 1.0, int(max_abs), exact=True)

    @property
    def resolution(self) -> float:
        """Value of one integer step (the quantisation step)."""
        return 1.0 / self.scale


class VectorLayout:
    """The agreed order, length and scale of every value in the masked vector."""

    def __init__(self, segments: Sequence[Segment], max_nodes: int) -> None:
        if not segments:
            raise ValueError("a layout needs at least one segment")
        names = [s.name for s in segments]
        if len(set(names)) != len(names):
            raise ValueError(f"segment names must be unique: {names}")
        if max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        for seg in segments:
            if seg.length < 0:
                raise ValueError(f"segment {seg.name!r} has negative length")
            if max_nodes * seg.bound > INT32_MAX:
                raise ValueError(
                    f"segment {seg.name!r}: {max_nodes} inputs of magnitude {seg.bound} "
                    f"could wrap Z_2^32 (need max_nodes * bound <= 2**31 - 1)"
                )
            if not (math.isfinite(seg.scale) and seg.scale > 0):
                raise ValueError(f"segment {seg.name!r} needs a positive finite scale")
            if not seg.exact and seg.bound > 1 << 30:
                raise ValueError(f"segment {seg.name!r}: real bounds are at most 2**30")
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.max_nodes = max_nodes
        offsets = [0]
        for seg in self.segments:
            offsets.append(offsets[-1] + seg.length)
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.length = offsets[-1]

    @classmethod
    def for_update(
        cls, num_params: int, params: SecAggParams, extras: Sequence[Segment] = ()
    ) -> VectorLayout:
        """A layout with the model update first (segment ``"update"``) then ``extras``."""
        head = Segment.real("update", num_params, params.clip, params.value_bits)
        return cls([head, *extras], params.max_nodes)

    def segment(self, name: str) -> tuple[int, Segment]:
        """Offset and description of the segment called ``name``."""
        for off, seg in zip(self.offsets, self.segments, strict=False):
            if seg.name == name:
                return off, seg
        raise KeyError(name)

    def source(
        self,
        inputs: Mapping[str, ArrayLike | Sequence[ArrayLike]],
        rounding_key: bytes | None = None,
    ) -> EncodingSource:
        """Validate ``inputs`` (one entry per segment) and return a chunk source.

        ``rounding_key`` (16 bytes) fixes the stochastic rounding; leave it
        ``None`` in production so a fresh ``os.urandom`` key is used.
        """
        return EncodingSource(self, inputs, rounding_key)

    def encode(
        self,
        inputs: Mapping[str, ArrayLike | Sequence[ArrayLike]],
        rounding_key: bytes | None = None,
    ) -> NDArray[np.uint32]:
        """Unmasked encoding of ``inputs`` (reference path; masking uses :meth:`source`)."""
        out = np.empty(self.length, dtype=np.uint32)
        src = self.source(inputs, rounding_key)
        cur = src.cursor(0)
        for start in range(0, self.length, DEFAULT_CHUNK_WORDS):
            cur.fill(out[start : start + DEFAULT_CHUNK_WORDS])
        return out

    def decode(
        self, summed: NDArray[np.uint32], num_contributors: int
    ) -> dict[str, NDArray[np.float64] | NDArray[np.int64]]:
        """Decode the ``uint32`` sum of ``num_contributors`` encodings, per segment.

        Real segments come back as ``float64`` sums, exact segments as
        ``int64`` sums. Raises ``ValueError`` if any value lies outside what
        ``num_contributors`` honest encodings can produce — a corrupt or
        tampered aggregate is refused rather than returned wrapped.
        """
        if summed.shape != (self.length,):
            raise ValueError(f"sum has shape {summed.shape}, layout needs ({self.length},)")
        if not 1 <= num_contributors <= self.max_nodes:
            raise ValueError(f"num_contributors {num_contributors} outside [1, {self.max_nodes}]")
        signed = np.asarray(summed, dtype=np.uint32).view(np.int32)
        out: dict[str, NDArray[np.float64] | NDArray[np.int64]] = {}
        for off, seg in zip(self.offsets, self.segments, strict=False):
            part = signed[off : off + seg.length]
            limit = num_contributors * seg.bound
            if part.size and int(np.abs(part.astype(np.int64)).max()) > limit:
                raise ValueError(
                    f"segment {seg.name!r}: decoded sum exceeds {num_contributors} x bound "
                    "(wrong contributor count or corrupt aggregate)"
                )
            if seg.exact:
                out[seg.name] = part.astype(np.int64)
            else:
                out[seg.name] = part.astype(np.float64) / seg.scale
        return out


@dataclass(frozen=True)
class _Piece:
    start: int
    data: NDArray[np.generic]
    segment: Segment


def _as_pieces(value: ArrayLike | Sequence[ArrayLike]) -> list[NDArray[np.generic]]:
    if isinstance(value, np.ndarray):
        return [value.reshape(-1)]
    if isinstance(value, (list, tuple)) and value and not np.isscalar(value[0]):
        return [np.asarray(v).reshape(-1) for v in value]
    return [np.asarray(value).reshape(-1)]


class EncodingSource:
    """Validated inputs ready to be encoded chunk by chunk (see :class:`EncodingCursor`)."""

    def __init__(
        self,
        layout: VectorLayout,
        inputs: Mapping[str, ArrayLike | Sequence[ArrayLike]],
        rounding_key: bytes | None,
    ) -> None:
        unknown = set(inputs) - {s.name for s in layout.segments}
        if unknown:
            raise ValueError(f"inputs for unknown segments: {sorted(unknown)}")
        if rounding_key is None:
            rounding_key = os.urandom(PRG_KEY_BYTES)
        if len(rounding_key) != PRG_KEY_BYTES:
            raise ValueError("rounding_key must be 16 bytes")
        self.rounding_key = rounding_key
        self.length = layout.length
        pieces: list[_Piece] = []
        for off, seg in zip(layout.offsets, layout.segments, strict=False):
            if seg.name not in inputs:
                raise ValueError(f"missing input for segment {seg.name!r}")
            arrays = _as_pieces(inputs[seg.name])
            total = sum(a.size for a in arrays)
            if total != seg.length:
                raise ValueError(f"segment {seg.name!r} expects {seg.length} values, got {total}")
            pos = off
            for arr in arrays:
                if arr.size == 0:
                    continue
                if seg.exact:
                    data: NDArray[np.generic] = _exact_ints(arr, seg)
                else:
                    if not (
                        np.issubdtype(arr.dtype, np.floating)
                        or np.issubdtype(arr.dtype, np.integer)
                    ):
                        raise ValueError(f"segment {seg.name!r} needs real numbers")
                    data = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)
                pieces.append(_Piece(pos, data, seg))
                pos += arr.size
        self.pieces: tuple[_Piece, ...] = tuple(pieces)

    def cursor(self, start: int) -> EncodingCursor:
        """A sequential writer starting at value ``start`` (a multiple of 4)."""
        return EncodingCursor(self, start)


def _exact_ints(arr: NDArray[np.generic], seg: Segment) -> NDArray[np.int64]:
    if np.issubdtype(arr.dtype, np.integer):
        ints = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.floor(arr)):
            raise ValueError(f"segment {seg.name!r} is exact: values must be integers")
        ints = arr.astype(np.int64)
    else:
        raise ValueError(f"segment {seg.name!r} needs integers")
    if ints.size and int(np.abs(ints).max()) > seg.bound:
        raise ValueError(
            f"segment {seg.name!r}: |value| exceeds the agreed bound {seg.bound} "
            "(exact segments are never clipped)"
        )
    return ints


_local = threading.local()


_Scratch = tuple[
    memoryview, memoryview, NDArray[np.int32], NDArray[np.float64], NDArray[np.float64]
]


def _scratch(words: int) -> _Scratch:
    """This thread's scratch buffers for ``words`` values, reused from call to call.

    Fresh buffers cost a page fault per 4 KiB on every call (measured at a few hundred
    microseconds per masking call here). Sharing them between the cursors of one thread
    is safe: :meth:`EncodingCursor.fill` writes and consumes them within one call, and a
    thread runs one ``fill`` at a time. One set per chunk size (a few sizes at most).
    """
    cache: dict[int, _Scratch] | None = getattr(_local, "scratch", None)
    if cache is None or len(cache) > 4:
        cache = _local.scratch = {}
    found = cache.get(words)
    if found is None:
        rbytes = bytearray(4 * words)
        found = cache[words] = (
            memoryview(rbytes),
            memoryview(bytes(4 * words)),
            np.frombuffer(rbytes, dtype="<i4"),
            np.empty(QUANTIZE_BLOCK, dtype=np.float64),
            np.empty(QUANTIZE_BLOCK, dtype=np.float64),
        )
    return found


class EncodingCursor:
    """Writes consecutive encoded values; owns its scratch buffers and rounding stream.

    One cursor per thread: the rounding keystream is positioned at the
    cursor's start, so the encoding of a value never depends on the chunking.
    """

    def __init__(self, source: EncodingSource, start: int) -> None:
        if start % 4:
            raise ValueError("cursor start must be a multiple of 4 values")
        self._pieces = source.pieces
        self._pos = start
        self._piece = 0
        while self._piece < len(self._pieces) and (
            self._pieces[self._piece].start + self._pieces[self._piece].data.size <= start
        ):
            self._piece += 1
        self._stream = KeyStream(source.rounding_key, 4 * start)
        self._cap = 0
        self._alloc(DEFAULT_CHUNK_WORDS)

    def _alloc(self, words: int) -> None:
        self._cap = words
        self._rview, self._zeros, self._rwords, self._f, self._g = _scratch(words)

    def fill(self, out: NDArray[np.uint32]) -> None:
        """Encode the next ``len(out)`` values into ``out`` (a ``uint32`` slice)."""
        m = out.shape[0]
        if m > self._cap:
            self._alloc(m)
        # One rounding word per value, at the value's own keystream offset.
        self._stream.fill(self._zeros[: 4 * m], self._rview)
        signed = out.view(np.int32)
        end = self._pos + m
        done = 0
        # One errstate per call, not per piece or block: NaN must raise in the float->int
        # cast (see _quantize); overflow to +-inf is clipped like any out-of-range value.
        with np.errstate(invalid="raise", over="ignore"):
            while done < m:
                if self._piece >= len(self._pieces):
                    raise ValueError("encoding past the end of the layout")
                piece = self._pieces[self._piece]
                lo = self._pos + done - piece.start
                take = min(m - done, piece.data.size - lo)
                dst = signed[done : done + take]
                seg = piece.segment
                src = piece.data[lo : lo + take]
                if seg.exact:
                    np.copyto(dst, src, casting="unsafe")
                else:
                    self._quantize(src, seg, dst, done)
                done += take
                if lo + take == piece.data.size:
                    self._piece += 1
        self._pos = end

    def _quantize(
        self, src: NDArray[np.generic], seg: Segment, dst: NDArray[np.int32], roff: int
    ) -> None:
        """``dst = rint(clip(src * scale) + v)``, ``v = int32(r) / 2**32`` (see module doc).

        Runs inside :meth:`fill`'s ``np.errstate(invalid="raise")``.
        """
        bound = float(seg.bound)
        scale = seg.scale
        mul, add, clip, rint, copyto = np.multiply, np.add, np.clip, np.rint, np.copyto
        try:
            # NaN survives clip and trips the float->int cast; +-inf clip like any
            # out-of-range value. No separate finiteness pass is needed.
            for lo in range(0, src.shape[0], QUANTIZE_BLOCK):
                hi = min(lo + QUANTIZE_BLOCK, src.shape[0])
                f = self._f[: hi - lo]
                g = self._g[: hi - lo]
                mul(self._rwords[roff + lo : roff + hi], _I32_TO_UNIT, out=g)  # v in [-1/2, 1/2)
                # dtype: a float32 input times a Python float would multiply in
                # float32 (NEP 50) and lose the fraction stochastic rounding needs.
                mul(src[lo:hi], scale, out=f, dtype=np.float64)
                clip(f, -bound, bound, out=f)
                add(f, g, out=f)
                rint(f, out=f)  # rint(y + v) = floor(y + u) but at ties: stochastic rounding
                copyto(dst[lo:hi], f, casting="unsafe")
        except FloatingPointError:
            raise ValueError(f"segment {seg.name!r} contains NaN") from None
