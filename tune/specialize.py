"""Specialization of one trial: one small served model (or the large reference) per trial.

A trial (domain, method, budget_steps, domain_tokens, seed, lr; tune/grid.py) starts from the
model(s) its method's ``start`` strategy gives (tune/methods.py, tune/starts.py), fine-tunes
with the one training loop (tune/finetune.py, run by Ray Train) on the domain train subset
with early stopping on the domain valid split, and publishes the best-valid model as a Hugging
Face directory (safetensors) plus ``training.json`` and ``row.json`` (its row of the results
table) under ``RUN/specialize/<sweep>/trials/<key>/``.

Costs charged to the row: every start's fine-tuning (several starts: mix with
expert_selection=all; the best one is kept), the teacher's fine-tuning (SLM-d), and the
pretraining its model was built with (tune/costs.py ``pretrain_split``). A method with a
teacher only looks its teacher trial up: the sweep trains teachers first (tune/sweep.py).
Paths in the row and in training.json are relative to the run directory.

A trial's Train worker may run on another node than the trial itself, so nothing it reads is
node-local: its starting models, its fine-tuning's Ray Train storage and best model are in the
trial's work directory on the run's Train storage (tune/grid.py ``trial_workdir``), removed once
the trial is published; models are read through the node's cached copy (slm.stage ``local_dir``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pyarrow.fs as pafs

from slm.configkit import ConfigError
from slm.errors import StageError
from slm.layout import TRIAL_ROW, TRIAL_TRAINING, RunLayout, domain_set, train_subset
from slm.models.config import FAMILY_INFO
from slm.models.flops import inference_flops_per_token
from slm.models.lm import lm_config, lm_param_count
from slm.stage import MANIFEST, filesystem, join, manifest, read_json, remove, write_json

from .costs import load_pretrain_costs, pretrain_split
from .finetune import fine_tune, lora_section
from .grid import Trial, small_data_lr, teacher_of, trial_done, trial_stage, trial_uri, trial_workdir
from .methods import Method, Start, get_method
from .starts import StartContext

log = logging.getLogger(__name__)


def teacher_model(recipe, trial: Trial) -> tuple[str, dict[str, Any], str]:
    """(URI, row, key) of the trial's published teacher trial (its method's ``teacher``), or
    ("", {}, "") for a method without one. StageError naming the teacher trial when it is not
    published: teachers are trained before their students, never from inside them."""
    ref = teacher_of(trial)
    if ref is None:
        return "", {}, ""
    uri = trial_uri(recipe, ref)
    if not trial_done(recipe, ref, uri):
        raise StageError(f"trial '{trial.key()}' needs its teacher, trial '{ref.key()}' "
                         f"({get_method(ref.method).label}), which is not published at '{uri}'; "
                         "`slm sweep` trains teachers first: re-run it (or specialize that trial)")
    return uri, read_json(join(uri, TRIAL_ROW)), ref.key()


def method_pretrain_costs(layout: RunLayout, method: Method, domain: str, level: float = 1.0,
                          domain_tokens: int = 0, seed: int | None = None) -> dict[str, float]:
    """The row's pretraining columns: everything the method's model was built with (all experts
    of a mixture, teacher + student for SLM-d, the run of the domain at this domain size for
    SLM-is, 0 for nopt), up to the pretraining ``level`` its start models were saved at, of the
    pretraining ``seed`` (as the layout names it; None: the recipe's own)."""
    shared, own, missing = pretrain_split(method, load_pretrain_costs(layout.root, seed), domain, level,
                                          domain_tokens)
    if missing:
        fam = missing[0]
        sub = FAMILY_INFO[fam].sub(domain, domain_tokens) if FAMILY_INFO[fam].runs == "per_domain" else ""
        what = (layout.pretrain_costs(fam, sub, seed) if level >= 1.0
                else layout.pretrain_level(fam, sub, level, seed))
        raise StageError(f"'{what}' is missing; the pretraining run did not finish (or level "
                         f"{level:g} is not in its pretrain.levels): re-run `slm pretrain --family {fam}`")
    return {"pretrain_flops": shared["flops"] + own["flops"],
            "pretrain_device_seconds": shared["device_seconds"] + own["device_seconds"]}


def _fine_tune_starts(recipe, trial: Trial, starts: list[Start], sets: dict[str, str], lr: float,
                      teacher: str, work: str, in_tune: bool) -> dict[str, Any]:
    """Fine-tune from every start; the best-valid run, charged with all of them."""
    best = None
    lora = lora_section(recipe.specialize.lora, trial.method)
    for start in starts:
        run = fine_tune(recipe, start.path, sets,
                        steps=trial.budget_steps, lr=lr, seed=trial.seed, teacher=teacher,
                        workdir=join(work, f"run-{max(start.expert, 0)}"),
                        name=f"{recipe.sweep.name}-{trial.key()}-e{start.expert}", in_tune=in_tune,
                        lora=lora)
        run["expert"] = start.expert
        steps = max(int(run["steps_run"]), 1)  # a fine-tuning step costs the same at every step
        for k in ("flops", "device_seconds"):
            run[f"{k}_to_best"] = float(run[k]) * min(int(run["best_step"]), steps) / steps
        if best is None:
            best = run
        else:  # every start's fine-tuning is paid for; the best one is kept
            spent = {k: best[k] + run[k] for k in ("flops", "device_seconds", "eval_device_seconds",
                                                    "flops_to_best", "device_seconds_to_best")}
            phases = {k: best["phases"][k] + v for k, v in run["phases"].items()}
            if run["valid_loss"] < best["valid_loss"]:
                best = run
            best.update(spent, phases=phases)
    return best


def specialize_trial(recipe, trial: Trial, out_uri: str, in_tune: bool = False) -> dict[str, Any]:
    """Specialize one trial and publish ``out_uri`` (HF model, training.json, row.json).
    Returns the trial's row of the results table."""
    t_trial = time.perf_counter()
    layout = RunLayout(recipe.run_dir)
    method = get_method(trial.method)
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
    teacher_uri, teacher_row, teacher_key = teacher_model(recipe, trial)
    pretrain = method_pretrain_costs(layout, method, trial.domain, trial.level, trial.domain_tokens,
                                     trial.pretrain_seed)
    work = trial_workdir(recipe, trial)
    t_start = time.perf_counter()
    context = StartContext(recipe, work)
    starts = context.starts(trial)
    select = context.selection  # expert selection's evaluations: paid by the trial
    t_starts = time.perf_counter() - t_start
    best = _fine_tune_starts(recipe, trial, starts, sets, lr, teacher_uri, work, in_tune)
    test_loss = best["test_loss"]  # of the best-valid model, measured where it was trained
    hf = read_json(join(best["model_dir"], "config.json"))
    config = lm_config(method.served_preset(recipe.pretrain), int(hf["vocab_size"]), recipe.data.seq_len)
    row = {
        "recipe": recipe.name, "domain": trial.domain, "method": trial.method,
        "budget_steps": trial.budget_steps, "domain_tokens": trial.domain_tokens,
        "seed": trial.seed, "lr": lr, "expert": int(best["expert"]),
        "pretrain_level": float(trial.level),
        "pretrain_seed": int(recipe.seed if trial.pretrain_seed is None else trial.pretrain_seed),
        "valid_loss": float(best["valid_loss"]), "test_loss": float(test_loss),
        "test_ppl": float(math.exp(min(test_loss, 50.0))),
        "steps_run": int(best["steps_run"]), "best_step": int(best["best_step"]),
        "spec_flops": float(best["flops"]) + float(teacher_row.get("spec_flops", 0.0)) + select["flops"],
        "spec_device_seconds": (float(best["device_seconds"]) + select["device_seconds"]
                                + float(teacher_row.get("spec_device_seconds", 0.0))),
        # to the best valid step (the paper's cost, §3.7): each start's and the teacher's
        "spec_flops_to_best": (best["flops_to_best"] + select["flops"]
                               + float(teacher_row.get("spec_flops_to_best", teacher_row.get("spec_flops", 0.0)))),
        "spec_device_seconds_to_best": (best["device_seconds_to_best"] + select["device_seconds"]
                                        + float(teacher_row.get("spec_device_seconds_to_best",
                                                                teacher_row.get("spec_device_seconds", 0.0)))),
        "select_flops": select["flops"], "select_device_seconds": select["device_seconds"],
        **pretrain,
        "inference_params": int(lm_param_count(config)),
        # what fine-tuning updated: every weight, or LoRA's adapters (lora_rank > 0)
        "trainable_params": int(best["trainable_params"]),
        "lora_rank": spec.lora.rank if trial.method in spec.lora.methods else 0,
        "inference_flops_per_token": float(inference_flops_per_token(config)),
        "model_path": layout.relative(out_uri), "trial": trial.key(), "base_lr": trial.lr,
        "expert_selection": spec.expert_selection if method.expert_selection else "",
        "teacher": teacher_key,
    }
    training = {**row, "data": {k: layout.relative(layout.shards(v)) for k, v in sets.items()},
                "teacher": layout.relative(teacher_uri) if teacher_uri else "",
                "kd_weight": spec.kd_weight if method.teacher else 0.0,
                "kd_temperature": spec.kd_temperature, "history": best.get("history", [])}
    t_publish = time.perf_counter()
    with trial_stage(recipe, trial, out_uri).publish() as out:
        _copy_files(best["model_dir"], out)
        _copy_files(layout.tokenizer, out)
        phases = {**best["phases"], "start": best["phases"]["start"] + t_starts,
                  "publish": best["phases"]["publish"] + time.perf_counter() - t_publish}
        timing = _timing(best, phases, time.perf_counter() - t_trial)
        row.update(timing)
        write_json(out.file(TRIAL_TRAINING), {**training, **timing})
        write_json(out.file(TRIAL_ROW), row)
        out.manifest.update({"trial": trial.key(), "valid_loss": row["valid_loss"]})
    remove(work)  # published: the trial's work is not needed any more
    log.info("specialized %s: valid %.4f test ppl %.2f (%d steps, best %d)", trial.key(),
             row["valid_loss"], row["test_ppl"], row["steps_run"], row["best_step"])
    return row


# a trial's wall time by phase (the row's phase_<name>_seconds): reading its rows, setting up
# (starting models, model and engine), training steps, evaluations (valid and test), publishing
PHASES = ("data", "start", "train", "eval", "publish")


def _timing(best: dict[str, Any], phases: dict[str, float], wall: float) -> dict[str, Any]:
    """The row's timing columns: the trial's wall seconds in this process (from the trial's
    start to its publication), seconds by phase (``PHASES``; ``other``: what no phase covers:
    looking up the teacher and costs, the trial's bookkeeping), and the device seconds of its
    own training steps (every start's; spec_device_seconds adds SLM-d's teacher) and of its
    evaluations (valid and test), as the loop measured them."""
    out = {"wall_seconds": round(wall, 3), "finished_at": time.time()}
    out.update({f"phase_{k}_seconds": round(float(phases.get(k, 0.0)), 3) for k in PHASES})
    out["phase_other_seconds"] = round(max(wall - sum(phases.get(k, 0.0) for k in PHASES), 0.0), 3)
    out["eval_device_seconds"] = float(best.get("eval_device_seconds", 0.0))
    out["trial_device_seconds"] = float(best["device_seconds"])  # its own steps (no teacher's)
    return out


def _copy_files(src_uri: str, out) -> None:
    """The files of a published directory (a model, the tokenizer: the served directory loads
    with Auto* classes alone) into a staging directory, without the source's manifest."""
    fs, path = filesystem(src_uri)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name != MANIFEST:
            pafs.copy_files(info.path, join(out.path, info.base_name), source_filesystem=fs,
                            destination_filesystem=out.fs)
