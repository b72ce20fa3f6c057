from splitvault.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IdentifyStart(_message.Message):
    __slots__ = ("ticket", "query_id", "committee", "probe_share", "dimension", "threshold", "margin", "addresses", "group", "verify_subject")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTEE_FIELD_NUMBER: _ClassVar[int]
    PROBE_SHARE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ticket: _common_pb2.VerificationTicket
    query_id: str
    committee: _containers.RepeatedScalarFieldContainer[str]
    probe_share: bytes
    dimension: int
    threshold: int
    margin: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    group: str
    verify_subject: str
    def __init__(self, ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., query_id: _Optional[str] = ..., committee: _Optional[_Iterable[str]] = ..., probe_share: _Optional[bytes] = ..., dimension: _Optional[int] = ..., threshold: _Optional[int] = ..., margin: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., group: _Optional[str] = ..., verify_subject: _Optional[str] = ...) -> None: ...

class IdentifyVerifyThreshold(_message.Message):
    __slots__ = ("share", "next_share")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    NEXT_SHARE_FIELD_NUMBER: _ClassVar[int]
    share: bytes
    next_share: bytes
    def __init__(self, share: _Optional[bytes] = ..., next_share: _Optional[bytes] = ...) -> None: ...

class IdentifyPairs(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: _containers.RepeatedScalarFieldContainer[int]
    second: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first: _Optional[_Iterable[int]] = ..., second: _Optional[_Iterable[int]] = ...) -> None: ...

class IdentifyResolve(_message.Message):
    __slots__ = ("row",)
    ROW_FIELD_NUMBER: _ClassVar[int]
    row: int
    def __init__(self, row: _Optional[int] = ...) -> None: ...

class IdentifyConfirm(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rows: _Optional[_Iterable[int]] = ...) -> None: ...

class IdentifyQueryRequest(_message.Message):
    __slots__ = ("start", "pairs", "resolve", "confirm", "verify_threshold")
    START_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    VERIFY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    start: IdentifyStart
    pairs: IdentifyPairs
    resolve: IdentifyResolve
    confirm: IdentifyConfirm
    verify_threshold: IdentifyVerifyThreshold
    def __init__(self, start: _Optional[_Union[IdentifyStart, _Mapping]] = ..., pairs: _Optional[_Union[IdentifyPairs, _Mapping]] = ..., resolve: _Optional[_Union[IdentifyResolve, _Mapping]] = ..., confirm: _Optional[_Union[IdentifyConfirm, _Mapping]] = ..., verify_threshold: _Optional[_Union[IdentifyVerifyThreshold, _Mapping]] = ...) -> None: ...

class IdentifyQueryResponse(_message.Message):
    __slots__ = ("bits", "rows", "gallery_digest", "subject", "audit_seq", "subjects", "norm_share", "epoch")
    BITS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    GALLERY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    NORM_SHARE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    bits: bytes
    rows: int
    gallery_digest: bytes
    subject: str
    audit_seq: int
    subjects: _containers.RepeatedScalarFieldContainer[str]
    norm_share: bytes
    epoch: int
    def __init__(self, bits: _Optional[bytes] = ..., rows: _Optional[int] = ..., gallery_digest: _Optional[bytes] = ..., subject: _Optional[str] = ..., audit_seq: _Optional[int] = ..., subjects: _Optional[_Iterable[str]] = ..., norm_share: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class IdentifyRoundRequest(_message.Message):
    __slots__ = ("query_id", "round", "payload")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    round: int
    payload: bytes
    def __init__(self, query_id: _Optional[str] = ..., round: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class IdentifyRoundResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
