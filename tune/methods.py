"""The specialization methods (paper §2, docs/paper.md §3): one registry entry per method.

An entry says everything the rest of slm needs to know about a method, so that specialization,
the sweep, the cost model, the planner, the report and export ask the registry and never
compare method names:

  * ``pretrains``: the pretraining families its served model (and its teacher) is built from;
    the recipe must pretrain them, and their measured pretraining is the method's pretraining
    cost. A family pretrained per domain (``FamilyInfo.runs == "per_domain"``, SLM-is: one run
    per domain and domain train size) is paid per domain and size, so the cost model counts it
    as the specialization of that size's trials (C_generic = 0);
  * ``start``: how a trial obtains its starting model(s) (a strategy below; the heavy work is
    done by the trial's start context, tune/starts.py);
  * ``served``: the size preset of the served model (``"slm"``: pretrain.slm_size, ``"llm"``:
    pretrain.llm_size);
  * ``teacher``: the method whose trial (same domain, budget, domain size, seed, LR) is the
    knowledge-distillation teacher, trained before the student's trial (SLM-d: llm); its
    fine-tuning is charged to the student;
  * ``paper``: how the planner reads the paper's numbers for it (PAPER_READINGS).

Per-trial extra costs follow from the entry: the teacher's fine-tuning (``teacher``), every
start's fine-tuning (several starts: SLM-mix with expert_selection=all), the per-domain
pretraining (``pretrains`` per domain). Adding a method is adding one ``register(Method(...))``
(a registered method must be registered in a module Ray's trial processes import too).

Light at import on purpose: tune/config.py validates recipes with it, without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slm.configkit import ConfigError
from slm.models.config import FAMILY_INFO

SERVED_SIZES = ("slm", "llm")  # the presets a served model can have (pretrain.<size>_size)

# How the planner reads the paper (tune/paper_findings.py, keyed by method name) for a method:
PAPER_READINGS = {
    "table8": "perplexity at fixed pretraining cost, interpolated in Table 8",
    "table4": "a fixed perplexity per domain size (Table 4)",
    "bound": "only a bound: better than every small-inference Table 8 method (Fig. 4)",
    "unreported": "its costs only (Table 3); the paper gives no perplexity",
    "": "not in the paper: the paper fallback leaves it out",
}


@dataclass(frozen=True)
class Start:
    """Where a fine-tuning run starts: a local HF directory (+ the expert it is, if any)."""

    path: str
    expert: int = -1


# ---- start strategies: each asks the trial's start context (tune/starts.py) -----------------

@dataclass(frozen=True)
class FromFamily:
    """The family's published model; a per-domain family's is the one of the trial's domain
    and domain size."""

    family: str

    def __call__(self, ctx: Any, trial: Any) -> list[Start]:
        return [ctx.pretrained(self.family, trial)]


@dataclass(frozen=True)
class SelectedExperts:
    """The experts of a per-expert family chosen by ``specialize.expert_selection``
    (top_cluster | lowest_loss | all: several starts, every one fine-tuned and paid for)."""

    family: str

    def __call__(self, ctx: Any, trial: Any) -> list[Start]:
        return ctx.selected_experts(self.family, trial)


@dataclass(frozen=True)
class MaterializedExpert:
    """A routed family's expert of the domain's most frequent cluster, materialised as a
    plain small model."""

    family: str

    def __call__(self, ctx: Any, trial: Any) -> list[Start]:
        return [ctx.materialized(self.family, trial)]


@dataclass(frozen=True)
class Fresh:
    """A randomly initialised small model (seeded by the trial's seed)."""

    def __call__(self, ctx: Any, trial: Any) -> list[Start]:
        return [ctx.fresh(trial)]


StartFn = Callable[[Any, Any], list[Start]]


@dataclass(frozen=True)
class Method:
    """One specialization method (see the module doc for what each field drives)."""

    name: str
    label: str
    description: str  # one sentence: how the served model is made (model cards, reports)
    start: StartFn
    pretrains: tuple[str, ...] = ()
    served: str = "slm"
    teacher: str = ""
    expert_selection: bool = False  # specialize.expert_selection applies (recorded in its rows)
    paper: str = ""
    color: str = "#000000"  # its colour in the report's figures

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "--" in self.name:
            raise ConfigError(f"method name '{self.name}' must be non-empty, without '/' or '--' "
                              "(it is part of trial directory names)")
        for fam in self.pretrains:
            if fam not in FAMILY_INFO:
                raise ConfigError(f"method '{self.name}': field 'pretrains' has unknown family "
                                  f"'{fam}'; known: {', '.join(FAMILY_INFO)}")
        if self.served not in SERVED_SIZES:
            raise ConfigError(f"method '{self.name}': field 'served' is '{self.served}'; use "
                              f"{' or '.join(SERVED_SIZES)}")
        if self.paper not in PAPER_READINGS:
            raise ConfigError(f"method '{self.name}': field 'paper' is '{self.paper}'; use one of "
                              f"{', '.join(repr(p) for p in PAPER_READINGS)}")

    @property
    def serves_large(self) -> bool:
        return self.served == "llm"

    def served_preset(self, pretrain) -> str:
        """The size preset of the served model under a recipe's ``pretrain`` section."""
        return pretrain.llm_size if self.serves_large else pretrain.slm_size

    @property
    def shared_families(self) -> tuple[str, ...]:
        """Families pretrained once for every domain (their cost is C_pretrain)."""
        return tuple(f for f in self.pretrains if FAMILY_INFO[f].runs != "per_domain")

    @property
    def per_domain_families(self) -> tuple[str, ...]:
        """Families pretrained once per domain (their cost is specialization)."""
        return tuple(f for f in self.pretrains if FAMILY_INFO[f].runs == "per_domain")

    def pretrain_note(self) -> str:
        """What its shared pretraining cost is, in words (the report's cost assumptions)."""
        fams = self.shared_families
        if not fams:
            return "0"
        experts = any(FAMILY_INFO[f].runs == "per_expert" for f in fams)
        return " + ".join(fams) + " pretraining" + (" (all experts)" if experts else "")

    def spec_notes(self) -> list[str]:
        """What its specialization cost adds to its own fine-tuning, in words."""
        out = []
        if self.expert_selection:
            out.append("every expert tried (expert_selection=all)")
        if self.teacher:
            out.append(f"the teacher's ({self.teacher}) fine-tuning")
        out += [f"the domain's own {f} pretraining (one per domain size)" for f in self.per_domain_families]
        return out


METHODS: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (its teacher must be registered first)."""
    if method.name in METHODS and not replace:
        raise ConfigError(f"method '{method.name}' is already registered")
    if method.teacher and method.teacher not in METHODS:
        raise ConfigError(f"method '{method.name}': its teacher '{method.teacher}' is not a "
                          f"registered method; known: {', '.join(METHODS)}")
    METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str, field: str = "sweep.methods") -> Method:
    """The registered method ``name``; ConfigError naming ``field`` and the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"field '{field}' has unknown method '{name}'; known: "
                          f"{', '.join(METHODS)}") from None


