from splitvault.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_MATCH: _ClassVar[Decision]
    DECISION_NO_MATCH: _ClassVar[Decision]
    DECISION_AMBIGUOUS: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_MATCH: Decision
DECISION_NO_MATCH: Decision
DECISION_AMBIGUOUS: Decision

class EnrollRequest(_message.Message):
    __slots__ = ("subject", "template", "request_id", "replace", "ticket", "group")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    subject: str
    template: _containers.RepeatedScalarFieldContainer[float]
    request_id: str
    replace: bool
    ticket: _common_pb2.VerificationTicket
    group: str
    def __init__(self, subject: _Optional[str] = ..., template: _Optional[_Iterable[float]] = ..., request_id: _Optional[str] = ..., replace: _Optional[bool] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., group: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("subject", "request_id", "epoch", "already_enrolled")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ENROLLED_FIELD_NUMBER: _ClassVar[int]
    subject: str
    request_id: str
    epoch: int
    already_enrolled: bool
    def __init__(self, subject: _Optional[str] = ..., request_id: _Optional[str] = ..., epoch: _Optional[int] = ..., already_enrolled: _Optional[bool] = ...) -> None: ...

class EnrollStreamRequest(_message.Message):
    __slots__ = ("subject", "template", "request_id", "replace", "ticket", "group")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    subject: str
    template: _containers.RepeatedScalarFieldContainer[float]
    request_id: str
    replace: bool
    ticket: _common_pb2.VerificationTicket
    group: str
    def __init__(self, subject: _Optional[str] = ..., template: _Optional[_Iterable[float]] = ..., request_id: _Optional[str] = ..., replace: _Optional[bool] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., group: _Optional[str] = ...) -> None: ...

class EnrollStreamResponse(_message.Message):
    __slots__ = ("subject", "request_id", "code", "message")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    subject: str
    request_id: str
    code: int
    message: str
    def __init__(self, subject: _Optional[str] = ..., request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EnrollBatchesRequest(_message.Message):
    __slots__ = ("items", "batch_ticket")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TICKET_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EnrollStreamRequest]
    batch_ticket: _common_pb2.VerificationTicket
    def __init__(self, items: _Optional[_Iterable[_Union[EnrollStreamRequest, _Mapping]]] = ..., batch_ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ...) -> None: ...

class EnrollBatchesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnrollStreamResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[EnrollStreamResponse, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("subject", "probe", "ticket")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    subject: str
    probe: _containers.RepeatedScalarFieldContainer[float]
    ticket: _common_pb2.VerificationTicket
    def __init__(self, subject: _Optional[str] = ..., probe: _Optional[_Iterable[float]] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("decision", "decision_id", "score", "epoch")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    decision_id: str
    score: float
    epoch: int
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., decision_id: _Optional[str] = ..., score: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("subject", "request_id", "ticket")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    subject: str
    request_id: str
    ticket: _common_pb2.VerificationTicket
    def __init__(self, subject: _Optional[str] = ..., request_id: _Optional[str] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ...) -> None: ...

class ShareholderOutcome(_message.Message):
    __slots__ = ("shareholder", "code", "message")
    SHAREHOLDER_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    shareholder: str
    code: int
    message: str
    def __init__(self, shareholder: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("subject", "complete", "outcomes")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    subject: str
    complete: bool
    outcomes: _containers.RepeatedCompositeFieldContainer[ShareholderOutcome]
    def __init__(self, subject: _Optional[str] = ..., complete: _Optional[bool] = ..., outcomes: _Optional[_Iterable[_Union[ShareholderOutcome, _Mapping]]] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("probe", "ticket", "group")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    probe: _containers.RepeatedScalarFieldContainer[float]
    ticket: _common_pb2.VerificationTicket
    group: str
    def __init__(self, probe: _Optional[_Iterable[float]] = ..., ticket: _Optional[_Union[_common_pb2.VerificationTicket, _Mapping]] = ..., group: _Optional[str] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("decision", "subject", "decision_id")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    subject: str
    decision_id: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., subject: _Optional[str] = ..., decision_id: _Optional[str] = ...) -> None: ...

class IdentifyBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[IdentifyRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[IdentifyRequest, _Mapping]]] = ...) -> None: ...

class IdentifyBatchResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: IdentifyResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[IdentifyResponse, _Mapping]] = ...) -> None: ...

class IdentifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IdentifyBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IdentifyBatchResult, _Mapping]]] = ...) -> None: ...
