"""matcher.committee: node calls on the committee's pool, consumed from an
RPC thread through a Gather. Real gRPC servers over real mTLS on
loopback whose GetNodeInfo answers after a chosen delay (the node's answer
itself is not what is tested here: deadlines, arrival order, closing and
unreachable nodes are)."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from matcher.committee import Committee
from matcher.config import ShareholderEndpoint
from splitvault.v1 import shareholder_pb2


class _Node:
    """A Shareholder endpoint whose GetNodeInfo answers after ``delay_s``."""

    def __init__(self, dev_pki, name: str, index: int, delay_s: float):
        self.release = threading.Event()
        self.calls = 0

        def info(request, context):
            self.calls += 1
            self.release.wait(delay_s)
            return shareholder_pb2.GetNodeInfoResponse(name=name, index=index)

        handler = grpc.method_handlers_generic_handler(
            "splitvault.v1.Shareholder",
            {"GetNodeInfo": grpc.unary_unary_rpc_method_handler(
                info,
                request_deserializer=shareholder_pb2.GetNodeInfoRequest.FromString,
                response_serializer=shareholder_pb2.GetNodeInfoResponse.SerializeToString,
            )},
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(8), handlers=(handler,),
                                  options=(("grpc.so_reuseport", 0),))
        port = self.server.add_secure_port("127.0.0.1:0", dev_pki.tls("shareholder", name).server_credentials())
        self.server.start()
        self.endpoint = ShareholderEndpoint(name, index, f"127.0.0.1:{port}")

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0).wait()


@pytest.fixture
def nodes(dev_pki):
    made = []

    def make(name, index, delay_s=0.0):
        node = _Node(dev_pki, name, index, delay_s)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


def _committee(dev_pki, endpoints, timeout_s=2.0, **kw) -> Committee:
    return Committee(tuple(endpoints), dev_pki.tls("matcher", "m"), timeout_s, **kw)


def test_answers_arrive_in_arrival_order_not_committee_order(dev_pki, nodes):
    slow, fast = nodes("bank-a", 1, delay_s=0.4), nodes("bank-b", 2)
    committee = _committee(dev_pki, [slow.endpoint, fast.endpoint])
    try:
        gather = committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        first, second = gather.next(), gather.next()
        assert (first.node.name, second.node.name) == ("bank-b", "bank-a")
        assert first.ok and first.response.name == "bank-b" and second.response.index == 1
        assert gather.next() is None and gather.pending == 0
    finally:
        committee.close()


def test_a_hung_node_ends_at_its_deadline(dev_pki, nodes):
    hung, fine = nodes("bank-a", 1, delay_s=30), nodes("bank-b", 2)
    committee = _committee(dev_pki, [hung.endpoint, fine.endpoint], timeout_s=0.5)
    try:
        started = time.monotonic()
        outcomes = {o.node.name: o for o in committee.call_all("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())}
        took = time.monotonic() - started
        assert outcomes["bank-b"].ok
        assert outcomes["bank-a"].code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.4 < took < 3.0
    finally:
        committee.close()


def test_poll_returns_none_while_a_call_is_pending(dev_pki, nodes):
    slow = nodes("bank-a", 1, delay_s=30)
    committee = _committee(dev_pki, [slow.endpoint], timeout_s=5.0)
    try:
        gather = committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        assert gather.poll(0.05) is None and gather.pending == 1
        slow.release.set()
        outcome = gather.poll(5.0)
        assert outcome is not None and outcome.ok
    finally:
        committee.close()


def test_an_unreachable_node_is_unavailable(dev_pki, nodes):
    gone = nodes("bank-a", 1)
    gone.stop()
    committee = _committee(dev_pki, [gone.endpoint], timeout_s=2.0)
    try:
        [outcome] = committee.call_all("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        assert outcome.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert outcome.response is None
    finally:
        committee.close()


def test_closing_ends_calls_in_flight_and_refuses_new_ones(dev_pki, nodes):
    hung = nodes("bank-a", 1, delay_s=30)
    committee = _committee(dev_pki, [hung.endpoint], timeout_s=20.0)
    gather = committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
    deadline = time.monotonic() + 5
    while hung.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    committee.close()
    outcome = gather.poll(5.0)
    assert outcome is not None and not outcome.ok
    assert outcome.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - started < 5.0
    committee.close()  # idempotent
    after = committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
    [refused] = after.all()
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "stopping" in refused.message


def test_calls_beyond_max_in_flight_wait_for_a_slot(dev_pki, nodes):
    slow = nodes("bank-a", 1, delay_s=0.3)
    committee = _committee(dev_pki, [slow.endpoint], timeout_s=5.0, max_in_flight=1)
    try:
        started = time.monotonic()
        gathers = [committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest()) for _ in range(3)]
        assert all(g.next().ok for g in gathers)
        # One at a time: three calls of 0.3 s each take at least 0.9 s.
        assert time.monotonic() - started >= 0.85
    finally:
        committee.close()
