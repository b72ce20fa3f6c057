"""The audit-chain format: hashing, checkpoints, and the verifier naming the
first broken entry."""
from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import audit
from vault.errors import AuditChainError
from vault.pki import public_key_raw

NODE = "bank-a"


@pytest.fixture(scope="module")
def key():
    return ed25519.Ed25519PrivateKey.generate()


def build(key, n=10, every=4):
    entries, checkpoints, prev = [], [], audit.GENESIS_HASH
    for seq in range(1, n + 1):
        e = audit.make_entry(
            seq=seq, prev_hash=prev, time_ms=1000 + seq, node=NODE, event="release",
            actor="matcher/m1", request_id=f"r{seq}", tenant="acme", subject=f"s{seq}",
            details={"epochs": [1], "reason": None, "count": seq},
        )
        entries.append(e)
        prev = e.entry_hash
        if seq % every == 0:
            checkpoints.append(audit.sign_checkpoint(key, NODE, seq, e.entry_hash, 2000 + seq))
    return entries, checkpoints


def edit(entry, **changes):
    # A copy of an entry (or checkpoint) with some fields changed, as a forger would write it.
    return dataclasses.replace(entry, **changes)


def test_intact_chain_verifies(key):
    entries, cps = build(key)
    report = audit.verify_chain(entries, cps, key.public_key(), node=NODE)
    assert report.ok and report.head_seq == 10 and report.signed_seq == 8 and report.checkpoints == 2
    assert report.head_hash == entries[-1].entry_hash
    assert report.raise_for_break() is report
    # Raw public key bytes work too.
    assert audit.verify_chain(entries, cps, public_key_raw(key)).ok


def test_empty_chain_verifies(key):
    report = audit.verify_chain([], [], key.public_key())
    assert report.ok and report.head_seq == 0 and report.head_hash == audit.GENESIS_HASH


def test_genesis_and_link(key):
    entries, _ = build(key, n=2)
    assert entries[0].prev_hash == bytes(32)
    assert entries[1].prev_hash == entries[0].entry_hash


@pytest.mark.parametrize("field, value", [
    ("subject", "mallory"), ("event", "store"), ("time_ms", 5), ("details_json", '{"count":99}'),
    ("actor", "matcher/m2"), ("tenant", "globex"), ("request_id", "x"), ("node", "bank-b"),
])
def test_edited_entry_is_named(key, field, value):
    entries, cps = build(key)
    entries[4] = edit(entries[4], **{field: value})
    report = audit.verify_chain(entries, cps, key.public_key())
    assert not report.ok and report.broken_seq == 5
    assert "altered" in report.reason
    with pytest.raises(AuditChainError) as err:
        report.raise_for_break()
    assert err.value.seq == 5


def test_removed_entry_is_named(key):
    entries, cps = build(key)
    del entries[5]
    report = audit.verify_chain(entries, cps, key.public_key())
    assert report.broken_seq == 6 and "missing" in report.reason


def test_removed_and_renumbered_entry_is_named(key):
    entries, cps = build(key)
    del entries[5]
    entries[5:] = [edit(e, seq=e.seq - 1) for e in entries[5:]]
    assert audit.verify_chain(entries, cps, key.public_key()).broken_seq == 6


def test_reordered_entries_are_named(key):
    entries, cps = build(key)
    entries[2], entries[3] = entries[3], entries[2]
    report = audit.verify_chain(entries, cps, key.public_key())
    assert report.broken_seq == 3 and "missing" in report.reason


def test_reordered_and_renumbered_entries_are_named(key):
    entries = build(key)[0]
    entries[2], entries[3] = edit(entries[3], seq=3), edit(entries[2], seq=4)
    assert audit.verify_chain(entries, [], key.public_key()).broken_seq == 3


def test_truncated_tail_contradicts_a_checkpoint(key):
    entries, cps = build(key, n=8)
    report = audit.verify_chain(entries[:6], cps, key.public_key())
    assert report.broken_seq == 7 and "removed" in report.reason


