"""Content-addressed blob directory for models, optimizer state and bundles.

A blob's name is its SHA-256, so storing is idempotent, a reader can verify
what it got, and the store needs no index. Writes go through a spool file and
an atomic rename, so a crash never leaves a half-written blob under a valid name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from wharf.chunks import TransferError, iter_file_chunks, receive_chunks, sha256_bytes
from wharf.proto import wharf_pb2 as pb


class BlobStore:
    """Blobs under ``root/ab/cdef…``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise KeyError(f"not a blob id: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        try:
            return self.path(sha256).exists()
        except KeyError:
            return False

    def put_bytes(self, data: bytes) -> pb.BlobRef:
        sha = sha256_bytes(data)
        dest = self.path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp / f"{sha}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        return pb.BlobRef(sha256=sha, size=len(data))

    def adopt(self, spooled: Path, sha256: str) -> pb.BlobRef:
        """Move a verified spool file into place under its hash."""
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = spooled.stat().st_size
        os.replace(spooled, dest)
        return pb.BlobRef(sha256=sha256, size=size)

    def put_chunks(self, chunks: Iterable[pb.BlobChunk]) -> pb.BlobRef:
        path, sha = receive_chunks(chunks, self.tmp)
        return self.adopt(path, sha)

    def get_bytes(self, sha256: str) -> bytes:
        path = self.path(sha256)
        if not path.exists():
            raise KeyError(f"blob {sha256[:12]}… not found")
        return path.read_bytes()

    def ref(self, sha256: str) -> pb.BlobRef:
        return pb.BlobRef(sha256=sha256, size=self.path(sha256).stat().st_size)

    def iter_chunks(self, sha256: str) -> Iterator[pb.BlobChunk]:
        path = self.path(sha256)
        if not path.exists():
            raise KeyError(f"blob {sha256[:12]}… not found")
        return iter_file_chunks(path, pb.BlobRef(sha256=sha256, size=path.stat().st_size))


__all__ = ["BlobStore", "TransferError"]
