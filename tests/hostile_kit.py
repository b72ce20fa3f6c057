"""Test support for the hostile-input campaign (tests/test_hostile_*.py).

- Hypothesis strategies for what a hostile or careless caller sends: ids
  (empty, oversized, unicode, control and invisible characters), vectors
  (wrong length, empty, huge, NaN, infinities, zero, denormals, extreme
  magnitudes) and ticket mutations (forged, expired, replayed, ...).
- The contract as an oracle: ``subject_ok`` / ``request_id_ok`` /
  ``vector_ok`` restate docs/contracts.md and matcher.proto, so each test
  can assert the EXACT status a request must get.
- Hostile TLS identities: a certificate under the cluster CA without a
  splitvault identity, one from another CA, none at all.
- ``raw_call``: any method with any bytes, past the client's own checks
  and size limit.
- ``Snapshot``: what every node holds (record counts and the victims'
  records), to show a refused request changed nothing.
"""
from __future__ import annotations

import datetime
import math
import threading
import uuid
from concurrent import futures

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import strategies as st

from fault_kit import clean_details
from node_kit import CLUSTER_ID
from splitvault.v1 import common_pb2, shareholder_pb2, shareholder_pb2_grpc
from vault import pki, ticket
from vaultrpc import wire
from vaultrpc.tls import TlsMaterial, secure_channel

__all__ = [
    "Snapshot", "clean_details", "hostile_ids", "no_identity_tls", "other_ca_tls", "raw_call", "request_id_ok",
    "status_of", "subject_ok", "vector_ok", "vectors", "TICKET_MUTATIONS", "mutate_ticket",
]

MAX_ID_BYTES = 128

# --- the contract as an oracle ---------------------------------------------------


def subject_ok(s: str) -> bool:
    """A subject: 1-128 bytes of printable UTF-8 (matcher.check_id)."""
    return 1 <= len(s.encode("utf-8")) <= MAX_ID_BYTES and s.isprintable()


def request_id_ok(s: str) -> bool:
    """A request id: 1-128 printable ASCII characters (matcher.proto)."""
    return 1 <= len(s) <= MAX_ID_BYTES and s.isascii() and s.isprintable()


def vector_ok(v: list[float], dim: int) -> bool:
    return len(v) == dim and all(math.isfinite(x) for x in np.float32(v).tolist()) and any(x != 0 for x in v)


# --- strategies -------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)


