"""Specialization of every method to a domain: one trial = one small served model.

A trial (domain, method, budget_steps, domain_tokens, seed, lr) starts from the method's
pretrained checkpoint(s), fine-tunes with the one training loop (``slm.models.train``, run by
Ray Train) on the domain train subset with early stopping on the domain valid split, and
publishes the best-valid model as a Hugging Face directory (safetensors) plus
``training.json``, and ``row.json`` (its row of the results table).

Methods (paper §2, docs/paper.md §3):
  slm   pretrain/slm/final                      llm  pretrain/llm/final (reference; bigger)
  is    pretrain/is/<domain>/final              nopt fresh small model, domain data only
  mix   expert chosen by specialize.expert_selection (top_cluster | lowest_loss | all)
  pn    expert of the top cluster at k_pn, materialised in closed form, then a plain SLM
  d     the llm trial's specialized model (same domain/size/seed/budget/lr) as KD teacher for
        the pretrained small model; the teacher's fine-tuning cost is counted
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from slm.configkit import ConfigError
from slm.errors import InputError, StageError
from slm.layout import RunLayout, domain_set, train_subset
from slm.stage import exists, filesystem, join, manifest, publish, read_json, write_json

log = logging.getLogger(__name__)

# Which pretraining family each method starts from ('' = none).
METHOD_FAMILY = {"slm": "slm", "llm": "llm", "is": "is", "mix": "mix", "pn": "pn", "d": "slm", "nopt": ""}

RESULT_COLUMNS = ["recipe", "domain", "method", "budget_steps", "domain_tokens", "seed", "lr",
                  "expert", "valid_loss", "test_loss", "test_ppl", "steps_run", "best_step",
                  "spec_flops", "spec_device_seconds", "pretrain_flops",
                  "pretrain_device_seconds", "inference_params", "inference_flops_per_token",
                  "model_path"]


@dataclass(frozen=True)
class Trial:
    """One point of the sweep grid."""

    domain: str
    method: str
    budget_steps: int
    domain_tokens: int
    seed: int
    lr: float  # base LR; divided by specialize.small_data_lr_div for small domains

    def key(self) -> str:
        """Directory name of the trial (deterministic, filesystem-safe)."""
        return (f"{self.domain}--{self.method}--b{self.budget_steps}--t{self.domain_tokens}"
                f"--s{self.seed}--lr{self.lr:g}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        return cls(str(d["domain"]), str(d["method"]), int(d["budget_steps"]),
                   int(d["domain_tokens"]), int(d["seed"]), float(d["lr"]))


def trial_uri(recipe, trial: Trial, sweep: str | None = None) -> str:
    return join(RunLayout(recipe.run_dir).sweep(sweep or recipe.sweep.name), "trials", trial.key())


def trial_config(recipe, trial: Trial) -> dict[str, Any]:
    """What a published trial was made with: a trial published under another specialization
    config is never reused silently (slm.stage.is_done raises, naming the fix)."""
    from slm.configkit import to_dict

    return {"trial": trial.to_dict(), "recipe": recipe.name, "specialize": to_dict(recipe.specialize)}


def trial_done(recipe, trial: Trial, uri: str) -> bool:
    """True when the trial's artifact is published with this config."""
    from slm.stage import fingerprint, is_done

    return is_done(uri, fingerprint({"config": trial_config(recipe, trial), "inputs": {}}))


# --------------------------------------------------------------------------------------------
# What the run holds
# --------------------------------------------------------------------------------------------

def run_domains(layout: RunLayout) -> list[str]:
    """Domains with published train/valid/test shards in the run, sorted."""
    import pyarrow.fs as pafs

    fs, path = filesystem(layout.path("data/shards"))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = {i.base_name for i in infos if i.type == pafs.FileType.Directory}
    out = []
    for n in names:
        if n.startswith("domain-") and n.endswith("-test"):
            d = n[len("domain-"):-len("-test")]
            if all(manifest(layout.shards(domain_set(d, s))) is not None for s in ("train", "valid", "test")):
                out.append(d)
    return sorted(out)


