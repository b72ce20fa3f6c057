"""Node config and key files: clear ConfigError messages for every mistake."""
from __future__ import annotations

import json
import os
import pathlib

import pytest

from shareholders import config
from shareholders.config import ConfigError, load_config, load_keys
from node_kit import Provider, kek_json, write_node_files
from vault import envelope

ACME = Provider.new("acme")


@pytest.fixture()
def cfg_path(tmp_path, dev_pki) -> pathlib.Path:
    return write_node_files(tmp_path / "n", name="bank-a", index=2, tls=dev_pki.files("shareholder", "bank-a"),
                            tenants={"acme": {"acme-1": ACME.public}}, attempts_per_subject=5)


def test_good_config(cfg_path):
    cfg = load_config(cfg_path, env={})
    assert (cfg.name, cfg.index, cfg.attempts_per_subject, cfg.metrics_port) == ("bank-a", 2, 5, -1)
    assert cfg.db_path == cfg_path.parent / "data" / "shares.db"
    assert set(cfg.tenants) == {"acme"} and set(cfg.tenants["acme"]) == {"acme-1"}
    keys = load_keys(cfg, env={})
    assert keys.kek.active == 1
    assert "audit_key" not in repr(keys)


def test_environment_overrides(cfg_path):
    cfg = load_config(cfg_path, env={"SPLITVAULT_LIMITS__ATTEMPTS_PER_SUBJECT": "9", "SPLITVAULT_NODE__LISTEN": "127.0.0.1:7000"})
    assert cfg.attempts_per_subject == 9 and cfg.listen == "127.0.0.1:7000"


def test_kek_from_the_environment_wins(cfg_path):
    cfg = load_config(cfg_path, env={})
    ring = load_keys(cfg, env={config.KEK_ENV: kek_json({4: envelope.new_kek(), 5: envelope.new_kek()}, 5)}).kek
    assert ring.active == 5 and ring.versions == (4, 5)


def test_kek_file_may_be_omitted_when_the_environment_has_it(cfg_path):
    text = cfg_path.read_text().replace(f'kek_file = "{cfg_path.parent / "kek.json"}"\n', "")
    cfg_path.write_text(text)
    with pytest.raises(ConfigError, match="kek_file"):
        load_config(cfg_path, env={})
    cfg = load_config(cfg_path, env={config.KEK_ENV: kek_json({1: bytes(32)}, 1)})
    assert cfg.kek_file is None


