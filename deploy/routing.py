"""Choosing a specialist for a prompt that names no domain, from the run's clustering.

The data pipeline clusters generic text (k-means over sentence embeddings) and records each
domain's histogram over those clusters. A prompt is embedded with the same model, assigned to its
nearest centroid c, and sent to the domain d with the largest share p(c | d) = counts_d[c] / n_d
of its training windows in that cluster. When no served domain has any window in c, the prompt
goes to the domain with the highest expected similarity sum_c p(c | d) * <e, mu_c>.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slm.errors import InputError
from slm.layout import RunLayout, domain_set
from slm.pipeline.kmeans import histogram_file, load_centroids, read_histogram
from slm.stage import manifest


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
    return RunLayout(run).kmeans_ks()


def load_router(run: str, domains: list[str], k: int = 0) -> ClusterRouter:
    """Router over ``domains`` from ``RUN/data/kmeans-k<k>`` and ``histograms-k<k>``
    (k = 0: the largest clustering the run has, the finest view of the domains)."""
    layout = RunLayout(run)
    ks = available_ks(run)
    if not ks:
        raise InputError(f"no k-means centroids in '{layout.data}' (kmeans-k<K>/); "
                         "routing by embedding needs the run's data pipeline output")
    k = k or max(ks)
    if manifest(layout.kmeans(k)) is None:
        raise InputError(f"'{layout.kmeans(k)}' is missing; available clusterings: k={ks}")
    centroids = load_centroids(layout, k)[0].astype(np.float32)
    shares = np.zeros((len(domains), centroids.shape[0]), dtype=np.float64)
    for i, d in enumerate(domains):
        try:
            h = read_histogram(layout, k, domain_set(d, "train"))
        except InputError:
            raise InputError(f"no histogram for domain '{d}' at "
                             f"'{histogram_file(layout, k, domain_set(d, 'train'))}'; run the data "
                             "pipeline (or `slm specialize`) for that domain, or name domains "
                             "explicitly") from None
        counts = np.asarray(h["counts"], dtype=np.float64)
        if counts.shape[0] != centroids.shape[0]:
            raise InputError(f"the histogram of domain '{d}' has {counts.shape[0]} clusters, the "
                             f"centroids have {centroids.shape[0]}; the run's data stages are "
                             "inconsistent")
        shares[i] = counts / max(counts.sum(), 1.0)
    return ClusterRouter(centroids=centroids, domains=list(domains), shares=shares)
