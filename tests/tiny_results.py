"""A real, tiny specialization study for the cost-model / report / planner tests.

Nothing here is invented: tiny GPT-2 models are really pretrained and fine-tuned with torch on
CPU (byte-level tokens, a few dozen steps), FLOPs are measured with torch's FlopCounterMode and
device seconds with a clock, perplexities are evaluated on held-out windows. The output has the
layout and schemas of a real run (docs/design.md):

    RUN/pretrain/{slm,llm}/costs.json, RUN/pretrain/mix/expert-<i>/costs.json,
    RUN/pretrain/is/<domain>-<tokens>/costs.json, RUN/specialize/<sweep>/results.parquet

Methods: slm, llm, nopt, is (a small model pretrained per domain and domain size on the generic
windows nearest to that size's domain train windows), mix (two experts, one per half of the generic windows split by the same
nearest-domain rule; the domain's expert is fine-tuned), d (the slm student distilled from the
fine-tuned llm teacher). Rows charge costs as the real sweep does (tune/specialize.py):
pretrain_* = the method's pretraining (all experts for mix, teacher + student for d, the
own run of the domain and size for is, 0 for nopt); spec_* = the fine-tuning (+ the teacher's for d).

Why byte tokens and stdlib text: no tokenizer training and no downloads; the two domains (Python
source code and module docstrings, i.e. prose) come with every Python install.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from slm.layout import RunLayout, domain_run, expert_name

SEQ = 32
BATCH = 8
VOCAB = 256
RECIPE = "tiny-test"
SWEEP = "tiny"
ARCH = {"slm": {"n_layer": 1, "n_embd": 32, "n_head": 2}, "llm": {"n_layer": 2, "n_embd": 64, "n_head": 4}}
# is pretrains per domain (paper: ~100x its fine-tuning); mix trains each expert on half the data.
PRETRAIN_STEPS = {"slm": 60, "llm": 60, "is": 200, "mix": 30}

_CODE_MODULES = ("json.decoder", "json.encoder", "json.scanner", "csv", "textwrap", "string",
                 "fnmatch", "shlex", "glob", "bisect", "heapq", "colorsys", "base64")
_PROSE_MODULES = ("os", "sys", "re", "json", "csv", "textwrap", "string", "fnmatch", "shlex",
                  "glob", "bisect", "heapq", "colorsys", "base64", "inspect", "pickle",
                  "random", "math", "functools", "itertools", "collections", "subprocess", "shutil",
                  "tempfile", "argparse", "logging", "unittest", "pathlib", "datetime")
_GENERIC_MODULES = ("calendar", "difflib", "gettext", "locale", "netrc", "pprint", "queue",
                    "sched", "statistics", "tarfile", "zipfile", "wave", "uuid", "ftplib")


def _windows(text: str) -> torch.Tensor:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    n = len(data) // SEQ
    return torch.from_numpy(data[: n * SEQ].astype(np.int64).reshape(n, SEQ))


def _source(names: tuple[str, ...]) -> str:
    return "\n".join(inspect.getsource(importlib.import_module(n)) for n in names)


def _docs(names: tuple[str, ...]) -> str:
    out = []
    for n in names:
        mod = importlib.import_module(n)
        out.append(mod.__doc__ or "")
        for _, obj in sorted(vars(mod).items()):
            doc = getattr(obj, "__doc__", None) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if isinstance(doc, str) and doc:
                out.append(doc)
    return "\n".join(out)


def corpora() -> dict[str, dict[str, torch.Tensor]]:
    """Windows of the generic set and of each domain's train/valid/test splits."""
    code, prose = _windows(_source(_CODE_MODULES)), _windows(_docs(_PROSE_MODULES))
    generic = _windows(_source(_GENERIC_MODULES) + _docs(_GENERIC_MODULES))
    g = torch.Generator().manual_seed(0)
    out = {"generic": {"train": generic[torch.randperm(len(generic), generator=g)]}}
    for name, w in (("code", code), ("prose", prose)):
        w = w[torch.randperm(len(w), generator=g)]
        out[name] = {"valid": w[:16], "test": w[16:40], "train": w[40:]}
    return out


def _model(kind: str, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0, **ARCH[kind])
    return GPT2LMHeadModel(cfg)


_FLOPS_CACHE: dict[tuple, float] = {}