def size_params(recipe, size: str) -> int:
    """Parameters of a served GPT-2 of preset ``size`` with the run's vocabulary."""
    from slm.models.lm import lm_config, lm_param_count

    return lm_param_count(lm_config(size, vocab_size(recipe), recipe.data.seq_len))


def vocab_size(recipe) -> int:
    """Vocabulary of the run's tokenizer (the recipe's size before the tokenizer is built)."""
    from transformers import PreTrainedTokenizerFast

    tok = RunLayout(recipe.run_dir).tokenizer
    if manifest(tok) is None:
        return recipe.tokenizer.vocab_size
    return len(PreTrainedTokenizerFast.from_pretrained(filesystem(tok)[1]))


def inference_budget(recipe) -> int:
    """Max parameters of a served model (``specialize.inference_budget``, 0 = the small model)."""
    return recipe.specialize.inference_budget or size_params(recipe, recipe.pretrain.slm_size)


def check_methods(recipe, methods: list[str]) -> list[str]:
    """The methods that fit the inference budget and the pretrained families; ConfigError names
    the field when none fits or a method needs a family the recipe does not pretrain."""
    from .config import METHODS

    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"field 'sweep.methods' has unknown method '{m}'; known: {', '.join(METHODS)}")
    budget = inference_budget(recipe)
    slm_p = size_params(recipe, recipe.pretrain.slm_size)
    llm_p = size_params(recipe, recipe.pretrain.llm_size)
    if budget < min(slm_p, llm_p):
        raise ConfigError(f"field 'specialize.inference_budget' is {budget} parameters, smaller than "
                          f"every model (slm {slm_p}, llm {llm_p}); raise it to at least {min(slm_p, llm_p)} "
                          "or pick a smaller pretrain.slm_size")
    out = []
    for m in methods:
        if m == "llm" and llm_p > budget:
            log.warning("method 'llm' excluded: the %s model has %d parameters, over the inference "
                        "budget of %d (specialize.inference_budget)", recipe.pretrain.llm_size, llm_p, budget)
            continue
        if m != "llm" and slm_p > budget:
            log.warning("method '%s' excluded: the small model (%d parameters) is over the inference "
                        "budget of %d", m, slm_p, budget)
            continue
        fams = [METHOD_FAMILY[m]] + (["llm"] if m == "d" else [])
        for fam in fams:
            if fam and fam not in recipe.pretrain.families:
                raise ConfigError(f"field 'sweep.methods' has '{m}', which needs the '{fam}' family, but "
                                  f"pretrain.families is {recipe.pretrain.families}; add '{fam}' or drop '{m}'")
        out.append(m)
    if not out:
        raise ConfigError("no method of 'sweep.methods' fits 'specialize.inference_budget'; raise the budget")
    return out


def small_data_lr(recipe, lr: float, domain_tokens: int) -> float:
    """Paper App. C: at <= small_data_tokens domain tokens the LR is divided (1M -> LR/3)."""
    spec = recipe.specialize
    return lr / spec.small_data_lr_div if domain_tokens <= spec.small_data_tokens else lr


def top_cluster(layout: RunLayout, k: int, set_name: str) -> int:
    """The most frequent cluster at ``k`` among the windows of a shard set (ties: lowest id).

    Counted from the shard's ``cluster_k<K>`` column, so it is the histogram of exactly the
    train subset being used (the pipeline's histograms cover whole domain splits)."""
    import numpy as np
    import pyarrow.parquet as pq

    from slm.pipeline.artifacts import parquet_files

    uri = layout.shards(set_name)
    if manifest(uri) is None:
        raise StageError(f"shard '{uri}' is missing; run the data pipeline (`slm data run`)")
    fs, _ = filesystem(uri)
    counts = np.zeros(k, dtype=np.int64)
    col = f"cluster_k{k}"
    for path in parquet_files(uri):
        pf = pq.ParquetFile(fs.open_input_file(path))
        if col not in pf.schema_arrow.names:
            raise InputError(f"shard '{uri}' has no column '{col}'; rebuild the shards with "
                             "`slm data run --force` so every k of the recipe has its column")
        values = pf.read(columns=[col]).column(0).to_numpy()
        counts += np.bincount(values, minlength=k)[:k]
    if counts.sum() == 0:
        raise InputError(f"shard '{uri}' holds no windows; the domain train subset is empty")
    return int(np.argmax(counts))


