"""The one seeded hash of ids that every sample and split of slm uses (splitmix64).

A sample keyed by a hash of ``window_id`` / ``doc_id`` does not depend on how Ray splits the
data into blocks, on file layout or on world size: held-out windows, the k-means fit sample,
the nested domain subsets and the importance resampling all draw from it.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def hash64(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per id (splitmix64 of ``id + golden·(seed + 1)``):
    sorting by it is a seeded permutation that does not depend on the rows' order."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((_GOLDEN * (seed + 1)) & _MASK)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) number per id (the top 53 bits of ``hash64``)."""
    return (hash64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sha256_file(path: str) -> str:
    """sha256 hex digest of a local file, read in 1 MiB blocks (integrity markers, manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
