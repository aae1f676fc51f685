"""The run's tokenizer, ``data/tokenizer``: a byte-level BPE trained on the generic corpus, or any
Hugging Face tokenizer by name/path, saved as a ``transformers`` fast tokenizer (EOS
``<|endoftext|>`` for a trained BPE; a named tokenizer keeps its own EOS).

Training streams the corpus artifact batch by batch into ``tokenizers``' trainer
(``train_from_iterator``): the trainer keeps word counts, never the corpus. It runs in a Ray
task (``train_in_ray``), not on the driver: the corpus blocks it reads then never pass through
the driver (on a cluster, the head), whose memory stays the same whatever the corpus size.
"""

from __future__ import annotations

import tempfile
from typing import Any, Iterator

import ray
import transformers  # AutoTokenizer resolves lazily (it imports torch): only named tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slm.cluster.ray_env import configure_data_context, progress_bars
from slm.errors import InputError, StageError
from slm.layout import RunLayout
from slm.pipeline.artifacts import read_artifact
from slm.pipeline.config import TokenizerConfig
from slm.stage import Stage, copy_dir, filesystem, input_fingerprints, is_remote, join, local_dir, manifest

EOS = "<|endoftext|>"
TRAIN_BATCH = 1_000  # documents per batch handed to the BPE trainer


def _corpus_texts(corpus_uri: str, limit: int) -> Iterator[list[str]]:
    """Batches of generic documents, streamed from the corpus artifact (Ray Data)."""
    ds = read_artifact(corpus_uri, columns=["text"])
    if limit:
        ds = ds.limit(limit)
    for batch in ds.iter_batches(batch_size=TRAIN_BATCH, batch_format="pyarrow"):
        yield batch.column("text").to_pylist()


def train_bpe(texts: Iterator[list[str]], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained from batches of texts; returns a fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress_bars())  # blank lines in a log
    tok.train_from_iterator(texts, trainer=trainer)
    return _fast(tok)


def _fast(core: Tokenizer) -> PreTrainedTokenizerFast:
    # GPT-2 convention: one special token is BOS, EOS, UNK and padding.
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)


def _train_on_corpus(corpus_uri: str, limit: int, vocab_size: int) -> str:
    """tokenizer.json text of a BPE trained on a corpus artifact (what the Ray task returns)."""
    if ray.is_initialized():
        configure_data_context()  # a Ray worker's own Dataset reads as the driver's do (order)
    return train_bpe(_corpus_texts(corpus_uri, limit), vocab_size).backend_tokenizer.to_str()


def train_in_ray(corpus_uri: str, limit: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """``train_bpe`` on a corpus artifact, in a Ray task when Ray is up. The task takes a CPU
    only where the cluster has a second one for the Ray Data reads it starts (with the only
    CPU taken, they would wait forever)."""
    if not ray.is_initialized():
        return _fast(Tokenizer.from_str(_train_on_corpus(corpus_uri, limit, vocab_size)))
    cpus = 1.0 if ray.cluster_resources().get("CPU", 0) >= 2 else 0.0
    task = ray.remote(num_cpus=cpus)(_train_on_corpus).options(name="bpe-train")
    return _fast(Tokenizer.from_str(ray.get(task.remote(corpus_uri, limit, vocab_size))))


def pretrained(name: str):
    """Any Hugging Face tokenizer by name or local path (fast only); InputError if unknown."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError / ValueError / hub errors: unknown or unreachable
        raise InputError(f"tokenizer.name '{name}' is not a local tokenizer directory nor a "
                         f"reachable Hugging Face tokenizer ({type(e).__name__}); give a path to "
                         "a saved tokenizer, a hub name where the hub is reachable, or leave "
                         "tokenizer.name empty to train a BPE") from None
    if not tok.is_fast:
        raise InputError(f"tokenizer '{name}' has no fast (Rust) version; give a tokenizer with "
                         "a tokenizer.json")
    if tok.eos_token is None:  # windows need a document separator
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(layout: RunLayout, cfg: TokenizerConfig, force: bool = False) -> str:
    """``data/tokenizer``: train a BPE on the generic corpus or save the named tokenizer."""
    if cfg.name:
        config: dict[str, Any] = {"name": cfg.name}
        inputs: dict[str, str] = {}
    else:
        config = {"vocab_size": cfg.vocab_size, "train_docs": cfg.train_docs}
        inputs = input_fingerprints(layout, layout.corpus_generic())
    st = Stage(layout.tokenizer, stage="tokenizer", config=config, inputs=inputs, force=force)
    if st.done:
        return st.uri
    tok = pretrained(cfg.name) if cfg.name else \
        train_in_ray(layout.corpus_generic(), cfg.train_docs, cfg.vocab_size)
    with st.publish() as out:
        _save(tok, out)
        out.manifest.update({"vocab_size": len(tok), "eos_token": tok.eos_token,
                             "eos_token_id": tok.eos_token_id, "rows": len(tok)})
    return st.uri


def _save(tok, out) -> None:
    """save_pretrained into the staging dir (through a local temp dir for object storage)."""
    if not is_remote(out.uri):
        tok.save_pretrained(out.local_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        copy_dir(tmp, out.uri)


def local_copy(uri: str) -> str:
    """A local directory holding the tokenizer's files (itself when local; else a cached copy)."""
    return local_dir(uri, "tokenizer")


def load_tokenizer(uri: str) -> PreTrainedTokenizerFast:
    """The tokenizer artifact at ``uri`` (local or object storage) as a fast tokenizer, with
    EOS as its padding token so that batched generation works."""
    tok = PreTrainedTokenizerFast.from_pretrained(local_copy(uri))
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _core(uri: str) -> Tokenizer:
    fs, path = filesystem(join(uri, "tokenizer.json"))
    with fs.open_input_stream(path) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def load_fast_core(uri: str) -> tuple[Tokenizer, int]:
    """The bare ``tokenizers.Tokenizer`` (Rust) and the EOS id: what a tokenization worker
    needs, read straight from the artifact (no local copy)."""
    m = manifest(uri)
    if m is None:
        raise InputError(f"no tokenizer at '{uri}'; run the tokenizer stage first")
    return _core(uri), int(m["eos_token_id"])


def _require_done(layout: RunLayout, recipe_path: str) -> str:
    uri = layout.tokenizer
    if manifest(uri) is None:
        raise StageError(f"tokenizer '{uri}' is missing (not done); build it with "
                         f"`slm data run --recipe {recipe_path or layout.recipe}`")
    return uri


def run_tokenizer(layout: RunLayout, recipe_path: str = "") -> PreTrainedTokenizerFast:
    """The run's tokenizer (``RUN/data/tokenizer``); StageError naming the command that builds
    it (with ``recipe_path``, default ``RUN/recipe.yaml``) when it is not done."""
    return load_tokenizer(_require_done(layout, recipe_path))


def run_vocab_size(layout: RunLayout, recipe_path: str = "") -> int:
    """Vocabulary size of the run's tokenizer, added tokens included (reads tokenizer.json
    only); StageError as ``run_tokenizer`` when it is not done."""
    return _core(_require_done(layout, recipe_path)).get_vocab_size()
