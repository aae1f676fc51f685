"""`slm export`: one specialized model as a self-contained Hugging Face directory.

The specialization code writes ``RUN/models/<domain>/<method>/`` (config.json,
model.safetensors, training.json). Export adds what a user of the model needs and nothing
slm-specific: the run's tokenizer, a ``generation_config.json`` and a model card (README.md)
with the training data, method, budgets, costs and test perplexity, so that

    AutoModelForCausalLM.from_pretrained(out); AutoTokenizer.from_pretrained(out)

followed by ``generate`` work as is. The run is read through ``slm.stage``'s filesystem (a
local path or an object-storage URI, opened through any path; the model's files through
``local_dir``, a node-local copy for a remote run). The output, a local directory or an
object-storage URI (built in a local temp dir, then copied), is published atomically
(slm.stage.publish) and names run paths relative to the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

from transformers import AutoModelForCausalLM, GenerationConfig

from slm.errors import InputError
from slm.hashing import sha256_file
from slm.layout import TRIAL_TRAINING, RunLayout
from slm.pipeline.tokenizer import run_tokenizer
from slm.stage import Staging, copy_dir, exists, is_remote, join, local_dir, publish, read_json, subdirs
from slm.tune.methods import METHODS

MODEL_FILES = ("config.json", "model.safetensors")


def export_dir(run: str, domain: str) -> str:
    """Default output: ``RUN/export/<domain>`` (one served specialist per domain)."""
    return RunLayout(run).export(domain)


def _read_json(uri: str) -> dict[str, Any]:
    try:
        return read_json(uri)
    except json.JSONDecodeError as e:
        raise InputError(f"'{uri}' is not valid JSON ({e}); re-run the specialization that "
                         "wrote it") from None


def _training(src: str) -> dict[str, Any]:
    """A model's training.json ({} when it has none)."""
    uri = join(src, TRIAL_TRAINING)
    return _read_json(uri) if exists(uri) else {}


def available_methods(run: str, domain: str) -> dict[str, str]:
    """method → model directory, for every complete specialized model of ``domain``."""
    layout = RunLayout(run)
    if not exists(layout.models(domain)):
        have = subdirs(layout.models())
        raise InputError(f"no specialized models for domain '{domain}' in '{layout.models()}' "
                         f"(domains there: {', '.join(have) or 'none'}); run `slm sweep` or "
                         f"`slm specialize` first, or pick one of those domains")
    return {m: layout.model(domain, m) for m in subdirs(layout.models(domain))
            if all(exists(join(layout.model(domain, m), f)) for f in MODEL_FILES)}


