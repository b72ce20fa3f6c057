"""Server assembly: one interceptor doing, in order, authentication (role
from the client certificate), exception-to-status, logging and metrics;
health and reflection; graceful shutdown on SIGTERM/SIGINT."""
from __future__ import annotations

import ctypes
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from vault.pki import Identity, identity_from_pem
from vaultrpc import logs, status
from vaultrpc.tls import MAX_MESSAGE_BYTES, TlsMaterial

RPC_TOTAL = Counter("splitvault_rpc_total", "RPCs handled, by method and status code.", ["method", "code"])
RPC_SECONDS = Histogram(
    "splitvault_rpc_seconds",
    "RPC handling time in seconds, by method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Methods every authenticated party may call.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
)

_log = logging.getLogger("vaultrpc")
_PR_SET_DUMPABLE = 4

# A request that does not parse reaches the handler as this marker and is
# refused AFTER authorisation with INVALID_ARGUMENT. (Left to grpc, it is
# INTERNAL "Exception deserializing request!", a server-side traceback,
# and a wrong-role caller learns nothing of its role: tests/test_hostile_*.py.)
_UNPARSEABLE = object()


def _tolerant(deserialize):
    if deserialize is None:
        return None

    def parse(data):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and kin
            return _UNPARSEABLE

    return parse


def _parsed(request):
    if request is _UNPARSEABLE:
        raise status.InvalidArgument("The request is not a well-formed message of this method's type.")
    return request


def _parsed_stream(requests):
    for request in requests:
        yield _parsed(request)


# The identity the interceptor authorised, kept on the call's own context so
# that a handler asking again does not rebuild grpc's auth context dict.
_IDENTITY_ATTR = "_splitvault_identity"


def _peer_identity(context: grpc.ServicerContext) -> Identity | None:
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return identity_from_pem(pems[0])


def caller(context: grpc.ServicerContext) -> Identity | None:
    """The caller's identity from its verified client certificate."""
    who = getattr(context, _IDENTITY_ATTR, None)
    if type(who) is Identity:
        return who
    return _peer_identity(context)


class RoleInterceptor(grpc.ServerInterceptor):
    """Authorise by role, map exceptions to statuses, log and count every call.

    ``roles`` maps a full method name to the roles allowed to call it; a
    method missing from the table is refused (deny by default).

    The wrapped handler of a method is built once and reused for every call
    that resolves to the same handler (it holds no per-call state).
    """

    # Bounds the cache; only methods a registered handler answers are cached.
    _MAX_CACHED = 1024

    def __init__(self, roles: Mapping[str, frozenset[str]], logger: logging.Logger,
                 unavailable: tuple[type[BaseException], ...] = ()):
        self._roles = roles
        self._log = logger
        # Errors that mean "not now" (a node's store out of reach): UNAVAILABLE, not INTERNAL.
        self._unavailable = unavailable
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if method in self._wrapped or len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        allowed = self._roles.get(method)
        open_method = method in OPEN_METHODS
        log = self._log
        unavailable = self._unavailable
        short_name = method.rsplit("/", 1)[-1]
        # This method's metric children, made on first use (labels() takes the
        # metric's lock and builds a key on every call).
        children: dict = {}
        ok = grpc.StatusCode.OK

        def authorise(context) -> Identity:
            who = _peer_identity(context)
            if who is None:
                raise status.Unauthenticated("The client certificate carries no splitvault identity.")
            if not open_method and (allowed is None or who.role not in allowed):
                raise status.PermissionDenied(f"Role {who.role!r} may not call {short_name}.")
            try:
                setattr(context, _IDENTITY_ATTR, who)
            except AttributeError:  # a context that takes no attributes: caller() asks grpc again
                pass
            return who

        def finish(context, who, started, exc):
            if exc is None:
                code = ok
            elif unavailable and isinstance(exc, unavailable):
                code, message = grpc.StatusCode.UNAVAILABLE, STORE_UNAVAILABLE
                # The engine's reason (no data in it) for the operator.
                log.error("store unavailable", exc_info=(type(exc), exc, None),
                          extra={"fields": {"method": method, "error": f"{type(exc).__name__}: {exc}"}})
            else:
                code, message = status.to_status(exc)
                if code == grpc.StatusCode.INTERNAL and not isinstance(exc, status.RpcError):
                    log.error(
                        "unhandled error",
                        exc_info=(type(exc), exc, None),
                        extra={"fields": {"method": method, "caller": str(who) if who else None}},
                    )
            elapsed = time.perf_counter() - started
            counter = children.get(code)
            if counter is None:
                counter = children[code] = RPC_TOTAL.labels(method, code.name)
            counter.inc()
            seconds = children.get(None)
            if seconds is None:
                seconds = children[None] = RPC_SECONDS.labels(method)
            seconds.observe(elapsed)
            if not open_method:
                logs.event(
                    log,
                    "rpc",
                    logging.INFO if code is ok else logging.WARNING,
                    method=method,
                    caller=str(who) if who else None,
                    code=code.name,
                    ms=round(elapsed * 1000, 3),
                )
            if exc is not None:
                context.abort(code, message)

        def unary_response(behaviour, stream_in: bool):
            def wrapped(request, context):
                started, who, exc = time.perf_counter(), None, None
                try:
                    who = authorise(context)
                    request = _parsed_stream(request) if stream_in else _parsed(request)
                    return behaviour(request, context)
                except Exception as e:  # noqa: BLE001 - mapped to a status below
                    exc = e
                finally:
                    if exc is None or not _is_abort(exc, context):
                        finish(context, who, started, exc)

            return wrapped

        def stream_response(behaviour, stream_in: bool):
            def wrapped(request, context):
                started, who, exc = time.perf_counter(), None, None
                try:
                    who = authorise(context)
                    request = _parsed_stream(request) if stream_in else _parsed(request)
                    yield from behaviour(request, context)
                except Exception as e:  # noqa: BLE001
                    exc = e
                finally:
                    if exc is None or not _is_abort(exc, context):
                        finish(context, who, started, exc)

            return wrapped

        kwargs = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary, False), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary, True), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream, False), **kwargs)
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream, True), **kwargs)


