"""The audit entry encoding does not drift: known-answer hashes computed with
the original construction (``vault/audit.py`` before the release-path speed-up),
a whole chain with signed checkpoints written before the typed boundary
(``tests/vectors/audit_chain.json``), and a randomised comparison against a
copy of the documented construction, so logs written by any version keep
verifying."""
from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault import audit
from vaultrpc import wire

# (make_entry arguments, details_json, entry_hash hex), from the original code.
KNOWN = [
    (
        dict(seq=1, prev_hash=audit.GENESIS_HASH, time_ms=0, node="bank-a", event="start"),
        "{}",
        "15d60a6a27ddf707d9d320498059e5782980518bc0da5578ccca5662c58f8498",
    ),
    (
        dict(seq=2, prev_hash=bytes(range(32)), time_ms=1_700_000_000_123, node="bank-a", event="release",
             actor="matcher/m1", request_id="verify-1", tenant="acme", subject="subject-000123",
             details={"counted": True, "ticket_expires_ms": 1_700_000_060_123, "key_id": "acme-1", "epochs": [1, 2],
                      "ticket": ["CgRhY21l", "EgE="], "ticket_sig": "c2ln"}),
        '{"counted":true,"epochs":[1,2],"key_id":"acme-1","ticket":["CgRhY21l","EgE="],'
        '"ticket_expires_ms":1700000060123,"ticket_sig":"c2ln"}',
        "bd9e9243c83ab470324dca4e5d750882b3b2aee61eb0fe2e563ad717e2ad4c3e",
    ),
    (
        dict(seq=2**63 + 5, prev_hash=b"\xff" * 32, time_ms=-5, node="n\u00e9\u4e2d", event="deny",
             actor="", request_id="r\u2603", tenant="t\U0001F600", subject="s\u0301",
             details={"reason": "rate_limited", "z": None, "a": [None, False, 0, -1, "\u00fc\\\"\n"],
                      "claimed_subject": "x\u2028y"}),
        '{"a":[null,false,0,-1,"\u00fc\\\\\\"\\n"],"claimed_subject":"x\u2028y","reason":"rate_limited","z":null}',
        "68e0c427f84699ce6ddd49fbf301593d4db26efde3a2db896d9e7d0d12d164a8",
    ),
    (
        dict(seq=7, prev_hash=bytes(32), time_ms=2**63 - 1, node="bank-b", event="store_batch",
             details={"records": 1000, "tenants": ["a", "b"], "records_sha256": "00" * 32, "big": 2**70,
                      "neg": -(2**65)}),
        '{"big":1180591620717411303424,"neg":-36893488147419103232,"records":1000,'
        '"records_sha256":"0000000000000000000000000000000000000000000000000000000000000000","tenants":["a","b"]}',
        "6be34fee49d3505e9d1cc233b7e25d36497977924acdc6831be122ea5e45e741",
    ),
]


@pytest.mark.parametrize("args,details_json,digest", KNOWN)
def test_known_answers(args, details_json, digest):
    entry, row = audit.make_entry_row(**args)
    assert entry.details_json == details_json
    assert entry.entry_hash.hex() == digest
    assert audit.entry_hash(entry).hex() == digest
    assert audit.make_entry(**args) == entry
    assert row == (entry.seq, entry.time_ms, entry.node, entry.event, entry.actor, entry.request_id, entry.tenant,
                   entry.subject, entry.details_json, entry.prev_hash, entry.entry_hash)


# --- the original construction, verbatim ------------------------------------------

_U64, _I64, _U32 = struct.Struct(">Q"), struct.Struct(">q"), struct.Struct(">I")


def _old_lps(text: str) -> bytes:
    data = text.encode("utf-8")
    return _U32.pack(len(data)) + data


def _old_entry_hash(e: audit.AuditEntry) -> bytes:
    return hashlib.sha256(b"".join((
        b"splitvault/audit/entry/v1\x00", _U64.pack(e.seq), _I64.pack(e.time_ms), _old_lps(e.node),
        _old_lps(e.event), _old_lps(e.actor), _old_lps(e.request_id), _old_lps(e.tenant), _old_lps(e.subject),
        _old_lps(e.details_json), _U32.pack(len(e.prev_hash)) + e.prev_hash,
    ))).digest()


