"""The sweep grid: one ``Trial`` per (domain, method, budget, domain size, seed, LR,
pretraining level, pretraining seed), where a
trial is published, which methods the run can specialize (inference budget, pretrained
families) and the teachers the trials depend on."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

from transformers import PreTrainedTokenizerFast

from slm.configkit import ConfigError, to_dict
from slm.layout import SPLITS, RunLayout, domain_set, expert_name, train_root
from slm.models.config import FAMILY_INFO, level_name
from slm.models.lm import lm_config, lm_param_count
from slm.stage import Stage, join, local_dir, manifest, subdirs

from .methods import get_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One point of the sweep grid."""

    domain: str
    method: str
    budget_steps: int
    domain_tokens: int
    seed: int
    lr: float  # base LR; divided by specialize.small_data_lr_div for small domains
    level: float = 1.0  # pretraining level its start models were saved at (pretrain.levels)
    # pretraining seed of its start models, as the layout names it (Recipe.layout_seed): None
    # for the recipe's own seed, whose trials keep their keys and fingerprints
    pretrain_seed: int | None = None

    def key(self) -> str:
        """Directory name of the trial (deterministic, filesystem-safe; the final model's
        level 1 and the recipe's own pretraining seed are left out, so keys of runs without
        levels or pretraining seeds do not change)."""
        level = f"--p{level_name(self.level)}" if self.level < 1.0 else ""
        pseed = f"--ps{self.pretrain_seed}" if self.pretrain_seed is not None else ""
        return (f"{self.domain}--{self.method}--b{self.budget_steps}--t{self.domain_tokens}"
                f"--s{self.seed}--lr{self.lr:g}{level}{pseed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.pretrain_seed is None:  # as before pretraining seeds: published trials stay valid
            del d["pretrain_seed"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        ps = d.get("pretrain_seed")
        return cls(str(d["domain"]), str(d["method"]), int(d["budget_steps"]),
                   int(d["domain_tokens"]), int(d["seed"]), float(d["lr"]), float(d.get("level", 1.0)),
                   None if ps is None else int(ps))


def trial_uri(recipe, trial: Trial, sweep: str | None = None) -> str:
    return RunLayout(recipe.run_dir).trial(sweep or recipe.sweep.name, trial.key())


def trial_workdir(recipe, trial: Trial) -> str:
    """Where the trial works while it runs (its fine-tuning's Ray Train storage, best model and
    written starting models; ``RunLayout.trial_work``): on the run's Train storage
    (slm.layout ``train_root``: the run itself, or ``<cluster.storage>/<run id>``), which every
    node reads, since the trial's Train worker may run on another node than the trial."""
    layout = RunLayout(recipe.run_dir)
    rel = layout.relative(layout.trial_work(recipe.sweep.name, trial.key()))
    return join(train_root(layout, recipe.cluster.storage), rel)


def trial_config(recipe, trial: Trial) -> dict[str, Any]:
    """What a published trial was made with: a trial published under another specialization
    config is never reused silently (slm.stage.is_done raises, naming the fix)."""
    return {"trial": trial.to_dict(), "recipe": recipe.name, "specialize": to_dict(recipe.specialize)}


def pretrained_inputs(recipe, trial: Trial) -> dict[str, str]:
    """The fingerprints of the pretrained models the trial's method is built from (its
    ``pretrains`` families at the trial's pretraining level: the run of the trial's domain and
    domain size of a per-domain family, every expert of a per-expert one), keyed run-relative;
    "" for one not published. A family pretrained again from another config changes them, so
    its finished trials are refused, not reused."""
    layout = RunLayout(recipe.run_dir)
    out = {}
    for family in get_method(trial.method).pretrains:
        runs = FAMILY_INFO[family].runs
        subs = ([expert_name(i) for i in range(recipe.kmeans.k_mix)] if runs == "per_expert"
                else [FAMILY_INFO[family].sub(trial.domain, trial.domain_tokens)])
        for sub in subs:  # the models of the trial's pretraining level
            model = layout.pretrain_level(family, sub, trial.level, trial.pretrain_seed)
            out[layout.relative(model)] = (manifest(model) or {}).get("fingerprint", "")
    return out


def trial_stage(recipe, trial: Trial, uri: str) -> Stage:
    """The trial as a stage: published at ``uri`` with its config (``trial_config``) and the
    pretrained models it starts from (``pretrained_inputs``)."""
    return Stage(uri, stage="specialize", config=trial_config(recipe, trial),
                 inputs=pretrained_inputs(recipe, trial))


def trial_done(recipe, trial: Trial, uri: str) -> bool:
    """True when the trial's artifact is published with this config."""
    return trial_stage(recipe, trial, uri).done


def teacher_of(trial: Trial) -> Trial | None:
    """The trial whose specialized model is ``trial``'s KD teacher (same domain, budget,
    domain size, seed, LR, pretraining level and pretraining seed; the method's ``teacher``),
    or None."""
    teacher = get_method(trial.method).teacher
    return dataclasses.replace(trial, method=teacher) if teacher else None


def teacher_trials(trials: list[Trial]) -> list[Trial]:
    """Every teacher the trials depend on, in the grid or not (each once, in grid order): the
    sweep trains them before their students, and keeps their rows as the reference."""
    seen, out = set(), []
    for t in trials:
        ref = teacher_of(t)
        if ref is not None and ref.key() not in seen:
            seen.add(ref.key())
            out.append(ref)
    return out


def small_data_lr(recipe, lr: float, domain_tokens: int) -> float:
    """Paper App. C: at <= small_data_tokens domain tokens the LR is divided (1M -> LR/3)."""
    spec = recipe.specialize
    return lr / spec.small_data_lr_div if domain_tokens <= spec.small_data_tokens else lr


# --------------------------------------------------------------------------------------------
# What the run holds
# --------------------------------------------------------------------------------------------

def run_domains(layout: RunLayout) -> list[str]:
    """Domains with published train/valid/test shards in the run, sorted."""
    prefix, _, suffix = domain_set("\0", "test").partition("\0")  # the name around the domain
    out = []
    for n in subdirs(layout.shards()):
        if n.startswith(prefix) and n.endswith(suffix):
            d = n[len(prefix):-len(suffix)]
            if all(manifest(layout.shards(domain_set(d, s))) is not None for s in SPLITS):
                out.append(d)
    return sorted(out)


def vocab_size(recipe) -> int:
    """Vocabulary of the run's tokenizer (the recipe's size before the tokenizer is built)."""
    tok = RunLayout(recipe.run_dir).tokenizer
    if manifest(tok) is None:
        return recipe.tokenizer.vocab_size
    return len(PreTrainedTokenizerFast.from_pretrained(local_dir(tok, "tokenizer")))


def size_params(recipe, size: str) -> int:
    """Parameters of a served GPT-2 of preset ``size`` with the run's vocabulary."""
    return lm_param_count(lm_config(size, vocab_size(recipe), recipe.data.seq_len))


def inference_budget(recipe) -> int:
    """Max parameters of a served model (``specialize.inference_budget``, 0 = the small model)."""
    return recipe.specialize.inference_budget or size_params(recipe, recipe.pretrain.slm_size)


def check_methods(recipe, methods: list[str]) -> list[str]:
    """The methods that fit the inference budget and the pretrained families; ConfigError names
    the field when none fits or a method needs a family the recipe does not pretrain."""
    entries = [get_method(m) for m in methods]
    budget = inference_budget(recipe)
    p = recipe.pretrain
    slm_p, llm_p = size_params(recipe, p.slm_size), size_params(recipe, p.llm_size)
    if budget < min(slm_p, llm_p):
        raise ConfigError(f"field 'specialize.inference_budget' is {budget} parameters, smaller than "
                          f"every model (slm {slm_p}, llm {llm_p}); raise it to at least {min(slm_p, llm_p)} "
                          "or pick a smaller pretrain.slm_size")
    out = []
    for m in entries:
        preset = m.served_preset(p)
        served = llm_p if m.serves_large else slm_p
        if served > budget:
            log.warning("method '%s' excluded: the %s model it serves has %d parameters, over the "
                        "inference budget of %d (specialize.inference_budget)", m.name, preset,
                        served, budget)
            continue
        for fam in m.pretrains:
            if fam not in p.families:
                raise ConfigError(f"field 'sweep.methods' has '{m.name}', which needs the '{fam}' family, "
                                  f"but pretrain.families is {p.families}; add '{fam}' or drop '{m.name}'")
        out.append(m.name)
    if not out:
        raise ConfigError("no method of 'sweep.methods' fits 'specialize.inference_budget'; raise the budget")
    return out


def sweep_trials(recipe, domains: list[str] | None = None) -> list[Trial]:
    """Every trial of the recipe's sweep, in a deterministic order; ConfigError names the field
    that asks for something the run cannot do (unknown domain, size, method, budget)."""
    sw, spec = recipe.sweep, recipe.specialize
    known = run_domains(RunLayout(recipe.run_dir))
    wanted = list(domains if domains is not None else (sw.domains or known))
    for d in wanted:
        if d not in known:
            raise ConfigError(f"field 'sweep.domains' names domain '{d}', which the run has no "
                              f"shards for; known: {', '.join(known) or '(none: run `slm data run`)'}")
    for b in sw.budgets:
        if b <= 0:
            raise ConfigError(f"field 'sweep.budgets' has {b}; a specialization budget must be > 0 steps")
    sizes = sw.domain_tokens or list(recipe.data.domain_train_tokens)
    for t in sizes:
        if t not in recipe.data.domain_train_tokens:
            raise ConfigError(f"field 'sweep.domain_tokens' has {t}, which is not one of the run's "
                              f"domain train subsets (data.domain_train_tokens = "
                              f"{recipe.data.domain_train_tokens}); use one of those")
    methods = check_methods(recipe, sw.methods)
    lrs = sw.lrs or [spec.lr]
    return [Trial(d, m, b, t, s, lr, lv, ps)
            for d, m, b, t, s, lr in product(wanted, methods, sw.budgets, sizes, sw.seeds, lrs)
            for lv in method_levels(recipe, m) for ps in method_pretrain_seeds(recipe, m)]


def method_levels(recipe, method: str) -> list[float]:
    """The pretraining levels a method is specialized from: those of sweep.levels (default:
    every one of pretrain.levels) for a method built from pretrained families, the final
    model's (1) alone for one that pretrains nothing (SLM-nopt: its cost is the same at every
    level). ConfigError names a sweep level the pretraining does not save."""
    saved = [float(lv) for lv in recipe.pretrain.levels]
    wanted = [float(lv) for lv in recipe.sweep.levels] or saved
    for lv in wanted:
        if lv not in saved:
            raise ConfigError(f"field 'sweep.levels' has {lv:g}, which pretraining does not save "
                              f"(pretrain.levels = {recipe.pretrain.levels}); use some of those")
    return wanted if get_method(method).pretrains else [1.0]


def method_pretrain_seeds(recipe, method: str) -> list[int | None]:
    """The pretraining seeds a method is specialized from, as the layout names them
    (``Recipe.layout_seed``: None for the recipe's own): those of sweep.pretrain_seeds
    (default: every one of ``Recipe.pretrain_seeds``) for a method built from pretrained
    families, the recipe's own alone for one that pretrains nothing (SLM-nopt). ConfigError
    names a sweep pretraining seed the recipe does not pretrain."""
    saved = recipe.pretrain_seeds()
    wanted = list(recipe.sweep.pretrain_seeds) or saved
    for s in wanted:
        if s not in saved:
            raise ConfigError(f"field 'sweep.pretrain_seeds' has {s}, which is not pretrained "
                              f"(pretraining seeds: {saved}, from pretrain.seeds or seed); use some of those")
    return [recipe.layout_seed(s) for s in wanted] if get_method(method).pretrains else [None]
