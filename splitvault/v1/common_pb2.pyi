from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TicketOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TICKET_OPERATION_UNSPECIFIED: _ClassVar[TicketOperation]
    TICKET_OPERATION_VERIFY: _ClassVar[TicketOperation]
    TICKET_OPERATION_ENROLL: _ClassVar[TicketOperation]
    TICKET_OPERATION_REPLACE: _ClassVar[TicketOperation]
    TICKET_OPERATION_DELETE: _ClassVar[TicketOperation]
    TICKET_OPERATION_IDENTIFY: _ClassVar[TicketOperation]
TICKET_OPERATION_UNSPECIFIED: TicketOperation
TICKET_OPERATION_VERIFY: TicketOperation
TICKET_OPERATION_ENROLL: TicketOperation
TICKET_OPERATION_REPLACE: TicketOperation
TICKET_OPERATION_DELETE: TicketOperation
TICKET_OPERATION_IDENTIFY: TicketOperation

class ShareRecord(_message.Message):
    __slots__ = ("tenant", "subject", "index", "epoch", "threshold", "shareholders", "dimension", "codec_version", "mac_count", "values", "request_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SHAREHOLDERS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAC_COUNT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    index: int
    epoch: int
    threshold: int
    shareholders: int
    dimension: int
    codec_version: int
    mac_count: int
    values: bytes
    request_id: str
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., index: _Optional[int] = ..., epoch: _Optional[int] = ..., threshold: _Optional[int] = ..., shareholders: _Optional[int] = ..., dimension: _Optional[int] = ..., codec_version: _Optional[int] = ..., mac_count: _Optional[int] = ..., values: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class MacKeyShare(_message.Message):
    __slots__ = ("epoch", "index", "dimension", "values")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    index: int
    dimension: int
    values: bytes
    def __init__(self, epoch: _Optional[int] = ..., index: _Optional[int] = ..., dimension: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class RecordInfo(_message.Message):
    __slots__ = ("tenant", "subject", "index", "epoch", "threshold", "shareholders", "dimension", "codec_version", "request_id", "kek_version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SHAREHOLDERS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEK_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    index: int
    epoch: int
    threshold: int
    shareholders: int
    dimension: int
    codec_version: int
    request_id: str
    kek_version: int
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., index: _Optional[int] = ..., epoch: _Optional[int] = ..., threshold: _Optional[int] = ..., shareholders: _Optional[int] = ..., dimension: _Optional[int] = ..., codec_version: _Optional[int] = ..., request_id: _Optional[str] = ..., kek_version: _Optional[int] = ...) -> None: ...

class VerificationTicket(_message.Message):
    __slots__ = ("body", "signature", "key_id")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    key_id: str
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class TicketBody(_message.Message):
    __slots__ = ("tenant", "subject", "request_id", "probe_digest", "nonce", "issued_at_ms", "expires_at_ms", "operation", "audience", "template_digest", "batch_digest", "group")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    request_id: str
    probe_digest: bytes
    nonce: bytes
    issued_at_ms: int
    expires_at_ms: int
    operation: TicketOperation
    audience: str
    template_digest: bytes
    batch_digest: bytes
    group: str
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., request_id: _Optional[str] = ..., probe_digest: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., operation: _Optional[_Union[TicketOperation, str]] = ..., audience: _Optional[str] = ..., template_digest: _Optional[bytes] = ..., batch_digest: _Optional[bytes] = ..., group: _Optional[str] = ...) -> None: ...

class WriteItem(_message.Message):
    __slots__ = ("subject", "request_id", "template_digest", "group")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    subject: str
    request_id: str
    template_digest: bytes
    group: str
    def __init__(self, subject: _Optional[str] = ..., request_id: _Optional[str] = ..., template_digest: _Optional[bytes] = ..., group: _Optional[str] = ...) -> None: ...

class WriteBatch(_message.Message):
    __slots__ = ("ticket", "items")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ticket: VerificationTicket
    items: _containers.RepeatedCompositeFieldContainer[WriteItem]
    def __init__(self, ticket: _Optional[_Union[VerificationTicket, _Mapping]] = ..., items: _Optional[_Iterable[_Union[WriteItem, _Mapping]]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("seq", "time_ms", "node", "event", "actor", "request_id", "tenant", "subject", "details_json", "prev_hash", "entry_hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_ms: int
    node: str
    event: str
    actor: str
    request_id: str
    tenant: str
    subject: str
    details_json: str
    prev_hash: bytes
    entry_hash: bytes
    def __init__(self, seq: _Optional[int] = ..., time_ms: _Optional[int] = ..., node: _Optional[str] = ..., event: _Optional[str] = ..., actor: _Optional[str] = ..., request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., subject: _Optional[str] = ..., details_json: _Optional[str] = ..., prev_hash: _Optional[bytes] = ..., entry_hash: _Optional[bytes] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("seq", "entry_hash", "time_ms", "node", "signature")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    entry_hash: bytes
    time_ms: int
    node: str
    signature: bytes
    def __init__(self, seq: _Optional[int] = ..., entry_hash: _Optional[bytes] = ..., time_ms: _Optional[int] = ..., node: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...