STORE_UNAVAILABLE = "The node cannot reach its database; retry later."


def _is_abort(exc: BaseException, context) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through.
    return type(exc) is Exception and context.code() is not None


def max_concurrent_rpcs(max_workers: int) -> int:
    """Calls a server admits at once: queued calls beyond its threads wait,
    calls beyond this are refused RESOURCE_EXHAUSTED."""
    return max_workers * 8


@dataclass
class Running:
    """A started server: its bound port and how to stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in self.service_names + ("",):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        for hook in self.on_stop:
            hook()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start(
    *,
    listen: str,
    tls: TlsMaterial,
    register: Iterable[Callable[[grpc.Server], None]],
    service_names: tuple[str, ...],
    roles: Mapping[str, frozenset[str]],
    logger: logging.Logger,
    max_workers: int = 32,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
    unavailable: tuple[type[BaseException], ...] = (),
) -> Running:
    """Build, bind and start a server; ``listen`` may use port 0.

    What callers can make it hold at once is bounded: at most
    ``max_workers * 8`` calls (more get RESOURCE_EXHAUSTED), each with at
    most one received message of ``max_receive_bytes`` in memory
    (docs/operations.md, "Server identity and exposure")."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[RoleInterceptor(roles, logger, unavailable)],
        options=(
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", min(max_receive_bytes, MAX_MESSAGE_BYTES)),
            ("grpc.so_reuseport", 0),
        ),
        maximum_concurrent_rpcs=max_concurrent_rpcs(max_workers),
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        service_names + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_secure_port(listen, tls.server_credentials())
    if port == 0:
        raise ValueError(f"Cannot listen on {listen}.")
    server.start()
    for name in service_names + ("",):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, health_servicer, service_names)


def harden_process(logger: logging.Logger | None = None) -> dict[str, bool]:
    """Keep secrets (rejoined templates, opened shares, keys) out of core files
    (best effort, documented); the matcher and every node call it.

    RLIMIT_CORE = 0 stops the kernel writing a core file; PR_SET_DUMPABLE = 0
    (Linux) also refuses core dumps and ptrace attachment by other processes
    of the same user. Either may be unavailable; what took effect is returned
    and logged.
    """
    done = {"rlimit_core": False, "not_dumpable": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["rlimit_core"] = True
    except (ValueError, OSError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done["not_dumpable"] = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        pass
    if logger is not None:
        logs.event(logger, "process hardened", **done)
    return done


def run_until_signalled(running: Running, grace: float = 5.0) -> None:
    """Block until SIGTERM/SIGINT, then drain in-flight calls and stop."""
    done = threading.Event()

    def handle(signum, frame):  # noqa: ARG001
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    running.stop(grace)
