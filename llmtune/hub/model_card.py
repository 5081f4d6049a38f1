"""The model card (README.md) published with a run: how the model was made, how well it does, how to load it.

Everything comes from the run directory (run.json, metrics.json); the Hub metadata header is written by
huggingface_hub's ModelCardData so the Hub indexes base model, datasets, license and tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from llmtune.models.sources import hub_base_model, installed_checkpoint
from llmtune.run.files import read_json, write_text
from llmtune.run.run_dir import METRICS_FILE, RUN_RECORD

TASK_NAMES = {"classification": "text classification", "sft": "instruction tuning (SFT)",
              "pretrain": "language modelling", "dpo": "preference tuning (DPO)", "kto": "preference tuning (KTO)",
              "orpo": "preference tuning (ORPO)", "simpo": "preference tuning (SimPO)",
              "reward": "reward modelling", "image_classification": "image classification",
              "distill": "text classification, distilled from a teacher", "grpo": "online RL from rewards (GRPO)"}
PIPELINES = {"classification": "text-classification", "reward": "text-classification", "distill": "text-classification",
             "image_classification": "image-classification",
             **dict.fromkeys(("sft", "pretrain", "dpo", "kto", "orpo", "simpo", "grpo"), "text-generation")}
AUTO_FOR_PIPELINE = {"text-classification": "AutoModelForSequenceClassification",
                     "image-classification": "AutoModelForImageClassification", "text-generation": "AutoModelForCausalLM"}
AUTO_CLASS_NAMES = {task: AUTO_FOR_PIPELINE[pipeline] for task, pipeline in PIPELINES.items()}


def render(record: dict, metrics: dict | None, repo_id: str, kind: str) -> str:
    """README.md text for a run pushed as `kind` ('adapter', 'merged' or 'full'); `metrics` None for a run that
    has not finished."""
    recipe = record["recipe"]
    task, method, training = recipe["task"], recipe["method"], recipe["training"]
    base = hub_base_model(recipe) if recipe["model"].get("name") else None
    quantized = method["type"] != "full" and method.get("quantization", "none") != "none"
    tags = ["llmtune", task, method["type"]]
    if quantized:
        tags.append("qlora" if method["quantization"] == "4bit" else "8-bit")
    metadata = ModelCardData(
        base_model=base,
        library_name="peft" if kind == "adapter" else "transformers",
        license=_license(recipe),
        datasets=_hub_datasets(recipe["data"]) or None,
        pipeline_tag=PIPELINES[task],
        tags=tags,
        model_name=repo_id.split("/")[-1],
    )
    adapter_name = {"lora": "LoRA", "dora": "DoRA"}.get(method["type"], "")
    if quantized:
        adapter_name += f" (trained on a {method['quantization']} base)"
    what = {"adapter": f"a {adapter_name} adapter", "merged": f"a model with a {adapter_name} adapter merged in",
            "full": "a fully fine-tuned model"}[kind]
    sections = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        _opening(what, TASK_NAMES[task], record, base),
        "## How to use\n",
        _usage(repo_id, base, kind, task, recipe),
        "## Training\n",
        _table(["setting", "value"], _settings(record, method, training, recipe)),
        "## Data\n",
        _data(record),
        "## Results\n",
        _results(metrics),
        *_benchmarks(metrics),
        *_exports(record),
        "## Framework versions\n",
        "\n".join(f"- {name}: {version}" for name, version in record.get("versions", {}).items()) + "\n",
        "## License\n",
        _license_line(recipe),
    ]
    return "\n".join(sections)


def write_run_card(run_dir: Path) -> Path:
    """Write llmtune's card as the run's own README.md and return its path.

    It replaces the drafts libraries leave there: trl writes one at every checkpoint that names the base model
    only by Hub id - "a fine-tuned version of [None](https://huggingface.co/None)" for a local, installed or
    from-scratch model - and peft adds its own to an adapter. The card names the run folder where a pushed card
    names the Hub repository; without metrics.json (a run not finished) it says so instead of giving results."""
    record = read_json(run_dir / RUN_RECORD)
    metrics = read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else None
    kind = "adapter" if (run_dir / "adapter_config.json").is_file() else \
        "merged" if (run_dir / "adapter").is_dir() else "full"
    path = run_dir / "README.md"
    write_text(path, render(record, metrics, str(run_dir.resolve()), kind))
    return path


def _opening(what: str, task_name: str, record: dict, base: str | None) -> str:
    """The card's first sentence: what the model is and what it started from, true also without a Hub id (a link
    only to a real Hub model)."""
    if record["recipe"]["model"].get("init") == "scratch" and not record.get("sft_parent"):
        return f"This is a model for {task_name}, trained from scratch (random initial weights) with llmtune.\n"
    return f"This is {what} for {task_name}, starting from {_base_text(record, base)}, trained with llmtune.\n"


def _base_text(record: dict, base: str | None) -> str:
    model = record["recipe"]["model"]
    parent = record.get("sft_parent")
    if parent:
        parent_base = hub_base_model({"model": {"name": parent.get("base_name") or ""}}) or parent.get("base_name")
        return (f"an SFT model (llmtune run `{Path(parent['run_dir']).name}`, task {parent.get('task')})"
                + (f" built on `{parent_base}`" if parent_base else ""))
    if base:
        return f"[{base}](https://huggingface.co/{base})"
    if model.get("name"):
        return f"the local checkpoint `{model['name']}` (not a Hugging Face Hub model)"
    return "a base model whose name the run did not record"


def _exports(record: dict) -> list[str]:
    """The GGUF / Ollama / ONNX files `llmtune export` made from this run, with what their checks measured."""
    rows = []
    for entry in record.get("exports", []):
        checks = entry.get("checks", {})
        if "max_probability_diff" in checks:
            check = f"onnxruntime probabilities within {checks['max_probability_diff']:.1e} of PyTorch"
        else:
            check = (f"logits within {checks.get('max_logit_diff_vs_full_precision', float('nan')):.2e} of full "
                     f"precision; top token agrees on {checks.get('top1_agreement_vs_full_precision', 0):.0%}")
        files = ", ".join(f"`{Path(f['path']).name}`" for f in entry.get("files", []))
        rows.append([entry.get("format"), entry.get("quant") or "float32", files, check])
    if not rows:
        return []
    return ["## Exports\n", "Made with `llmtune export` from the same weights (not part of this repository):\n",
            _table(["format", "weights", "files", "checked on a probe"], rows)]


def _license(recipe: dict) -> str:
    if recipe["output"].get("license"):
        return recipe["output"]["license"]
    if recipe["model"].get("init") == "scratch":
        return "other"  # model.name only lent the tokenizer: its license is not the weights'
    known = installed_checkpoint(recipe["model"].get("name") or "")
    return known.license if known else "other"


def _license_line(recipe: dict) -> str:
    if recipe["output"].get("license"):
        return f"{recipe['output']['license']}.\n"
    if recipe["model"].get("init") == "scratch":
        return "other: not chosen (set output.license); there is no base model whose license applies.\n"
    return f"{_license(recipe)}, the license of the base model.\n"


def _hub_datasets(data: dict) -> list[str]:
    sources = [data.get("dataset")] + [source.get("dataset") for source in data.get("mixture", [])]
    return [s for s in sources if s and s.count("/") == 1 and not Path(s).exists()]


def _settings(record: dict, method: dict, training: dict, recipe: dict) -> list[list[Any]]:
    world = record.get("world_size", 1)
    per_device, accumulation = training["batch_size"], training["gradient_accumulation"]
    rows = [["task", recipe["task"]], ["method", method["type"]]]
    if method["type"] != "full":
        rows += [["LoRA rank / alpha / dropout", f"{method['r']} / {method['alpha']} / {method['dropout']}"],
                 ["target modules", ", ".join(record.get("parameters", {}).get("adapted_modules", []))
                  or str(method.get("target_modules"))]]
        if method.get("quantization", "none") != "none":
            detail = f" {method['quant_type']}, double quant {method['double_quant']}" if method["quantization"] == "4bit" else ""
            rows.append(["base quantization", f"{method['quantization']}{detail} (bitsandbytes)"])
    parameters = record.get("parameters")
    if parameters:
        rows.append(["trainable parameters",
                     f"{parameters['trainable']:,} of {parameters['total']:,} ({parameters['trainable_percent']:.2f}%)"])
    rows += [
        ["epochs" if not training.get("max_steps") else "max steps", training.get("max_steps") or training["epochs"]],
        ["learning rate", training["learning_rate"]],
        ["scheduler / warm-up", f"{training['scheduler']} / {training['warmup']}"],
        ["optimizer", training["optimizer"]],
        ["weight decay", training["weight_decay"]],
        ["batch size per device", per_device],
        ["gradient accumulation", accumulation],
        ["processes", world],
        ["global batch size", per_device * accumulation * world],
        ["max sequence length", recipe["data"]["max_length"]],
        ["precision", training["precision"]],
        ["seed", training["seed"]],
    ]
    return rows


def _data(record: dict) -> str:
    lines = []
    for key, value in record.get("data", {}).items():
        if key == "dataset":
            splits = ", ".join(f"{k}={v}" for k, v in value.items() if k.endswith("split") and v)
            lines.append(f"- dataset `{value['id']}`" + (f" ({value['subset']})" if value.get("subset") else "")
                         + (f", {splits}" if splits else ""))
        else:
            lines.append(f"- {key.replace('_', ' ')}: `{Path(value['path']).name}` (sha256 {value['sha256'][:12]})")
    for source in record.get("recipe", {}).get("data", {}).get("mixture", []):
        name = source.get("dataset") or Path(source.get("train_file", "")).name
        lines.append(f"- mixed in: `{name}` (weight {source.get('weight', 1.0)})")
    return "\n".join(lines) + "\n" if lines else "Not recorded.\n"


def _results(metrics: dict | None) -> str:
    if metrics is None:
        return "The run has not finished: its results are added to this card when it does.\n"
    before, after, test = metrics.get("before", {}), metrics.get("after", {}), metrics.get("test", {})
    names = [n for n in after if isinstance(after[n], (int, float)) and not n.endswith(("runtime", "per_second"))
             and n not in ("epoch",)]
    if not names:
        return "No evaluation set was used.\n"
    rows = [[n, _number(before.get(n)), _number(after[n])] + ([_number(test.get(n))] if test else []) for n in names]
    header = ["metric", "before fine-tuning", "after fine-tuning"] + (["test"] if test else [])
    return _table(header, rows)


def _benchmarks(metrics: dict | None) -> list[str]:
    """The eval.benchmarks scores (lm-evaluation-harness) before and after fine-tuning, as the run measured them."""
    rows = ((metrics or {}).get("benchmarks") or {}).get("forgetting") or []
    if not rows:
        return []
    table = _table(["benchmark", "metric", "before fine-tuning", "after fine-tuning", "change"],
                   [[r["task"], r["metric"], _number(r["before"]), _number(r["after"]), f"{r['change']:+.4f}"
                     + (" (dropped beyond its 95% interval)" if r["dropped"] else "")] for r in rows])
    return ["### Benchmarks\n", "Scored with lm-evaluation-harness on the model as trained (adapter on its base):\n",
            table]


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _usage(repo_id: str, base: str | None, kind: str, task: str, recipe: dict) -> str:
    auto = AUTO_CLASS_NAMES[task]
    if task == "image_classification":
        scratch = recipe["model"].get("init") == "scratch"
        return ("```python\n" + ("import llmtune.models.vision  # registers llmtune's CNN / MLP with the Auto classes\n"
                                   if scratch else "") +
                f"from transformers import {auto}\n\n"
                f'model = {auto}.from_pretrained("{repo_id}")\n'
                "# pixels: resize to config.image_size, config.num_channels channels, scale to [0, 1], then\n"
                "# normalise with config.image_mean / config.image_std (llmtune predict --image does this)\n```\n")
    if kind != "adapter":
        code = (f"from transformers import {auto}, AutoTokenizer\n\n"
                f'model = {auto}.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n')
    else:
        base_ref = base or recipe["model"]["name"]
        code = (f"from peft import PeftModel\nfrom transformers import AutoConfig, {auto}, AutoTokenizer\n\n"
                f'config = AutoConfig.from_pretrained("{repo_id}")  # labels / vocabulary size of the fine-tuned model\n'
                f'base = {auto}.from_pretrained("{base_ref}", config=config)\n'
                f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n')
    if task == "pretrain":
        code += ('\ninputs = tokenizer("Once upon a time", return_tensors="pt")\n'
                 "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n")
    elif task in ("sft", "dpo", "kto", "orpo", "simpo"):
        code += ('\nmessages = [{"role": "user", "content": "Give three tips for staying healthy."}]\n'
                 "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                 "return_dict=True)\n"
                 "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n")
    return f"```python\n{code}```\n"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
