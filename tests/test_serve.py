"""`slm serve` on the local Ray: real HTTP requests to 127.0.0.1, bounded in number and time.

One application for the module (two exported domains, default CPU shares fitted to the 2-CPU
local Ray, bearer-token auth on). Its embedding model is not loaded until the first routed
request: the test that checks embedding runs off the router's event loop comes first.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import ray
import torch
from ray import serve
from tiny_run import build_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.deploy.export import export_model
from slm.deploy.serve import (ServeOptions, exported_domains, pack_groups, plan_resources,
                              start, token_digest)
from slm.errors import InputError

TIMEOUT = 60  # seconds per request
TOKEN = secrets.token_urlsafe(24)
MAX_QUEUED = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    tiny = build_tiny_run(str(tmp_path_factory.mktemp("run")))
    for d in ("code", "legal"):
        export_model(tiny["root"], d)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    # num_cpus left at its default: the replicas' shares are fitted to the 2-CPU Ray (before,
    # two specialists at 1 CPU each and a 1-CPU router never became ready here)
    opts = ServeOptions(max_new_tokens=16, max_prompt_chars=2000, max_batch_size=4,
                        batch_wait_s=0.5, torch_threads=1, max_queued_requests=MAX_QUEUED,
                        token_file=str(token_file), ready_timeout_s=300)
    try:
        url = start(tiny["root"], None, "127.0.0.1", _free_port(), opts)
        yield url, tiny
    finally:
        serve.shutdown()


def _call(url: str, path: str, body=None, token: str | None = TOKEN, headers=None):
    """(status, JSON body, response headers) of one request."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=data, headers=h,
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def _post(url: str, body, **kw) -> tuple[int, dict]:
    status, r, _ = _call(url, "/generate", body, **kw)
    return status, r


def _tok(root: str, domain: str = "code"):
    return AutoTokenizer.from_pretrained(os.path.join(root, "export", domain))


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


def _burst(fns: list) -> list:
    """Run the callables at once (threads released together by a barrier)."""
    barrier = threading.Barrier(len(fns))

    def go(fn):
        barrier.wait(timeout=TIMEOUT)
        return fn()
    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(go, fns))


def test_embedding_does_not_block_the_router(served):
    """The first routed request loads the embedding model (seconds); meanwhile the router
    answers other requests (before: the load ran on its event loop and everything waited)."""
    url, tiny = served
    done = {}

    def routed():
        status, r = _post(url, {"prompt": tiny["texts"]["legal"]["test"][0][:80], "max_new_tokens": 2})
        done["routed"] = (time.monotonic(), status, r)

    t = threading.Thread(target=routed)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    status, info, _ = _call(url, "/domains")
    t1 = time.monotonic()
    t.join(TIMEOUT)
    assert status == 200 and info["domains"] == ["code", "legal"]
    routed_at, routed_status, r = done["routed"]
    assert routed_status == 200 and r["routed_by"] == "embedding", r
    _, stats, _ = _call(url, "/stats")
    load_s = stats["router"]["embed_load_s"]
    assert load_s is not None and load_s > 0.3
    assert t1 < routed_at, "GET /domains waited for the embedding"
    assert t1 - t0 < 1.0, f"GET /domains took {t1 - t0:.2f} s while the embedder loaded ({load_s} s)"


