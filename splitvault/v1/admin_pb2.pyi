from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_KIND_UNSPECIFIED: _ClassVar[SessionKind]
    SESSION_KIND_REFRESH: _ClassVar[SessionKind]
    SESSION_KIND_RESHARE: _ClassVar[SessionKind]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_BEGUN: _ClassVar[SessionState]
    SESSION_STATE_PREPARED: _ClassVar[SessionState]
    SESSION_STATE_COMMITTED: _ClassVar[SessionState]
    SESSION_STATE_FINALIZED: _ClassVar[SessionState]
    SESSION_STATE_ABORTED: _ClassVar[SessionState]
SESSION_KIND_UNSPECIFIED: SessionKind
SESSION_KIND_REFRESH: SessionKind
SESSION_KIND_RESHARE: SessionKind
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_BEGUN: SessionState
SESSION_STATE_PREPARED: SessionState
SESSION_STATE_COMMITTED: SessionState
SESSION_STATE_FINALIZED: SessionState
SESSION_STATE_ABORTED: SessionState

class DealFirstMacKeyRequest(_message.Message):
    __slots__ = ("peers", "width", "finish")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Member]
    width: int
    finish: bool
    def __init__(self, peers: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., width: _Optional[int] = ..., finish: _Optional[bool] = ...) -> None: ...

class DealFirstMacKeyResponse(_message.Message):
    __slots__ = ("epoch", "width", "already", "finished")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    width: int
    already: bool
    finished: bool
    def __init__(self, epoch: _Optional[int] = ..., width: _Optional[int] = ..., already: _Optional[bool] = ..., finished: _Optional[bool] = ...) -> None: ...

