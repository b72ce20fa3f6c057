"""vault.plan: the committee-change plan's canonical form, signatures and
the checks a node relies on (pure; no network)."""
from __future__ import annotations

import hashlib
import json

import pytest

from vault import pki
from vault import plan as committee_plan
from vault.plan import InvalidPlan, NewMember

AUDIENCE = "ab" * 32


def _members(names=("bank-a", "bank-b", "bank-d")):
    return [NewMember(n, i, f"127.0.0.1:{5000 + i}", f"{i:02x}" * 32, pki.public_key_raw(_key(n)).hex())
            for i, n in enumerate(names, start=1)]


_KEYS: dict = {}


def _key(name):
    if name not in _KEYS:
        _KEYS[name] = pki.load_signing_key(pki.new_signing_key()[0])
    return _KEYS[name]


def _plan(**over):
    args = dict(audience=AUDIENCE, session_id="reshare-test-0001", from_epoch=1, new_epoch=2,
                old_committee={"bank-a": 1, "bank-b": 2, "bank-c": 3}, old_threshold=2, new_committee=_members(),
                new_threshold=2, senders=[1, 2])
    args.update(over)
    return committee_plan.make(**args)


def test_round_trip_is_canonical_and_nonce_fresh():
    p = _plan()
    body = p.body()
    assert committee_plan.parse(body) == p
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    assert _plan().nonce != p.nonce and len(p.nonce) == 32
    assert p.pins == {m.name: m.spki_sha256 for m in _members()}
    assert p.new_indices == {"bank-a": 1, "bank-b": 2, "bank-d": 3}


def test_any_change_to_the_bytes_is_refused_or_unsigned():
    p = _plan()
    body = p.body()
    sig = committee_plan.sign(body, _key("bank-a"))
    keys = {n: _key(n).public_key() for n in ("bank-a", "bank-b", "bank-c")}
    assert committee_plan.approved_by(body, {"bank-a": sig}, keys) == {"bank-a"}
    # A signature under another operator's name, or over other bytes, counts for nothing.
    assert committee_plan.approved_by(body, {"bank-b": sig}, keys) == set()
    other = _plan(new_epoch=3).body()
    assert committee_plan.approved_by(other, {"bank-a": sig}, keys) == set()
    # Not canonical (spaces) -> refused even though it is the same JSON.
    with pytest.raises(InvalidPlan):
        committee_plan.parse(json.dumps(json.loads(body), sort_keys=True).encode())
    # An operator the node does not pin counts for nothing.
    assert committee_plan.approved_by(body, {"evil": committee_plan.sign(body, _key("evil"))}, keys) == set()


@pytest.mark.parametrize("over, words", [
    ({"senders": [1]}, "senders"),
    ({"senders": [1, 4]}, "senders"),
    ({"old_threshold": 4}, "old_threshold"),
    ({"new_threshold": 1}, "new_threshold"),
    ({"new_epoch": 1}, "new_epoch"),
    ({"session_id": "x"}, "session_id"),
    ({"audience": "zz"}, "audience"),
    ({"ttl_ms": committee_plan.MAX_TTL_MS + 1}, "validity"),
    ({"old_committee": {"bank-a": 1, "bank-b": 1, "bank-c": 3}}, "twice"),
])
def test_malformed_plans_are_one_sentence(over, words):
    with pytest.raises(InvalidPlan) as err:
        _plan(**over)
    assert words in str(err.value) and str(err.value).endswith(".")


def test_new_members_need_a_key_fingerprint():
    members = _members()
    bad = [NewMember(m.name, m.index, m.address, "short", m.operator_key) for m in members]
    with pytest.raises(InvalidPlan):
        _plan(new_committee=bad)


def test_window_and_file_document(dev_pki):
    p = _plan(ttl_ms=1000, issued_at_ms=10_000)
    committee_plan.check_window(p, at_ms=10_500)
    with pytest.raises(InvalidPlan, match="expired"):
        committee_plan.check_window(p, at_ms=11_000)
    with pytest.raises(InvalidPlan, match="future"):
        committee_plan.check_window(p, at_ms=10_000 - committee_plan.CLOCK_SKEW_MS - 1)
    body = p.body()
    doc = committee_plan.document(body, {"bank-a": committee_plan.sign(body, _key("bank-a"))})
    again, approvals = committee_plan.from_document(json.loads(json.dumps(doc)))
    assert again == body and set(approvals) == {"bank-a"}
    # The fingerprint pins the key, not the name: two certificates for one name differ.
    a = dev_pki.files("shareholder", "pin-a")
    cert_a = open(a.cert, "rb").read()
    cert_b, _ = pki.issue_cert(dev_pki.ca_cert, dev_pki.ca_key, "shareholder", "pin-a")
    assert committee_plan.spki_sha256(cert_a) != committee_plan.spki_sha256(cert_b)
    assert committee_plan.spki_sha256(cert_a) == committee_plan.spki_sha256(cert_a)


def test_a_new_committee_that_cannot_renew_the_mac_keys_is_refused():
    # 3 members with k = 3: the renewal of the MAC keys at a refresh needs 2k - 1 = 5.
    with pytest.raises(InvalidPlan, match="2k - 1"):
        committee_plan.parse(_plan(new_threshold=3).body())


def test_the_audience_binds_the_ca_and_the_cluster_id():
    # Two clusters under one CA (perhaps with the same operators' keys): a
    # plan approved for one names another audience than the other's nodes
    # expect, so they refuse it (shareholders.epochs, reason "audience").
    ca_pem, _ = pki.make_ca()
    other_ca, _ = pki.make_ca()
    a = committee_plan.audience_for(ca_pem, "splitvault-prod")
    assert a == committee_plan.audience_for(ca_pem, "splitvault-prod")
    assert len({a, committee_plan.audience_for(ca_pem, "splitvault-dr"),
                committee_plan.audience_for(other_ca, "splitvault-prod"), committee_plan.spki_sha256(ca_pem)}) == 4
    expected = hashlib.sha256(committee_plan.AUDIENCE_CONTEXT + bytes.fromhex(committee_plan.spki_sha256(ca_pem))
                              + b"splitvault-prod").hexdigest()
    assert a == expected
