"""The run directory: one place that names every artifact (local path or object-storage URI).

    RUN/
      recipe.yaml                          the recipe the run was started with
      data/corpus/generic/                 ingested documents (doc_id, text)
      data/corpus/domains/<d>/<split>/
      data/tokenizer/                      HF fast tokenizer
      data/windows/<name>/                 fixed-length token windows (window_id, input_ids)
      data/embeddings/<name>/              window_id, embedding
      data/kmeans-k<K>/                    centroids (safetensors)
      data/assign-k<K>/<name>/             window_id, cluster, distance
      data/histograms-k<K>/                one histogram per domain + generic (json)
      data/shards/<name>/                  training shards: input_ids + cluster_k<K> columns
      pretrain/<family>/                   Ray Train storage: checkpoints, metrics, costs
      specialize/<sweep>/                  Ray Tune experiment, results.parquet
      models/<domain>/<method>/            Hugging Face directories (the products)
      report/                              index.html + PNG figures

Window/shard set names: ``generic``, ``domain-<d>-<split>`` (split: train, valid, test),
``domain-<d>-train-<tokens>`` (nested train subsets), ``is-k<K>-<d>`` (SLM-is resampled).
"""

from __future__ import annotations

from dataclasses import dataclass

from slm.stage import join

SPLITS = ("train", "valid", "test")


def domain_set(domain: str, split: str) -> str:
    return f"domain-{domain}-{split}"


def train_subset(domain: str, tokens: int) -> str:
    return f"domain-{domain}-train-{tokens}"


def is_set(domain: str, k: int) -> str:
    return f"is-k{k}-{domain}"


@dataclass(frozen=True)
class RunLayout:
    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def recipe(self) -> str:
        return self.path("recipe.yaml")

    def corpus_generic(self) -> str:
        return self.path("data/corpus/generic")

    def corpus_domain(self, domain: str, split: str) -> str:
        return self.path("data/corpus/domains", domain, split)

    @property
    def tokenizer(self) -> str:
        return self.path("data/tokenizer")

    def windows(self, name: str) -> str:
        return self.path("data/windows", name)

    def embeddings(self, name: str) -> str:
        return self.path("data/embeddings", name)

    def kmeans(self, k: int) -> str:
        return self.path(f"data/kmeans-k{k}")

    def assignments(self, k: int, name: str) -> str:
        return self.path(f"data/assign-k{k}", name)

    def histograms(self, k: int) -> str:
        return self.path(f"data/histograms-k{k}")

    def shards(self, name: str) -> str:
        return self.path("data/shards", name)

    def pretrain(self, family: str) -> str:
        return self.path("pretrain", family)

    def sweep(self, name: str) -> str:
        return self.path("specialize", name)

    def model(self, domain: str, method: str) -> str:
        return self.path("models", domain, method)

    @property
    def report(self) -> str:
        return self.path("report")
