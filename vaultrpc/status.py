"""One exception class per gRPC status, mapped in one place.

Handlers raise these with a whole-sentence message that is safe to show the
caller (never template, probe, share or key bytes). Anything else that
escapes a handler becomes INTERNAL with a generic message; the detail goes to
the server log only.
"""
from __future__ import annotations

import grpc

from vault import errors as vault_errors


class RpcError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RpcError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RpcError):
    code = grpc.StatusCode.ABORTED


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(RpcError):
    code = grpc.StatusCode.DATA_LOSS


class Internal(RpcError):
    code = grpc.StatusCode.INTERNAL


# Domain errors from the pure core, and the status each becomes.
_DOMAIN = (
    (vault_errors.InvalidTemplate, grpc.StatusCode.INVALID_ARGUMENT),
    (vault_errors.InvalidTicket, grpc.StatusCode.PERMISSION_DENIED),
    (vault_errors.EnvelopeError, grpc.StatusCode.DATA_LOSS),
    (vault_errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (vault_errors.InvalidShares, grpc.StatusCode.INVALID_ARGUMENT),
    (vault_errors.InvalidName, grpc.StatusCode.INVALID_ARGUMENT),
)

_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated, ResourceExhausted,
    FailedPrecondition, Aborted, Unavailable, DeadlineExceeded, DataLoss, Internal,
)}

GENERIC_INTERNAL = "Internal error; the server log has the details."


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (status, caller-safe message) for an exception."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    for cls, code in _DOMAIN:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


def error(code: grpc.StatusCode, message: str) -> RpcError:
    """The RpcError of a status code (a code without a class here is INTERNAL)."""
    return _BY_CODE.get(code, Internal)(message)


def of(exc: BaseException) -> RpcError:
    """The RpcError an exception becomes, by the same map as to_status."""
    return error(*to_status(exc))


def checked(check, *args):
    """check(*args), a domain error raised as the RpcError it maps to (for
    handlers that collect RpcErrors per item, like bulk enrolment)."""
    try:
        return check(*args)
    except vault_errors.VaultError as exc:
        raise of(exc) from None


def code_value(code: grpc.StatusCode) -> int:
    """The google.rpc.Code integer of a status."""
    return code.value[0]