def choose_method(run: str, domain: str, method: str = "") -> tuple[str, str]:
    """(method, model dir): the named one, or the one with the lowest *validation* loss (the
    test split stays for reporting)."""
    methods = available_methods(run, domain)
    if method:
        if method not in methods:
            raise InputError(f"no complete model for domain '{domain}', method '{method}' "
                             f"(config.json + model.safetensors); available: "
                             f"{', '.join(methods) or 'none'}")
        return method, methods[method]
    scored = []
    for m, d in methods.items():
        v = _training(d).get("valid_loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            scored.append((float(v), m))
    if not scored:
        raise InputError(f"cannot pick the best method for domain '{domain}': no model has a "
                         f"valid_loss in its {TRIAL_TRAINING} (methods: {', '.join(methods) or 'none'}); "
                         "name one with --method")
    best = min(scored)[1]
    return best, methods[best]


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------

def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def _run_relative(value: Any, layout: RunLayout | None) -> Any:
    """``value`` with every string that names a path inside the run made run-relative (older
    runs recorded absolute paths): a model card never names the machine that built it."""
    if layout is None:
        return value
    if isinstance(value, str):
        return layout.relative(value) if value.startswith(("/", layout.root)) else value
    if isinstance(value, dict):
        return {k: _run_relative(v, layout) for k, v in value.items()}
    if isinstance(value, list):
        return [_run_relative(v, layout) for v in value]
    return value


def _data_lines(data: Any, layout: RunLayout | None = None) -> list[str]:
    data = _run_relative(data, layout)
    if data is None:
        return ["- not recorded"]
    if isinstance(data, dict):
        return [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in data.items()]
    if isinstance(data, list):
        return [f"- {json.dumps(v) if isinstance(v, (dict, list)) else v}" for v in data]
    return [f"- {data}"]


def method_note(method: str) -> str:
    """How the method makes its served model (the method registry's one sentence)."""
    m = METHODS.get(method)
    return f"{m.label}: {m.description}" if m else "see the slm documentation"


def model_card(domain: str, method: str, info: dict[str, Any], config: dict[str, Any],
               layout: RunLayout | None = None) -> str:
    """README.md of an exported model. Missing training.json keys read 'not recorded'; paths
    inside the run (``layout``) are written run-relative."""
    g = info.get
    total_flops = (g("pretrain_flops") + g("spec_flops")
                   if g("pretrain_flops") is not None and g("spec_flops") is not None else None)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [slm, specialized, domain-{domain}, method-{method}]",
        "---",
        "",
        f"# slm specialist: domain `{domain}`, method `{method}`",
        "",
        f"A small language model specialized to the domain **{domain}** with **{method}**: "
        f"{method_note(method)}. Trained with "
        "slm, after Grangier et al. 2024, *Specialized Language Models with Cheap Inference "
        "from Limited Domain Data*.",
        "",
        "## Model",
        f"- architecture: {', '.join(config.get('architectures') or [config.get('model_type', '?')])}",
        f"- layers: {_fmt(config.get('n_layer'))}, width: {_fmt(config.get('n_embd'))}, "
        f"heads: {_fmt(config.get('n_head'))}, context: {_fmt(config.get('n_positions'))} tokens, "
        f"vocabulary: {_fmt(config.get('vocab_size'))}",
        f"- inference parameters: {_fmt(g('inference_params'))}",
        "",
        "## Training data",
        f"- in-domain training tokens: {_fmt(g('domain_tokens'))}",
        *_data_lines(g("data"), layout),
        "",
        "## Method and budgets",
        f"- method: `{method}`",
        f"- specialization budget: {_fmt(g('budget_steps'), 'steps')}",
        f"- seed: {_fmt(g('seed'))}",
        "",
        "## Costs",
        f"- pretraining compute: {_fmt(g('pretrain_flops'), 'FLOPs')}",
        f"- pretraining device time: {_fmt(g('pretrain_device_seconds'), 'device-seconds')}",
        f"- specialization compute: {_fmt(g('spec_flops'), 'FLOPs')}",
        f"- specialization device time: {_fmt(g('spec_device_seconds'), 'device-seconds')}",
        f"- total training compute: {_fmt(total_flops, 'FLOPs')}",
        "",
        "## Evaluation (held-out domain data)",
        f"- validation loss: {_fmt(g('valid_loss'), 'nats/token')}",
        f"- test loss: {_fmt(g('test_loss'), 'nats/token')}",
        f"- **test perplexity: {_fmt(g('test_ppl'))}**",
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "ids = tok(\"your prompt\", return_tensors=\"pt\")",
        "out = model.generate(**ids, max_new_tokens=32)",
        "print(tok.decode(out[0][ids['input_ids'].shape[1]:]))",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _build_dir(st: Staging) -> Iterator[str]:
    """A local directory to write the export into: the staging directory itself for a local
    output; for object storage a temporary one, copied into the staging location on success
    (before ``publish`` writes the manifest, so a reader never sees a partial export)."""
    if not is_remote(st.uri):
        yield st.local_dir
        return
    with tempfile.TemporaryDirectory(prefix="slm-export-") as tmp:
        yield tmp
        copy_dir(tmp, st.uri)


def check_out(layout: RunLayout, out: str) -> None:
    """An export goes outside the run or under ``RUN/export/<name>``, never over the run's own
    artifacts (or the run itself)."""
    if ".." in out.replace("\\", "/").split("/"):
        raise InputError(f"--out '{out}' has a '..' component; give the export's directory plainly")
    rel = layout.relative(out)
    if rel == out and not is_remote(out) and not is_remote(layout.root):  # through a symlink?
        real_root, real_out = os.path.realpath(layout.root), os.path.realpath(out)
        if real_out == real_root or real_out.startswith(real_root + os.sep):
            rel = os.path.relpath(real_out, real_root)
    if rel != out and not (rel.startswith("export/") and rel.count("/") == 1):
        raise InputError(f"--out '{out}' is inside the run '{layout.root}' (at '{rel}'): an export "
                         f"goes outside the run, or to '{layout.path('export', '<domain>')}' (the default)")


def export_model(run: str, domain: str, method: str = "", out: str = "", force: bool = True) -> str:
    """Write ``RUN/models/<domain>/<method>`` as a self-contained HF directory at ``out``
    (default ``RUN/export/<domain>``); return its path. ``method`` '' = lowest valid_loss."""
    layout = RunLayout(run)
    out = out or layout.export(domain)
    check_out(layout, out)
    method, src = choose_method(run, domain, method)
    info = _training(src)
    config = _read_json(join(src, "config.json"))
    tok = run_tokenizer(layout)
    local_src = local_dir(src, "model")  # the model's files on this node (from_pretrained)
    model = AutoModelForCausalLM.from_pretrained(local_src)  # fails here, not at the user's
    if model.config.vocab_size < len(tok):
        raise InputError(f"model '{src}' has vocab_size {model.config.vocab_size} but the "
                         f"run's tokenizer has {len(tok)} tokens; the model was not trained "
                         "with this run's tokenizer")
    gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id if tok.bos_token_id is not None
                           else tok.eos_token_id, max_new_tokens=64, do_sample=False)
    # the weights' hash is an input: a re-export of other weights to the same place is another
    # artifact (readers' node-local caches, slm.stage.local_dir, are keyed by it)
    weights = {layout.relative(join(src, MODEL_FILES[1])):
               sha256_file(os.path.join(local_src, MODEL_FILES[1]))}
    with publish(out, stage="export", force=force, inputs=weights,
                 config={"domain": domain, "method": method, "source": layout.relative(src)}) as st:
        with _build_dir(st) as d:
            for f in MODEL_FILES:  # the trained weights, byte for byte
                shutil.copy2(os.path.join(local_src, f), os.path.join(d, f))
            if info:  # run paths in it relative to the run, as in every output of a run
                with open(os.path.join(d, TRIAL_TRAINING), "w", encoding="utf-8") as f:
                    json.dump(_run_relative(info, layout), f, indent=2, sort_keys=True)
            tok.save_pretrained(d)
            gen.save_pretrained(d)
            with open(os.path.join(d, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(domain, method, info, config, layout))
            st.manifest.update({"domain": domain, "method": method,
                                "test_ppl": info.get("test_ppl"), "params": model.num_parameters()})
    return out