for _m in (
    Method("slm", "SLM", "a small model pretrained on the generic corpus, then fine-tuned on the "
           "domain", FromFamily("slm"), ("slm",), paper="table8", color="#1f77b4"),
    Method("llm", "LLM", "a large model pretrained on the generic corpus, then fine-tuned on the "
           "domain (the large reference, and SLM-d's teacher)", FromFamily("llm"), ("llm",),
           served="llm", paper="table8", color="#d62728"),
    Method("is", "SLM-is", "a small model pretrained on generic data importance-resampled to "
           "match the cluster histogram of the domain's train subset, then fine-tuned on it",
           FromFamily("is"), ("is",), paper="bound", color="#2ca02c"),
    Method("mix", "SLM-mix", "the expert of a hard mixture (one small model per generic "
           "cluster) chosen for the domain by specialize.expert_selection, then fine-tuned on "
           "the domain", SelectedExperts("mix"), ("mix",), expert_selection=True, paper="table8",
           color="#ff7f0e"),
    Method("pn", "SLM-pn", "a projected network over cluster experts, instantiated as a small "
           "model for the domain's most frequent cluster, then fine-tuned on the domain",
           MaterializedExpert("pn"), ("pn",), paper="table8", color="#9467bd"),
    Method("d", "SLM-d", "a small generic model fine-tuned on the domain while distilled from "
           "the fine-tuned LLM teacher (the llm trial of the same domain and budget)",
           FromFamily("slm"), ("slm", "llm"), teacher="llm", paper="unreported", color="#8c564b"),
    Method("nopt", "SLM-nopt", "a small model without pretraining, trained on the domain data "
           "only", Fresh(), paper="table4", color="#7f7f7f"),
):
    register(_m)