def test_named_domains_get_their_specialist(served):
    url, tiny = served
    prompt = "Licensed under the terms of"
    got = {}
    for d in ("code", "legal"):
        status, r = _post(url, {"prompt": prompt, "domain": d, "max_new_tokens": 12})
        assert status == 200, r
        assert r["domain"] == d and r["model"] == f"{d}/slm" and r["routed_by"] == "request"
        assert r["completion"] == _local_greedy(tiny["root"], d, prompt, 12)
        assert r["completion_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
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
    results = _burst([lambda: _post(url, body)] * 4)
    assert all(s == 200 for s, _ in results), results
    assert len({r["completion"] for _, r in results}) == 1
    assert max(r["batch_size"] for _, r in results) > 1
    _, stats, _ = _call(url, "/stats")
    assert stats["specialists"]["code"]["largest_batch"] > 1


def _prompt_of(tok, text: str, n: int) -> tuple[str, int]:
    """A prompt of about ``n`` tokens cut from ``text``, and its exact token count."""
    p = tok.decode(tok(text)["input_ids"][:n])
    return p, len(tok(p)["input_ids"])


def test_mixed_lengths_and_limits_in_one_batch(served):
    """Very different prompt lengths and max_new_tokens at once, on a 64-token model: each
    request gets its own token counts and greedy continuation (left padding), never more
    tokens than it asked for; one that cannot fit the context is refused alone. Before, the
    batch was padded to its longest prompt and run for its largest max_new_tokens: 50 + 16
    positions > 64 failed every request in it."""
    url, tiny = served
    tok = _tok(tiny["root"])
    text = " ".join(tiny["texts"]["code"]["test"])
    asks = [(52, 12), (3, 16), (40, 2), (10, 16)]
    prompts = [(p, n, min(m, 64 - n)) for p, n, m in
               ((*_prompt_of(tok, text, n), m) for n, m in asks)]
    assert all(n + m <= 64 for _, n, m in prompts) and max(n for _, n, _ in prompts) + 16 > 64
    too_long, n_long = _prompt_of(tok, text, 60)
    calls = [lambda p=p, m=m: _post(url, {"prompt": p, "domain": "code", "max_new_tokens": m})
             for p, _, m in prompts]
    calls.append(lambda: _post(url, {"prompt": too_long, "domain": "code", "max_new_tokens": 16}))
    results = _burst(calls)
    for (p, n, m), (status, r) in zip(prompts, results):
        assert status == 200, r
        assert r["prompt_tokens"] == n and 0 <= r["completion_tokens"] <= m, (n, m, r)
        assert r["completion"] == _local_greedy(tiny["root"], "code", p, m), (n, m, r)
    status, r = results[-1]
    assert status == 413 and r["error"]["field"] == "prompt"
    assert f"prompt is {n_long} tokens" in r["error"]["message"]
    # sampled (temperature at its floor) and greedy requests in one batch
    results = _burst([lambda t=t: _post(url, {"prompt": "def loads(s", "domain": "code",
                                              "max_new_tokens": 8, "temperature": t})
                      for t in (0.0, 1e-3, 1.0, 0.0)])
    assert [s for s, _ in results] == [200] * 4, results
    assert all(r["completion_tokens"] <= 8 for _, r in results)


def test_pack_groups_fit_the_context():
    lengths, new = [48, 3, 40, 10, 60, 1], [14, 16, 2, 16, 4, 3]
    groups = pack_groups(lengths, new, 64, 4)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert max(lengths[i] for i in g) + max(new[i] for i in g) <= 64 and len(g) <= 4


def test_bad_requests_get_4xx_and_server_keeps_serving(served):
    url, _ = served

    def bad(body, status, field=None, text=""):
        got, r = _post(url, body)
        assert got == status, (body if len(str(body)) < 200 else str(body)[:200], got, r)
        assert r["error"]["code"] == status and text in r["error"]["message"], r
        if field:
            assert r["error"]["field"] == field, r

    bad(b'{"prompt": "unterminated', 400, text="not valid JSON")
    bad(b"hello", 400, text="not valid JSON")
    bad(b"", 400, text="not valid JSON")
    bad(b"[1, 2]", 400, text="must be a JSON object")
    bad(b"[" * 100_000, 400, text="not valid JSON")                       # 100k-deep nesting
    bad(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, text="not valid JSON")
    bad(b'{"prompt": "\\ud800 lone surrogate"}', 400, text="not valid JSON")
    bad(b'{"prompt": "\xed\xa0\x80"}', 400, text="not valid JSON")       # invalid UTF-8
    bad({"prompt": "x", "domain": "astrology"}, 404, "domain", "unknown domain 'astrology'")
    bad({"prompt": "word " * 200, "domain": "code"}, 413, "prompt", "context of 64 tokens")
    bad({"prompt": "y" * 3000}, 413, "prompt", "limit is 2000")
    bad({"prompt": "x", "max_new_tokens": 1000}, 400, "max_new_tokens", "[1, 16]")
    bad({"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens")
    bad({"prompt": "x", "max_new_tokens": 2.0}, 400, "max_new_tokens")
    bad({"prompt": "x", "max_new_tokens": True}, 400, "max_new_tokens")
    bad({"domain": "code"}, 400, "prompt", "'prompt' is required")
    bad({"prompt": ""}, 400, "prompt")
    bad({"prompt": 5}, 400, "prompt")
    bad({"prompt": "x", "temperature": 1e-40}, 400, "temperature", "0 (greedy) or in [0.001")
    bad({"prompt": "x", "temperature": -1}, 400, "temperature")
    bad({"prompt": "x", "temperature": 6}, 400, "temperature")
    bad({"prompt": "x", "temperature": "0.5"}, 400, "temperature")
    bad(b'{"prompt": "x", "temperature": NaN}', 400)
    bad(b'{"prompt": "x", "temperature": 1e999}', 400, "temperature")
    bad({"prompt": "x", "top_p": 0}, 400, "top_p")
    bad({"prompt": "x", "top_p": 1.5}, 400, "top_p")
    bad({"prompt": "x", "timeout_s": -1}, 400, "timeout_s")
    bad({"prompt": "x", "stream": True}, 400, "stream", "unknown field 'stream'")
    bad(json.dumps({"prompt": "a" * 300_000}).encode(), 413, text="larger than the limit")
    # a chunked body (no Content-Length) is capped as it streams in
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/generate", body=iter([b'{"prompt": "', b"a" * 150_000, b"a" * 150_000]),
                     headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"},
                     encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "larger than the limit" in json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()
    status, r, _ = _call(url, "/nowhere")
    assert status == 404 and "POST /v1/generate" in r["error"]["message"]
    status, r, _ = _call(url, "/generate", token=TOKEN)  # GET
    assert status == 405 and r["error"]["code"] == 405
    status, info, _ = _call(url, "/domains")
    assert status == 200 and info["domains"] == ["code", "legal"] and info["routing"]["k"] == 4
    assert info["auth"] == "bearer" and info["limits"]["max_queued_requests"] == MAX_QUEUED
    status, r = _post(url, {"prompt": "Copyright", "domain": "legal", "max_new_tokens": 3,
                            "temperature": 0.7, "top_p": 0.9})
    assert status == 200 and r["domain"] == "legal" and r["completion_tokens"] <= 3


def test_bearer_token_is_required(served):
    url, _ = served
    body = {"prompt": "def f(", "domain": "code", "max_new_tokens": 2}
    for token in (None, "", "wrong-" + TOKEN, TOKEN[:-1], TOKEN + "x"):
        status, r, h = _call(url, "/generate", body, token=token)
        assert status == 401 and r["error"]["code"] == 401, (token, r)
        assert h["WWW-Authenticate"].startswith("Bearer")
    for path in ("/domains", "/stats"):
        assert _call(url, path, token=None)[0] == 401
    status, r, _ = _call(url, "/generate", body, headers={"Authorization": f"Basic {TOKEN}"},
                         token=None)
    assert status == 401
    assert _post(url, body)[0] == 200


def test_non_loopback_host_needs_a_token_file(tmp_path, served):
    _, tiny = served
    with pytest.raises(InputError, match="--token-file"):  # refused before anything starts
        start(tiny["root"], None, "0.0.0.0", _free_port(), ServeOptions())
    assert token_digest("0.0.0.0", ServeOptions(insecure_no_auth=True)) == ""
    assert token_digest("127.0.0.1", ServeOptions()) == ""
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(InputError, match="at least 16"):
        token_digest("0.0.0.0", ServeOptions(token_file=str(short)))
    with pytest.raises(InputError, match="cannot be read"):
        token_digest("127.0.0.1", ServeOptions(token_file=str(tmp_path / "missing")))


def test_request_timeout_answers_504_and_server_keeps_serving(served):
    """A lone request waits batch_wait_s (0.5 s) for its batch to fill: with a 0.1 s limit it
    times out; the next request is served."""
    url, _ = served
    t0 = time.monotonic()
    status, r = _post(url, {"prompt": "def f(", "domain": "code", "max_new_tokens": 4,
                            "timeout_s": 0.1})
    assert status == 504 and "timed out after 0.1 s" in r["error"]["message"], r
    assert time.monotonic() - t0 < 5
    assert _post(url, {"prompt": "def f(", "domain": "code", "max_new_tokens": 4})[0] == 200
    _, stats, _ = _call(url, "/stats")
    assert stats["router"]["timeouts"] >= 1


def test_full_queue_answers_503_with_retry_after(served):
    """MAX_QUEUED requests held (3 per domain: batches of 4 that wait 0.5 s to fill), then a
    burst beyond the limit: 503 + Retry-After, and the held ones are all answered."""
    url, _ = served
    held = [lambda d=d: _post(url, {"prompt": "The licence", "domain": d, "max_new_tokens": 4})
            for d in ("code", "legal") for _ in range(MAX_QUEUED // 2)]
    over = [lambda: _call(url, "/generate", {"prompt": "x", "domain": "code", "max_new_tokens": 2})
            for _ in range(4)]
    with ThreadPoolExecutor(len(held)) as pool:
        futures = [pool.submit(f) for f in held]
        for _ in range(40):  # until the router holds them all (they wait >= 0.5 s in batches)
            if _call(url, "/stats")[1]["router"]["in_flight"] >= MAX_QUEUED:
                break
            time.sleep(0.01)
        rejected = _burst(over)
        answered = [f.result(timeout=TIMEOUT) for f in futures]
    assert [s for s, _ in answered] == [200] * len(held), answered
    for status, r, h in rejected:
        assert status == 503 and "server busy" in r["error"]["message"], r
        assert int(h["Retry-After"]) >= 1
    assert _post(url, {"prompt": "x", "domain": "code", "max_new_tokens": 2})[0] == 200
    _, stats, _ = _call(url, "/stats")
    assert stats["router"]["busy"] >= 4 and stats["router"]["peak_in_flight"] <= MAX_QUEUED


def test_replicas_fit_two_cpus(served):
    """Two specialists and the router are ready on the 2-CPU Ray; an explicit share that
    does not fit is refused before deploying, naming what it needs."""
    url, _ = served
    assert ray.cluster_resources()["CPU"] == 2
    _, stats, _ = _call(url, "/stats")
    assert sorted(stats["specialists"]) == ["code", "legal"]
    assert all(s["peak_rss_bytes"] > 0 for s in stats["specialists"].values())
    plan = plan_resources(2, ServeOptions(), {"CPU": 2.0}, {"CPU": 2.0}, [2.0])
    assert plan["needed_cpus"] <= 2 and plan["specialist_cpus"] == 0.95
    with pytest.raises(InputError, match=r"needs 2\.1 CPU .* 2 of 2 CPU free.*at most 0\.95"):
        plan_resources(2, ServeOptions(num_cpus=1.0), {"CPU": 2.0}, {"CPU": 2.0}, [2.0])
    with pytest.raises(InputError, match="largest node has 1"):
        plan_resources(1, ServeOptions(num_cpus=1.5), {"CPU": 4.0}, {"CPU": 4.0}, [1.0] * 4)
    with pytest.raises(InputError, match="needs at least"):
        plan_resources(2, ServeOptions(), {"CPU": 0.05}, {"CPU": 2.0}, [2.0])


def test_unexported_domain_is_refused(served):
    _, tiny = served
    with pytest.raises(InputError, match="slm export --run"):
        exported_domains(tiny["root"], ["physics"])
