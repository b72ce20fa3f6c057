"""The role interceptor without a transport: a method's wrapped handler is
built once and reused, the role check still runs on every call, and the
identity a handler reads back is the one authorised for that call."""
from __future__ import annotations

import logging

import grpc
import pytest

from vault import pki
from vaultrpc import server as rpcserver

METHOD = "/t.T/Do"


class Ctx:
    """A servicer context carrying one client certificate."""

    def __init__(self, pem: bytes | None):
        self._pem = pem
        self._code = None

    def auth_context(self):
        return {"x509_pem_cert": [self._pem]} if self._pem else {}

    def abort(self, code, message):
        self._code = code
        raise Exception(message)  # what grpc's abort raises

    def code(self):
        return self._code


@pytest.fixture(scope="module")
def pems():
    ca, key = pki.make_ca()
    return {role: pki.issue_cert(ca, key, role, f"{role}-1")[0] for role in ("matcher", "auditor")}


def details(method=METHOD):
    class D:
        pass

    d = D()
    d.method, d.invocation_metadata = method, ()
    return d


def test_wrapper_is_reused_and_every_call_is_authorised(pems):
    seen = []

    def behaviour(request, context):
        seen.append(rpcserver.caller(context))
        return b"ok"

    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    icpt = rpcserver.RoleInterceptor({METHOD: frozenset({"matcher"})}, logging.getLogger("test"))
    first = icpt.intercept_service(lambda d: handler, details())
    assert icpt.intercept_service(lambda d: handler, details()) is first
    assert first.unary_unary(b"x", Ctx(pems["matcher"])) == b"ok"
    assert seen == [pki.Identity("matcher", "matcher-1")]
    # The cached wrapper still refuses a wrong role, and no certificate at all.
    for pem, code in ((pems["auditor"], grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED)):
        ctx = Ctx(pem)
        with pytest.raises(Exception):
            first.unary_unary(b"x", ctx)
        assert ctx.code() == code
    assert len(seen) == 1
    # Another handler for the same method gets its own wrapper.
    other = grpc.unary_unary_rpc_method_handler(lambda request, context: b"other")
    wrapped = icpt.intercept_service(lambda d: other, details())
    assert wrapped is not first and wrapped.unary_unary(b"x", Ctx(pems["matcher"])) == b"other"


def test_unknown_method_is_denied_by_default(pems):
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    icpt = rpcserver.RoleInterceptor({}, logging.getLogger("test"))
    wrapped = icpt.intercept_service(lambda d: handler, details("/t.T/Other"))
    ctx = Ctx(pems["matcher"])
    with pytest.raises(Exception):
        wrapped.unary_unary(b"x", ctx)
    assert ctx.code() == grpc.StatusCode.PERMISSION_DENIED
    assert icpt.intercept_service(lambda d: None, details("/t.T/Missing")) is None


def test_caller_without_the_interceptor_reads_the_certificate(pems):
    assert rpcserver.caller(Ctx(pems["auditor"])) == pki.Identity("auditor", "auditor-1")
    assert rpcserver.caller(Ctx(None)) is None
    # Only an Identity set by the interceptor is taken from the context.
    ctx = Ctx(pems["auditor"])
    setattr(ctx, rpcserver._IDENTITY_ATTR, "matcher/forged")
    assert rpcserver.caller(ctx) == pki.Identity("auditor", "auditor-1")


def test_json_log_line_is_unchanged():
    import json

    from vaultrpc import logs

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append((record, self.format(record)))

    handler = Keep()
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test.json-line")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logs.event(logger, "rpc", method=METHOD, caller="matcher/m", code="OK", ms=1.25, n=None, who=pki.Identity("a", "b"))
        logs.event(logger, "quiet", logging.DEBUG, x=1)
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1
    record, line = lines[0]
    expected = {"ts": round(record.created, 3), "level": "info", "logger": "test.json-line", "msg": "rpc",
                "method": METHOD, "caller": "matcher/m", "code": "OK", "ms": 1.25, "n": None, "who": "a/b"}
    assert line == json.dumps(expected, separators=(",", ":"), default=str)
    assert record.funcName == "event" and record.pathname == logs.__file__


def test_a_store_out_of_reach_is_unavailable_not_internal(pems):
    """Errors the server names as "not now" (a node's PostgreSQL away or just
    restarted: shareholders.storage.unavailable_errors) are UNAVAILABLE with
    one sentence; any other exception stays INTERNAL."""

    class Away(Exception):
        pass

    def raising(exc):
        def behaviour(request, context):
            raise exc
        return grpc.unary_unary_rpc_method_handler(behaviour)

    icpt = rpcserver.RoleInterceptor({METHOD: frozenset({"matcher"})}, logging.getLogger("test"), (Away,))
    for exc, code, message in ((Away("server closed the connection unexpectedly"), grpc.StatusCode.UNAVAILABLE,
                                rpcserver.STORE_UNAVAILABLE),
                               (KeyError("x"), grpc.StatusCode.INTERNAL, "Internal error; the server log has the details.")):
        handler = raising(exc)
        wrapped = icpt.intercept_service(lambda d: handler, details())
        ctx = Ctx(pems["matcher"])
        with pytest.raises(Exception) as err:
            wrapped.unary_unary(b"x", ctx)
        assert (ctx.code(), str(err.value)) == (code, message)
