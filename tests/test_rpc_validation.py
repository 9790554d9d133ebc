"""Malformed input at every public RPC gets a clear status, and nothing of it is stored.

Real gRPC with mutual TLS against an in-process coordinator (``conftest.py``). Upload
validation runs against a real job: the test plays a node by hand (Hello, TaskStream,
DownloadBlob, UploadResult) and answers the job's statistics and training tasks with
malformed results first, then valid ones, so the job completes.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import (
    DEADLINE,
    DrivenNode,
    Harness,
    dataset_info,
    expect_status,
    spec_dict,
    submit,
    upload_parts,
)

from wharf import bundle as bundle_mod
from wharf.algorithms import models
from wharf.chunks import receive_chunks, sha256_bytes
from wharf.coordinator.node_service import MAX_DATASETS
from wharf.coordinator.store import nodes, tasks
from wharf.coordinator.tasks import RoundCollector
from wharf.proto import wharf_pb2 as pb
from wharf.proto import wharf_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

OVERSIZE = 9 << 20  # above the 8 MiB per-message limit


def ref_of(data: bytes) -> pb.BlobRef:
    return pb.BlobRef(sha256=sha256_bytes(data), size=len(data))


def assert_nothing_stored(coord: Harness) -> None:
    assert coord.counts() == dict.fromkeys(coord.counts(), 0)
    assert coord.blob_files() == set()
    assert coord.spool_files() == []


# --------------------------------------------------------------------------- bundles

BUNDLE_SOURCE = (
    "import torch\n\n\ndef build(input_shape, num_classes):\n"
    "    return torch.nn.Linear(input_shape[0], num_classes)\n"
)


def bundle_weights(**override: np.ndarray) -> bytes:
    arrays = {"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}
    arrays.update(override)
    return models.weights_to_bytes(arrays)


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def packed_bundle(tmp_path: Path, weights: bytes | None = None) -> bytes:
    src = tmp_path / "bundle-src"
    src.mkdir(exist_ok=True)
    (src / "net.py").write_text(BUNDLE_SOURCE)
    return bundle_mod.pack(src, extra={bundle_mod.INITIAL_WEIGHTS: weights or bundle_weights()})


def bundle_spec(bundle: bytes | str) -> dict[str, Any]:
    sha = bundle if isinstance(bundle, str) else sha256_bytes(bundle)
    return spec_dict(
        model={"kind": "bundle", "input_shape": [4]},
        bundle={"model": "net:build", "sha256": sha},
    )


# --------------------------------------------------------------------------- SubmitJob

SPEC_CASES: list[Any] = [
    pytest.param("", "not valid JSON", id="empty"),
    pytest.param("{not json", "not valid JSON", id="invalid-json"),
    pytest.param("[1, 2]", "must be a table", id="not-an-object"),
    pytest.param(
        json.dumps({**spec_dict(), "colour": "red"}),
        "unknown field 'colour'",
        id="unknown-top-level-field",
    ),
    pytest.param(
        json.dumps(spec_dict(training={"lrr": 0.1})),
        "unknown field training.lrr",
        id="unknown-nested-field",
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"rounds": "3"})),
        "federation.rounds must be an integer",
        id="wrong-type-int",
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"secure": "no"})),
        "federation.secure must be true or false",
        id="wrong-type-bool",
    ),
    pytest.param(
        json.dumps(spec_dict(data="cancer")), "[data] must be a table", id="wrong-type-section"
    ),
    pytest.param(
        json.dumps(spec_dict(model={"hidden": [8, 2.5]})),
        "model.hidden must be a list of integers",
        id="wrong-type-list",
    ),
    pytest.param(
        json.dumps(spec_dict(training={"lr": float("nan")})),
        "training.lr must be finite",
        id="nan-value",
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"round_timeout_s": float("inf")})),
        "federation.round_timeout_s must be finite",
        id="inf-value",
    ),
    pytest.param(
        json.dumps({"name": "x", "purpose": "research"}),
        "missing required field 'data'",
        id="missing-field",
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"rounds": 0})),
        "federation.rounds must be between",
        id="out-of-range",
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"secure": True, "min_nodes": 1})),
        "at least 2 with secure aggregation",
        id="secure-with-one-node",
    ),
    pytest.param(
        json.dumps(spec_dict(model={"kind": "transformer"})),
        "model.kind must be one of",
        id="unknown-model-kind",
    ),
    # Messages that echo input stay short enough to travel (gRPC caps trailers at 8 KiB).
    pytest.param(
        json.dumps({**spec_dict(), "k" * 20_000: 1}), "unknown field 'kkkk", id="huge-unknown-field"
    ),
    pytest.param(
        json.dumps(spec_dict(federation={"rounds": [1] * 20_000})),
        "federation.rounds must be an integer",
        id="huge-wrong-value",
    ),
]


@pytest.mark.parametrize(("spec_json", "message"), SPEC_CASES)
def test_submit_rejects_malformed_specs(coord: Harness, spec_json: str, message: str) -> None:
    alice = coord.jobs("alice")
    expect_status(INVALID, alice.SubmitJob, pb.SubmitJobRequest(spec_json=spec_json), match=message)
    assert_nothing_stored(coord)


def test_submit_rejects_malformed_bundles(coord: Harness, tmp_path: Path) -> None:
    alice = coord.jobs("alice")
    good = packed_bundle(tmp_path)
    weights = bundle_weights()
    big_weights = models.weights_to_bytes(
        {"w": np.random.default_rng(0).standard_normal(5 << 18).astype(np.float32)}
    )
    oversized = make_zip(
        {"net.py": BUNDLE_SOURCE.encode(), bundle_mod.INITIAL_WEIGHTS: big_weights},
        zipfile.ZIP_STORED,
    )
    assert bundle_mod.MAX_BUNDLE_SIZE < len(oversized) < 8 << 20
    nan_weights = bundle_weights(bias=np.array([np.nan, 0], np.float32))
    cases: list[tuple[dict[str, Any], bytes, str]] = [
        # A bundle sent with a job that does not use one.
        (spec_dict(), good, "a bundle was sent but model.kind is not 'bundle'"),
        # A bundle job without its bundle.
        (bundle_spec(good), b"", "needs the packed bundle"),
        # Not a zip at all / a zip cut short.
        (bundle_spec(b"PK\x03\x04garbage"), b"PK\x03\x04garbage", "not a valid zip"),
        (bundle_spec(good[:-40]), good[:-40], "not a valid zip"),
        # A zip whose entry would land outside the bundle directory.
        (
            bundle_spec(b"x"),
            make_zip({"../evil.py": b"", bundle_mod.INITIAL_WEIGHTS: weights}),
            "escapes its directory",
        ),
        # Initial weights missing, not safetensors, or not finite.
        (bundle_spec(b"x"), make_zip({"net.py": b""}), "lacks wharf-initial.safetensors"),
        (
            bundle_spec(b"x"),
            make_zip({"net.py": b"", bundle_mod.INITIAL_WEIGHTS: b"{}"}),
            "not valid safetensors",
        ),
        (
            bundle_spec(b"x"),
            make_zip({"net.py": b"", bundle_mod.INITIAL_WEIGHTS: nan_weights}),
            "contains NaN or Inf",
        ),
        # The spec binds another bundle than the one sent.
        (bundle_spec("0" * 64), good, "does not match the bundle sent"),
        # Larger than bundles may be.
        (bundle_spec(oversized), oversized, "limit"),
    ]
    for spec, bundle, message in cases:
        request = pb.SubmitJobRequest(spec_json=json.dumps(spec), bundle=bundle)
        expect_status(INVALID, alice.SubmitJob, request, match=message)
        assert_nothing_stored(coord)

    # The well-formed bundle job is accepted and its bundle stored under its hash.
    job = submit(alice, bundle_spec(good), good)
    assert json.loads(job.spec_json)["bundle"]["sha256"] == sha256_bytes(good)
    assert coord.ctx.blobs.get_bytes(sha256_bytes(good)) == good


def test_oversized_messages_are_refused(coord: Harness) -> None:
    big = coord.jobs("alice", options=coord.oversize_options())
    spec = spec_dict(description="x" * OVERSIZE)
    expect_status(TOO_BIG, big.SubmitJob, pb.SubmitJobRequest(spec_json=json.dumps(spec)))
    node = coord.node("hospital-a", options=coord.oversize_options())
    hello = pb.HelloRequest(datasets=[dataset_info(schema_json="x" * OVERSIZE)])
    expect_status(TOO_BIG, node.Hello, hello)
    header = pb.ResultHeader(task_id="t", ok=True, secagg=b"x" * OVERSIZE)
    expect_status(TOO_BIG, node.UploadResult, upload_parts(header, []))
    # (An oversized data chunk after a valid header is refused in the real-job test.)
    assert_nothing_stored(coord)
    coord.assert_serving()


# --------------------------------------------------------------------------- job lookups


def test_job_rpcs_reject_unknown_and_empty_job_ids(coord: Harness) -> None:
    for who in ("alice", "admin"):
        stub = coord.jobs(who)
        for fn, make in [
            (stub.GetJob, lambda j: pb.JobRef(job_id=j)),
            (stub.CancelJob, lambda j: pb.JobRef(job_id=j)),
            (stub.WatchJob, lambda j: pb.WatchJobRequest(job_id=j)),
            (stub.DownloadModel, lambda j: pb.JobRef(job_id=j)),
        ]:
            expect_status(INVALID, fn, make(""), match="job_id is required")
            expect_status(NOT_FOUND, fn, make("no-such-job"), match="no job 'no-such-job'")
            expect_status(INVALID, fn, make("x" * 10_000), match="at most 64 characters")
    assert_nothing_stored(coord)


def test_unfinished_and_finished_jobs_refuse_what_does_not_apply(coord: Harness) -> None:
    alice = coord.jobs("alice")
    job = submit(alice)  # waits for a node holding 'cancer' that never comes
    expect_status(
        PRECONDITION,
        alice.DownloadModel,
        pb.JobRef(job_id=job.job_id),
        match="available once it completes",
    )
    cancelled = alice.CancelJob(pb.JobRef(job_id=job.job_id), timeout=DEADLINE)
    assert cancelled.state == "cancelled"
    expect_status(
        PRECONDITION, alice.CancelJob, pb.JobRef(job_id=job.job_id), match="already cancelled"
    )
    expect_status(
        PRECONDITION, alice.DownloadModel, pb.JobRef(job_id=job.job_id), match="is cancelled"
    )
    # Watching a terminal job replays its events and ends.
    kinds = [
        e.kind
        for e in alice.WatchJob(
            pb.WatchJobRequest(job_id=job.job_id, after_seq=-5), timeout=DEADLINE
        )
    ]
    assert kinds[0] == "submitted" and "state" in kinds
    assert coord.blob_files() == set()


def test_list_calls_tolerate_odd_arguments(coord: Harness) -> None:
    for who in ("alice", "admin"):
        stub = coord.jobs(who)
        for request in [
            pb.ListJobsRequest(limit=-1),
            pb.ListJobsRequest(limit=10**9),
            pb.ListJobsRequest(state="no-such-state"),
        ]:
            assert list(stub.ListJobs(request, timeout=DEADLINE).jobs) == []
        assert list(stub.ListNodes(pb.ListNodesRequest(), timeout=DEADLINE).nodes) == []
    node = coord.node("hospital-a")
    resp = node.Heartbeat(pb.HeartbeatRequest(running_tasks=["x"] * 1000), timeout=DEADLINE)
    assert resp.server_time > 0
    assert_nothing_stored(coord)


# --------------------------------------------------------------------------- Hello


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        pytest.param([dataset_info("a"), dataset_info("a")], "unique", id="duplicate-names"),
        pytest.param([dataset_info(feature_shape=[-4])], "must be positive", id="negative-shape"),
        pytest.param([dataset_info(feature_shape=[4, 0])], "must be positive", id="zero-dimension"),
        pytest.param([dataset_info(rows=-1)], "must be positive", id="negative-rows"),
        pytest.param([dataset_info("")], "1-64 characters", id="empty-name"),
        pytest.param([dataset_info("n" * 65)], "1-64 characters", id="long-name"),
        pytest.param(
            [dataset_info(f"d{i}") for i in range(MAX_DATASETS + 1)],
            f"at most {MAX_DATASETS} datasets",
            id="too-many",
        ),
        pytest.param(
            [dataset_info(feature_shape=[1 << 20, 1 << 20])], "too large", id="absurd-shape"
        ),
        pytest.param([dataset_info(feature_shape=[2] * 9)], "too large", id="too-many-dimensions"),
    ],
)
def test_hello_rejects_malformed_datasets(
    coord: Harness, datasets: list[pb.DatasetInfo], message: str
) -> None:
    node = coord.node("hospital-a")
    request = pb.HelloRequest(version="test", datasets=datasets)
    expect_status(INVALID, node.Hello, request, match=message)
    assert_nothing_stored(coord)
    assert coord.ctx.sessions._datasets == {}
    # A well-formed Hello right after is recorded.
    assert node.Hello(pb.HelloRequest(datasets=[dataset_info()]), timeout=DEADLINE).node_name
    assert [n["name"] for n in coord.rows(nodes)] == ["hospital-a"]


# --------------------------------------------------------------------------- uploads


def test_uploads_without_an_active_task_are_refused(coord: Harness) -> None:
    node = coord.node("hospital-a")
    data = b"payload"
    expect_status(INVALID, node.UploadResult, iter([]), match="must start with a result header")
    expect_status(
        INVALID,
        node.UploadResult,
        upload_parts(None, [data]),
        match="must start with a result header",
    )
    for task_id in ("", "no-such-task", "t" * 20_000):
        header = pb.ResultHeader(
            task_id=task_id, ok=True, kind=pb.TASK_TRAIN, num_examples=1, blob=ref_of(data)
        )
        expect_status(
            NOT_FOUND, node.UploadResult, upload_parts(header, [data]), match="is not active"
        )
    expect_status(DENIED, node.DownloadBlob, pb.BlobRequest(), match="no task of this job")
    assert_nothing_stored(coord)


def _wait_for_state(coord: Harness, job_id: str, state: str) -> pb.JobInfo:
    stub = coord.jobs("admin")
    deadline = time.monotonic() + DEADLINE
    while True:
        info = stub.GetJob(pb.JobRef(job_id=job_id), timeout=DEADLINE)
        if info.state == state:
            return info
        assert info.state not in ("failed", "cancelled"), info.reason
        assert time.monotonic() < deadline, f"job stayed {info.state}"
        time.sleep(0.05)


def _wait_until(condition: Any, what: str) -> None:
    """Poll briefly: a handler may still be cleaning up after the client saw its status."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def result_header(task: pb.Task, data: bytes | None, **kw: Any) -> pb.ResultHeader:
    """A successful result header for ``task`` announcing ``data`` (overridable)."""
    fields: dict[str, Any] = {
        "task_id": task.task_id,
        "job_id": task.job_id,
        "round": task.round,
        "kind": task.kind,
        "ok": True,
        "num_examples": 100,
    }
    if data is not None:
        fields["blob"] = ref_of(data)
    fields.update(kw)
    return pb.ResultHeader(**fields)