class GetMacKeyContributionRequest(_message.Message):
    __slots__ = ("epoch", "width")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    width: int
    def __init__(self, epoch: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class GetMacKeyContributionResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    def __init__(self, values: _Optional[bytes] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("name", "index", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    address: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class BeginSessionRequest(_message.Message):
    __slots__ = ("session_id", "kind", "from_epoch", "new_epoch", "old_committee", "new_committee", "old_threshold", "new_threshold", "senders", "plan", "mac_key_width")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEW_EPOCH_FIELD_NUMBER: _ClassVar[int]
    OLD_COMMITTEE_FIELD_NUMBER: _ClassVar[int]
    NEW_COMMITTEE_FIELD_NUMBER: _ClassVar[int]
    OLD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: SessionKind
    from_epoch: int
    new_epoch: int
    old_committee: _containers.RepeatedCompositeFieldContainer[Member]
    new_committee: _containers.RepeatedCompositeFieldContainer[Member]
    old_threshold: int
    new_threshold: int
    senders: _containers.RepeatedScalarFieldContainer[int]
    plan: CommitteePlan
    mac_key_width: int
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[_Union[SessionKind, str]] = ..., from_epoch: _Optional[int] = ..., new_epoch: _Optional[int] = ..., old_committee: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., new_committee: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., old_threshold: _Optional[int] = ..., new_threshold: _Optional[int] = ..., senders: _Optional[_Iterable[int]] = ..., plan: _Optional[_Union[CommitteePlan, _Mapping]] = ..., mac_key_width: _Optional[int] = ...) -> None: ...

class CommitteePlan(_message.Message):
    __slots__ = ("body", "approvals")
    BODY_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    approvals: _containers.RepeatedCompositeFieldContainer[PlanApproval]
    def __init__(self, body: _Optional[bytes] = ..., approvals: _Optional[_Iterable[_Union[PlanApproval, _Mapping]]] = ...) -> None: ...

class PlanApproval(_message.Message):
    __slots__ = ("operator", "signature")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    operator: str
    signature: bytes
    def __init__(self, operator: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "kind", "state", "from_epoch", "new_epoch", "actor", "started_ms", "updated_ms", "records_old", "records_prepared", "records_new", "records_skipped", "in_new_committee", "new_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEW_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_OLD_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PREPARED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_NEW_FIELD_NUMBER: _ClassVar[int]
    RECORDS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    IN_NEW_COMMITTEE_FIELD_NUMBER: _ClassVar[int]
    NEW_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: SessionKind
    state: SessionState
    from_epoch: int
    new_epoch: int
    actor: str
    started_ms: int
    updated_ms: int
    records_old: int
    records_prepared: int
    records_new: int
    records_skipped: int
    in_new_committee: bool
    new_index: int
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[_Union[SessionKind, str]] = ..., state: _Optional[_Union[SessionState, str]] = ..., from_epoch: _Optional[int] = ..., new_epoch: _Optional[int] = ..., actor: _Optional[str] = ..., started_ms: _Optional[int] = ..., updated_ms: _Optional[int] = ..., records_old: _Optional[int] = ..., records_prepared: _Optional[int] = ..., records_new: _Optional[int] = ..., records_skipped: _Optional[int] = ..., in_new_committee: _Optional[bool] = ..., new_index: _Optional[int] = ...) -> None: ...

class BeginSessionResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SessionStatus
    def __init__(self, status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class PrepareSessionRequest(_message.Message):
    __slots__ = ("session_id", "peers", "max_records_per_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_PER_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    peers: _containers.RepeatedCompositeFieldContainer[Member]
    max_records_per_s: int
    def __init__(self, session_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., max_records_per_s: _Optional[int] = ...) -> None: ...

class PrepareSessionResponse(_message.Message):
    __slots__ = ("done", "total", "status")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    status: SessionStatus
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class CheckRefreshRequest(_message.Message):
    __slots__ = ("session_id", "challenges", "peers", "exclude")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHALLENGES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    challenges: _containers.RepeatedScalarFieldContainer[bytes]
    peers: _containers.RepeatedCompositeFieldContainer[Member]
    exclude: _containers.RepeatedCompositeFieldContainer[RecordKey]
    def __init__(self, session_id: _Optional[str] = ..., challenges: _Optional[_Iterable[bytes]] = ..., peers: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., exclude: _Optional[_Iterable[_Union[RecordKey, _Mapping]]] = ...) -> None: ...

class CheckReshareRequest(_message.Message):
    __slots__ = ("session_id", "challenges", "contributions", "exclude_key_hashes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHALLENGES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_KEY_HASHES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    challenges: _containers.RepeatedScalarFieldContainer[bytes]
    contributions: _containers.RepeatedCompositeFieldContainer[MemberContribution]
    exclude_key_hashes: bytes
    def __init__(self, session_id: _Optional[str] = ..., challenges: _Optional[_Iterable[bytes]] = ..., contributions: _Optional[_Iterable[_Union[MemberContribution, _Mapping]]] = ..., exclude_key_hashes: _Optional[bytes] = ...) -> None: ...

class MemberContribution(_message.Message):
    __slots__ = ("name", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    contribution: bytes
    def __init__(self, name: _Optional[str] = ..., contribution: _Optional[bytes] = ...) -> None: ...

class CheckReshareResponse(_message.Message):
    __slots__ = ("contribution", "old_values", "new_values", "old_index", "new_index", "old_records", "new_records", "old_keys_sha256", "new_keys_sha256", "context_sha256", "old_key_hashes", "new_key_hashes")
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUES_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUES_FIELD_NUMBER: _ClassVar[int]
    OLD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NEW_INDEX_FIELD_NUMBER: _ClassVar[int]
    OLD_RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEW_RECORDS_FIELD_NUMBER: _ClassVar[int]
    OLD_KEYS_SHA256_FIELD_NUMBER: _ClassVar[int]
    NEW_KEYS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OLD_KEY_HASHES_FIELD_NUMBER: _ClassVar[int]
    NEW_KEY_HASHES_FIELD_NUMBER: _ClassVar[int]
    contribution: bytes
    old_values: _containers.RepeatedScalarFieldContainer[int]
    new_values: _containers.RepeatedScalarFieldContainer[int]
    old_index: int
    new_index: int
    old_records: int
    new_records: int
    old_keys_sha256: str
    new_keys_sha256: str
    context_sha256: str
    old_key_hashes: bytes
    new_key_hashes: bytes
    def __init__(self, contribution: _Optional[bytes] = ..., old_values: _Optional[_Iterable[int]] = ..., new_values: _Optional[_Iterable[int]] = ..., old_index: _Optional[int] = ..., new_index: _Optional[int] = ..., old_records: _Optional[int] = ..., new_records: _Optional[int] = ..., old_keys_sha256: _Optional[str] = ..., new_keys_sha256: _Optional[str] = ..., context_sha256: _Optional[str] = ..., old_key_hashes: _Optional[bytes] = ..., new_key_hashes: _Optional[bytes] = ...) -> None: ...

class CheckRefreshResponse(_message.Message):
    __slots__ = ("values", "records", "keys_sha256", "context_sha256", "excluded", "call", "renewal_values", "renewal_context_sha256")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_VALUES_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_CONTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    records: int
    keys_sha256: str
    context_sha256: str
    excluded: int
    call: int
    renewal_values: _containers.RepeatedScalarFieldContainer[int]
    renewal_context_sha256: str
    def __init__(self, values: _Optional[_Iterable[int]] = ..., records: _Optional[int] = ..., keys_sha256: _Optional[str] = ..., context_sha256: _Optional[str] = ..., excluded: _Optional[int] = ..., call: _Optional[int] = ..., renewal_values: _Optional[_Iterable[int]] = ..., renewal_context_sha256: _Optional[str] = ...) -> None: ...

class CommitSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CommitSessionResponse(_message.Message):
    __slots__ = ("done", "total", "status")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    status: SessionStatus
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class FinalizeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class FinalizeSessionResponse(_message.Message):
    __slots__ = ("done", "total", "status")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    status: SessionStatus
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class AbortSessionRequest(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortSessionResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SessionStatus
    def __init__(self, status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("found", "status")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    status: SessionStatus
    def __init__(self, found: _Optional[bool] = ..., status: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class ListSessionKeysRequest(_message.Message):
    __slots__ = ("session_id", "after_tenant", "after_subject", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_TENANT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_tenant: str
    after_subject: str
    limit: int
    def __init__(self, session_id: _Optional[str] = ..., after_tenant: _Optional[str] = ..., after_subject: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListSessionKeysResponse(_message.Message):
    __slots__ = ("keys", "more")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[RecordKey]
    more: bool
    def __init__(self, keys: _Optional[_Iterable[_Union[RecordKey, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class RecordKey(_message.Message):
    __slots__ = ("tenant", "subject", "threshold", "width")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    threshold: int
    width: int
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., threshold: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class GetRefreshDeltasRequest(_message.Message):
    __slots__ = ("session_id", "keys", "mask_challenges", "mask_threshold", "check_challenges", "check_context", "check_count", "mac_key", "renew", "renewal_mask", "renewal_mask_renew", "renewal_check_context", "check_answer")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MASK_CHALLENGES_FIELD_NUMBER: _ClassVar[int]
    MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CHECK_CHALLENGES_FIELD_NUMBER: _ClassVar[int]
    CHECK_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CHECK_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_MASK_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_MASK_RENEW_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_CHECK_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CHECK_ANSWER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keys: _containers.RepeatedCompositeFieldContainer[RecordKey]
    mask_challenges: _containers.RepeatedScalarFieldContainer[bytes]
    mask_threshold: int
    check_challenges: _containers.RepeatedScalarFieldContainer[bytes]
    check_context: bytes
    check_count: int
    mac_key: bool
    renew: bool
    renewal_mask: bool
    renewal_mask_renew: bool
    renewal_check_context: bytes
    check_answer: bool
    def __init__(self, session_id: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[RecordKey, _Mapping]]] = ..., mask_challenges: _Optional[_Iterable[bytes]] = ..., mask_threshold: _Optional[int] = ..., check_challenges: _Optional[_Iterable[bytes]] = ..., check_context: _Optional[bytes] = ..., check_count: _Optional[int] = ..., mac_key: _Optional[bool] = ..., renew: _Optional[bool] = ..., renewal_mask: _Optional[bool] = ..., renewal_mask_renew: _Optional[bool] = ..., renewal_check_context: _Optional[bytes] = ..., check_answer: _Optional[bool] = ...) -> None: ...

class GetRefreshDeltasResponse(_message.Message):
    __slots__ = ("values", "masks", "contribution", "key_hashes", "renewal", "renewal_contribution", "renewal_report", "check_answer")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    KEY_HASHES_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_REPORT_FIELD_NUMBER: _ClassVar[int]
    CHECK_ANSWER_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    masks: _containers.RepeatedScalarFieldContainer[int]
    contribution: bytes
    key_hashes: bytes
    renewal: bytes
    renewal_contribution: bytes
    renewal_report: bytes
    check_answer: CheckRefreshResponse
    def __init__(self, values: _Optional[bytes] = ..., masks: _Optional[_Iterable[int]] = ..., contribution: _Optional[bytes] = ..., key_hashes: _Optional[bytes] = ..., renewal: _Optional[bytes] = ..., renewal_contribution: _Optional[bytes] = ..., renewal_report: _Optional[bytes] = ..., check_answer: _Optional[_Union[CheckRefreshResponse, _Mapping]] = ...) -> None: ...

class GetReshareSharesRequest(_message.Message):
    __slots__ = ("session_id", "after_tenant", "after_subject", "limit", "keys", "mac_key", "check_mask_deal", "check_mask_reshare", "check_answer")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_TENANT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_FIELD_NUMBER: _ClassVar[int]
    CHECK_MASK_DEAL_FIELD_NUMBER: _ClassVar[int]
    CHECK_MASK_RESHARE_FIELD_NUMBER: _ClassVar[int]
    CHECK_ANSWER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_tenant: str
    after_subject: str
    limit: int
    keys: _containers.RepeatedCompositeFieldContainer[RecordKey]
    mac_key: bool
    check_mask_deal: bool
    check_mask_reshare: bool
    check_answer: bool
    def __init__(self, session_id: _Optional[str] = ..., after_tenant: _Optional[str] = ..., after_subject: _Optional[str] = ..., limit: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[RecordKey, _Mapping]]] = ..., mac_key: _Optional[bool] = ..., check_mask_deal: _Optional[bool] = ..., check_mask_reshare: _Optional[bool] = ..., check_answer: _Optional[bool] = ...) -> None: ...

class ReshareItem(_message.Message):
    __slots__ = ("tenant", "subject", "dimension", "codec_version", "mac_count", "request_id", "threshold", "values", "group")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAC_COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    dimension: int
    codec_version: int
    mac_count: int
    request_id: str
    threshold: int
    values: bytes
    group: str
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., dimension: _Optional[int] = ..., codec_version: _Optional[int] = ..., mac_count: _Optional[int] = ..., request_id: _Optional[str] = ..., threshold: _Optional[int] = ..., values: _Optional[bytes] = ..., group: _Optional[str] = ...) -> None: ...

class GetReshareSharesResponse(_message.Message):
    __slots__ = ("items", "more", "mac_key_values", "mac_key_width", "check_masks", "check_answer")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_VALUES_FIELD_NUMBER: _ClassVar[int]
    MAC_KEY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHECK_MASKS_FIELD_NUMBER: _ClassVar[int]
    CHECK_ANSWER_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReshareItem]
    more: bool
    mac_key_values: bytes
    mac_key_width: int
    check_masks: _containers.RepeatedScalarFieldContainer[int]
    check_answer: CheckReshareResponse
    def __init__(self, items: _Optional[_Iterable[_Union[ReshareItem, _Mapping]]] = ..., more: _Optional[bool] = ..., mac_key_values: _Optional[bytes] = ..., mac_key_width: _Optional[int] = ..., check_masks: _Optional[_Iterable[int]] = ..., check_answer: _Optional[_Union[CheckReshareResponse, _Mapping]] = ...) -> None: ...
