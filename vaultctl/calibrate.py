"""Choosing a modality's threshold, and what int8 quantisation does to it.

From genuine pairs (two samples of one person) and impostor pairs (two
people), ``calibrate`` finds the lowest cosine threshold whose false-match
rate (impostor pairs at or above it; Verify matches on score >= threshold)
is at most the target, the false non-match rate there, the DET curve, and,
when the pairs are embeddings, how many decisions the vault's int8
quantisation (``vault.codec``) changes at that threshold. Scores and
embeddings stay in memory; only counts and rates are reported.

``SyntheticFaces`` makes embeddings whose score distributions are modelled
on real ones (docs/fidelity.md says how).
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

from vault import codec

__all__ = ["Calibration", "CalibrationError", "Pairs", "SyntheticFaces", "calibrate", "det_curve", "fmr_at",
           "fnmr_at", "load_pairs", "quantised_scores", "threshold_for_fmr", "write_det_png"]


class CalibrationError(ValueError):
    """Unusable pairs or target; the message is one sentence."""


@dataclass
class Pairs:
    """Float32 cosine scores of genuine and impostor pairs, and the int8 scores when embeddings were given."""

    genuine: np.ndarray
    impostor: np.ndarray
    genuine_q: np.ndarray | None = None
    impostor_q: np.ndarray | None = None


def threshold_for_fmr(impostor: np.ndarray, fmr: float) -> float:
    """The lowest threshold t with mean(impostor >= t) <= fmr.

    With m = floor(fmr * N) false matches allowed, t is just above the
    (m + 1)-th highest impostor score.
    """
    scores = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise CalibrationError("There are no impostor pairs to calibrate on.")
    if not 0.0 < fmr < 1.0:
        raise CalibrationError("The target false-match rate must be between 0 and 1.")
    allowed = int(np.floor(fmr * scores.size + 1e-9))
    if allowed >= scores.size:
        return float(scores[-1])
    return float(np.nextafter(scores[allowed], np.inf))


def fmr_at(impostor: np.ndarray, threshold: float) -> float:
    return float(np.mean(np.asarray(impostor) >= threshold))


def fnmr_at(genuine: np.ndarray, threshold: float) -> float:
    return float(np.mean(np.asarray(genuine) < threshold))


def det_curve(genuine: np.ndarray, impostor: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FMR, FNMR) at thresholds where FMR or FNMR steps through log-spaced rates
    (a DET plot is read on log axes, so its thresholds are quantiles, not evenly spaced scores)."""
    g = np.sort(np.asarray(genuine, dtype=np.float64))
    i = np.sort(np.asarray(impostor, dtype=np.float64))
    rates = np.logspace(np.log10(0.5 / max(g.size, i.size)), 0, points)
    t = np.unique(np.concatenate([np.quantile(i, 1 - rates), np.quantile(g, rates)]))
    fmr = 1.0 - np.searchsorted(i, t, side="left") / i.size
    fnmr = np.searchsorted(g, t, side="left") / g.size
    return t, fmr, fnmr