def test_rewritten_chain_contradicts_a_checkpoint(key):
    entries, cps = build(key)
    # Edit entry 6 and re-hash everything after it: the chain alone looks fine.
    prev = entries[4].entry_hash
    forged = entries[:5]
    for e in entries[5:]:
        f = audit.make_entry(
            seq=e.seq, prev_hash=prev, time_ms=e.time_ms, node=e.node, event=e.event, actor=e.actor,
            request_id=e.request_id, tenant=e.tenant, subject="forged" if e.seq == 6 else e.subject,
        )
        forged.append(f)
        prev = f.entry_hash
    assert audit.verify_chain(forged, [], key.public_key()).ok
    report = audit.verify_chain(forged, cps, key.public_key())
    assert report.broken_seq == 8 and "after entry 4" in report.reason


def test_bad_checkpoint_signature(key):
    entries, cps = build(key)
    bad = edit(cps[0], time_ms=cps[0].time_ms + 1)
    report = audit.verify_chain(entries, [bad, cps[1]], key.public_key())
    assert report.broken_seq == 4 and "signature" in report.reason
    other = ed25519.Ed25519PrivateKey.generate()
    assert audit.verify_chain(entries, cps, other.public_key()).broken_seq == 4


def test_checkpoint_not_matching_the_chain(key):
    entries, _ = build(key)
    cp = audit.sign_checkpoint(key, NODE, 6, entries[4].entry_hash, 1)
    assert audit.verify_chain(entries, [cp], key.public_key()).broken_seq == 6


def test_checkpoint_for_another_node(key):
    entries, _ = build(key)
    cp = audit.sign_checkpoint(key, "bank-b", 6, entries[5].entry_hash, 1)
    assert audit.verify_chain(entries, [cp], key.public_key(), node=NODE).broken_seq == 6


def test_first_break_wins(key):
    entries, cps = build(key)
    entries[7] = edit(entries[7], subject="x")
    entries[2] = edit(entries[2], subject="y")
    assert audit.verify_chain(entries, cps, key.public_key()).broken_seq == 3


def test_suffix_verification(key):
    entries, cps = build(key)
    report = audit.verify_chain(entries[4:], cps, key.public_key(), start_seq=5, start_prev_hash=entries[3].entry_hash)
    assert report.ok and report.head_seq == 10
    assert not audit.verify_chain(entries[4:], cps, key.public_key(), start_seq=5).ok


def test_hash_is_unambiguous():
    base = dict(seq=1, prev_hash=bytes(32), time_ms=1, node="n", event="e")
    a = audit.make_entry(**base, tenant="ab", subject="c")
    b = audit.make_entry(**base, tenant="a", subject="bc")
    assert a.entry_hash != b.entry_hash


def test_details_are_canonical():
    assert audit.canonical_details({"b": 1, "a": [True, None, "x"]}) == '{"a":[true,null,"x"],"b":1}'
    assert audit.canonical_details(None) == "{}"


@pytest.mark.parametrize("bad", [
    {"share": b"\x01\x02"}, {"v": [b"x"]}, {"v": 1.5}, {"v": {"nested": 1}}, {"v": bytearray(3)},
    {"v": "x" * 600}, {"v": list(range(100))}, {1: "x"},
])
def test_details_refuse_bytes_and_other_types(bad):
    with pytest.raises(ValueError):
        audit.canonical_details(bad)


def test_make_entry_validation():
    with pytest.raises(ValueError):
        audit.make_entry(seq=0, prev_hash=bytes(32), time_ms=1, node="n", event="e")
    with pytest.raises(ValueError):
        audit.make_entry(seq=1, prev_hash=bytes(31), time_ms=1, node="n", event="e")
    with pytest.raises(ValueError):
        audit.make_entry(seq=1, prev_hash=bytes(32), time_ms=1, node="n", event="")


def test_checkpoint_message_binds_every_field():
    base = ("n", 5, bytes(32), 7)
    variants = [("m", 5, bytes(32), 7), ("n", 6, bytes(32), 7), ("n", 5, b"\x01" * 32, 7), ("n", 5, bytes(32), 8)]
    assert all(audit.checkpoint_message(*v) != audit.checkpoint_message(*base) for v in variants)


def test_load_entries_round_trip(key):
    entries, _ = build(key, n=3)
    rows = [(e.seq, e.time_ms, e.node, e.event, e.actor, e.request_id, e.tenant, e.subject, e.details_json,
             e.prev_hash, e.entry_hash) for e in entries]
    assert audit.load_entries(rows) == entries