def moments(**override: np.ndarray) -> bytes:
    """A statistics result for the 4-feature 'cancer' dataset."""
    arrays = {"sum": np.zeros(4, np.float32), "sumsq": np.full(4, 100.0, np.float32)}
    arrays.update(override)
    return models.weights_to_bytes(arrays)


def start_probe_job(coord: Harness, driven_node: Any) -> tuple[DrivenNode, pb.JobInfo, pb.Task]:
    """hospital-a says hello with 'cancer', connects; alice submits; the stats task arrives."""
    a = driven_node("hospital-a")
    a.hello()
    a.connect()
    job = submit(coord.jobs("alice"))
    stats = a.next_task(pb.TASK_STATS)
    assert (stats.job_id, stats.dataset) == (job.job_id, "cancer")
    return a, job, stats


def download_model_of(a: DrivenNode, task: pb.Task, dest: Path) -> dict[str, np.ndarray]:
    chunks = a.stub.DownloadBlob(
        pb.BlobRequest(sha256=task.model.sha256, job_id=task.job_id), timeout=DEADLINE
    )
    path, sha = receive_chunks(chunks, dest)
    assert sha == task.model.sha256
    weights = models.weights_from_bytes(path.read_bytes())
    path.unlink()
    return weights


def test_results_are_validated_through_a_real_job(
    coord: Harness, driven_node: Any, tmp_path: Path
) -> None:
    a, job, stats = start_probe_job(coord, driven_node)
    other = driven_node("hospital-b")  # holds the dataset too, but was sent nothing
    other.hello(dataset_info("cancer"))
    alice = coord.jobs("alice")

    # ---- round 0: feature statistics ------------------------------------------------
    base: dict[str, Any] = {}

    def snapshot() -> None:
        base.update(blobs=coord.blob_files(), tasks=coord.rows(tasks), spool=coord.spool_files())

    snapshot()
    assert [t["state"] for t in base["tasks"]] == ["sent"]

    def refused(
        code: grpc.StatusCode,
        match: str,
        hdr: pb.ResultHeader | None,
        parts: list[bytes],
        stub: pb_grpc.NodeServiceStub | None = None,
        chunks: Any = None,
    ) -> None:
        stub = stub or a.stub
        expect_status(code, stub.UploadResult, chunks or upload_parts(hdr, parts), match=match)
        _wait_until(
            lambda: coord.spool_files() == base["spool"],
            f"a refused upload ({match or code.name}) left a spool file",
        )
        assert coord.blob_files() == base["blobs"], "a refused upload stored a blob"
        assert coord.rows(tasks) == base["tasks"], "a refused upload changed a task"

    header = result_header
    good = moments()
    nan = np.array([0, np.nan, 0, 0], np.float32)
    inf = np.array([0, 0, np.inf, 0], np.float32)
    only_sum = models.weights_to_bytes({"sum": np.zeros(4, np.float32)})
    short_sum = moments(sum=np.zeros(3, np.float32))
    sha_good = ref_of(good).sha256
    stats_cases: list[tuple[grpc.StatusCode, str, pb.ResultHeader, list[bytes]]] = [
        # Transfer: hash, length, declared payload.
        (INVALID, "hash mismatch", header(stats, moments(sum=np.ones(4, np.float32))), [good]),
        (INVALID, "truncated", header(stats, good), [good[:-7]]),
        (INVALID, "truncated", header(stats, good), []),
        (INVALID, "exceeds its declared size", header(stats, good), [good, b"x"]),
        (
            INVALID,
            "64 lowercase hex",
            header(stats, None, blob=pb.BlobRef(sha256="XYZ", size=len(good))),
            [good],
        ),
        (
            INVALID,
            "out of range",
            header(stats, None, blob=pb.BlobRef(sha256=sha_good, size=-1)),
            [good],
        ),
        (INVALID, "must carry its payload", header(stats, None), []),
        (INVALID, "declares no payload", header(stats, None, ok=False), [good]),
        # Header does not match the task.
        (INVALID, "does not match the task", header(stats, good, job_id="other-job"), [good]),
        (INVALID, "does not match the task", header(stats, good, kind=pb.TASK_TRAIN), [good]),
        # Payload content.
        (INVALID, "not a valid safetensors", header(stats, b"garbage"), [b"garbage"]),
        (INVALID, "'sum' of shape (4,)", header(stats, short_sum), [short_sum]),
        (INVALID, "'sumsq' of shape (4,)", header(stats, only_sum), [only_sum]),
        (INVALID, "NaN or Inf", header(stats, moments(sum=nan)), [moments(sum=nan)]),
        (INVALID, "NaN or Inf", header(stats, moments(sumsq=inf)), [moments(sumsq=inf)]),
        (INVALID, "positive example count", header(stats, good, num_examples=0), [good]),
        (INVALID, "positive example count", header(stats, good, num_examples=-5), [good]),
    ]
    for code, match, hdr, parts in stats_cases:
        refused(code, match, hdr, parts)
    # A second header where data must follow.
    refused(
        INVALID,
        "only data chunks may follow",
        None,
        [],
        chunks=iter(
            [
                pb.UploadChunk(header=header(stats, good)),
                pb.UploadChunk(header=header(stats, good)),
            ]
        ),
    )
    # The task was sent to hospital-a, not to hospital-b.
    refused(DENIED, "not sent to you", header(stats, good), [good], stub=other.stub)
    # One data message above the 8 MiB limit, after a valid header.
    big = coord.node("hospital-a", options=coord.oversize_options())
    refused(TOO_BIG, "", header(stats, good), [b"\0" * OVERSIZE], stub=big)

    ack = a.upload(header(stats, good), [good[:100], good[100:]])
    assert ack.accepted and ack.sha256 == sha_good

    # ---- round 1: training ----------------------------------------------------------
    train = a.next_task(pb.TASK_TRAIN)
    assert train.job_id == job.job_id and train.model.sha256
    delta = {k: np.zeros_like(v) for k, v in download_model_of(a, train, tmp_path).items()}
    snapshot()

    def update(**override: np.ndarray | None) -> bytes:
        arrays = dict(delta)
        for k, v in override.items():
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v
        return models.weights_to_bytes(arrays)

    name = sorted(k for k, v in delta.items() if v.dtype.kind == "f" and v.ndim == 2)[0]
    shape = delta[name].shape
    bad_nan = np.zeros(shape, delta[name].dtype)
    bad_nan.flat[0] = np.nan
    bad_inf = np.zeros(shape, delta[name].dtype)
    bad_inf.flat[-1] = -np.inf
    wrong_shape = (*shape[::-1], 1)
    train_cases: list[tuple[str, bytes, dict[str, Any]]] = [
        ("do not match the model's tensors", update(**{name: None}), {}),
        ("do not match the model's tensors", update(extra=np.zeros(3, np.float32)), {}),
        (f"has shape {wrong_shape}", update(**{name: np.zeros(wrong_shape, np.float32)}), {}),
        (f"has shape {(int(np.prod(shape)),)}", update(**{name: bad_nan.reshape(-1)}), {}),
        ("NaN or Inf", update(**{name: bad_nan}), {}),
        ("NaN or Inf", update(**{name: bad_inf}), {}),
        ("positive number of examples", update(), {"num_examples": 0}),
        (
            "metric 'train_loss_sum' is not finite",
            update(),
            {"metrics": {"train_loss_sum": float("nan")}},
        ),
        (
            "metric 'eval_loss_sum' is not finite",
            update(),
            {"metrics": {"eval_loss_sum": float("inf")}},
        ),
    ]
    for match, data, kw in train_cases:
        refused(INVALID, match, header(train, data, **kw), [data])

    # Downloads of blobs that are not this node's to fetch.
    elsewhere = coord.ctx.blobs.put_bytes(models.weights_to_bytes({"x": np.ones(3)}))
    coord.ctx.store.create_job(
        job_id="elsewhere",
        name="elsewhere",
        owner="bob",
        spec_json="{}",
        job_hash="0" * 64,
        bundle_sha="",
        rounds_total=1,
    )
    coord.ctx.store.set_initial_model("elsewhere", elsewhere.sha256, elsewhere.size)
    for stub, request, match in [
        (other.stub, pb.BlobRequest(sha256=train.model.sha256, job_id=job.job_id), "no task"),
        (a.stub, pb.BlobRequest(sha256=elsewhere.sha256, job_id=job.job_id), "not belong"),
        (a.stub, pb.BlobRequest(sha256=elsewhere.sha256, job_id="elsewhere"), "no task"),
        (a.stub, pb.BlobRequest(sha256="f" * 64, job_id=job.job_id), "not belong"),
        (a.stub, pb.BlobRequest(sha256="", job_id=job.job_id), "not belong"),
        (a.stub, pb.BlobRequest(sha256=train.model.sha256, job_id=""), "no task"),
    ]:
        expect_status(DENIED, stub.DownloadBlob, request, match=match)

    good_update = update()
    ack = a.upload(header(train, good_update, metrics={"train_loss_sum": 42.0}), [good_update])
    assert ack.accepted

    done = _wait_for_state(coord, job.job_id, "completed")
    assert done.rounds_completed == 1 and list(done.nodes) == ["hospital-a"]
    assert [t["state"] for t in coord.rows(tasks)] == ["done", "done"]
    # A late, duplicate upload finds no active task.
    expect_status(
        NOT_FOUND,
        a.stub.UploadResult,
        upload_parts(header(train, good_update), [good_update]),
        match="is not active",
    )

    model_chunks = alice.DownloadModel(pb.JobRef(job_id=job.job_id), timeout=DEADLINE)
    path, sha = receive_chunks(model_chunks, tmp_path)
    assert sha == done.model.sha256 and path.stat().st_size == done.model.size
    coord.assert_serving()


