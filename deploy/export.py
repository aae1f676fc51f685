"""`slm export`: one specialized model as a self-contained Hugging Face directory.

The specialization code writes ``RUN/models/<domain>/<method>/`` (config.json,
model.safetensors, training.json). Export adds what a user of the model needs and nothing
slm-specific: the run's tokenizer, a ``generation_config.json`` and a model card (README.md)
with the training data, method, budgets, costs and test perplexity, so that

    AutoModelForCausalLM.from_pretrained(out); AutoTokenizer.from_pretrained(out)

followed by ``generate`` work as is. The output is published atomically (slm.stage.publish).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

from slm.errors import InputError
from slm.layout import RunLayout

MODEL_FILES = ("config.json", "model.safetensors")
TRAINING = "training.json"

METHOD_NOTES = {
    "slm": "a small generic model pretrained on the generic corpus, then fine-tuned on the domain",
    "llm": "a large generic model pretrained on the generic corpus, then fine-tuned on the domain",
    "is": "SLM-is: a small model pretrained on generic data importance-sampled to match the "
          "domain's cluster histogram, then fine-tuned on the domain",
    "mix": "SLM-mix: the expert of a hard mixture (one small model per generic cluster) "
           "selected by the domain's cluster histogram, then fine-tuned on the domain",
    "pn": "SLM-pn: a projected network over cluster experts, instantiated for the domain's "
          "histogram as a small model, then fine-tuned on the domain",
    "d": "a small model trained on the domain data only",
    "nopt": "a small model without pretraining, trained on the domain data",
}


def export_dir(run: str, domain: str) -> str:
    """Default output: ``RUN/export/<domain>`` (one served specialist per domain)."""
    return RunLayout(run).path("export", domain)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"'{path}' is not valid JSON ({e}); re-run the specialization that "
                         "wrote it") from None


def available_methods(run: str, domain: str) -> dict[str, str]:
    """method → model directory, for every complete specialized model of ``domain``."""
    root = os.path.join(RunLayout(run).path("models"), domain)
    if not os.path.isdir(root):
        models = RunLayout(run).path("models")
        have = sorted(os.listdir(models)) if os.path.isdir(models) else []
        raise InputError(f"no specialized models for domain '{domain}' in '{models}' "
                         f"(domains there: {', '.join(have) or 'none'}); run `slm sweep` or "
                         f"`slm specialize` first, or pick one of those domains")
    return {m: os.path.join(root, m) for m in sorted(os.listdir(root))
            if all(os.path.isfile(os.path.join(root, m, f)) for f in MODEL_FILES)}


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
        info = _read_json(os.path.join(d, TRAINING)) if os.path.isfile(os.path.join(d, TRAINING)) else {}
        v = info.get("valid_loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            scored.append((float(v), m))
    if not scored:
        raise InputError(f"cannot pick the best method for domain '{domain}': no model has a "
                         f"valid_loss in its {TRAINING} (methods: {', '.join(methods) or 'none'}); "
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


def _data_lines(data: Any) -> list[str]:
    if data is None:
        return ["- not recorded"]
    if isinstance(data, dict):
        return [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in data.items()]
    if isinstance(data, list):
        return [f"- {json.dumps(v) if isinstance(v, (dict, list)) else v}" for v in data]
    return [f"- {data}"]


def model_card(domain: str, method: str, info: dict[str, Any], config: dict[str, Any]) -> str:
    """README.md of an exported model. Missing training.json keys read 'not recorded'."""
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
        f"{METHOD_NOTES.get(method, 'see the slm documentation')}. Trained with "
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
        *_data_lines(g("data")),
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

def load_run_tokenizer(run: str):
    """The run's HF fast tokenizer with a pad token (EOS) for batched generation."""
    from transformers import PreTrainedTokenizerFast

    path = RunLayout(run).tokenizer
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise InputError(f"no tokenizer at '{path}' (tokenizer.json missing); run the data "
                         "pipeline (`slm data run`) for this run first")
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    if tok.eos_token is None:
        tok.eos_token = "<|endoftext|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def export_model(run: str, domain: str, method: str = "", out: str = "", force: bool = True) -> str:
    """Write ``RUN/models/<domain>/<method>`` as a self-contained HF directory at ``out``
    (default ``RUN/export/<domain>``); return its path. ``method`` '' = lowest valid_loss."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from slm.stage import publish

    method, src = choose_method(run, domain, method)
    out = out or export_dir(run, domain)
    info = _read_json(os.path.join(src, TRAINING)) if os.path.isfile(os.path.join(src, TRAINING)) else {}
    config = _read_json(os.path.join(src, "config.json"))
    tok = load_run_tokenizer(run)
    model = AutoModelForCausalLM.from_pretrained(src)  # fails here, not at the user's, if broken
    if model.config.vocab_size < len(tok):
        raise InputError(f"model '{src}' has vocab_size {model.config.vocab_size} but the run's "
                         f"tokenizer has {len(tok)} tokens; the model was not trained with this "
                         "run's tokenizer")
    gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                           max_new_tokens=64, do_sample=False)
    with publish(out, stage="export", force=force,
                 config={"domain": domain, "method": method, "source": os.path.abspath(src)}) as st:
        d = st.local_dir
        for f in MODEL_FILES:  # the trained weights, byte for byte
            shutil.copy2(os.path.join(src, f), os.path.join(d, f))
        if info:
            shutil.copy2(os.path.join(src, TRAINING), os.path.join(d, TRAINING))
        tok.save_pretrained(d)
        gen.save_pretrained(d)
        with open(os.path.join(d, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(domain, method, info, config))
        st.manifest.update({"domain": domain, "method": method,
                            "test_ppl": info.get("test_ppl"), "params": model.num_parameters()})
    return out