def pretrain_final(layout: RunLayout, family: str, domain: str = "", expert: int | None = None) -> str:
    if family == "is":
        base = join(layout.pretrain("is"), domain)
    elif family == "mix":
        base = join(layout.pretrain("mix"), f"expert-{expert}")
    else:
        base = layout.pretrain(family)
    final = join(base, "final")
    if not exists(final):
        raise StageError(f"pretrained model '{final}' is missing; run `slm pretrain --family {family}` first")
    return final


def pretrain_costs(layout: RunLayout, method: str, domain: str, k_mix: int) -> dict[str, float]:
    """Pretraining FLOPs and device-seconds a method's model was built with (all experts of
    the mixture; teacher + student for SLM-d; 0 for nopt)."""
    def costs(base: str) -> dict[str, float]:
        uri = join(base, "costs.json")
        if not exists(uri):
            raise StageError(f"'{uri}' is missing; the pretraining run did not finish: re-run `slm pretrain`")
        c = read_json(uri)
        return {"flops": float(c["flops"]), "device_seconds": float(c["device_seconds"])}

    if method == "nopt":
        parts: list[dict[str, float]] = []
    elif method == "is":
        parts = [costs(join(layout.pretrain("is"), domain))]
    elif method == "mix":
        top = join(layout.pretrain("mix"), "costs.json")
        parts = ([costs(layout.pretrain("mix"))] if exists(top)
                 else [costs(join(layout.pretrain("mix"), f"expert-{i}")) for i in range(k_mix)])
    elif method == "d":
        parts = [costs(layout.pretrain("slm")), costs(layout.pretrain("llm"))]
    else:
        parts = [costs(layout.pretrain(METHOD_FAMILY[method]))]
    return {"pretrain_flops": sum(p["flops"] for p in parts),
            "pretrain_device_seconds": sum(p["device_seconds"] for p in parts)}


# --------------------------------------------------------------------------------------------
# Evaluation on a shard (driver/trial side; domain valid/test shards are small)
# --------------------------------------------------------------------------------------------

