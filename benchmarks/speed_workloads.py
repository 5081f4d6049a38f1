"""The speed benchmark's workloads: for each, its data and how every system builds its Trainer (the held-out
evaluator all systems share is speed_eval.py).

Baselines are written the way their documentation teaches. The plain Trainer scripts tokenize, pad per batch
(DataCollatorForLanguageModeling / DataCollatorWithPadding) and train with random batches. TRL runs twice: with
its SFTConfig defaults ("trl"), and configured for speed the way an informed user would ("trl_tuned":
padding-free batches, the precision that is fastest on the machine, no activation checkpointing, loss on the
completion only, and the attention implementation llmtune picks). All systems of a workload get the same model,
adapter settings (llmtune's recipe), data, learning rate, batch size and seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ALPACA_5K = DATA / "alpaca" / "alpaca_5000.json"


@dataclass
class Workload:
    title: str
    recipe: str
    systems: tuple[str, ...]
    token_budget: dict[str, int]  # effective training tokens per system run, by machine size
    batch_size: dict[str, int]
    overrides: list[str] = field(default_factory=list)  # applied to the recipe for every llmtune run


WORKLOADS = {
    "sft_lora": Workload(
        "SmolLM2-135M-Instruct LoRA SFT on Alpaca (max length 512)", "smollm2_alpaca_lora.yaml",
        ("plain_trainer", "trl", "trl_tuned", "llmtune"), {"cpu": 13_000, "gpu": 400_000}, {"cpu": 4, "gpu": 16}),
    "qlora": Workload(
        "SmolLM2-135M-Instruct QLoRA (4-bit NF4) SFT on Alpaca (max length 512)", "smollm2_alpaca_qlora.yaml",
        ("plain_trainer", "llmtune"), {"cpu": 10_000, "gpu": 200_000}, {"cpu": 4, "gpu": 16}),
    "sst2": Workload(
        "all-MiniLM-L6-v2 LoRA classification on SST-2 (max length 64)", "sst2_minilm_lora.yaml",
        ("plain_trainer", "llmtune"), {"cpu": 110_000, "gpu": 1_000_000}, {"cpu": 32, "gpu": 128}),
    "pretrain": Workload(
        "tiny GPT (4 x 256) pretraining from scratch on Tiny Shakespeare (blocks of 128)",
        "tiny_gpt_shakespeare_scratch.yaml",
        ("plain_trainer", "llmtune"), {"cpu": 200_000, "gpu": 4_000_000}, {"cpu": 32, "gpu": 128}),
    "dpo": Workload(
        "SmolLM2-135M-Instruct LoRA DPO on HH-RLHF harmless-base pairs (max length 384)", "smollm2_hh_dpo_lora.yaml",
        ("trl_script", "llmtune"), {"cpu": 14_000, "gpu": 1_000_000}, {"cpu": 2, "gpu": 16}),
    "sft_lora_1b": Workload(  # no CPU budget: a GPU workload only
        "a 1.2B Llama (TinyLlama-1.1B's shape, SmolLM2's tokenizer, random weights) LoRA SFT on Alpaca (max length 512)",
        "smollm2_alpaca_lora.yaml", ("plain_trainer", "trl_tuned", "llmtune"), {"gpu": 200_000}, {"gpu": 8}),
}
SFT_WORKLOADS = ("sft_lora", "qlora", "sft_lora_1b")
HH_PAIRS = DATA / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"


def prepare(workload: str, work: Path, samples: int) -> None:
    """Write the workload's train and held-out files into `work`."""
    if workload in SFT_WORKLOADS:
        rows = json.loads(ALPACA_5K.read_text())
        rows = [r for r in rows if r["output"].strip()]
        (work / "train.json").write_text(json.dumps(rows[:samples]))
        (work / "eval.json").write_text(json.dumps(rows[-40:]))
        if workload == "sft_lora_1b":
            random_llama(work / "model")
    elif workload == "dpo":
        _write_preference_pairs(work)
    elif workload == "sst2":
        lines = (DATA / "sst2" / "train.tsv").read_text().splitlines()
        (work / "train.tsv").write_text("\n".join(lines[: samples + 1]) + "\n")
        (work / "eval.tsv").write_text((DATA / "sst2" / "dev.tsv").read_text())
    else:
        text = (DATA / "tinyshakespeare" / "input.txt").read_text()
        cut = int(len(text) * 0.9)
        (work / "train.txt").write_text(text[:cut])
        (work / "eval.txt").write_text(text[cut:cut + 40_000])


