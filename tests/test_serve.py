"""`slm serve` on the local Ray: real HTTP requests to 127.0.0.1, bounded in number and time."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from ray import serve
from tiny_run import build_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.deploy.export import export_model
from slm.deploy.serve import ServeOptions, exported_domains, start
from slm.errors import InputError

TIMEOUT = 60  # seconds per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    tiny = build_tiny_run(str(tmp_path_factory.mktemp("run")))
    for d in ("code", "legal"):
        export_model(tiny["root"], d)
    opts = ServeOptions(num_cpus=0.25, max_new_tokens=16, max_prompt_chars=2000,
                        max_batch_size=4, batch_wait_s=0.5, torch_threads=1)
    try:
        url = start(tiny["root"], None, "127.0.0.1", _free_port(), opts)
        yield url, tiny
    finally:
        serve.shutdown()


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _local_greedy(root: str, domain: str, prompt: str, n: int) -> str:
    path = os.path.join(root, "export", domain)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


def test_named_domains_get_their_specialist(served):
    url, tiny = served
    prompt = "Licensed under the terms of"
    got = {}
    for d in ("code", "legal"):
        status, r = _post(url, {"prompt": prompt, "domain": d, "max_new_tokens": 12})
        assert status == 200, r
        assert r["domain"] == d and r["model"] == f"{d}/slm" and r["routed_by"] == "request"
        assert r["completion"] == _local_greedy(tiny["root"], d, prompt, 12)
        got[d] = r["completion"]
    assert got["code"] != got["legal"]  # two different models answered


def test_routing_by_embedding_sends_test_text_to_its_domain(served):
    url, tiny = served
    for d in ("code", "legal"):
        for text in tiny["texts"][d]["test"][:2]:
            status, r = _post(url, {"prompt": text[:80], "max_new_tokens": 4})
            assert status == 200, r
            assert r["routed_by"] == "embedding" and isinstance(r["cluster"], int)
            assert r["domain"] == d, (d, text[:80], r)


def test_concurrent_requests_are_batched(served):
    url, _ = served
    body = {"prompt": "def dumps(obj", "domain": "code", "max_new_tokens": 6}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _post(url, body), range(4)))
    assert all(s == 200 for s, _ in results)
    assert len({r["completion"] for _, r in results}) == 1
    assert max(r["batch_size"] for _, r in results) > 1


def test_bad_requests_get_4xx_and_server_keeps_serving(served):
    url, _ = served
    status, r = _post(url, b'{"prompt": "unterminated')
    assert status == 400 and "not valid JSON" in r["error"]["message"]
    status, r = _post(url, {"prompt": "x", "domain": "astrology"})
    assert status == 404 and "unknown domain 'astrology'" in r["error"]["message"]
    assert "code, legal" in r["error"]["message"]
    status, r = _post(url, {"prompt": "word " * 200, "domain": "code"})
    assert status == 413 and "context of 64 tokens" in r["error"]["message"]
    status, r = _post(url, {"prompt": "y" * 3000})
    assert status == 413 and "limit is 2000" in r["error"]["message"]
    status, r = _post(url, {"prompt": "x", "max_new_tokens": 1000})
    assert status == 400 and "max_new_tokens" in r["error"]["message"]
    status, r = _post(url, {"domain": "code"})
    assert status == 400 and "'prompt' is required" in r["error"]["message"]
    with urllib.request.urlopen(url + "/domains", timeout=TIMEOUT) as resp:
        info = json.loads(resp.read())
    assert info["domains"] == ["code", "legal"] and info["routing"]["k"] == 4
    status, r = _post(url, {"prompt": "Copyright", "domain": "legal", "max_new_tokens": 3})
    assert status == 200 and r["domain"] == "legal"


def test_unexported_domain_is_refused(served):
    _, tiny = served
    with pytest.raises(InputError, match="slm export --run"):
        exported_domains(tiny["root"], ["physics"])