def shard_batches(uri: str, batch_size: int, max_batches: int = 0):
    """Yield int64 [batch, seq_len] tensors of ``input_ids`` from a published shard, in order,
    streamed record batch by record batch."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from slm.pipeline.artifacts import parquet_files

    if manifest(uri) is None:
        raise StageError(f"shard '{uri}' is not done; run the data pipeline first")
    fs, _ = filesystem(uri)
    n = 0
    for path in parquet_files(uri):
        pf = pq.ParquetFile(fs.open_input_file(path))
        for rb in pf.iter_batches(batch_size=batch_size, columns=["input_ids"]):
            col = rb.column(0)
            arr = np.asarray(col.values.to_numpy(zero_copy_only=False)).reshape(len(col), -1)
            yield torch.from_numpy(arr.astype(np.int64))
            n += 1
            if max_batches and n >= max_batches:
                return


def evaluate(model, uri: str, batch_size: int = 8, max_batches: int = 0) -> float:
    """Mean next-token loss (nats) of ``model`` over a shard (token-weighted)."""
    import torch

    from slm.models.losses import lm_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in shard_batches(uri, batch_size, max_batches):
            loss, n = lm_loss(model(input_ids=ids).logits, ids)
            total += float(loss) * n
            count += n
    if count == 0:
        raise InputError(f"shard '{uri}' holds no windows; the domain split is too small for "
                         "one window of data.seq_len tokens: add text or lower data.seq_len")
    return total / count


def load_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(filesystem(path)[1])


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------

@dataclass
class Start:
    """Where a fine-tuning run starts: a local HF directory (+ the expert it is, if any)."""

    path: str
    expert: int = -1


def _starts(recipe, trial: Trial, workdir: str) -> list[Start]:
    """The initial model(s) of a trial; several only for mix with expert_selection=all."""
    layout = RunLayout(recipe.run_dir)
    spec, km = recipe.specialize, recipe.kmeans
    train_set = train_subset(trial.domain, trial.domain_tokens)
    m = trial.method
    if m in ("slm", "llm", "d"):
        return [Start(pretrain_final(layout, METHOD_FAMILY[m]))]
    if m == "is":
        return [Start(pretrain_final(layout, "is", domain=trial.domain))]
    if m == "nopt":
        from slm.models.lm import lm_config, make_lm

        d = os.path.join(workdir, "init-nopt")
        make_lm(lm_config(recipe.pretrain.slm_size, vocab_size(recipe), recipe.data.seq_len),
                seed=trial.seed).save_pretrained(d)
        return [Start(d)]
    if m == "pn":
        from slm.models.projected import ProjectedLM

        i = top_cluster(layout, km.k_pn, train_set)
        pn = ProjectedLM.from_pretrained(filesystem(pretrain_final(layout, "pn"))[1])
        d = os.path.join(workdir, f"init-pn-expert-{i}")
        pn.materialize(i).save_pretrained(d)
        return [Start(d, i)]
    if m == "mix":
        experts = list(range(km.k_mix))
        if spec.expert_selection == "top_cluster":
            experts = [top_cluster(layout, km.k_mix, train_set)]
        elif spec.expert_selection == "lowest_loss":
            valid = layout.shards(domain_set(trial.domain, "valid"))
            losses = {i: evaluate(load_lm(pretrain_final(layout, "mix", expert=i)), valid,
                                  spec.micro_batch, spec.eval_batches) for i in experts}
            experts = [min(losses, key=losses.get)]
            log.info("mix/%s: valid losses before fine-tuning %s -> expert %d", trial.domain, losses, experts[0])
        return [Start(pretrain_final(layout, "mix", expert=i), i) for i in experts]
    raise ConfigError(f"unknown method '{m}'")


def _teacher(recipe, trial: Trial) -> tuple[str, dict[str, Any]]:
    """SLM-d's teacher: the llm trial of the same domain/size/seed/budget/lr, specialized now
    if no sweep has published it yet (then it is published like any llm trial)."""
    t = Trial(trial.domain, "llm", trial.budget_steps, trial.domain_tokens, trial.seed, trial.lr)
    uri = trial_uri(recipe, t)
    if not trial_done(recipe, t, uri):
        try:
            specialize_trial(recipe, t, uri)
        except StageError:
            if manifest(uri) is None:  # not a concurrent publish of the same teacher
                raise
    return uri, read_json(join(uri, "row.json"))


def specialize_trial(recipe, trial: Trial, out_uri: str, in_tune: bool = False) -> dict[str, Any]:
    """Specialize one trial and publish ``out_uri`` (HF model, training.json, row.json).
    Returns the trial's row of the results table."""
    from slm.models.lm import lm_config, lm_param_count

    from .finetune import fine_tune

    layout = RunLayout(recipe.run_dir)
    spec = recipe.specialize
    if trial.budget_steps <= 0:
        raise ConfigError(f"field 'sweep.budgets' has {trial.budget_steps}; a budget must be > 0 steps")
    sets = {"train": train_subset(trial.domain, trial.domain_tokens),
            "valid": domain_set(trial.domain, "valid"), "test": domain_set(trial.domain, "test")}
    for s in sets.values():
        if manifest(layout.shards(s)) is None:
            raise StageError(f"shard '{layout.shards(s)}' is missing; run the data pipeline "
                             "(`slm data run`) for this domain and size")
    lr = small_data_lr(recipe, trial.lr, trial.domain_tokens)
    teacher_uri, teacher_row = ("", {})
    if trial.method == "d":
        teacher_uri, teacher_row = _teacher(recipe, trial)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"slm-spec-{trial.key()}-") as work:
        best = None
        for start in _starts(recipe, trial, work):
            run = fine_tune(recipe, start.path, {k: sets[k] for k in ("train", "valid")},
                            steps=trial.budget_steps, lr=lr, seed=trial.seed,
                            teacher=filesystem(teacher_uri)[1] if teacher_uri else "",
                            workdir=os.path.join(work, f"run-{max(start.expert, 0)}"),
                            name=f"{recipe.sweep.name}-{trial.key()}-e{start.expert}", in_tune=in_tune)
            run["expert"] = start.expert
            if best is None:
                best = run
            else:  # mix/all: every expert's fine-tuning is paid for; the best one is kept
                spent = {k: best[k] + run[k] for k in ("flops", "device_seconds")}
                if run["valid_loss"] < best["valid_loss"]:
                    best = run
                best.update(spent)
        model = load_lm(best["model_dir"])
        test_loss = evaluate(model, layout.shards(sets["test"]), spec.micro_batch)
        size = recipe.pretrain.llm_size if trial.method == "llm" else recipe.pretrain.slm_size
        config = lm_config(size, model.config.vocab_size, recipe.data.seq_len)
        params = lm_param_count(config)
        row = {
            "recipe": recipe.name, "domain": trial.domain, "method": trial.method,
            "budget_steps": trial.budget_steps, "domain_tokens": trial.domain_tokens,
            "seed": trial.seed, "lr": lr, "expert": int(best["expert"]),
            "valid_loss": float(best["valid_loss"]), "test_loss": float(test_loss),
            "test_ppl": float(math.exp(min(test_loss, 50.0))),
            "steps_run": int(best["steps_run"]), "best_step": int(best["best_step"]),
            "spec_flops": float(best["flops"]) + float(teacher_row.get("spec_flops", 0.0)),
            "spec_device_seconds": float(best["device_seconds"]) + float(teacher_row.get("spec_device_seconds", 0.0)),
            **pretrain_costs(layout, trial.method, trial.domain, recipe.kmeans.k_mix),
            "inference_params": int(params),
            "inference_flops_per_token": float(_flops_per_token(config)),
            "model_path": out_uri, "trial": trial.key(), "base_lr": trial.lr,
            "expert_selection": spec.expert_selection if trial.method == "mix" else "",
            "wall_seconds": round(time.time() - t0, 3), "finished_at": time.time(),
        }
        training = {**row, "data": {k: layout.shards(v) for k, v in sets.items()},
                    "teacher": teacher_uri, "kd_weight": spec.kd_weight if trial.method == "d" else 0.0,
                    "kd_temperature": spec.kd_temperature, "history": best.get("history", [])}
        try:
            with publish(out_uri, stage="specialize", config=trial_config(recipe, trial)) as out:
                _save_model(model, out, work)
                _copy_tokenizer(layout.tokenizer, out)
                write_json(out.file("training.json"), training)
                write_json(out.file("row.json"), row)
                out.manifest.update({"trial": trial.key(), "valid_loss": row["valid_loss"]})
        except StageError:
            if manifest(out_uri) is None:
                raise
            # the same trial was published meanwhile (SLM-d specializing its teacher while the
            # llm trial ran): keep the published one, never replace a model someone may read
            log.info("trial %s was published concurrently; keeping that one", trial.key())
            return read_json(join(out_uri, "row.json"))
    log.info("specialized %s: valid %.4f test ppl %.2f (%d steps, best %d)", trial.key(),
             row["valid_loss"], row["test_ppl"], row["steps_run"], row["best_step"])
    return row


def _flops_per_token(config) -> float:
    from slm.models.flops import inference_flops_per_token

    return inference_flops_per_token(config)


def _save_model(model, out, work: str) -> None:
    """save_pretrained (safetensors) into the staging directory, local or object storage."""
    import pyarrow.fs as pafs

    from slm.stage import is_remote

    if not is_remote(out.uri):
        model.save_pretrained(out.local_dir, safe_serialization=True)
        return
    local = os.path.join(work, "save")
    model.save_pretrained(local, safe_serialization=True)
    for name in os.listdir(local):
        pafs.copy_files(os.path.join(local, name), join(out.path, name),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out.fs)


def _copy_tokenizer(tok_uri: str, out) -> None:
    """The served directory holds the tokenizer too, so it loads with Auto* classes alone."""
    import pyarrow.fs as pafs

    fs, path = filesystem(tok_uri)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name != "manifest.json":
            pafs.copy_files(info.path, join(out.path, info.base_name), source_filesystem=fs,
                            destination_filesystem=out.fs)

