"""The matcher's configuration: the contract's TOML format, one-sentence
errors, and ``python -m matcher`` exiting 1 without a traceback."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from matcher import config as matcher_config
from matcher_kit import DIM, ROOT, Tenant, matcher_dict

# --- the matcher's configuration -------------------------------------------------


def _toml_for(tmp_path, pki_, **edit) -> pathlib.Path:
    t = Tenant("acme")
    data = matcher_dict(pki_, [("bank-a", 1, "127.0.0.1:1"), ("bank-b", 2, "127.0.0.1:2")], [t], k=2)
    for dotted, value in edit.items():
        section, _, key = dotted.partition("__")
        if value is None:
            data[section].pop(key, None)
        else:
            data[section][key] = value
    lines = []
    for section in ("matcher", "tls", "metrics"):
        lines.append(f"[{section}]")
        for key, value in data[section].items():
            lines.append(f"{key} = {_toml_value(value)}")
    for sh in data["shareholders"]:
        lines.append("[[shareholders]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in sh.items()]
    for name, tenant in data["tenants"].items():
        lines.append(f"[tenants.{name}]")
        lines.append(f"match_threshold = {tenant['match_threshold']}")
        lines.append(f"score_allowed = {str(tenant['score_allowed']).lower()}")
        keys = ", ".join(f'"{k}" = "{v}"' for k, v in tenant["ticket_keys"].items())
        lines.append(f"ticket_keys = {{ {keys} }}")
    path = tmp_path / "matcher.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def test_config_loads_the_contract_format(tmp_path, dev_pki):
    cfg = matcher_config.load(_toml_for(tmp_path, dev_pki))
    assert cfg.threshold == 2 and cfg.n == 2 and cfg.dimension == DIM
    assert [e.name for e in cfg.shareholders] == ["bank-a", "bank-b"]
    assert cfg.tenants["acme"].match_threshold == 0.8 and not cfg.tenants["acme"].score_allowed


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"matcher__threshold": 3}, "threshold"),
        ({"matcher__threshold": 1}, "threshold"),
        ({"matcher__dimension": 0}, "dimension"),
        ({"matcher__listen": None}, "matcher.listen"),
        ({"matcher__call_timeout_ms": "soon"}, "call_timeout_ms"),
        ({"matcher__cluster_id": None}, "matcher.cluster_id"),
        ({"matcher__cluster_id": "bad\tid"}, "matcher.cluster_id"),
    ],
)
def test_bad_config_is_one_sentence(tmp_path, dev_pki, edit, words):
    with pytest.raises(matcher_config.ConfigError, match=words):
        matcher_config.load(_toml_for(tmp_path, dev_pki, **edit))


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, -1, 1.01, float("nan"), float("inf"), True])
def test_match_threshold_that_would_match_everything_is_a_config_error(dev_pki, threshold):
    # At or below 0 unrelated templates match; NaN compares false both ways; above 1 nothing can.
    data = matcher_dict(dev_pki, [("bank-a", 1, "127.0.0.1:1"), ("bank-b", 2, "127.0.0.1:2")], [Tenant("acme")], k=2)
    data["tenants"]["acme"]["match_threshold"] = threshold
    with pytest.raises(matcher_config.ConfigError, match="match_threshold"):
        matcher_config.from_dict(data)


def test_python_m_matcher_bad_config_exits_1_without_traceback(tmp_path, dev_pki):
    path = _toml_for(tmp_path, dev_pki, matcher__threshold=5)
    proc = subprocess.run([sys.executable, "-m", "matcher", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "threshold" in proc.stderr


def test_python_m_matcher_missing_tls_file_exits_1(tmp_path, dev_pki):
    path = _toml_for(tmp_path, dev_pki, tls__key=str(tmp_path / "missing.key"))
    proc = subprocess.run([sys.executable, "-m", "matcher", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "missing.key" in proc.stderr


def test_verify_on_shares_is_a_tenant_option_with_its_preconditions(dev_pki):
    t = Tenant("acme")
    three = [("bank-a", 1, "127.0.0.1:1"), ("bank-b", 2, "127.0.0.1:2"), ("bank-c", 3, "127.0.0.1:3")]
    data = matcher_dict(dev_pki, three, [t], k=2)
    assert not matcher_config.from_dict(data).tenants["acme"].verify_on_shares
    data["tenants"]["acme"]["verify_on_shares"] = True
    assert matcher_config.from_dict(data).tenants["acme"].verify_on_shares
    for edit, words in ((lambda d: d["tenants"]["acme"].update(score_allowed=True), "score_allowed"),
                        (lambda d: d["matcher"].update(threshold=3), "threshold = 2"),
                        (lambda d: d.update(shareholders=d["shareholders"][:2]), "three shareholders")):
        bad = matcher_dict(dev_pki, three, [t], k=2)
        bad["tenants"]["acme"]["verify_on_shares"] = True
        edit(bad)
        with pytest.raises(matcher_config.ConfigError, match=words):
            matcher_config.from_dict(bad)
