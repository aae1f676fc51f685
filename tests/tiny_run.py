"""A tiny, real run directory for the deploy tests (export, serve).

Two domains of real text that look nothing alike: `code` (Python standard-library sources) and
`legal` (licence texts shipped by Debian in /usr/share/common-licenses). On them: a real
byte-level BPE tokenizer, two small GPT-2 specialists fine-tuned a few steps each on their
domain, real all-MiniLM-L6-v2 embeddings, k-means centroids and domain histograms, all written
where the run layout says.
"""

from __future__ import annotations

import argparse
import inspect
import json
import json.encoder
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.cluster import KMeans
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from slm.layout import RunLayout, domain_set
from slm.pipeline.embed import load_model
from slm.pipeline.kmeans import CENTROIDS_FILE, save_centroids
from slm.stage import publish, write_json

K = 4
DOMAINS = ("code", "legal")


def _chunks(text: str, size: int = 400) -> list[str]:
    parts, cur = [], ""
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            parts.append(cur[:size * 2])
            cur = ""
    return parts


def domain_texts() -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [...], "test": [...]}} from real files of this machine."""
    code_train = _chunks(inspect.getsource(textwrap) + inspect.getsource(json.encoder))
    # held-out code: argparse source from a function definition on (its docstrings are prose)
    code_test = [c[c.index("    def "):] for c in _chunks(inspect.getsource(argparse))
                 if "    def " in c][10:14]
    lic = Path("/usr/share/common-licenses")
    legal_train = _chunks((lic / "GPL-3").read_text())[:40]
    legal_test = _chunks((lic / "Apache-2.0").read_text())[3:7]
    return {"code": {"train": code_train[:40], "test": code_test},
            "legal": {"train": legal_train, "test": legal_test}}


def _train_tokenizer(texts: list[str], out: str):
    """The run's tokenizer artifact (published with its manifest, as the pipeline does)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=512, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    with publish(out, stage="tokenizer", config={"vocab_size": 512}) as st:
        tok.save_pretrained(st.local_dir)
        st.manifest.update({"vocab_size": len(tok), "eos_token": tok.eos_token,
                            "eos_token_id": tok.eos_token_id})
    return tok


def _train_specialist(tok, texts: list[str], test: list[str], seed: int, out: str, domain: str):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    ids = torch.tensor(sum((tok(t)["input_ids"] + [tok.eos_token_id] for t in texts), []))
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        batch = windows[torch.randint(len(windows), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_ids = torch.tensor(sum((tok(t)["input_ids"] for t in test), []))
    tw = test_ids[: len(test_ids) // 32 * 32].view(-1, 32)
    with torch.no_grad():
        test_loss = float(model(input_ids=tw, labels=tw).loss)
        valid_loss = float(model(input_ids=windows[:4], labels=windows[:4]).loss)
    model.save_pretrained(out)
    # Some keys on purpose absent (spec_flops...): the model card must cope.
    info = {"domain": domain, "method": "slm", "budget_steps": 40, "domain_tokens": int(ids.numel()),
            "seed": seed, "valid_loss": valid_loss, "test_loss": test_loss,
            "test_ppl": math.exp(test_loss), "pretrain_flops": 1.5e12,
            "inference_params": model.num_parameters(),
            "data": {"train": f"{len(texts)} documents", "source": "tests/tiny_run.py"}}
    Path(out, "training.json").write_text(json.dumps(info))
    return model


def build_tiny_run(root: str) -> dict:
    """Write the run under ``root``; return {"texts", "models" (in-memory), "root"}."""
    layout = RunLayout(root)
    texts = domain_texts()
    tok = _train_tokenizer([t for d in DOMAINS for t in texts[d]["train"]], layout.tokenizer)
    models = {}
    for seed, d in enumerate(DOMAINS):
        out = layout.model(d, "slm")
        os.makedirs(out, exist_ok=True)
        models[d] = _train_specialist(tok, texts[d]["train"], texts[d]["test"], seed, out, d)
    emb = load_model("all-MiniLM-L6-v2", device="cpu")
    vecs = {d: emb.encode(texts[d]["train"], normalize_embeddings=True) for d in DOMAINS}
    allv = np.concatenate([vecs[d] for d in DOMAINS]).astype(np.float32)
    km = KMeans(n_clusters=K, n_init=3, random_state=0).fit(allv)
    with publish(layout.kmeans(K), stage="kmeans", config={"k": K}) as st:
        save_centroids(st.file(CENTROIDS_FILE), km.cluster_centers_, np.zeros(K, np.float32))
    with publish(layout.histograms(K), stage="histograms", config={"k": K}) as st:
        for d in DOMAINS:
            counts = np.bincount(km.predict(vecs[d]), minlength=K)
            write_json(st.file(f"{domain_set(d, 'train')}.json"),
                       {"k": K, "counts": counts.tolist(), "n": int(counts.sum())})
    Path(layout.recipe).write_text(yaml.safe_dump({
        "name": "tiny", "run_dir": root, "embed": {"model": "all-MiniLM-L6-v2"},
        "kmeans": {"k_is": K, "k_mix": 2, "k_pn": 2}}))
    return {"root": root, "texts": texts, "models": models, "tokenizer": tok}