def _old_details(details) -> str:
    if not details:
        return "{}"
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), _text)
_details = st.one_of(
    st.none(),
    st.dictionaries(_text, st.one_of(_scalar, st.lists(_scalar, max_size=5), st.tuples(_scalar, _scalar)),
                    max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(1, 2**64 - 1), time_ms=st.integers(-(2**63), 2**63 - 1), prev=st.binary(min_size=32, max_size=32),
    node=_text, event=_text.filter(bool), actor=_text, request_id=_text, tenant=_text, subject=_text,
    details=_details,
)
def test_same_bytes_as_the_original_construction(seq, time_ms, prev, node, event, actor, request_id, tenant,
                                                  subject, details):
    entry, row = audit.make_entry_row(
        seq=seq, prev_hash=prev, time_ms=time_ms, node=node, event=event, actor=actor, request_id=request_id,
        tenant=tenant, subject=subject, details=details,
    )
    assert entry.details_json == _old_details(details)
    assert entry.entry_hash == _old_entry_hash(entry) == audit.entry_hash(entry)
    assert row == (entry.seq, entry.time_ms, entry.node, entry.event, entry.actor, entry.request_id, entry.tenant,
                   entry.subject, entry.details_json, entry.prev_hash, entry.entry_hash)


def test_argument_types_the_message_converts_hash_as_stored():
    # An int subclass and a str subclass: hashed and stored as the message holds them.
    class Seq(int):
        pass

    class Name(str):
        pass

    a, row_a = audit.make_entry_row(seq=Seq(1), prev_hash=bytes(32), time_ms=1, node=Name("n"), event="e")
    b, row_b = audit.make_entry_row(seq=1, prev_hash=bytes(32), time_ms=1, node="n", event="e")
    assert a == b and row_a == row_b
    assert type(row_a[0]) is int and type(row_a[2]) is str and type(row_a[9]) is bytes


# --- a chain written before the typed boundary ---------------------------------------

CHAIN = json.loads((pathlib.Path(__file__).parent / "vectors" / "audit_chain.json").read_text(encoding="utf-8"))


def _chain_rows():
    return [(*r[:9], bytes.fromhex(r[9]), bytes.fromhex(r[10])) for r in CHAIN["rows"]]


def _chain_checkpoints():
    return [audit.AuditCheckpoint(seq=c["seq"], entry_hash=bytes.fromhex(c["entry_hash"]), time_ms=c["time_ms"],
                                  node=c["node"], signature=bytes.fromhex(c["signature"])) for c in CHAIN["checkpoints"]]


def test_a_chain_written_before_the_typed_boundary_still_verifies():
    entries, cps = audit.load_entries(_chain_rows()), _chain_checkpoints()
    report = audit.verify_chain(entries, cps, bytes.fromhex(CHAIN["public_key"]), node="bank-a")
    assert report.ok and report.head_seq == report.signed_seq == len(entries) == 5, report.reason
    # The same entries through the wire messages (as `vaultctl audit verify` reads a live node).
    again = [wire.audit_entry(wire.audit_entry_message(e)) for e in entries]
    cps_again = [wire.checkpoint(wire.checkpoint_message(c)) for c in cps]
    assert again == entries and cps_again == cps
    assert audit.verify_chain(again, cps_again, bytes.fromhex(CHAIN["public_key"]), node="bank-a").ok
    # One changed byte anywhere still breaks it.
    forged = list(entries)
    forged[2] = audit.AuditEntry(**{**{n: getattr(entries[2], n) for n, _ in audit.ENTRY_FIELDS}, "subject": "bob"})
    assert audit.verify_chain(forged, cps, bytes.fromhex(CHAIN["public_key"])).broken_seq == 3


def test_todays_code_writes_the_same_chain_byte_for_byte():
    prev = audit.GENESIS_HASH
    for seq, (args, want) in enumerate(zip(CHAIN["make_entry"], _chain_rows()), start=1):
        entry, row = audit.make_entry_row(seq=seq, prev_hash=prev, **args)
        assert row == want and entry.entry_hash == want[10]
        prev = entry.entry_hash
