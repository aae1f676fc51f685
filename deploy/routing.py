"""Choosing a specialist for a prompt that names no domain, from the run's clustering.

The data pipeline clusters generic text (k-means over sentence embeddings) and records each
domain's histogram over those clusters. A prompt is embedded with the same model, assigned to its
nearest centroid c, and sent to the domain d with the largest share p(c | d) = counts_d[c] / n_d
of its training windows in that cluster. When no served domain has any window in c, the prompt
goes to the domain with the highest expected similarity sum_c p(c | d) * <e, mu_c>.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from slm.errors import InputError
from slm.layout import RunLayout


@dataclass
class ClusterRouter:
    centroids: np.ndarray            # [K, dim] float32
    domains: list[str]
    shares: np.ndarray               # [D, K] p(cluster | domain)

    def nearest_cluster(self, embedding: np.ndarray) -> int:
        d = ((self.centroids - embedding[None, :]) ** 2).sum(axis=1)
        return int(np.argmin(d))

    def route(self, embedding: np.ndarray) -> tuple[str, int]:
        """(domain, nearest cluster) for one L2-normalised embedding."""
        c = self.nearest_cluster(embedding)
        col = self.shares[:, c]
        if col.max() > 0:
            return self.domains[int(np.argmax(col))], c
        expected = self.shares @ (self.centroids @ embedding)
        return self.domains[int(np.argmax(expected))], c


def available_ks(run: str) -> list[int]:
    data = RunLayout(run).path("data")
    if not os.path.isdir(data):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(data)
                  if (m := re.fullmatch(r"kmeans-k(\d+)", n)))


def load_router(run: str, domains: list[str], k: int = 0) -> ClusterRouter:
    """Router over ``domains`` from ``RUN/data/kmeans-k<k>`` and ``histograms-k<k>``
    (k = 0: the largest clustering the run has, the finest view of the domains)."""
    from safetensors.numpy import load_file

    layout = RunLayout(run)
    ks = available_ks(run)
    if not ks:
        raise InputError(f"no k-means centroids in '{layout.path('data')}' (kmeans-k<K>/); "
                         "routing by embedding needs the run's data pipeline output")
    k = k or max(ks)
    path = os.path.join(layout.kmeans(k), "centroids.safetensors")
    if not os.path.isfile(path):
        raise InputError(f"'{path}' is missing; available clusterings: k={ks}")
    centroids = load_file(path)["centroids"].astype(np.float32)
    shares = np.zeros((len(domains), centroids.shape[0]), dtype=np.float64)
    for i, d in enumerate(domains):
        hpath = os.path.join(layout.histograms(k), f"domain-{d}-train.json")
        if not os.path.isfile(hpath):
            raise InputError(f"no histogram for domain '{d}' at '{hpath}'; run the data pipeline "
                             f"(or `slm specialize`) for that domain, or name domains explicitly")
        with open(hpath, encoding="utf-8") as f:
            h = json.load(f)
        counts = np.asarray(h["counts"], dtype=np.float64)
        if counts.shape[0] != centroids.shape[0]:
            raise InputError(f"'{hpath}' has {counts.shape[0]} clusters, centroids have "
                             f"{centroids.shape[0]}; the run's data stages are inconsistent")
        shares[i] = counts / max(counts.sum(), 1.0)
    return ClusterRouter(centroids=centroids, domains=list(domains), shares=shares)
