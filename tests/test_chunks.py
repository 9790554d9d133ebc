"""Chunked, content-addressed transfer: a 20+ MB model round-trips and verifies; damaged
streams are refused and leave no partial file.

Uses the real BlobStore on disk, real safetensors weights, and real gRPC with mutual
TLS (DownloadModel, DownloadBlob and the SDK's ``Client.download_model``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DEADLINE, Harness

from wharf.algorithms import models
from wharf.chunks import (
    CHUNK_SIZE,
    MAX_BLOB_SIZE,
    Spool,
    TransferError,
    iter_file_chunks,
    receive_chunks,
    sha256_bytes,
    sha256_file,
)
from wharf.client import Client
from wharf.coordinator.blobs import BlobStore
from wharf.proto import wharf_pb2 as pb

MODEL_BYTES = 21 << 20  # a little over 20 MiB of float32 weights


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real safetensors model of ~21 MiB (several named tensors, not a multiple of a chunk)."""
    rng = np.random.default_rng(7)
    n = MODEL_BYTES // 4
    arrays = {
        "fc1.weight": rng.standard_normal((n // 2 // 1024, 1024), dtype=np.float32),
        "fc1.bias": rng.standard_normal(1024, dtype=np.float32),
        "head.weight": rng.standard_normal((n // 2 - 1024 - 3,), dtype=np.float32),
        "head.bias": rng.standard_normal(3, dtype=np.float32),
    }
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    path.write_bytes(models.weights_to_bytes(arrays))
    assert path.stat().st_size >= 20 * 1000 * 1000
    assert path.stat().st_size % CHUNK_SIZE != 0
    return path


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- round trips


def test_big_model_round_trips_through_the_blob_store(big_model: Path, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    sent = list(iter_file_chunks(big_model))
    size = big_model.stat().st_size
    assert len(sent) == math.ceil(size / CHUNK_SIZE)
    assert all(len(c.data) <= CHUNK_SIZE for c in sent)
    assert [c.offset for c in sent] == [i * CHUNK_SIZE for i in range(len(sent))]

    ref = store.put_chunks(iter(sent))
    assert (ref.sha256, ref.size) == (sha256_file(big_model), size)
    assert files_in(store.tmp) == []

    out = tmp_path / "out"
    path, sha = receive_chunks(store.iter_chunks(ref.sha256), out)
    assert sha == ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.read_bytes() == big_model.read_bytes()
    got = models.weights_from_bytes(path.read_bytes())
    want = models.weights_from_bytes(big_model.read_bytes())
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_empty_payload_round_trips(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    chunks = list(iter_file_chunks(empty))
    assert len(chunks) == 1 and chunks[0].data == b""
    path, sha = receive_chunks(chunks, tmp_path / "out")
    assert sha == sha256_bytes(b"") and path.read_bytes() == b""


def _register_model(coord: Harness, model: Path, job_id: str = "bigjob") -> pb.BlobRef:
    """A completed job of alice's whose model is ``model`` (and a task of hospital-a in it)."""
    ref = coord.ctx.blobs.put_chunks(iter_file_chunks(model))
    store = coord.ctx.store
    store.create_job(
        job_id=job_id,
        name=job_id,
        owner="alice",
        spec_json="{}",
        job_hash="0" * 64,
        bundle_sha="",
        rounds_total=1,
    )
    store.set_initial_model(job_id, ref.sha256, ref.size)
    assert store.set_state(job_id, "completed")
    store.create_task(
        task_id=f"{job_id}-t", job_id=job_id, rnd=1, attempt=0, node="hospital-a", kind="TASK_TRAIN"
    )
    return ref


def test_big_model_round_trips_over_grpc(coord: Harness, big_model: Path, tmp_path: Path) -> None:
    ref = _register_model(coord, big_model)

    # Developer: DownloadModel, raw stream.
    chunks = list(coord.jobs("alice").DownloadModel(pb.JobRef(job_id="bigjob"), timeout=DEADLINE))
    assert len(chunks) == math.ceil(ref.size / CHUNK_SIZE)
    path, sha = receive_chunks(iter(chunks), tmp_path / "dev")
    assert sha == ref.sha256 and path.read_bytes() == big_model.read_bytes()

    # Node: DownloadBlob of the job's model.
    stream = coord.node("hospital-a").DownloadBlob(
        pb.BlobRequest(sha256=ref.sha256, job_id="bigjob"), timeout=DEADLINE
    )
    path, sha = receive_chunks(stream, tmp_path / "node")
    assert sha == ref.sha256 and sha256_file(path) == sha256_file(big_model)

    # The SDK: verified, then moved into place.
    certs = coord.pki.root / "certs"
    with Client(
        coord.address,
        cert=certs / "alice.pem",
        key=certs / "alice.key",
        ca=coord.pki.root / "ca" / "ca.pem",
    ) as client:
        got = client.download_model("bigjob", tmp_path / "sdk" / "model.safetensors")
    assert (got.sha256, got.size) == (ref.sha256, ref.size)
    assert files_in(tmp_path / "sdk") == [tmp_path / "sdk" / "model.safetensors"]


# --------------------------------------------------------------------------- rejections


def _payload(size: int = 5 * CHUNK_SIZE // 2) -> tuple[bytes, list[pb.BlobChunk]]:
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    sha = sha256_bytes(data)
    chunks = [
        pb.BlobChunk(sha256=sha, offset=o, total_size=size, data=data[o : o + CHUNK_SIZE])
        for o in range(0, size, CHUNK_SIZE)
    ]
    return data, chunks


def _corrupt(chunks: list[pb.BlobChunk]) -> list[pb.BlobChunk]:
    bad = [
        pb.BlobChunk(sha256=c.sha256, offset=c.offset, total_size=c.total_size, data=c.data)
        for c in chunks
    ]
    flipped = bytearray(bad[1].data)
    flipped[123] ^= 0x01
    bad[1].data = bytes(flipped)
    return bad


def _swap(chunks: list[pb.BlobChunk]) -> list[pb.BlobChunk]:
    return [chunks[0], chunks[2], chunks[1], *chunks[3:]]


def _extra(chunks: list[pb.BlobChunk]) -> list[pb.BlobChunk]:
    last = chunks[-1]
    return [
        *chunks,
        pb.BlobChunk(
            sha256=last.sha256, offset=last.total_size, total_size=last.total_size, data=b"more"
        ),
    ]


def _longer_last(chunks: list[pb.BlobChunk]) -> list[pb.BlobChunk]:
    last = chunks[-1]
    grown = pb.BlobChunk(
        sha256=last.sha256, offset=last.offset, total_size=last.total_size, data=last.data + b"x"
    )
    return [*chunks[:-1], grown]


def _retarget(chunks: list[pb.BlobChunk], **fields: object) -> list[pb.BlobChunk]:
    out = list(chunks)
    changed = pb.BlobChunk()
    changed.CopyFrom(out[1])
    for key, value in fields.items():
        setattr(changed, key, value)
    out[1] = changed
    return out


def _first(chunks: list[pb.BlobChunk], **fields: object) -> list[pb.BlobChunk]:
    first = pb.BlobChunk()
    first.CopyFrom(chunks[0])
    for key, value in fields.items():
        setattr(first, key, value)
    return [first, *chunks[1:]]


DAMAGE: list[tuple[str, Callable[[list[pb.BlobChunk]], list[pb.BlobChunk]], str]] = [
    ("truncated", lambda c: c[:-1], "truncated"),
    (
        "truncated-inside-a-chunk",
        lambda c: [
            *c[:-1],
            pb.BlobChunk(
                sha256=c[-1].sha256,
                offset=c[-1].offset,
                total_size=c[-1].total_size,
                data=c[-1].data[:-1],
            ),
        ],
        "truncated",
    ),
    ("corrupted-chunk", _corrupt, "hash mismatch"),
    ("out-of-order", _swap, "offset"),
    ("repeated-chunk", lambda c: [c[0], c[0], *c[1:]], "offset"),
    ("skipped-chunk", lambda c: [c[0], *c[2:]], "offset"),
    ("more-bytes-than-declared", _extra, "exceeds its declared size"),
    ("oversized-last-chunk", _longer_last, "exceeds its declared size"),
    ("other-payload-mid-stream", lambda c: _retarget(c, sha256="0" * 64), "different payload"),
    (
        "size-changes-mid-stream",
        lambda c: _retarget(c, total_size=10 * CHUNK_SIZE),
        "different payload",
    ),
    ("empty-stream", lambda c: [], "empty transfer"),
    ("bad-sha", lambda c: _first(c, sha256="XYZ"), "64 lowercase hex"),
    ("uppercase-sha", lambda c: [_first(c, sha256=c[0].sha256.upper())[0]], "64 lowercase hex"),
    ("negative-size", lambda c: _first(c, total_size=-1), "out of range"),
    ("absurd-size", lambda c: _first(c, total_size=MAX_BLOB_SIZE + 1), "out of range"),
]


@pytest.mark.parametrize(
    ("damage", "message"), [pytest.param(fn, msg, id=name) for name, fn, msg in DAMAGE]
)
def test_damaged_streams_are_refused_without_a_trace(
    tmp_path: Path, damage: Callable[[list[pb.BlobChunk]], list[pb.BlobChunk]], message: str
) -> None:
    _, chunks = _payload()
    # receive_chunks on its own ...
    with pytest.raises(TransferError, match=message):
        receive_chunks(iter(damage(chunks)), tmp_path / "recv")
    assert files_in(tmp_path) == []
    # ... and through the blob store: no blob, no spool file.
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(TransferError, match=message):
        store.put_chunks(iter(damage(chunks)))
    assert files_in(tmp_path) == []
    # The intact stream is accepted.
    data, chunks = _payload()
    assert store.get_bytes(store.put_chunks(iter(chunks)).sha256) == data


def test_a_stream_that_breaks_leaves_no_partial_file(tmp_path: Path) -> None:
    _, chunks = _payload()

    def broken() -> Iterator[pb.BlobChunk]:
        yield chunks[0]
        yield chunks[1]
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        receive_chunks(broken(), tmp_path)
    assert files_in(tmp_path) == []


def test_spool_refuses_excess_at_once_and_cleans_up(tmp_path: Path) -> None:
    data = b"abcdefgh"
    spool = Spool(tmp_path, sha256_bytes(data), len(data))
    spool.write(data[:4], 0)
    with pytest.raises(TransferError, match="exceeds its declared size"):
        spool.write(b"x" * 5)  # refused before anything is written
    assert spool.received == 4
    with pytest.raises(TransferError, match="offset 9, expected 4"):
        spool.write(b"x", 9)
    with pytest.raises(TransferError, match="truncated: got 4 of 8 bytes"):
        spool.finish()
    assert files_in(tmp_path) == []
    spool.discard()  # idempotent

    spool = Spool(tmp_path, sha256_bytes(data), len(data))
    spool.write(data[:4])
    spool.write(data[4:])
    path = spool.finish()
    assert path.read_bytes() == data


# --------------------------------------------------------------------------- over gRPC


def _tamper(
    stream: Iterable[pb.BlobChunk], damage: Callable[[list[pb.BlobChunk]], list[pb.BlobChunk]]
) -> Iterator[pb.BlobChunk]:
    yield from damage(list(stream))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda c: c[:-1], "truncated", id="truncated"),
        pytest.param(_corrupt, "hash mismatch", id="corrupted"),
        pytest.param(_swap, "offset", id="out-of-order"),
    ],
)
def test_damaged_grpc_downloads_are_refused(
    coord: Harness,
    big_model: Path,
    tmp_path: Path,
    damage: Callable[[list[pb.BlobChunk]], list[pb.BlobChunk]],
    message: str,
) -> None:
    _register_model(coord, big_model)
    stream = coord.jobs("alice").DownloadModel(pb.JobRef(job_id="bigjob"), timeout=DEADLINE)
    with pytest.raises(TransferError, match=message):
        receive_chunks(_tamper(stream, damage), tmp_path / "dl")
    assert files_in(tmp_path / "dl") == []


def test_a_blob_damaged_on_disk_is_caught_by_the_downloader(
    coord: Harness, big_model: Path, tmp_path: Path
) -> None:
    ref = _register_model(coord, big_model)
    stored = coord.ctx.blobs.path(ref.sha256)
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    stored.write_bytes(bytes(raw))
    certs = coord.pki.root / "certs"
    dest = tmp_path / "dl" / "model.safetensors"
    with Client(
        coord.address,
        cert=certs / "alice.pem",
        key=certs / "alice.key",
        ca=coord.pki.root / "ca" / "ca.pem",
    ) as client:
        with pytest.raises(TransferError, match="hash mismatch"):
            client.download_model("bigjob", dest)
    assert files_in(tmp_path / "dl") == []
    # The server is unharmed and keeps serving.
    coord.assert_serving()
    info = coord.jobs("alice").GetJob(pb.JobRef(job_id="bigjob"), timeout=DEADLINE)
    assert info.state == "completed"
    with pytest.raises(grpc.RpcError) as exc:
        list(coord.jobs("bob").DownloadModel(pb.JobRef(job_id="bigjob"), timeout=DEADLINE))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