def _arch(model) -> tuple:
    c = model.config
    return (c.n_layer, c.n_embd, c.n_head)


def _step_flops(model, teacher=None) -> float:
    """FLOPs of one training step (forward + backward; + the teacher's forward), measured once
    per architecture (every step of a model has the same shapes)."""
    key = ("step", _arch(model), _arch(teacher) if teacher is not None else None)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _measure_step_flops(model, teacher)
    return _FLOPS_CACHE[key]


def _measure_step_flops(model, teacher=None) -> float:
    m = copy.deepcopy(model)
    batch = torch.zeros(BATCH, SEQ, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        logits = m(batch).logits
        if teacher is not None:
            with torch.no_grad():
                teacher(batch)
        F.cross_entropy(logits.reshape(-1, VOCAB), batch.reshape(-1)).backward()
    return float(fc.get_total_flops())


def _fwd_flops_per_token(model) -> float:
    key = ("fwd", _arch(model))
    if key in _FLOPS_CACHE:
        return _FLOPS_CACHE[key]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, SEQ, dtype=torch.long))
    _FLOPS_CACHE[key] = float(fc.get_total_flops()) / SEQ
    return _FLOPS_CACHE[key]


@torch.no_grad()
def _eval(model, windows: torch.Tensor) -> float:
    model.eval()
    logits = model(windows).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    model.train()
    return float(loss)


def _train(model, windows: torch.Tensor, steps: int, lr: float, seed: int, teacher=None,
           valid: torch.Tensor | None = None, eval_every: int = 3) -> dict[str, Any]:
    """Train ``steps`` steps; with ``valid``, keep the best-valid weights (early stopping)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    flops = _step_flops(model, teacher)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = windows[torch.randint(len(windows), (BATCH,), generator=g)]
        logits = model(batch).logits
        s, t = logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        loss = F.cross_entropy(s, t)
        if teacher is not None:
            with torch.no_grad():
                tl = teacher(batch).logits[:, :-1].reshape(-1, VOCAB)
            kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(tl, -1), log_target=True,
                          reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if valid is not None and (step % eval_every == 0 or step == steps):
            v = _eval(model, valid)
            if v < best[0]:
                best = (v, step, copy.deepcopy(model.state_dict()))
    seconds = time.perf_counter() - t0
    if valid is not None:
        model.load_state_dict(best[2])
    return {"flops": flops * steps, "device_seconds": seconds, "steps": steps,
            "tokens": steps * BATCH * SEQ, "valid_loss": best[0], "best_step": best[1]}


def _nearest_domain(generic: torch.Tensor, data: dict, n_train: int | None = None) -> torch.Tensor:
    """For each generic window, the index of the domain (0 code, 1 prose) whose byte unigram
    distribution (of its first ``n_train`` train windows: a domain size) is closest (cosine):
    a one-feature stand-in for the embedding clusters."""
    def hist(w):
        h = torch.bincount(w.reshape(-1), minlength=VOCAB).float()
        return h / h.norm()
    cents = torch.stack([hist(data["code"]["train"][:n_train]), hist(data["prose"]["train"][:n_train])])
    feats = torch.stack([torch.bincount(w, minlength=VOCAB).float() for w in generic])
    feats = feats / feats.norm(dim=1, keepdim=True)
    return (feats @ cents.T).argmax(dim=1)


def _write_costs(path: str, c: dict[str, Any], params: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"flops": c["flops"], "device_seconds": c["device_seconds"],
                   "tokens": c["tokens"], "steps": c["steps"], "params": params}, f)


def build_run(run_dir: str, budgets=(4, 16), domain_tokens=(1024, 4096), seeds=(0, 1),
              lrs=(3e-3,)) -> str:
    """Pretrain, fine-tune and write a real tiny run under ``run_dir``; returns results.parquet.

    Runs on one thread: these models are so small that a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_run(run_dir, budgets, domain_tokens, seeds, lrs)
    finally:
        torch.set_num_threads(threads)


