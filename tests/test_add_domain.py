"""Adding a domain later: a flat set of documents is split, tokenized with the run's tokenizer,
embedded, assigned to the run's centroids, sharded and specialized, and the pretraining
checkpoints are not touched (sha256 of every file under RUN/pretrain)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from spec_run import build_corpus, build_tiny_run

from slm.errors import InputError


@pytest.fixture(scope="module")
def recipe(ray_local, tmp_path_factory):
    return build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")


def _tree_sha(root: str) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_new_domain_is_specialized_without_touching_pretraining(recipe, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from slm.layout import RunLayout, domain_set, train_subset
    from slm.stage import manifest, read_json, join
    from slm.tune.add_domain import specialize_new_domain

    layout = RunLayout(recipe.run_dir)
    before = _tree_sha(layout.pretrain(""))
    assert before
    corpus = build_corpus(tmp_path_factory.getbasetemp() / "spec-run" / "corpus")
    # pn: the new domain's own cluster histogram picks the expert it materializes
    out = specialize_new_domain(recipe.run_dir, corpus["later"], name="later", methods=["pn"])
    assert _tree_sha(layout.pretrain("")) == before
    assert set(out) == {("later", "pn")}
    for split in ("train", "valid", "test"):
        assert manifest(layout.shards(domain_set("later", split))) is not None
    for size in recipe.data.domain_train_tokens:
        assert manifest(layout.shards(train_subset("later", size))) is not None
    hist = read_json(join(layout.histograms(recipe.kmeans.k_pn), f"{domain_set('later', 'train')}.json"))
    assert hist["k"] == recipe.kmeans.k_pn and sum(hist["counts"]) == hist["n"] > 0
    for (_, method), uri in out.items():
        model = AutoModelForCausalLM.from_pretrained(uri)
        info = json.loads(open(os.path.join(uri, "training.json")).read())
        assert info["domain"] == "later" and info["method"] == method
        assert model.config.n_embd > 0


def test_bad_domain_inputs(recipe, tmp_path):
    from slm.tune.add_domain import specialize_new_domain

    with pytest.raises(InputError, match="does not exist"):
        specialize_new_domain(recipe.run_dir, str(tmp_path / "nope"), methods=["slm"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match="holds no text"):
        specialize_new_domain(recipe.run_dir, str(empty), methods=["slm"])
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n")
    with pytest.raises(InputError, match="holds no text"):
        specialize_new_domain(recipe.run_dir, str(blank), methods=["slm"])


def test_unknown_run_is_a_clear_error(tmp_path):
    from slm.tune.add_domain import specialize_new_domain

    with pytest.raises(InputError, match="run '.*nosuch' does not exist"):
        specialize_new_domain(str(tmp_path / "nosuch"), str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "slm.cli", "specialize", "--run",
                          str(tmp_path / "nosuch"), "--domain", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
