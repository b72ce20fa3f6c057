"""Face images with known identities, fetched from PyPI with pip into a
cache folder (the project's ``build/face-samples``, ignored by git).

- ``face-recognition`` 1.3.0's source distribution (MIT licence) ships test
  photographs of two people: five of Barack Obama (one a partial face) and
  one of Joe Biden; ``32bit.png`` is obama2.jpg again as RGBA.
- scikit-image's wheel bundles ``astronaut.png`` (Eileen Collins, a NASA
  photograph in the public domain), and ``chelsea.png`` (a cat) and
  ``coffee.png``, which show no human face.

Each image's SHA-256 is pinned, so a changed file is refused, and nothing is
fetched again once the cache holds the right bytes. Run as
``python -m vaultctl.face_samples [DIR]`` (``make face-samples``).
"""
from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = ["CACHE", "IMAGES", "SampleError", "Sample", "fetch"]

CACHE = pathlib.Path(__file__).resolve().parent.parent / "build" / "face-samples"

_FACE_RECOGNITION = ("face-recognition==1.3.0", "sdist")
_SCIKIT_IMAGE = ("scikit-image==0.26.0", "wheel")


@dataclass(frozen=True)
class Sample:
    name: str
    identity: str | None  # None: no human face in the picture
    source: tuple[str, str]
    member: str  # path inside the archive (after its top folder for an sdist)
    sha256: str


IMAGES: tuple[Sample, ...] = (
    Sample("obama.jpg", "obama", _FACE_RECOGNITION, "tests/test_images/obama.jpg",
           "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6"),
    Sample("obama2.jpg", "obama", _FACE_RECOGNITION, "tests/test_images/obama2.jpg",
           "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6"),
    Sample("obama3.jpg", "obama", _FACE_RECOGNITION, "tests/test_images/obama3.jpg",
           "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3"),
    Sample("obama_partial_face.jpg", "obama", _FACE_RECOGNITION, "tests/test_images/obama_partial_face.jpg",
           "c2d1f09e7ef3042352b41e41286e6eb0522f64f88308be13886991b95db52117"),
    Sample("obama_partial_face2.jpg", "obama", _FACE_RECOGNITION, "tests/test_images/obama_partial_face2.jpg",
           "9a812347f97633542b8cd9992de22def11b74f79d82056bc3ee830f13878e028"),
    Sample("32bit.png", "obama", _FACE_RECOGNITION, "tests/test_images/32bit.png",
           "44dca895a7d635a4aedddd91a4f37af9a8a5b44e66154282a24645a757b5f627"),
    Sample("biden.jpg", "biden", _FACE_RECOGNITION, "tests/test_images/biden.jpg",
           "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c"),
    Sample("astronaut.png", "collins", _SCIKIT_IMAGE, "skimage/data/astronaut.png",
           "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    Sample("chelsea.png", None, _SCIKIT_IMAGE, "skimage/data/chelsea.png",
           "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    Sample("coffee.png", None, _SCIKIT_IMAGE, "skimage/data/coffee.png",
           "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
)


class SampleError(RuntimeError):
    """The images could not be fetched or are not the pinned ones."""


def _sha256(path: pathlib.Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _download(requirement: str, kind: str, into: pathlib.Path) -> pathlib.Path:
    binary = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *binary, "-d", str(into), requirement],
        capture_output=True, text=True,
    )
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(p for p in into.iterdir() if p.name.lower().replace("-", "_").startswith(name))
    if done.returncode != 0 or not found:
        raise SampleError(f"pip could not download {requirement}: {done.stderr.strip()[-300:]}")
    return found[0]


def _extract(archive: pathlib.Path, member: str) -> bytes:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        for info in t.getmembers():
            if info.isfile() and info.name.split("/", 1)[-1] == member:
                f = t.extractfile(info)
                assert f is not None
                return f.read()
    raise SampleError(f"{archive.name} has no file {member}.")


def fetch(cache: str | pathlib.Path = CACHE) -> dict[str, pathlib.Path]:
    """Every sample image in ``cache`` (fetched with pip when missing): name -> path."""
    cache = pathlib.Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    paths = {s.name: cache / s.name for s in IMAGES}
    missing = [s for s in IMAGES if _sha256(paths[s.name]) != s.sha256]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            archives: dict[tuple[str, str], pathlib.Path] = {}
            for sample in missing:
                if sample.source not in archives:
                    archives[sample.source] = _download(*sample.source, pathlib.Path(tmp))
                data = _extract(archives[sample.source], sample.member)
                if hashlib.sha256(data).hexdigest() != sample.sha256:
                    raise SampleError(f"The sample image {sample.name} from {sample.source[0]} is not the pinned one.")
                partial = paths[sample.name].with_suffix(".part")
                partial.write_bytes(data)
                partial.replace(paths[sample.name])
    return paths


def embeddings(embedder, paths: dict[str, pathlib.Path]) -> dict[str, tuple[str, "np.ndarray"]]:
    """name -> (identity, 128-d embedding) of every sample image with a face."""
    return {s.name: (s.identity, embedder.embed(paths[s.name])) for s in IMAGES if s.identity is not None}


def pairs(embedded: dict[str, tuple[str, "np.ndarray"]]) -> list[tuple[str, str, bool]]:
    """Every unordered pair of embedded images: (name, name, same identity)."""
    names = list(embedded)
    return [(x, y, embedded[x][0] == embedded[y][0]) for i, x in enumerate(names) for y in names[i + 1:]]


if __name__ == "__main__":
    try:
        got = fetch(sys.argv[1] if len(sys.argv) > 1 else CACHE)
    except SampleError as exc:
        sys.exit(str(exc))
    print(f"{len(got)} sample images in {pathlib.Path(next(iter(got.values()))).parent}")