@pytest.mark.parametrize("old, new, message", [
    ('name = "bank-a"', 'name = "../bank"', "node.name"),
    ("index = 2", "index = 0", "node.index"),
    ("index = 2", 'index = "two"', "node.index"),
    ('listen = "127.0.0.1:0"', 'listen = "nowhere"', "node.listen"),
    ('log_level = "WARNING"', 'log_level = "LOUD"', "log_level"),
    ("attempts_per_subject = 5", "attempts_per_subject = 0", "attempts_per_subject"),
    ("[tls]", "[tls_typo]", "tls.ca"),
    ('ticket_keys = { "acme-1"', 'ticket_keys = { "acme-1" = "zz", "x"', "ticket key"),
    ("port = -1", "port = 70000", "metrics.port"),
    ("[node]", "[node\n", "not valid TOML"),
    ('cluster_id = "test-cluster"', "", "node.cluster_id"),              # every ticket's audience: required
    ('cluster_id = "test-cluster"', 'cluster_id = "a\tb"', "node.cluster_id"),
])
def test_bad_config_values(cfg_path, old, new, message):
    cfg_path.write_text(cfg_path.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_path, env={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read the config file"):
        load_config(tmp_path / "absent.toml", env={})


def test_world_readable_key_files_are_refused(cfg_path):
    cfg = load_config(cfg_path, env={})
    for name in ("kek.json", "audit.key"):
        path = cfg_path.parent / name
        path.chmod(0o644)
        with pytest.raises(ConfigError, match="readable by other users.*chmod 600"):
            load_keys(cfg, env={})
        path.chmod(0o600)
    load_keys(cfg, env={})


def test_unreadable_or_missing_key_files_are_refused(cfg_path):
    cfg = load_config(cfg_path, env={})
    (cfg_path.parent / "audit.key").unlink()
    with pytest.raises(ConfigError, match="Cannot read the audit key file"):
        load_keys(cfg, env={})


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ('{"active": 1}', "must be"),
    ('{"active": "1", "keys": {"1": "' + "00" * 32 + '"}}', "active version"),
    ('{"active": 2, "keys": {"1": "' + "00" * 32 + '"}}', "invalid"),
    ('{"active": 1, "keys": {"1": "abcd"}}', "32 bytes"),
    ('{"active": 1, "keys": {"one": "' + "00" * 32 + '"}}', "version number"),
])
def test_bad_kek_files(cfg_path, text, message):
    cfg = load_config(cfg_path, env={})
    (cfg_path.parent / "kek.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_keys(cfg, env={})


def test_audit_key_must_be_ed25519_pem(cfg_path):
    cfg = load_config(cfg_path, env={})
    (cfg_path.parent / "audit.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="Ed25519"):
        load_keys(cfg, env={})


def test_kek_file_format_matches_the_contract(cfg_path):
    data = json.loads((cfg_path.parent / "kek.json").read_text())
    assert data["active"] == 1 and len(data["keys"]["1"]) == 64
    assert oct(os.stat(cfg_path.parent / "kek.json").st_mode & 0o777) == "0o600"


def test_peer_table(cfg_path):
    """[peers]: the node's own addresses of the other nodes, read again on demand."""
    assert load_config(cfg_path, env={}).peers == {}
    text = cfg_path.read_text()
    cfg_path.write_text(text + '\n[peers]\n"bank-b" = "127.0.0.1:7001"\n')
    cfg = load_config(cfg_path, env={})
    assert cfg.peers == {"bank-b": "127.0.0.1:7001"}
    cfg_path.write_text(text + '\n[peers]\n"bank-b" = "127.0.0.1:7002"\n"bank-c" = "10.0.0.3:7443"\n')
    assert config.load_peers(cfg, env={}) == {"bank-b": "127.0.0.1:7002", "bank-c": "10.0.0.3:7443"}
    # The table is parsed once per text: a rewrite of the same size at once,
    # and an override in the environment, are each seen at the next call.
    cfg_path.write_text(text + '\n[peers]\n"bank-b" = "127.0.0.1:7003"\n"bank-c" = "10.0.0.3:7443"\n')
    assert config.load_peers(cfg, env={})["bank-b"] == "127.0.0.1:7003"
    assert config.load_peers(cfg, env={"SPLITVAULT_PEERS__BANK-C": "10.0.0.4:7443"})["bank-c"] == "10.0.0.4:7443"
    assert config.load_peers(cfg, env={})["bank-c"] == "10.0.0.3:7443"
    for bad, message in (('"bank-b" = "nowhere"', "peers.bank-b"), ('"bank-b" = "127.0.0.1:0"', "real port"),
                         ('"../x" = "127.0.0.1:1"', "peer name")):
        cfg_path.write_text(text + f"\n[peers]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, env={})


@pytest.mark.parametrize("peers, message", [
    ([], None),
    ([{"name": "bank-b", "audit_public_key": ACME.public.hex(), "address": "10.0.0.2:7443"},
      {"name": "bank-c", "audit_public_key": ACME.public.hex(), "ready_file": "../c/ready.json"}], None),
    ([{"name": "bank-a", "audit_public_key": ACME.public.hex(), "address": "x:1"}], "never the node itself"),
    ([{"name": "bank-b", "audit_public_key": ACME.public.hex(), "address": "x:1"}] * 2, "each peer once"),
    ([{"name": "bank-b", "audit_public_key": "zz", "address": "x:1"}], "audit_public_key"),
    ([{"name": "bank-b", "audit_public_key": ACME.public.hex()}], "exactly one of address and ready_file"),
    ([{"name": "bank-b", "audit_public_key": ACME.public.hex(), "address": "x:1", "ready_file": "r"}],
     "exactly one of address and ready_file"),
    ([{"name": "../b", "audit_public_key": ACME.public.hex(), "address": "x:1"}], "not a valid node name"),
])
def test_witness_peers(cfg_path, peers, message):
    lines = []
    for p in peers:
        lines.append("\n[[witness.peers]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in p.items()]
    cfg_path.write_text(cfg_path.read_text() + "\n".join(lines) + "\n")
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, env={})
        return
    cfg = load_config(cfg_path, env={})
    assert list(cfg.witness_peers) == [p["name"] for p in peers]
    if peers:
        b, c = cfg.witness_peers["bank-b"], cfg.witness_peers["bank-c"]
        assert (b.address, b.ready_file) == ("10.0.0.2:7443", None)
        assert c.address is None and c.ready_file == cfg_path.parent / "../c/ready.json"
def test_operators_and_founding_committee(cfg_path):
    from vault import pki

    operator = pki.public_key_raw(pki.load_signing_key(pki.new_signing_key()[0])).hex()
    base = cfg_path.read_text()
    cfg_path.write_text(base + f'\n[operators]\n"bank-a" = "{operator}"\n\n[committee]\nthreshold = 2\n'
                        'members = { "bank-a" = 2, "bank-b" = 1 }\n')
    cfg = load_config(cfg_path, env={})
    assert set(cfg.operators) == {"bank-a"} and cfg.committee == {"bank-a": 2, "bank-b": 1}
    assert cfg.committee_threshold == 2
    for extra, message in (
        ('\n[operators]\n"bank-a" = "zz"\n', "operators.bank-a"),
        ('\n[committee]\nthreshold = 3\nmembers = { "bank-a" = 2, "bank-b" = 1 }\n', "committee.threshold"),
        ('\n[committee]\nthreshold = 2\nmembers = { "bank-a" = 1, "bank-b" = 1 }\n', "same index"),
        ('\n[committee]\nthreshold = 2\n', r"\[committee\]"),
    ):
        cfg_path.write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, env={})


def test_committee_pins(cfg_path):
    """[committee] pins: each member's certificate-key fingerprint, all or none."""
    a, b = "ab" * 32, "cd" * 32
    base = cfg_path.read_text() + '\n[committee]\nthreshold = 2\nmembers = { "bank-a" = 2, "bank-b" = 1 }\n'
    cfg_path.write_text(base)
    assert load_config(cfg_path, env={}).committee_pins == {}
    cfg_path.write_text(base + f'pins = {{ "bank-a" = "{a}", "bank-b" = "{b}" }}\n')
    assert load_config(cfg_path, env={}).committee_pins == {"bank-a": a, "bank-b": b}
    for pins, message in (
        (f'{{ "bank-a" = "{a}" }}', "every committee member"),
        (f'{{ "bank-a" = "{a}", "bank-b" = "{b}", "bank-c" = "{a}" }}', "every committee member"),
        (f'{{ "bank-a" = "{a}", "bank-b" = "{b.upper()}" }}', "committee.pins.bank-b"),
        (f'{{ "bank-a" = "{a}", "bank-b" = 7 }}', "committee.pins.bank-b"),
    ):
        cfg_path.write_text(base + f"pins = {pins}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, env={})


def test_store_backend(cfg_path):
    cfg = load_config(cfg_path, env={})
    assert (cfg.store.backend, cfg.store.path) == ("sqlite", cfg.db_path)
    base = cfg_path.read_text()
    cfg_path.write_text(base + '[store]\nbackend = "postgres"\ndsn_env = "PG_NODE"\nowner_dsn = "user=owner"\n')
    cfg = load_config(cfg_path, env={"PG_NODE": "user=node password=secret"})
    assert (cfg.store.backend, cfg.store.dsn, cfg.store.owner_dsn) == ("postgres", "user=node password=secret", "user=owner")
    assert "secret" not in repr(cfg) and "secret" not in str(cfg.store)  # the DSN's password stays out of messages


@pytest.mark.parametrize("section, env, message", [
    ('backend = "oracle"', {}, "store.backend must be one of"),
    ('backend = "postgres"', {}, "store.dsn"),
    ('backend = "postgres"\ndsn_env = "PG_NODE"', {}, "PG_NODE"),
    ('backend = "postgres"\ndsn = "a"\ndsn_env = "PG_NODE"', {"PG_NODE": "b"}, "dsn or dsn_env"),
    ('dsn = "user=node"', {}, 'for store.backend = "postgres" only'),
])
def test_bad_store_sections(cfg_path, section, env, message):
    cfg_path.write_text(cfg_path.read_text() + f"[store]\n{section}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_path, env=env)


def test_identify_preload_names_registered_tenants(cfg_path):
    assert load_config(cfg_path, env={}).identify_preload == ()
    text = cfg_path.read_text()
    cfg_path.write_text(text + '\n[identify]\npreload = ["acme"]\n')
    assert load_config(cfg_path, env={}).identify_preload == ("acme",)
    for bad, message in (('preload = ["acme", "other"]', "'other', which is not a tenant"),
                         ('preload = "acme"', "identify.preload has the wrong type"),
                         ('preload = ["acme", "acme"]', "distinct tenant names"),
                         ("preload = [1]", "distinct tenant names")):
        cfg_path.write_text(text + f"\n[identify]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(cfg_path, env={})
