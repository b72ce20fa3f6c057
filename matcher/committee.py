"""The matcher's view of the shareholder committee: one long-lived mutual-TLS
channel and stub per node, and parallel calls with a deadline on every one
(Python gRPC does not propagate deadlines, so each outgoing call carries its
own ``call_timeout_ms``).

Calls run as blocking gRPC calls on one long-lived thread pool and their
answers are consumed in the order they arrive (``Gather``), so a Verify can
go on as soon as k shares are in hand while slower nodes are still
answering. (``stub.Method.future()`` was measured slower: grpc's Python
layer starts a channel-spin thread for a future whenever its channel has
no call in flight, which cost more than the whole rejoin. grpc.aio calls on
one event-loop thread were measured too: over six interleaved rounds of
``python -m bench.suite_verify run --quick`` they made no difference to
throughput, latency or CPU per verification, so the simpler pool stays.)
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from matcher.config import ShareholderEndpoint
from splitvault.v1 import shareholder_pb2_grpc
from vault.pki import ROLE_SHAREHOLDER, Identity
from vaultrpc import status
from vaultrpc.tls import TlsMaterial, secure_channel

# Reconnect quickly to a node that comes back (gRPC's default backoff grows
# to two minutes, which would keep a restarted node out of the quorum).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Transport-level failures: the node did not really answer.
TRANSPORT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class Outcome:
    """One node's answer to one call: a response, or a status code and message."""

    node: ShareholderEndpoint
    response: Any = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class Gather:
    """Answers of one fan-out, in arrival order, until every call has ended.

    Every call carries its own deadline, so every call ends by then;
    the Gather's own deadline (one second later) only guards against a
    callback that never fires.
    """

    def __init__(self, targets: tuple[ShareholderEndpoint, ...], deadline: float):
        self._queue: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._targets = targets
        self._left = len(targets)
        self._deadline = deadline
        self.outcomes: list[Outcome] = []

    def _put(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    @property
    def pending(self) -> int:
        return self._left

    def next(self) -> Outcome | None:
        """The next answer, or None when all calls have ended (or the deadline passed)."""
        return self.poll(float("inf"))

    def poll(self, timeout: float) -> Outcome | None:
        """The next answer if one arrives within ``timeout`` seconds, else None
        (calls may still be pending: see ``pending``)."""
        if self._left <= 0:
            return None
        timeout = max(0.0, min(timeout, self._deadline - time.monotonic()))
        try:
            outcome = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._left -= 1
        self.outcomes.append(outcome)
        return outcome

    def _add(self, targets: tuple[ShareholderEndpoint, ...], deadline: float) -> None:
        # More calls joining this gather (a hedged fan-out asking the other nodes).
        self._targets = self._targets + targets
        self._left += len(targets)
        self._deadline = max(self._deadline, deadline)

    def arrived(self) -> list[Outcome]:
        """The answers that have already arrived, without waiting."""
        out = []
        while self._left > 0:
            try:
                outcome = self._queue.get_nowait()
            except queue.Empty:
                break
            self._left -= 1
            self.outcomes.append(outcome)
            out.append(outcome)
        return out

    def __iter__(self) -> Iterator[Outcome]:
        while (outcome := self.next()) is not None:
            yield outcome

    def all(self) -> list[Outcome]:
        """Wait for every answer; nodes that never answered count as DEADLINE_EXCEEDED."""
        for _ in self:
            pass
        answered = {o.node.name for o in self.outcomes}
        for node in self._targets:
            if node.name not in answered:
                self.outcomes.append(Outcome(node, None, grpc.StatusCode.DEADLINE_EXCEEDED, "No answer in time."))
        self._left = 0
        return self.outcomes


class Committee:
    """Channels and stubs to every shareholder, opened once and reused."""

    def __init__(self, endpoints: tuple[ShareholderEndpoint, ...], tls: TlsMaterial, timeout_s: float,
                 max_in_flight: int = 192, readers: int = 0):
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        # One thread per outgoing call in flight; a hung node holds its
        # threads only until the call's deadline.
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="node-call")
        # Readers of Identify's streams, apart: they wait as long as the
        # nodes compute, and must not queue the release calls above.
        self._readers = ThreadPoolExecutor(max_workers=readers or max_in_flight, thread_name_prefix="identify-read")
        self._channels = {e.name: secure_channel(e.address, tls, expect=Identity(ROLE_SHAREHOLDER, e.name),
                                                   extra_options=_CHANNEL_OPTIONS) for e in endpoints}
        self._stubs = {name: shareholder_pb2_grpc.ShareholderStub(ch) for name, ch in self._channels.items()}

    def __len__(self) -> int:
        return len(self.endpoints)

    def channel(self, name: str) -> grpc.Channel:
        """The long-lived channel to one node (for services other than Shareholder)."""
        return self._channels[name]

    def by_index(self, index: int) -> ShareholderEndpoint | None:
        for e in self.endpoints:
            if e.index == index:
                return e
        return None

    def fan_out(
        self,
        method: str,
        request_for: Callable[[ShareholderEndpoint], Any] | Any,
        *,
        nodes: tuple[ShareholderEndpoint, ...] | None = None,
        timeout_s: float | None = None,
        into: Gather | None = None,
    ) -> Gather:
        """Start ``method`` on every node (or ``nodes``) at once; answers arrive in a Gather.

        ``request_for`` is either one request for all nodes or a function of
        the node giving its request. A streaming-request method takes an
        iterator as its request. With ``into``, the calls join that gather.
        """
        targets = tuple(self.endpoints if nodes is None else nodes)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout + 1.0
        if into is None:
            gather = Gather(targets, deadline)
        else:
            gather = into
            gather._add(targets, deadline)
        for node in targets:
            request = request_for(node) if callable(request_for) else request_for
            rpc = getattr(self._stubs[node.name], method)
            try:
                self._pool.submit(_call, gather, node, rpc, request, timeout)
            except RuntimeError:  # the pool is shut down: the matcher is stopping
                gather._put(Outcome(node, None, grpc.StatusCode.UNAVAILABLE, "The matcher is stopping."))
        return gather

    def read_later(self, fn, *args) -> Future:
        """Run ``fn(*args)``, a reader of an Identify stream, on the readers'
        pool (no thread started per read); UNAVAILABLE once the matcher stops."""
        try:
            return self._readers.submit(fn, *args)
        except RuntimeError:
            raise status.Unavailable("The matcher is stopping.") from None

    def call_all(self, method: str, request_for, **kw) -> list[Outcome]:
        """Fan out and wait for every answer; results in committee order."""
        outcomes = self.fan_out(method, request_for, **kw).all()
        order = {e.name: i for i, e in enumerate(self.endpoints)}
        return sorted(outcomes, key=lambda o: order[o.node.name])

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)


def _call(gather: Gather, node: ShareholderEndpoint, rpc, request, timeout: float) -> None:
    gather._put(_outcome(node, rpc, request, timeout))


def _outcome(node: ShareholderEndpoint, rpc, request, timeout: float) -> Outcome:
    try:
        return Outcome(node, rpc(request, timeout=timeout))
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = err.details() if callable(getattr(err, "details", None)) else ""
        return Outcome(node, None, code or grpc.StatusCode.UNKNOWN, details or "")
    except Exception as exc:  # noqa: BLE001
        return Outcome(node, None, grpc.StatusCode.UNKNOWN, type(exc).__name__)
