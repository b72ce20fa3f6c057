from splitvault.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoreSharesRequest(_message.Message):
    __slots__ = ("records", "replace", "tickets", "batches")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShareRecord]
    replace: bool
    tickets: _containers.RepeatedCompositeFieldContainer[_common_pb2.VerificationTicket]
    batches: _containers.RepeatedCompositeFieldContainer[_common_pb2.WriteBatch]
    def __init__(self, records: _Optional[_Iterable[_Union[_common_pb2.ShareRecord, _Mapping]]] = ..., replace: _Optional[bool] = ..., tickets: _Optional[_Iterable[_Union[_common_pb2.VerificationTicket, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[_common_pb2.WriteBatch, _Mapping]]] = ...) -> None: ...

class StoreSharesResponse(_message.Message):
    __slots__ = ("stored", "already_stored")
    STORED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    already_stored: int
    def __init__(self, stored: _Optional[int] = ..., already_stored: _Optional[int] = ...) -> None: ...

class StoreShareStreamRequest(_message.Message):
    __slots__ = ("records", "replace", "tickets", "batches")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShareRecord]
    replace: bool
    tickets: _containers.RepeatedCompositeFieldContainer[_common_pb2.VerificationTicket]
    batches: _containers.RepeatedCompositeFieldContainer[_common_pb2.WriteBatch]
    def __init__(self, records: _Optional[_Iterable[_Union[_common_pb2.ShareRecord, _Mapping]]] = ..., replace: _Optional[bool] = ..., tickets: _Optional[_Iterable[_Union[_common_pb2.VerificationTicket, _Mapping]]] = ..., batches: _Optional[_Iterable[_Union[_common_pb2.WriteBatch, _Mapping]]] = ...) -> None: ...

class StoreShareStreamResponse(_message.Message):
    __slots__ = ("stored", "already_stored")
    STORED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    already_stored: int
    def __init__(self, stored: _Optional[int] = ..., already_stored: _Optional[int] = ...) -> None: ...

class ReleaseShareRequest(_message.Message):
    __slots__ = ("ticket", "identify_query_id", "subject")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    IDENTIFY_QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ticket: _common_pb2.VerificationTicket
    identify_query_id: str
    subject: str
    def __init__(self, ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., identify_query_id: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class ReleaseShareResponse(_message.Message):
    __slots__ = ("shares", "audit_seq", "mac_keys")
    SHARES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAC_KEYS_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShareRecord]
    audit_seq: int
    mac_keys: _containers.RepeatedCompositeFieldContainer[_common_pb2.MacKeyShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[_common_pb2.ShareRecord, _Mapping]]] = ..., audit_seq: _Optional[int] = ..., mac_keys: _Optional[_Iterable[_Union[_common_pb2.MacKeyShare, _Mapping]]] = ...) -> None: ...

class GetMacKeyShareRequest(_message.Message):
    __slots__ = ("dimension", "ticket", "batch")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    ticket: _common_pb2.VerificationTicket
    batch: _common_pb2.WriteBatch
    def __init__(self, dimension: _Optional[int] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., batch: _Optional[_Union[_common_pb2.WriteBatch, _Mapping]] = ...) -> None: ...

class GetMacKeyShareResponse(_message.Message):
    __slots__ = ("key", "audit_seq")
    KEY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.MacKeyShare
    audit_seq: int
    def __init__(self, key: _Optional[_Union[_common_pb2.MacKeyShare, _Mapping]] = ..., audit_seq: _Optional[int] = ...) -> None: ...

class DeleteSharesRequest(_message.Message):
    __slots__ = ("tenant", "subject", "request_id", "ticket", "batch")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    request_id: str
    ticket: _common_pb2.VerificationTicket
    batch: _common_pb2.WriteBatch
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., request_id: _Optional[str] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., batch: _Optional[_Union[_common_pb2.WriteBatch, _Mapping]] = ...) -> None: ...

class DeleteSharesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class DescribeRecordsRequest(_message.Message):
    __slots__ = ("tenant", "subject")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class DescribeRecordsResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_common_pb2.RecordInfo]
    def __init__(self, records: _Optional[_Iterable[_Union[_common_pb2.RecordInfo, _Mapping]]] = ...) -> None: ...

class GetNodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetNodeInfoResponse(_message.Message):
    __slots__ = ("name", "index", "epoch", "kek_version", "audit_public_key", "records", "audit_head_seq", "mac_key_width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEK_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    epoch: int
    kek_version: int
    audit_public_key: bytes
    records: int
    audit_head_seq: int
    mac_key_width: int
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., epoch: _Optional[int] = ..., kek_version: _Optional[int] = ..., audit_public_key: _Optional[bytes] = ..., records: _Optional[int] = ..., audit_head_seq: _Optional[int] = ..., mac_key_width: _Optional[int] = ...) -> None: ...

class ReadAuditLogRequest(_message.Message):
    __slots__ = ("from_seq",)
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    def __init__(self, from_seq: _Optional[int] = ...) -> None: ...

class ReadAuditLogResponse(_message.Message):
    __slots__ = ("entry", "checkpoint")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    entry: _common_pb2.AuditEntry
    checkpoint: _common_pb2.AuditCheckpoint
    def __init__(self, entry: _Optional[_Union[_common_pb2.AuditEntry, _Mapping]] = ..., checkpoint: _Optional[_Union[_common_pb2.AuditCheckpoint, _Mapping]] = ...) -> None: ...

class RotateKekRequest(_message.Message):
    __slots__ = ("session_id", "batch_size", "pause_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    batch_size: int
    pause_ms: int
    def __init__(self, session_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., pause_ms: _Optional[int] = ...) -> None: ...

class RotateKekResponse(_message.Message):
    __slots__ = ("phase", "session_id", "node", "to_version", "from_versions", "total", "rewrapped", "batches", "resumed", "retired_versions", "already_done", "audit_seq")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[RotateKekResponse.Phase]
        PHASE_STARTED: _ClassVar[RotateKekResponse.Phase]
        PHASE_REWRAPPING: _ClassVar[RotateKekResponse.Phase]
        PHASE_DONE: _ClassVar[RotateKekResponse.Phase]
    PHASE_UNSPECIFIED: RotateKekResponse.Phase
    PHASE_STARTED: RotateKekResponse.Phase
    PHASE_REWRAPPING: RotateKekResponse.Phase
    PHASE_DONE: RotateKekResponse.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DONE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    phase: RotateKekResponse.Phase
    session_id: str
    node: str
    to_version: int
    from_versions: _containers.RepeatedScalarFieldContainer[int]
    total: int
    rewrapped: int
    batches: int
    resumed: bool
    retired_versions: _containers.RepeatedScalarFieldContainer[int]
    already_done: bool
    audit_seq: int
    def __init__(self, phase: _Optional[_Union[RotateKekResponse.Phase, str]] = ..., session_id: _Optional[str] = ..., node: _Optional[str] = ..., to_version: _Optional[int] = ..., from_versions: _Optional[_Iterable[int]] = ..., total: _Optional[int] = ..., rewrapped: _Optional[int] = ..., batches: _Optional[int] = ..., resumed: _Optional[bool] = ..., retired_versions: _Optional[_Iterable[int]] = ..., already_done: _Optional[bool] = ..., audit_seq: _Optional[int] = ...) -> None: ...

class WitnessCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _common_pb2.AuditCheckpoint
    def __init__(self, checkpoint: _Optional[_Union[_common_pb2.AuditCheckpoint, _Mapping]] = ...) -> None: ...

class WitnessCheckpointResponse(_message.Message):
    __slots__ = ("audit_seq", "already_witnessed")
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    ALREADY_WITNESSED_FIELD_NUMBER: _ClassVar[int]
    audit_seq: int
    already_witnessed: bool
    def __init__(self, audit_seq: _Optional[int] = ..., already_witnessed: _Optional[bool] = ...) -> None: ...
