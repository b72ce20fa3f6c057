"""Statistics for the tests that shares look uniform (test support)."""
from __future__ import annotations

import math

import numpy as np


def chi2_critical(df: int, z: float = 3.719) -> float:
    # Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is
    # the one-sided normal quantile for alpha = 1e-4.
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def two_sample_chi2(h1: np.ndarray, h2: np.ndarray) -> tuple[float, int]:
    # Chi-square test of homogeneity for two histograms of equal total.
    mask = (h1 + h2) > 0
    h1, h2 = h1[mask].astype(float), h2[mask].astype(float)
    stat = (((h1 - h2) ** 2) / (h1 + h2)).sum()
    return stat, mask.sum() - 1
