from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_TRAIN: _ClassVar[TaskKind]
    TASK_STATS: _ClassVar[TaskKind]
    TASK_SECAGG: _ClassVar[TaskKind]
    TASK_END_JOB: _ClassVar[TaskKind]
    TASK_OFFER: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_TRAIN: TaskKind
TASK_STATS: TaskKind
TASK_SECAGG: TaskKind
TASK_END_JOB: TaskKind
TASK_OFFER: TaskKind

class BlobRef(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("sha256", "offset", "total_size", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    total_size: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "rows", "label", "features", "feature_shape", "schema_json", "schema_hash", "fingerprint", "format", "certificate_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    label: str
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    schema_json: str
    schema_hash: str
    fingerprint: str
    format: str
    certificate_json: str
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., label: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., feature_shape: _Optional[_Iterable[int]] = ..., schema_json: _Optional[str] = ..., schema_hash: _Optional[str] = ..., fingerprint: _Optional[str] = ..., format: _Optional[str] = ..., certificate_json: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("version", "datasets")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    version: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, version: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("node_name", "coordinator_version", "heartbeat_interval_s")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    coordinator_version: str
    heartbeat_interval_s: float
    def __init__(self, node_name: _Optional[str] = ..., coordinator_version: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class TaskStreamRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "kind", "job_spec_json", "job_hash", "model", "bundle", "dataset", "secagg", "deadline_unix", "secure", "weight_scale", "secagg_kind", "requester", "ledger_seq", "ledger_head")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SCALE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KIND_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEDGER_HEAD_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    job_spec_json: str
    job_hash: str
    model: BlobRef
    bundle: BlobRef
    dataset: str
    secagg: bytes
    deadline_unix: float
    secure: bool
    weight_scale: int
    secagg_kind: str
    requester: str
    ledger_seq: int
    ledger_head: str
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., job_spec_json: _Optional[str] = ..., job_hash: _Optional[str] = ..., model: _Optional[_Union[BlobRef, _Mapping]] = ..., bundle: _Optional[_Union[BlobRef, _Mapping]] = ..., dataset: _Optional[str] = ..., secagg: _Optional[bytes] = ..., deadline_unix: _Optional[float] = ..., secure: _Optional[bool] = ..., weight_scale: _Optional[int] = ..., secagg_kind: _Optional[str] = ..., requester: _Optional[str] = ..., ledger_seq: _Optional[int] = ..., ledger_head: _Optional[str] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "kind", "ok", "error", "num_examples", "metrics", "blob", "secagg", "receipt_json")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    ok: bool
    error: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    blob: BlobRef
    secagg: bytes
    receipt_json: str
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., blob: _Optional[_Union[BlobRef, _Mapping]] = ..., secagg: _Optional[bytes] = ..., receipt_json: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "message", "sha256", "receipt_json")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    sha256: str
    receipt_json: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., sha256: _Optional[str] = ..., receipt_json: _Optional[str] = ...) -> None: ...

class BlobRequest(_message.Message):
    __slots__ = ("sha256", "job_id")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    job_id: str
    def __init__(self, sha256: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("job_id", "job_hash", "outcome", "reason", "grant_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANT_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job_hash: str
    outcome: str
    reason: str
    grant_json: str
    def __init__(self, job_id: _Optional[str] = ..., job_hash: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., grant_json: _Optional[str] = ...) -> None: ...

class DecisionAck(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("job_id", "attestation_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attestation_json: str
    def __init__(self, job_id: _Optional[str] = ..., attestation_json: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("running_tasks",)
    RUNNING_TASKS_FIELD_NUMBER: _ClassVar[int]
    running_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running_tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    def __init__(self, server_time: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_json", "bundle")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    bundle: bytes
    def __init__(self, spec_json: _Optional[str] = ..., bundle: _Optional[bytes] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "metrics", "nodes", "started", "finished", "attempt")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    metrics: _containers.ScalarMap[str, float]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    started: float
    finished: float
    attempt: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., nodes: _Optional[_Iterable[str]] = ..., started: _Optional[float] = ..., finished: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "owner", "state", "reason", "rounds_total", "rounds_completed", "job_hash", "model", "spec_json", "created", "updated", "rounds", "nodes", "grants", "privacy_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    JOB_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    owner: str
    state: str
    reason: str
    rounds_total: int
    rounds_completed: int
    job_hash: str
    model: BlobRef
    spec_json: str
    created: float
    updated: float
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    grants: _containers.RepeatedCompositeFieldContainer[GrantInfo]
    privacy_json: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., rounds_total: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., job_hash: _Optional[str] = ..., model: _Optional[_Union[BlobRef, _Mapping]] = ..., spec_json: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., nodes: _Optional[_Iterable[str]] = ..., grants: _Optional[_Iterable[_Union[GrantInfo, _Mapping]]] = ..., privacy_json: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: str
    limit: int
    def __init__(self, state: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "time", "kind", "message", "round", "metrics", "state")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time: float
    kind: str
    message: str
    round: int
    metrics: _containers.ScalarMap[str, float]
    state: str
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., round: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., state: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "online", "last_seen", "datasets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    online: bool
    last_seen: float
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, name: _Optional[str] = ..., online: _Optional[bool] = ..., last_seen: _Optional[float] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class LedgerRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "limit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    limit: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("seq", "entry_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    entry_json: str
    def __init__(self, seq: _Optional[int] = ..., entry_json: _Optional[str] = ...) -> None: ...

class LedgerResponse(_message.Message):
    __slots__ = ("entries", "head_seq", "head_hash", "signer_cert_pem")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    head_seq: int
    head_hash: str
    signer_cert_pem: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ..., signer_cert_pem: _Optional[str] = ...) -> None: ...

class DossierResponse(_message.Message):
    __slots__ = ("dossier_json",)
    DOSSIER_JSON_FIELD_NUMBER: _ClassVar[int]
    dossier_json: str
    def __init__(self, dossier_json: _Optional[str] = ...) -> None: ...

class GrantInfo(_message.Message):
    __slots__ = ("node", "outcome", "reason", "grant_json", "updated")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANT_JSON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    node: str
    outcome: str
    reason: str
    grant_json: str
    updated: float
    def __init__(self, node: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., grant_json: _Optional[str] = ..., updated: _Optional[float] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...
