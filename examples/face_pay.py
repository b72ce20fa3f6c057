"""Pay with your face: photographs -> dlib embeddings -> splitvault (``make demo-faces``).

    python examples/face_pay.py [--dir build/face-pay-cluster] [--images build/face-samples]

1. start a local cluster (3 nodes, threshold 2, as processes) that holds two
   modalities: the default 512-d one and face-dlib128 (128-d, its threshold
   and the false-match rate it was chosen for, docs/fidelity.md);
2. enrol Barack Obama from obama.jpg and Joe Biden from biden.jpg: detect
   the one face, embed it (128 floats), enrol through MatcherClient;
3. another photograph of Obama (obama2.jpg) against "obama" -> MATCH;
4. Biden's photograph against "obama" and Eileen Collins' (astronaut.png)
   against "biden" -> NO_MATCH;
5. images the pipeline refuses, each with one clear sentence: no face
   (coffee.png), two faces (obama.jpg and biden.jpg side by side), a file
   that is not an image;
6. stop the cluster.

Between 4 and 5, ``identify_step``: obama3.jpg alone, searched among the
enrolled faces on shares (1:N, "pay with your face alone") -> MATCH obama.
Exit status 0 only if every step behaved as expected.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matcher.config import check_modality  # noqa: E402
from vaultctl import cluster, face_samples, faces  # noqa: E402
from vaultctl.client import MatcherClient  # noqa: E402

FACE = check_modality(faces.MODALITY, faces.DIMENSION, faces.MATCH_THRESHOLD, faces.MATCH_FMR)


def side_by_side(left: pathlib.Path, right: pathlib.Path) -> np.ndarray:
    """One RGB picture of two photographs next to each other (two faces)."""
    a, b = faces.load_rgb(left), faces.load_rgb(right)
    height = max(a.shape[0], b.shape[0])
    canvas = np.zeros((height, a.shape[1] + b.shape[1], 3), dtype=np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    return canvas


def identify_step(client: MatcherClient, embedder: faces.FaceEmbedder, image) -> str:
    """The 1:N step: the probe alone names the enrolled subject ("DECISION subject")."""
    result = client.identify(embedder.embed(image))
    return f"{result.decision} {result.subject or ''}".strip()


def run(cluster_dir: pathlib.Path, images: pathlib.Path) -> int:
    failures = []

    def expect(what: str, got: str, want: str) -> None:
        ok = got == want
        print(f"  {what}: {got}{'' if ok else f'  (expected {want})'}")
        if not ok:
            failures.append(what)

    paths = face_samples.fetch(images)
    print("1. loading the face models (SHA-256 checked) and starting the cluster")
    embedder = faces.FaceEmbedder()
    info = cluster.up(cluster_dir, modalities=(FACE,))
    print(f"  matcher {info['matcher']['address']}, {len(info['shareholders'])} shareholders, "
          f"modalities {', '.join(m['name'] + ' ' + str(m['dimension']) + '-d' for m in info['spec']['modalities'])}")
    try:
        with MatcherClient.from_cluster_dir(cluster_dir) as client:
            print("2. enrolling two customers from one photograph each")
            for subject, image in (("obama", "obama.jpg"), ("biden", "biden.jpg")):
                template = embedder.embed(paths[image])
                client.enroll(subject, template, replace=True)
                print(f"  enrolled {subject} from {image} ({template.size} values, split into shares)")
            print("3. the same person, another photograph")
            expect("obama2.jpg as obama", client.verify("obama", embedder.embed(paths["obama2.jpg"])).decision, "MATCH")
            print("4. other people")
            expect("biden.jpg as obama", client.verify("obama", embedder.embed(paths["biden.jpg"])).decision, "NO_MATCH")
            expect("astronaut.png as biden", client.verify("biden", embedder.embed(paths["astronaut.png"])).decision,
                   "NO_MATCH")
            print("4b. a face alone, searched among the enrolled ones on shares (1:N)")
            expect("identify obama3.jpg", identify_step(client, embedder, paths["obama3.jpg"]), "MATCH obama")
        print("5. images the pipeline refuses")
        with tempfile.TemporaryDirectory() as tmp:
            junk = pathlib.Path(tmp) / "receipt.jpg"
            junk.write_bytes(b"this is not a photograph")
            for label, image, kind in (
                ("coffee.png", paths["coffee.png"], faces.NoFace),
                ("obama.jpg + biden.jpg", side_by_side(paths["obama.jpg"], paths["biden.jpg"]), faces.SeveralFaces),
                ("receipt.jpg", junk, faces.UnreadableImage),
            ):
                try:
                    embedder.embed(image)
                    got = "accepted"
                except faces.FaceError as exc:
                    got = type(exc).__name__
                    print(f"  {label}: {exc}")
                expect(f"{label} refused", got, kind.__name__)
    finally:
        print("6. stopping the cluster")
        cluster.down(cluster_dir)
    print("face pay: all steps as expected" if not failures else f"face pay: FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=ROOT / "build" / "face-pay-cluster")
    parser.add_argument("--images", type=pathlib.Path, default=face_samples.CACHE)
    args = parser.parse_args(argv)
    try:
        return run(args.dir, args.images)
    except (faces.FacesUnavailable, faces.ModelFileError, face_samples.SampleError, cluster.ClusterError) as exc:
        print(f"face pay: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