def random_llama(folder: Path, **shape) -> None:
    """A Llama of TinyLlama-1.1B's shape (22 layers, 2048 wide, 32 query and 4 key/value heads; 1.2B parameters with
    SmolLM2's 49k vocabulary) with seeded random weights, saved with SmolLM2's tokenizer: the speed of a 1B-class
    model without downloading one. `shape` overrides the config (the tests build a small one)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmtune.models.sources import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, **shape})
    torch.manual_seed(0)
    with torch.device("cuda" if _cuda() else "cpu"):  # initialising 1.2B weights takes a CPU tens of seconds
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model  # the systems' runs load it in processes of their own; this one keeps going for the whole benchmark
    if _cuda():
        torch.cuda.empty_cache()


def _write_preference_pairs(work: Path) -> None:
    """The HH pairs as prompt/chosen/rejected message lists (llmtune's reading of the transcripts, rows that
    cannot teach dropped), training pairs and the recipe's held-out pairs (every 5th) in separate files, so
    both systems read the very same rows."""
    from transformers import AutoTokenizer

    from llmtune import load_recipe
    from llmtune.data.preference import chat_prompt_tokens, load_preference_splits
    from llmtune.models.sources import resolve_model

    recipe = load_recipe(REPO / "recipes" / WORKLOADS["dpo"].recipe, [f"data.train_file={HH_PAIRS}"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.model.name).path)
    splits, _, _ = load_preference_splits(recipe.data, recipe.training.seed, True, chat_prompt_tokens(tokenizer),
                                          recipe.pref.max_prompt_length)
    for name, file in (("train", "train.jsonl"), ("eval", "eval.jsonl")):
        rows = splits[name].select_columns(["prompt", "chosen", "rejected"])
        (work / file).write_text("".join(json.dumps(row) + "\n" for row in rows))


def llmtune_overrides(workload: str, work: Path, args) -> list[str]:
    common = [f"training.batch_size={args.batch_size}", "training.gradient_accumulation=1",
              f"training.learning_rate={args.learning_rate}", "training.epochs=100", "training.warmup=0",
              "training.scheduler=linear", "training.eval_every=no", "training.save_every=no",
              f"training.precision={args.precision}", f"training.compile={getattr(args, 'compile', False)}",
              "data.validation_fraction=0", f"output.dir={work / 'run'}", "output.overwrite=true",  # each round's
              f"training.seed={_seed(args)}"]  # run replaces the last one's scratch folder
    if workload in SFT_WORKLOADS:
        model = [f"model.name={work / 'model'}"] if workload == "sft_lora_1b" else []  # every system loads it
        return common + model + ["data.dataset=null", f"data.train_file={work / 'train.json'}",
                                 "data.eval_split=null", "lm.generation_prompts=[]"]
    if workload == "sst2":
        return common + ["data.dataset=null", f"data.train_file={work / 'train.tsv'}", "data.eval_split=null"]
    if workload == "dpo":
        return common + [f"data.train_file={work / 'train.jsonl'}", "data.holdout_every=null",
                         "lm.generation_prompts=[]"]
    return common + ["data.dataset=null", f"data.train_file={work / 'train.txt'}", "data.eval_split=null"]


def build(workload: str, system: str, args, work: Path):
    """The Trainer of one system on one workload (nothing trained yet)."""
    from llmtune import load_recipe

    recipe = load_recipe(REPO / "recipes" / WORKLOADS[workload].recipe, llmtune_overrides(workload, work, args))
    if system == "llmtune":
        from llmtune import build_trainer

        return build_trainer(recipe)
    if workload == "dpo":
        return trl_dpo_script(recipe, args, work)
    plain = _plain_sft if workload in SFT_WORKLOADS else {"sst2": _plain_sst2, "pretrain": _plain_pretrain}[workload]
    return plain(recipe, args, work, trl=system if system.startswith("trl") else None)


def _training_args(args, work: Path, **extra) -> dict:
    return dict(output_dir=str(work / "out"), per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, num_train_epochs=100, logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", use_cpu=not _cuda(), seed=_seed(args), **extra)


def _seed(args) -> int:
    """The run's seed: speed.py gives each round its own (42, 43, ...), the same for every system in a round."""
    return int(getattr(args, "seed", None) or 42)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _lora(recipe, task_type: str):
    from peft import LoraConfig

    from llmtune.models.adapters import default_target_modules

    method = recipe.method
    return LoraConfig(task_type=task_type, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=method.target_modules or default_target_modules(
                          "bert" if task_type == "SEQ_CLS" else "llama"))