def _build_run(run_dir: str, budgets, domain_tokens, seeds, lrs) -> str:
    layout = RunLayout(run_dir)
    data = corpora()
    generic = data["generic"]["train"]
    near = _nearest_domain(generic, data)
    domains = ("code", "prose")
    pre: dict[str, Any] = {}
    pre_costs: dict[str, dict] = {}
    for fam in ("slm", "llm"):
        m = _model(fam, 0)
        c = _train(m, generic, PRETRAIN_STEPS[fam], 3e-3, 0)
        pre[fam], pre_costs[fam] = m, c
        _write_costs(layout.pretrain_costs(fam), c, m.num_parameters())
    for tokens in domain_tokens:  # is: per (domain, size) on the windows nearest that subset
        near_t = _nearest_domain(generic, data, tokens // SEQ)
        for i, d in enumerate(domains):
            m = _model("slm", 0)
            c = _train(m, generic[near_t == i], PRETRAIN_STEPS["is"], 3e-3, 0)
            pre[f"is/{d}-{tokens}"], pre_costs[f"is/{d}-{tokens}"] = m, c
            _write_costs(layout.pretrain_costs("is", domain_run(d, tokens)), c, m.num_parameters())
    mix_total = {"flops": 0.0, "device_seconds": 0.0}
    for i in range(2):  # mix: one expert per cluster
        m = _model("slm", 0)
        c = _train(m, generic[near == i], PRETRAIN_STEPS["mix"], 3e-3, 0)
        pre[f"mix/{i}"] = m
        for k in mix_total:
            mix_total[k] += c[k]
        _write_costs(layout.pretrain_costs("mix", expert_name(i)), c, m.num_parameters())

    rows = []
    teachers: dict[tuple, GPT2LMHeadModel] = {}
    teacher_spend: dict[tuple, dict] = {}
    methods = ("llm", "slm", "nopt", "is", "mix", "d")  # llm first: d needs its teachers
    for d_i, dom in enumerate(domains):
        dd = data[dom]
        for method in methods:
            for budget in budgets:
                for tokens in domain_tokens:
                    train = dd["train"][: tokens // SEQ]
                    for seed in seeds:
                        for lr in lrs:
                            expert = -1
                            teacher = None
                            if method == "nopt":
                                start, pfam = _model("slm", seed), None
                            elif method == "is":
                                start, pfam = pre[f"is/{dom}-{tokens}"], f"is/{dom}-{tokens}"
                            elif method == "mix":
                                expert = d_i
                                start, pfam = pre[f"mix/{d_i}"], "mix"
                            elif method == "d":
                                start, pfam = pre["slm"], "d"
                                teacher = teachers[(dom, budget, tokens, seed, lr)]
                            else:
                                start, pfam = pre[method], method
                            model = copy.deepcopy(start)
                            r = _train(model, train, budget, lr, seed, teacher=teacher,
                                       valid=dd["valid"])
                            if method == "llm":
                                teachers[(dom, budget, tokens, seed, lr)] = model
                                teacher_spend[(dom, budget, tokens, seed, lr)] = r
                            if method == "d":
                                tr = teacher_spend[(dom, budget, tokens, seed, lr)]
                                r["flops"] += tr["flops"]
                                r["device_seconds"] += tr["device_seconds"]
                            test_loss = _eval(model, dd["test"])
                            if pfam is None:
                                pf, ps = 0.0, 0.0
                            elif pfam == "mix":
                                pf, ps = mix_total["flops"], mix_total["device_seconds"]
                            elif pfam == "d":
                                pf = pre_costs["slm"]["flops"] + pre_costs["llm"]["flops"]
                                ps = pre_costs["slm"]["device_seconds"] + pre_costs["llm"]["device_seconds"]
                            else:
                                pf, ps = pre_costs[pfam]["flops"], pre_costs[pfam]["device_seconds"]
                            rows.append({
                                "recipe": RECIPE, "domain": dom, "method": method,
                                "budget_steps": budget, "domain_tokens": tokens, "seed": seed,
                                "lr": lr, "expert": expert, "valid_loss": r["valid_loss"],
                                "test_loss": test_loss, "test_ppl": math.exp(test_loss),
                                "steps_run": r["steps"], "best_step": r["best_step"],
                                "spec_flops": r["flops"], "spec_device_seconds": r["device_seconds"],
                                "pretrain_flops": pf, "pretrain_device_seconds": ps,
                                "inference_params": model.num_parameters(),
                                "inference_flops_per_token": _fwd_flops_per_token(model),
                                "model_path": "",
                            })
    out = layout.results(SWEEP)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out
