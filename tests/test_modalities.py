"""Per-modality configuration: each tenant's modalities by dimension, each
threshold with the false-match rate it was chosen for, in the matcher's
config and a dev cluster's spec (the matcher's behaviour with two
modalities is tested over real servers in tests/test_faces.py)."""
from __future__ import annotations

import json
import tomllib

import pytest

from matcher import config as matcher_config
from matcher_kit import Tenant, matcher_dict
from vaultctl import cli, cluster


# --- per-modality configuration ------------------------------------------------


def _config(dev_pki, modalities, **tenant):
    t = Tenant("acme")
    data = matcher_dict(dev_pki, [("bank-a", 1, "127.0.0.1:1"), ("bank-b", 2, "127.0.0.1:2")], [t], k=2, dim=512)
    data["tenants"]["acme"].update(tenant)
    if modalities is not None:
        data["tenants"]["acme"]["modalities"] = modalities
    return matcher_config.from_dict(data)


def test_a_tenant_has_a_modality_per_dimension_each_with_its_fmr(dev_pki):
    cfg = _config(dev_pki, {"face-dlib128": {"dimension": 128, "match_threshold": 0.895, "fmr": 1e-4}},
                  match_fmr=1e-3)
    policy = cfg.tenants["acme"]
    assert policy.dimensions == (128, 512)
    assert policy.modality(128) == matcher_config.Modality("face-dlib128", 128, 0.895, 1e-4)
    assert policy.modality(512) == matcher_config.Modality("default", 512, 0.8, 1e-3)
    assert _config(dev_pki, None).tenants["acme"].modality(512).fmr is None  # older configs load unchanged


@pytest.mark.parametrize("modalities, words", [
    ({"face": {"dimension": 512, "match_threshold": 0.9, "fmr": 1e-4}}, "same dimension 512"),
    ({"face": {"dimension": 128, "match_threshold": 0.9}}, "missing tenants.acme.modalities.face.fmr"),
    ({"face": {"dimension": 128, "match_threshold": 0.0, "fmr": 1e-4}}, "match_threshold must be above 0"),
    ({"face": {"dimension": 128, "match_threshold": 0.9, "fmr": 1.0}}, "fmr"),
    ({"face": {"dimension": 0, "match_threshold": 0.9, "fmr": 1e-4}}, "dimension must be between"),
    ({"bad name!": {"dimension": 128, "match_threshold": 0.9, "fmr": 1e-4}}, "modality name"),
    ({"face": 3}, "is not a table"),
])
def test_bad_modalities_are_config_errors(dev_pki, modalities, words):
    with pytest.raises(matcher_config.ConfigError, match=words):
        _config(dev_pki, modalities)


def test_cluster_spec_keeps_modalities_and_writes_them_for_the_matcher(tmp_path):
    face = matcher_config.check_modality("face-dlib128", 128, 0.895, 1e-4)
    spec = cluster.ClusterSpec(modalities=(face,))
    assert cluster.ClusterSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(cluster.ClusterError, match="its own dimension"):
        cluster.ClusterSpec(dim=128, modalities=(face,))
    paths = cluster.init(tmp_path / "c", spec)
    text = cluster.matcher_config_text(paths, spec, {n: "127.0.0.1:1" for n in spec.nodes})
    cfg = matcher_config.from_dict(tomllib.loads(text), base=paths.matcher_dir)
    assert cfg.tenants[spec.tenant].modality(128) == face


def test_cluster_up_modality_argument(capsys):
    assert cli.main(["cluster", "up", "--dir", "/nonexistent/x", "--modality", "face:128:0.9"]) == 1
    assert "NAME:DIM:THRESHOLD:FMR" in capsys.readouterr().err


def test_cluster_up_on_a_cluster_with_other_modalities_says_which(tmp_path):
    spec = cluster.ClusterSpec()
    cluster.init(tmp_path / "c", spec)
    face = matcher_config.check_modality("face-dlib128", 128, 0.895, 1e-4)
    with pytest.raises(cluster.ClusterError, match="already holds a cluster with modality = none; use another --dir"):
        cluster.up(tmp_path / "c", modalities=(face,))