def alpaca_messages(row: dict) -> list[dict]:
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _smollm2(recipe, attention: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from llmtune.models.sources import resolve_model

    path = resolve_model(recipe.model.name).path
    quantization = None
    if recipe.method.quantization == "4bit":  # the bitsandbytes docs' QLoRA setting
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16 if _cuda() else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quantization,
                                                 attn_implementation=attention)
    return model, AutoTokenizer.from_pretrained(path)


def _plain_sft(recipe, args, work: Path, trl: str | None):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from llmtune.run.training import transformers_optimizer

    set_seed(_seed(args))  # the adapters' initial weights follow the round's seed, as llmtune's do
    if trl:
        tuned = trl == "trl_tuned"
        model, tokenizer = _smollm2(recipe, tuned_attention(args.precision) if tuned else "sdpa")
        return trl_sft_trainer(model, tokenizer, recipe, args, work, work / "train.json", tuned)
    model, tokenizer = _smollm2(recipe)
    data = plain_sft_data(tokenizer, work / "train.json", recipe.data.max_length)
    if recipe.method.quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, _lora(recipe, "CAUSAL_LM"))
    optimizer = transformers_optimizer(recipe.training.optimizer)  # the QLoRA docs' 8-bit (paged on CUDA) AdamW
    return Trainer(model=model, args=TrainingArguments(**_training_args(args, work, bf16=args.precision == "bf16",
                                                                        optim=optimizer)),
                   train_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                   processing_class=tokenizer)


def plain_sft_data(tokenizer, train_file: Path, max_length: int):
    """The transformers docs' way: chat-formatted text, labels = inputs (the collator pads per batch)."""
    from datasets import load_dataset

    def tokenize(row):
        text = tokenizer.apply_chat_template(alpaca_messages(row), tokenize=False)
        return tokenizer(text, truncation=True, max_length=max_length)

    rows = load_dataset("json", data_files=str(train_file), split="train")
    return rows.map(tokenize, remove_columns=rows.column_names)


def tuned_attention(precision: str) -> str:
    """The attention implementation llmtune picks for padding-free batches (flash attention 2 on CUDA where it is
    installed; else its per-sample SDPA, registered with transformers by importing the module)."""
    from llmtune.kernels.attention import attention_for

    return attention_for("auto", padding_free=True, precision=precision)


