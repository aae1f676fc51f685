"""SLM-pn training cost per token vs the SLM and an SLM-mix expert, measured and by formula.

Each family's model is trained with its own family object (models/families.py: the same build,
loss and FLOPs code the Ray Train loop runs) and torch AdamW on random token windows, the
families' steps interleaved; steady-state seconds/token after warm-up, and formula FLOPs/token (models/flops.py, pn with the
experts measured present per micro-batch). An SLM-mix expert is an SLM-size LM trained on its
cluster's rows, so its per-token cost is the SLM's; it is measured separately anyway.
Paper (paper.md §4, Table 2): pn 3.6 vs SLM 2.2 GPUh per 1B tokens = 1.64×.

    .venv/bin/python bench/bench_pn_cost.py [--size demo-slm --seq-len 128 --vocab 4096 --k 4 --h 4 --m 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from slm.models.families import FamilySpec, build_family

PAPER_PN_OVER_SLM = 3.6 / 2.2


class Trainer:
    """One family's model + AdamW, stepping on random windows; accumulates steady-state cost."""

    def __init__(self, spec: FamilySpec, batch: int, seed: int = 0):
        self.spec, self.batch = spec, batch
        self.fam = build_family(spec)
        self.model = self.fam.build(seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator().manual_seed(seed)
        self.secs, self.toks, self.flops = 0.0, 0, 0.0

    def step(self, record: bool) -> None:
        ids = torch.randint(0, self.spec.vocab_size, (self.batch, self.spec.seq_len), generator=self.gen)
        cl = torch.randint(0, max(self.spec.n_experts, 1), (self.batch,), generator=self.gen)
        t0 = time.perf_counter()
        loss, _ = self.fam.loss(self.model, ids, cl)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if record:
            self.secs += dt
            self.toks += ids.numel()
            self.flops += self.fam.micro_flops(ids, cl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="demo-slm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4, help="SLM-pn experts (clusters)")
    ap.add_argument("--h", type=int, default=4)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    common = dict(size=a.size, vocab_size=a.vocab, seq_len=a.seq_len)
    trainers = {"slm": Trainer(FamilySpec("slm", **common), a.batch),
                "mix-expert": Trainer(FamilySpec("mix", **common), a.batch),
                "pn": Trainer(FamilySpec("pn", **common, n_experts=a.k, pn_h=a.h, pn_m=a.m), a.batch)}
    # interleaved steps: load changes on a shared machine hit every family alike
    for s in range(a.warmup + a.steps):
        for tr in trainers.values():
            tr.step(record=s >= a.warmup)
    rows = {n: (tr.secs / tr.toks, tr.flops / tr.toks) for n, tr in trainers.items()}
    for name in rows:
        print(f"{name:11s} {rows[name][0] * 1e6:9.2f} µs/token  {rows[name][1] / 1e6:9.3f} MFLOP/token")
    s_slm, f_slm = rows["slm"]
    print(f"pn / slm : measured {rows['pn'][0] / s_slm:.2f}×, formula {rows['pn'][1] / f_slm:.2f}× "
          f"(paper {PAPER_PN_OVER_SLM:.2f}× with k=32 at 126M)")
    print(f"pn / mix : measured {rows['pn'][0] / rows['mix-expert'][0]:.2f}×, "
          f"formula {rows['pn'][1] / rows['mix-expert'][1]:.2f}×")


if __name__ == "__main__":
    main()
