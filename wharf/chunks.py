"""Chunked, content-addressed transfer of large payloads.

Models, masked vectors and task bundles can be larger than one gRPC message.
They travel as a sequence of :class:`~wharf.proto.wharf_pb2.BlobChunk` (or raw
``bytes`` parts of an upload) of at most :data:`CHUNK_SIZE` bytes, spooled to
disk as they arrive so memory stays bounded whatever the payload size, and the
SHA-256 of the whole is checked before anything is accepted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from wharf.proto import wharf_pb2 as pb

CHUNK_SIZE = 1 << 20
"""1 MiB per message: well under the 8 MiB gRPC message limit."""

MAX_BLOB_SIZE = 8 << 30
"""Refuse payloads that claim more than 8 GiB."""


class TransferError(ValueError):
    """A chunked payload was truncated, corrupted, oversized or out of order."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def blob_ref_for_file(path: Path) -> pb.BlobRef:
    """The content address of a file."""
    return pb.BlobRef(sha256=sha256_file(path), size=path.stat().st_size)


def iter_file_chunks(path: Path, ref: pb.BlobRef | None = None) -> Iterator[pb.BlobChunk]:
    """Yield a file as BlobChunks (at least one, even for an empty file)."""
    ref = ref or blob_ref_for_file(path)
    offset = 0
    with path.open("rb") as fh:
        while True:
            data = fh.read(CHUNK_SIZE)
            if not data and offset > 0:
                break
            yield pb.BlobChunk(sha256=ref.sha256, offset=offset, total_size=ref.size, data=data)
            offset += len(data)
            if not data:
                break


def iter_file_parts(path: Path) -> Iterator[bytes]:
    """Yield a file's raw bytes in CHUNK_SIZE parts (for upload streams)."""
    with path.open("rb") as fh:
        yield from iter(lambda: fh.read(CHUNK_SIZE), b"")


class Spool:
    """Receive a payload piece by piece into a temporary file, hashing as it goes.

    ``expected_sha256``/``expected_size`` are checked by :meth:`finish`; a part
    that would exceed the expected size is refused at once, so an oversized
    stream cannot fill the disk.
    """

    def __init__(self, directory: Path, expected_sha256: str, expected_size: int) -> None:
        if expected_size < 0 or expected_size > MAX_BLOB_SIZE:
            raise TransferError(f"payload size {expected_size} is out of range")
        if len(expected_sha256) != 64 or any(c not in "0123456789abcdef" for c in expected_sha256):
            raise TransferError("payload sha256 must be 64 lowercase hex characters")
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".spool-")
        self.path = Path(name)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.received = 0

    def write(self, data: bytes, offset: int | None = None) -> None:
        """Append one part; ``offset`` (if given) must equal the bytes received so far."""
        if offset is not None and offset != self.received:
            raise TransferError(f"chunk at offset {offset}, expected {self.received}")
        if self.received + len(data) > self.expected_size:
            raise TransferError(f"payload exceeds its declared size of {self.expected_size} bytes")
        self._fh.write(data)
        self._digest.update(data)
        self.received += len(data)

    def finish(self) -> Path:
        """Close and verify; returns the spooled file's path (caller moves it)."""
        self._fh.close()
        if self.received != self.expected_size:
            self.discard()
            raise TransferError(
                f"payload truncated: got {self.received} of {self.expected_size} bytes"
            )
        actual = self._digest.hexdigest()
        if actual != self.expected_sha256:
            self.discard()
            raise TransferError(
                f"payload hash mismatch: declared {self.expected_sha256[:12]}…, got {actual[:12]}…"
            )
        return self.path

    def discard(self) -> None:
        """Drop the partial file."""
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


def receive_chunks(chunks: Iterable[pb.BlobChunk], directory: Path) -> tuple[Path, str]:
    """Spool a BlobChunk stream to ``directory`` and verify it.

    Returns the verified temp file path and its sha256. Raises TransferError on
    any inconsistency (and leaves no partial file behind).
    """
    spool: Spool | None = None
    try:
        for chunk in chunks:
            if spool is None:
                spool = Spool(directory, chunk.sha256, chunk.total_size)
            elif chunk.sha256 != spool.expected_sha256 or chunk.total_size != spool.expected_size:
                raise TransferError("chunk belongs to a different payload")
            spool.write(chunk.data, chunk.offset)
        if spool is None:
            raise TransferError("empty transfer: no chunk received")
        path = spool.finish()
        return path, spool.expected_sha256
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
