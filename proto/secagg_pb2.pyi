from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_PHASE_UNSPECIFIED: _ClassVar[SecAggPhase]
    SECAGG_PHASE_SETUP: _ClassVar[SecAggPhase]
    SECAGG_PHASE_ADVERTISE_KEYS: _ClassVar[SecAggPhase]
    SECAGG_PHASE_SHARE_KEYS: _ClassVar[SecAggPhase]
    SECAGG_PHASE_MASKED_INPUT: _ClassVar[SecAggPhase]
    SECAGG_PHASE_CONSISTENCY_CHECK: _ClassVar[SecAggPhase]
    SECAGG_PHASE_UNMASK: _ClassVar[SecAggPhase]

class SecAggShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_SHARE_KIND_UNSPECIFIED: _ClassVar[SecAggShareKind]
    SECAGG_SHARE_KIND_SELF_MASK_SEED: _ClassVar[SecAggShareKind]
    SECAGG_SHARE_KIND_MASK_KEY: _ClassVar[SecAggShareKind]
SECAGG_PHASE_UNSPECIFIED: SecAggPhase
SECAGG_PHASE_SETUP: SecAggPhase
SECAGG_PHASE_ADVERTISE_KEYS: SecAggPhase
SECAGG_PHASE_SHARE_KEYS: SecAggPhase
SECAGG_PHASE_MASKED_INPUT: SecAggPhase
SECAGG_PHASE_CONSISTENCY_CHECK: SecAggPhase
SECAGG_PHASE_UNMASK: SecAggPhase
SECAGG_SHARE_KIND_UNSPECIFIED: SecAggShareKind
SECAGG_SHARE_KIND_SELF_MASK_SEED: SecAggShareKind
SECAGG_SHARE_KIND_MASK_KEY: SecAggShareKind

class SecAggHeader(_message.Message):
    __slots__ = ("protocol_version", "job_id", "round", "phase", "sender", "context_hash")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HASH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    job_id: str
    round: int
    phase: SecAggPhase
    sender: int
    context_hash: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., sender: _Optional[int] = ..., context_hash: _Optional[bytes] = ...) -> None: ...

class SecAggParameters(_message.Message):
    __slots__ = ("num_nodes", "degree", "threshold", "value_bits", "clip", "max_nodes", "malicious_coordinator")
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MALICIOUS_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    num_nodes: int
    degree: int
    threshold: int
    value_bits: int
    clip: float
    max_nodes: int
    malicious_coordinator: bool
    def __init__(self, num_nodes: _Optional[int] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ..., value_bits: _Optional[int] = ..., clip: _Optional[float] = ..., max_nodes: _Optional[int] = ..., malicious_coordinator: _Optional[bool] = ...) -> None: ...

class SecAggRosterEntry(_message.Message):
    __slots__ = ("index", "node_id", "certificate")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    index: int
    node_id: str
    certificate: bytes
    def __init__(self, index: _Optional[int] = ..., node_id: _Optional[str] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("header", "params", "roster", "graph_seed", "neighbours", "num_values")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    params: SecAggParameters
    roster: _containers.RepeatedCompositeFieldContainer[SecAggRosterEntry]
    graph_seed: bytes
    neighbours: _containers.RepeatedScalarFieldContainer[int]
    num_values: int
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., params: _Optional[_Union[SecAggParameters, _Mapping]] = ..., roster: _Optional[_Iterable[_Union[SecAggRosterEntry, _Mapping]]] = ..., graph_seed: _Optional[bytes] = ..., neighbours: _Optional[_Iterable[int]] = ..., num_values: _Optional[int] = ...) -> None: ...

class SecAggAdvertiseKeys(_message.Message):
    __slots__ = ("header", "encryption_public_key", "mask_public_key", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    encryption_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggKeyDirectory(_message.Message):
    __slots__ = ("header", "advertisements")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ADVERTISEMENTS_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    advertisements: _containers.RepeatedCompositeFieldContainer[SecAggAdvertiseKeys]
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., advertisements: _Optional[_Iterable[_Union[SecAggAdvertiseKeys, _Mapping]]] = ...) -> None: ...

class SecAggEncryptedShare(_message.Message):
    __slots__ = ("sender", "receiver", "nonce", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeys(_message.Message):
    __slots__ = ("header", "shares", "self_mask_commitment", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShare]
    self_mask_commitment: bytes
    signature: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[SecAggEncryptedShare, _Mapping]]] = ..., self_mask_commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggShareDelivery(_message.Message):
    __slots__ = ("header", "shares")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShare]
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[SecAggEncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggMaskedInput(_message.Message):
    __slots__ = ("header", "num_values", "vector_sha256", "masked_vector", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SHA256_FIELD_NUMBER: _ClassVar[int]
    MASKED_VECTOR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    num_values: int
    vector_sha256: bytes
    masked_vector: bytes
    signature: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., num_values: _Optional[int] = ..., vector_sha256: _Optional[bytes] = ..., masked_vector: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggSurvivors(_message.Message):
    __slots__ = ("header", "survivors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    survivors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., survivors: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggConsistencySignature(_message.Message):
    __slots__ = ("header", "survivors", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    survivors: _containers.RepeatedScalarFieldContainer[int]
    signature: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., survivors: _Optional[_Iterable[int]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggSurvivorSignature(_message.Message):
    __slots__ = ("signer", "signature")
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signer: int
    signature: bytes
    def __init__(self, signer: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("header", "survivors", "signatures", "self_mask_share_owners", "mask_key_share_owners")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARE_OWNERS_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARE_OWNERS_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    survivors: _containers.RepeatedScalarFieldContainer[int]
    signatures: _containers.RepeatedCompositeFieldContainer[SecAggSurvivorSignature]
    self_mask_share_owners: _containers.RepeatedScalarFieldContainer[int]
    mask_key_share_owners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., survivors: _Optional[_Iterable[int]] = ..., signatures: _Optional[_Iterable[_Union[SecAggSurvivorSignature, _Mapping]]] = ..., self_mask_share_owners: _Optional[_Iterable[int]] = ..., mask_key_share_owners: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggRevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    kind: SecAggShareKind
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., kind: _Optional[_Union[SecAggShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("header", "shares", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealedShare]
    signature: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[SecAggRevealedShare, _Mapping]]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggAbort(_message.Message):
    __slots__ = ("header", "reason", "detail")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    reason: str
    detail: str
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
