"""The float32 vector of a request (template or probe), checked once."""
from __future__ import annotations

import numpy as np

from vaultrpc import status


def checked(values, dimensions: tuple[int, ...], what: str) -> np.ndarray:
    """The request's vector as float32: one of the tenant's modalities' dimensions, finite, non-zero.

    The length is checked before any conversion: a 60 MB message of floats
    (under the 64 MiB limit) would otherwise cost ~300 MB and 0.7 s of
    conversion just to be refused (tests/test_hostile_matcher.py).
    """
    if len(values) not in dimensions:
        if len(dimensions) == 1:
            raise status.InvalidArgument(f"The {what} must have exactly {dimensions[0]} values.")
        sizes = ", ".join(map(str, dimensions[:-1])) + f" or {dimensions[-1]}"
        raise status.InvalidArgument(f"The {what} must have {sizes} values (one per modality of the tenant).")
    arr = np.array(values, dtype=np.float32)
    if not np.isfinite(arr).all():
        arr.fill(0)
        raise status.InvalidArgument(f"The {what} contains a non-finite value (NaN or infinity).")
    if not arr.any():
        raise status.InvalidArgument(f"The {what} is the zero vector.")
    return arr