def trl_sft_trainer(model, tokenizer, recipe, args, work: Path, train_file: Path, tuned: bool = False):
    """TRL's SFTTrainer on prompt/completion conversations (it tokenizes in its constructor), with its SFTConfig
    defaults or, tuned, as its docs teach for speed. Tuned batches are padding-free without packing, which trl
    runs only without max_length (it could not enforce it): Alpaca answers rarely reach 512 tokens."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=str(train_file), split="train")
    data = rows.map(lambda row: {"prompt": alpaca_messages(row)[:1], "completion": alpaca_messages(row)[1:]},
                    remove_columns=rows.column_names)
    speed = {}
    if tuned:  # completion_only_loss is trl's default for prompt/completion rows: the answer alone is trained
        speed = dict(padding_free=True, gradient_checkpointing=False, bf16=args.precision == "bf16",
                     completion_only_loss=True)
    config = SFTConfig(**_training_args(args, work), max_length=None if tuned else recipe.data.max_length, **speed)
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=_lora(recipe, "CAUSAL_LM"))


def sft_preprocessing_seconds(system: str, args, work: Path, train_file: Path) -> float:
    """Seconds from the raw Alpaca file to the tokenized training set, the way `system` does it, with the
    tokenizer already loaded (every system needs it anyway). TRL tokenizes inside SFTTrainer's constructor, so its
    time includes wrapping the (already loaded) model in LoRA. llmtune's time is its `prepare_data` given the loaded
    tokenizer: the cache key, then the cached splits or the tokenization."""
    import time

    from llmtune import load_recipe

    recipe = load_recipe(REPO / "recipes" / WORKLOADS["sft_lora"].recipe, [
        "data.dataset=null", f"data.train_file={train_file}", "data.validation_fraction=0", "data.eval_split=null",
        f"output.dir={work / 'run'}"])
    if system == "llmtune":
        from llmtune.models.sources import resolve_source
        from llmtune.models.tokenizers import load_lm_tokenizer
        from llmtune.tasks import causal_lm

        path = resolve_source(recipe).path
        loaded = load_lm_tokenizer(recipe, True, path)
        start = time.perf_counter()
        causal_lm.prepare_data(recipe, path, loaded)
        return time.perf_counter() - start
    model, tokenizer = _smollm2(recipe)
    args.learning_rate, args.precision = recipe.training.learning_rate, "fp32"
    start = time.perf_counter()
    if system == "trl":
        trl_sft_trainer(model, tokenizer, recipe, args, work, train_file)
    else:
        plain_sft_data(tokenizer, train_file, recipe.data.max_length)
    return time.perf_counter() - start


def trl_dpo_script(recipe, args, work: Path):
    """DPO the way trl's docs teach it: the model, a LoraConfig and DPOConfig's defaults (activation checkpointing
    on), conversational prompt/chosen/rejected rows; the recipe's beta and max length, and the precision that is
    fastest on the machine (DPOConfig's bf16 default is emulated, several times slower, on a CPU without it)."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _smollm2(recipe)
    data = load_dataset("json", data_files=str(work / "train.jsonl"), split="train")
    config = DPOConfig(**_training_args(args, work), beta=recipe.pref.beta, max_length=recipe.data.max_length,
                       bf16=args.precision == "bf16")
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=_lora(recipe, "CAUSAL_LM"))


def _plain_sst2(recipe, args, work: Path, trl: str | None):
    from datasets import load_dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from llmtune.models.sources import resolve_model

    path = resolve_model(recipe.model.name).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(_seed(args))  # the classifier head and LoRA weights start as llmtune's (seeded before the model is built)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = load_dataset("csv", data_files=str(work / "train.tsv"), delimiter="\t", split="train")
    data = rows.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=recipe.data.max_length),
                    batched=True, remove_columns=["sentence"])
    model = get_peft_model(model, _lora(recipe, "SEQ_CLS"))
    return Trainer(model=model, args=TrainingArguments(**_training_args(args, work, bf16=args.precision == "bf16")),
                   train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)


def _plain_pretrain(recipe, args, work: Path, trl: str | None):
    """The transformers docs' causal-LM recipe: tokenize, concatenate and cut into blocks, Trainer. Same
    tokenizer and initial model as llmtune's (its tokenizer trainer and model builder, same seed)."""
    from datasets import load_dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from llmtune.models.loading import ensure_pad_token
    from llmtune.models.scratch import build_model, train_tokenizer

    rows = load_dataset("text", data_files=str(work / "train.txt"), split="train")
    tokenizer = train_tokenizer(iter(rows["text"]), recipe.scratch.vocab_size)
    ensure_pad_token(tokenizer)
    set_seed(_seed(args))
    model = build_model(recipe.scratch, tokenizer)
    block = recipe.data.max_length

    def group_texts(batch):
        ids = [t for text in batch["text"] if text for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        usable = len(ids) // block * block
        return {"input_ids": [ids[i:i + block] for i in range(0, usable, block)]}

    data = rows.map(group_texts, batched=True, batch_size=2000, remove_columns=["text"])
    return Trainer(model=model, args=TrainingArguments(**_training_args(args, work, bf16=args.precision == "bf16")),
                   train_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                   processing_class=tokenizer)