def hostile_ids(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Valid ids mixed with every kind of invalid one."""
    return st.one_of(
        valid,
        st.just(""),
        _text,                                                         # anything printable or not
        st.text(alphabet="é漢😀", min_size=33, max_size=70),           # multi-byte: over 128 bytes, under 128 chars
        st.integers(129, 5000).map(lambda n: "x" * n),                 # oversized
        st.sampled_from(["a\x00b", "tab\there", "new\nline", "\u200b", "rtl\u202eevil", "del\x7f", " ", "\ufeff"]),
        st.sampled_from(["../../etc/passwd", "'; DROP TABLE shares; --", "%s%s%n", "{{7*7}}", "\\x00"]),
    )


valid_subjects = st.text(alphabet=st.characters(categories=("L", "N", "P", "S"), max_codepoint=0x2FFFF),
                         min_size=1, max_size=40).filter(subject_ok)
valid_request_ids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


def _poke(vector: list[float], pokes) -> list[float]:
    out = list(vector)
    for i, x in pokes:
        out[i] = x
    return out


def vectors(dim: int) -> st.SearchStrategy[list[float]]:
    """float32 vectors for a matcher of dimension ``dim``: valid and not."""
    f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
    specials = st.sampled_from([float("nan"), float("inf"), float("-inf"), 3.4028235e38, -3.4028235e38, 1e-45,
                                -0.0, 0.0])
    valid = st.lists(f32, min_size=dim, max_size=dim).filter(lambda v: any(x != 0 for x in v))
    with_specials = st.tuples(valid, st.lists(st.tuples(st.integers(0, dim - 1), specials), min_size=1, max_size=4)).map(
        lambda t: _poke(*t))
    return st.one_of(
        valid,
        with_specials,
        st.just([0.0] * dim),
        st.just([]),
        st.integers(1, 3).flatmap(lambda n: st.lists(f32, min_size=dim + n, max_size=dim + n)),   # too long
        st.integers(1, dim - 1).flatmap(lambda n: st.lists(f32, min_size=n, max_size=n)),          # too short
        st.sampled_from([dim * 8, 100_000]).map(lambda n: [1.0] * n),                               # huge
    )


# --- tickets ----------------------------------------------------------------------

TICKET_MUTATIONS = (
    "valid", "missing", "forged_signature", "unknown_key_id", "expired", "issued_in_future", "too_long_ttl",
    "other_subject", "other_tenant", "other_probe", "garbage_body", "empty_body", "truncated_signature",
    "replayed",
)
# Every mutation but "valid" is refused before any share leaves a node.
REFUSED = frozenset(TICKET_MUTATIONS) - {"valid"}


def mutate_ticket(kind: str, *, key, key_id: str, tenant: str, subject: str, probe, used: list) -> common_pb2.VerificationTicket | None:
    """A ticket of the given kind for (tenant, subject, probe); ``used`` holds
    tickets already honoured (the source of replays)."""
    now = ticket.now_ms()

    def issue(**kw):
        args = dict(tenant=tenant, subject=subject, request_id=f"hostile-{uuid.uuid4().hex}", probe=probe,
                    audience=CLUSTER_ID)
        args.update(kw)
        return wire.issue_ticket(key, key_id, **args)

    if kind == "missing":
        return None
    if kind == "replayed" and used:
        return used[0]
    t = issue()
    if kind in ("valid", "replayed"):
        return t
    if kind == "forged_signature":
        sig = bytearray(t.signature)
        sig[5] ^= 0x20
        t.signature = bytes(sig)
    elif kind == "truncated_signature":
        t.signature = t.signature[:40]
    elif kind == "unknown_key_id":
        t.key_id = key_id + "-retired"
    elif kind == "expired":
        t = issue(issued_at_ms=now - 120_000, ttl_ms=60_000)
    elif kind == "issued_in_future":
        t = issue(issued_at_ms=now + 10 * 60_000, ttl_ms=60_000)
    elif kind == "too_long_ttl":
        t = issue(ttl_ms=24 * 3600 * 1000)
    elif kind == "other_subject":
        t = issue(subject=subject + "-other" if len(subject.encode()) < 100 else "someone-else")
    elif kind == "other_tenant":
        t = issue(tenant="beta")
    elif kind == "other_probe":
        t = issue(probe=np.asarray(probe, dtype=np.float32) + np.float32(1.0))
    elif kind == "garbage_body":
        t.body = b"\xff\xfe not a protobuf \x00" * 3
    elif kind == "empty_body":
        t.body = b""
    return t


# --- identities -------------------------------------------------------------------


def no_identity_tls(dev_pki) -> TlsMaterial:
    """A certificate signed by the cluster CA but without a splitvault identity (only a DNS name)."""
    ca_cert = x509.load_pem_x509_certificate(dev_pki.ca_cert)
    ca_key = serialization.load_pem_private_key(dev_pki.ca_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "psp/acme")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return TlsMaterial(dev_pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM), key_pem)


def other_ca_tls(dev_pki, role: str, name: str) -> TlsMaterial:
    """A well-formed identity (right role and name) from ANOTHER CA; trusts the real CA."""
    ca_cert, ca_key = pki.make_ca("not the splitvault CA")
    cert, key = pki.issue_cert(ca_cert, ca_key, role, name)
    return TlsMaterial(dev_pki.ca_cert, cert, key)


def no_cert_channel(address: str, dev_pki) -> grpc.Channel:
    """TLS that trusts the server but presents no client certificate."""
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=dev_pki.ca_cert))


# --- calls ------------------------------------------------------------------------


def raw_call(channel: grpc.Channel, method: str, payload: bytes, *, stream: bool = False, timeout: float = 20):
    """Send raw bytes to any method (unary or client-streaming x server-streaming)."""
    ident = lambda b: b  # noqa: E731
    if stream == "unary_stream":
        return list(channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(payload, timeout=timeout))
    if stream == "stream_stream":
        return list(channel.stream_stream(method, request_serializer=ident, response_deserializer=ident)(iter([payload]), timeout=timeout))
    if stream == "stream_unary":
        return channel.stream_unary(method, request_serializer=ident, response_deserializer=ident)(iter([payload]), timeout=timeout)
    return channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(payload, timeout=timeout)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call; OK and '' when it succeeds."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --- what the nodes hold ------------------------------------------------------------


class Snapshot:
    """Every node's record count and the victims' records, read as the auditor."""

    def __init__(self, dev_pki, addresses: dict[str, str], tenant: str, victims: list[str]):
        self.pki, self.addresses, self.tenant, self.victims = dev_pki, addresses, tenant, victims
        self._channels = {n: secure_channel(a, dev_pki.tls("auditor", "auditor"), expect=pki.Identity("shareholder", n))
                          for n, a in addresses.items()}

    def take(self) -> dict:
        out = {}
        for name, ch in self._channels.items():
            stub = shareholder_pb2_grpc.ShareholderStub(ch)
            info = stub.GetNodeInfo(shareholder_pb2.GetNodeInfoRequest(), timeout=10)
            victims = {}
            for v in self.victims:
                reply = stub.DescribeRecords(shareholder_pb2.DescribeRecordsRequest(tenant=self.tenant, subject=v), timeout=10)
                victims[v] = [(r.request_id, r.epoch, r.kek_version) for r in reply.records]
            out[name] = {"records": info.records, "victims": victims}
        return out

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


# --- an impostor server ---------------------------------------------------------------


class _Recorder(grpc.GenericRpcHandler):
    """Takes every method (unary or streaming alike on the wire), notes it, refuses it."""

    def __init__(self, impostor: "Impostor"):
        self.impostor = impostor

    def service(self, details):
        with self.impostor._lock:
            self.impostor.calls.append(details.method)

        def refuse(requests, context):
            context.abort(grpc.StatusCode.UNAVAILABLE, "impostor")

        return grpc.stream_stream_rpc_method_handler(refuse)


class Impostor:
    """A gRPC server presenting someone's certificate; it accepts any client,
    records every call that reaches it and answers UNAVAILABLE."""

    def __init__(self, dev_pki, role: str, name: str):
        self.calls: list[str] = []
        self._lock = threading.Lock()
        tls = dev_pki.tls(role, name)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((_Recorder(self),))
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=False)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)