def quantised_scores(a: np.ndarray, b: np.ndarray, chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (float32 cosine, int8 cosine) of two (N, d) batches, as Verify computes the latter."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise CalibrationError("Both sides of the pairs must be N x d arrays of one shape.")
    f, q = np.empty(len(a)), np.empty(len(a))
    for s in range(0, len(a), chunk):
        x, y = a[s:s + chunk].astype(np.float64), b[s:s + chunk].astype(np.float64)
        f[s:s + chunk] = np.einsum("ij,ij->i", x, y) / np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
        q[s:s + chunk] = codec.cosine_batch(codec.encode(x, a.shape[1]), codec.encode(y, a.shape[1]))
    return f, q


@dataclass
class Calibration:
    target_fmr: float
    threshold: float
    fmr: float
    fnmr: float
    genuine: int
    impostor: int
    # Quantisation, when embeddings were given: decisions that differ
    # between float32 and int8 at the threshold, and the largest |change|.
    changed: int | None = None
    max_abs_change: float | None = None
    # Pairs whose float32 score lies within max_abs_change of the
    # threshold: only these can flip; as a share of impostor pairs, the
    # FMR that quantisation can move at most.
    in_band_impostor_rate: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def calibrate(pairs: Pairs, target_fmr: float) -> Calibration:
    t = threshold_for_fmr(pairs.impostor, target_fmr)
    if pairs.genuine.size == 0:
        raise CalibrationError("There are no genuine pairs to calibrate on.")
    out = Calibration(target_fmr, t, fmr_at(pairs.impostor, t), fnmr_at(pairs.genuine, t),
                      int(pairs.genuine.size), int(pairs.impostor.size))
    if pairs.genuine_q is not None:
        f = np.concatenate([pairs.genuine, pairs.impostor])
        q = np.concatenate([pairs.genuine_q, pairs.impostor_q])
        out.changed = int(np.count_nonzero((f >= t) != (q >= t)))
        band = float(np.max(np.abs(q - f)))
        out.max_abs_change = band
        out.in_band_impostor_rate = float(np.mean(np.abs(pairs.impostor - t) <= band))
    return out


def load_pairs(path: str | pathlib.Path) -> Pairs:
    """Pairs from ``.npz`` or ``.json``: either scores (``genuine``, ``impostor``: 1-D) or
    embeddings (``genuine_a``, ``genuine_b``, ``impostor_a``, ``impostor_b``: N x d)."""
    path = pathlib.Path(path)
    try:
        if path.suffix == ".json":
            data = {k: np.asarray(v, dtype=np.float64) for k, v in json.loads(path.read_text()).items()}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
        else:
            raise CalibrationError("The pairs file must be .npz or .json.")
    except CalibrationError:
        raise
    except FileNotFoundError:
        raise CalibrationError(f"The pairs file {path} does not exist.") from None
    except (OSError, ValueError, TypeError, AttributeError):
        raise CalibrationError(f"The pairs file {path} cannot be read as {path.suffix[1:]} arrays of numbers.") from None
    if {"genuine_a", "genuine_b", "impostor_a", "impostor_b"} <= data.keys():
        g, gq = quantised_scores(data["genuine_a"], data["genuine_b"])
        i, iq = quantised_scores(data["impostor_a"], data["impostor_b"])
        pairs = Pairs(g, i, gq, iq)
    elif {"genuine", "impostor"} <= data.keys():
        pairs = Pairs(data["genuine"].reshape(-1), data["impostor"].reshape(-1))
    else:
        raise CalibrationError(
            "The pairs file needs genuine and impostor scores, or genuine_a/_b and impostor_a/_b embeddings.")
    for name, arr in (("genuine", pairs.genuine), ("impostor", pairs.impostor)):
        if arr.size == 0:
            raise CalibrationError(f"There are no {name} pairs to calibrate on.")
        if not np.isfinite(arr).all() or arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6:
            raise CalibrationError(f"The {name} scores must be finite cosines between -1 and 1.")
    return pairs


def write_det_png(path: str | pathlib.Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                  marks: dict[str, tuple[float, float]] | None = None, title: str = "DET") -> None:
    """A DET plot (FNMR against FMR, both on log axes) of named (fmr, fnmr) curves, with marked operating points."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    floor = 1e-6
    for label, (fmr, fnmr) in curves.items():
        ax.plot(np.maximum(fmr, floor), np.maximum(fnmr, floor), "--" if "int8" in label else "-", label=label)
    for label, (x, y) in (marks or {}).items():
        ax.plot([max(x, floor)], [max(y, floor)], "o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class SyntheticFaces:
    """Embeddings x = mean + sigma_id * z_identity + u * sigma_noise * z_sample (z standard normal, d-dim).

    Two samples of one identity share z_identity; two identities do not.
    For large d, with m2 = |mean|^2 and R^2 = m2 + d (sigma_id^2 + sigma_noise^2):
    impostor cosine ~ m2 / R^2 and genuine cosine ~ (m2 + d sigma_id^2) / R^2,
    which ``fitted`` solves for sigma_id and sigma_noise given the real means.
    u = exp(noise_spread * z - noise_spread^2) per sample (E[u^2] = 1) makes
    some photographs worse than others, which widens the genuine scores to
    the real spread (``with_genuine_spread``); isotropic noise alone gives
    every genuine pair nearly the same score.
    """

    mean: np.ndarray
    sigma_id: float
    sigma_noise: float
    noise_spread: float = 0.0

    def with_genuine_spread(self, target_sd: float, n: int = 20_000, seed: int = 0) -> "SyntheticFaces":
        """The same model with noise_spread chosen (bisection) so that genuine scores have sd ``target_sd``."""
        lo, hi = 0.0, 1.5
        for _ in range(14):
            mid = (lo + hi) / 2
            model = SyntheticFaces(self.mean, self.sigma_id, self.sigma_noise, mid)
            a, b = model.pairs(np.random.default_rng(seed), n, True)
            sd = float(np.std(quantised_scores(a, b)[0]))
            lo, hi = (mid, hi) if sd < target_sd else (lo, mid)
        return SyntheticFaces(self.mean, self.sigma_id, self.sigma_noise, (lo + hi) / 2)

    @classmethod
    def fitted(cls, mean: np.ndarray, genuine_mean: float, impostor_mean: float) -> "SyntheticFaces":
        mean = np.asarray(mean, dtype=np.float64)
        d = mean.size
        m2 = float(mean @ mean)
        if m2 == 0.0:
            # No shared component: impostor cosines centre on 0 and R^2 is free (take 1).
            r2 = 1.0
        else:
            r2 = m2 / impostor_mean
        id2 = (genuine_mean * r2 - m2) / d
        noise2 = (r2 - m2) / d - id2
        if id2 <= 0 or noise2 <= 0:
            raise CalibrationError("The genuine mean must lie between the impostor mean and 1.")
        return cls(mean, float(np.sqrt(id2)), float(np.sqrt(noise2)))

    def pairs(self, rng: np.random.Generator, n: int, genuine: bool) -> tuple[np.ndarray, np.ndarray]:
        d = self.mean.size
        mean = self.mean.astype(np.float32)

        def z():
            return rng.standard_normal((n, d), dtype=np.float32)

        a_id = self.sigma_id * z()
        b_id = a_id if genuine else self.sigma_id * z()
        def u():
            s = self.noise_spread
            return np.exp(s * rng.standard_normal((n, 1)) - s * s).astype(np.float32)

        a = mean + a_id + self.sigma_noise * u() * z()
        b = mean + b_id + self.sigma_noise * u() * z()
        return a, b