def test_accepted_results_leave_no_spool_files(
    coord: Harness, driven_node: Any, tmp_path: Path
) -> None:
    a, job, stats = start_probe_job(coord, driven_node)
    good = moments()
    a.upload(result_header(stats, good), [good])
    train = a.next_task(pb.TASK_TRAIN)
    update = models.weights_to_bytes(
        {k: np.zeros_like(v) for k, v in download_model_of(a, train, tmp_path).items()}
    )
    a.upload(result_header(train, update), [update])
    _wait_for_state(coord, job.job_id, "completed")
    assert coord.spool_files() == []


def test_a_result_arriving_after_its_round_closed_is_refused(coord: Harness) -> None:
    # A round waiting for one statistics result from hospital-a, as JobRunner._dispatch does.
    collector = RoundCollector({"t1": "hospital-a"}, validator=lambda result: None)
    coord.ctx.broker.register(collector, "job", pb.TASK_STATS, {"t1": "hospital-a"})
    data = moments()
    header = pb.ResultHeader(
        task_id="t1", job_id="job", kind=pb.TASK_STATS, ok=True, num_examples=1, blob=ref_of(data)
    )
    gate = threading.Event()

    def parts() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=header)
        gate.wait(DEADLINE)
        yield pb.UploadChunk(data=data)

    upload = coord.node("hospital-a").UploadResult.future(parts(), timeout=DEADLINE)
    # The server has accepted the header once it spools the payload ...
    _wait_until(lambda: coord.spool_files() != [], "the upload never started spooling")
    # ... then the round ends (deadline passed) before the payload arrives.
    coord.ctx.broker.unregister(["t1"])
    gate.set()
    with pytest.raises(grpc.RpcError):
        upload.result()
    _wait_until(lambda: coord.spool_files() == [], "the late result's spool file was kept")
