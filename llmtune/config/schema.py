"""The recipe schema: every key a recipe may set, its type, default and meaning.

The `help` text of each field is the reference documentation, and its bounds (ge/gt/le/lt) and choices (from
`vocab.py`) are the valid values; `explain.py` prints them all (`llmtune validate --explain`). Cross-field rules
live in `rules.py`; loading and command-line overrides in `loader.py`. The sections only some
tasks read (lm, pref, scratch, image, distill, sweep) are in `task_sections.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmtune.config.fields import _field
from llmtune.config.task_sections import (
    DistillConfig,
    ImageConfig,
    LMConfig,
    PreferenceConfig,
    RLConfig,
    ScratchConfig,
    SweepConfig,
)
from llmtune.config.vocab import DTYPES, PRECISIONS, STORAGE_DTYPES, TASKS, TRACKERS

__all__ = ["DistillConfig", "ImageConfig", "LMConfig", "PreferenceConfig", "ScratchConfig", "SweepConfig"]


@dataclass
class ModelConfig:
    name: str = _field(
        "minilm",
        "Checkpoint to start from: a Hugging Face Hub id (org/name), a local folder, a single .gguf file, or "
        "a short offline name of a registry-installed checkpoint ('minilm', 'smollm2-135m-instruct').",
        path=True,
    )
    revision: str | None = _field(None, "Hub branch, tag or commit to load (Hub ids only).")
    dtype: str = _field(
        "float32", "dtype the weights are loaded in. Training precision is `training.precision`.", choices=DTYPES
    )
    trust_remote_code: bool = _field(
        False, "Run modelling code shipped with the checkpoint. Only turn on for checkpoints you trust."
    )
    attention: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = _field(
        "auto",
        "Attention kernel: auto, sdpa, eager, flash_attention_2 or sdpa_varlen (llmtune's per-sample SDPA for "
        "padding-free batches; on a GPU, one masked SDPA call for rows up to 4096 tokens). auto: flash_attention_2 "
        "on CUDA when flash-attn is installed and training runs in bf16/fp16, else sdpa_varlen for padding-free "
        "causal-LM batches, else sdpa.",
    )
    init: Literal["pretrained", "scratch"] = _field(
        "pretrained",
        "pretrained: load `name`. scratch: build a new model from the `scratch` section (random weights, "
        "a BPE tokenizer trained on the training data unless `name` points at a tokenizer to reuse).",
    )
    keep_layers: list[int] | None = _field(
        None,
        "Structured pruning: keep only these transformer blocks (0-based) of the loaded checkpoint, e.g. [0, 2, 4]. "
        "The saved model is an ordinary, smaller checkpoint of the same architecture.",
        ge=0,
    )
    num_layers: int | None = _field(
        None, "Structured pruning: keep this many transformer blocks, spread evenly (6 -> 3 keeps blocks 0, 2, 4).", ge=1
    )


@dataclass
class DataConfig:
    dataset: str | None = _field(
        None,
        "Hub dataset id or a local folder (saved with `save_to_disk`, or holding data files). Leave empty "
        "and set `train_file` to train on local files.",
        path=True,
    )
    subset: str | None = _field(None, "Dataset configuration name on the Hub (e.g. 'sst2' of 'nyu-mll/glue').")
    train_split: str = _field("train", "Split of `dataset` to train on.")
    eval_split: str | None = _field(None, "Split of `dataset` to evaluate on.")
    test_split: str | None = _field(None, "Split of `dataset` to predict on (labels optional).")
    train_file: str | None = _field(
        None, "Local training file: .json, .jsonl, .csv, .tsv, .parquet or .txt.", path=True
    )
    eval_file: str | None = _field(None, "Local evaluation file (same formats as `train_file`).", path=True)
    test_file: str | None = _field(
        None, "Local file to predict on after training; predictions go to the run directory.", path=True
    )
    validation_fraction: float = _field(
        0.0, "Fraction of the training data held out for evaluation when no eval split or file is given.", ge=0, lt=1
    )
    holdout_every: int | None = _field(
        None,
        "Hold out every N-th training row for evaluation (0-based row index % N == N-1): a fixed split that does "
        "not move with the seed, e.g. 5 for the HH-RLHF pairs' documented 1,850 / 462 split.",
        ge=2,
    )
    text_column: str = _field("text", "Column holding the text (the first sentence of a pair).")
    text_pair_column: str | None = _field(None, "Column holding the second sentence of a sentence pair.")
    label_column: str = _field("label", "Column holding the label (strings or integers).")
    label_names: list[str] | None = _field(
        None, "Names for integer labels 0..N-1, e.g. [negative, positive]. String labels name themselves."
    )
    max_train_samples: int | None = _field(
        None, "Use N training rows, picked at random (seeded by training.seed).", ge=1
    )
    max_eval_samples: int | None = _field(None, "Use only the first N evaluation rows.", ge=1)
    max_test_samples: int | None = _field(None, "Use only the first N test rows.", ge=1)
    format: Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt"] = _field(
        "auto",
        "Causal-LM data layout. text: plain text (concatenated, cut into max_length blocks). prompt_completion: "
        "prompt/completion columns. alpaca: instruction/input/output. messages: lists of {role, content}. "
        "sharegpt: conversations of {from, value}. auto: detect from the columns.",
    )
    columns: dict[str, str] = _field(
        {},
        "Column mapping for causal-LM formats, standard name -> your column, e.g. {instruction: question, "
        "output: answer} or {messages: dialog}. Standard names: text, prompt, completion, instruction, input, "
        "output, messages, conversations.",
    )
    system_prompt: str | None = _field(None, "System message put in front of every conversation that has none.")
    mixture: list[dict] = _field(
        [],
        "Extra training sources mixed in: a list of {train_file | dataset (+ subset, train_split), weight, "
        "format, columns}. weight scales the source's rows (0.5 = half of them, 2 = each twice).",
        path=True,
    )
    max_length: int = _field(
        128, "Longest tokenized input; longer inputs are truncated (text: the block size).", ge=1
    )
    preprocessing_workers: int | None = _field(None, "Processes for tokenization (default: one).", ge=1)


@dataclass
class MethodConfig:
    type: Literal["full", "lora", "dora"] = _field(
        "full", "full: train every weight. lora: low-rank adapters. dora: weight-decomposed LoRA."
    )
    r: int = _field(8, "LoRA rank.", ge=1)
    alpha: int = _field(16, "LoRA scaling numerator (the update is scaled by alpha / r).", ge=1)
    dropout: float = _field(
        0.0,
        "Dropout on the LoRA input (peft's default, 0). Each adapted layer draws its own mask: on a CPU that cost "
        "a quarter of a SmolLM2 LoRA step at 0.05 (benchmarks/speed.py).",
        ge=0, lt=1,
    )
    target_modules: str | list[str] | None = _field(
        None,
        "Modules that get adapters: a list of module names, 'all-linear' (every linear layer but the output "
        "head), or empty for the architecture's default (Llama family: q/k/v/o projections; GPT-2: c_attn; "
        "BERT: query/value; others: all-linear).",
    )
    modules_to_save: list[str] | None = _field(
        None, "Extra modules trained in full and saved with the adapter (default: the task head)."
    )
    quantization: Literal["none", "4bit", "8bit"] = _field(
        "none",
        "Load the frozen base weights quantized with bitsandbytes: 4bit (QLoRA) or 8bit. Needs type lora or "
        "dora; adapters and the task head stay in full precision.",
    )
    quant_type: Literal["nf4", "fp4"] = _field("nf4", "4-bit data type: nf4 (NormalFloat, the QLoRA default) or fp4.")
    double_quant: bool = _field(True, "4-bit: quantize the quantization constants too (saves ~0.4 bits per weight).")
    compute_dtype: str = _field(
        "auto", "dtype 4-bit layers compute in. auto: bfloat16 on GPUs that support it, float32 elsewhere.",
        choices=DTYPES,
    )
    quant_storage: str = _field(
        "auto",
        "dtype the packed 4-bit weights are stored in. auto: the compute dtype under FSDP (which needs one dtype "
        "per sharded block), uint8 otherwise.",
        choices=STORAGE_DTYPES,
    )


@dataclass
class TrainingConfig:
    epochs: float = _field(3.0, "Passes over the training data (ignored when `max_steps` is set).", ge=0)
    max_steps: int | None = _field(None, "Stop after this many optimizer steps.", ge=1)
    learning_rate: float = _field(5e-5, "Peak learning rate.", gt=0)
    scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "reduce_lr_on_plateau",
    ] = _field("linear", "Learning-rate schedule after warm-up.")
    warmup: float = _field(0.0, "Warm-up length: a fraction of training if below 1, else a number of steps.", ge=0)
    batch_size: int = _field(16, "Training examples per device per step.", ge=1)
    eval_batch_size: int | None = _field(
        None, "Examples per device per evaluation step (default: 2 x batch_size).", ge=1
    )
    gradient_accumulation: int = _field(1, "Steps whose gradients are summed before each optimizer step.", ge=1)
    global_batch_size: int | None = _field(
        None,
        "Examples per optimizer step over all processes. When set, gradient_accumulation is derived from it: "
        "global = batch_size x accumulation x processes, so the recipe trains the same on 1 or 8 GPUs.",
        ge=1,
    )
    weight_decay: float = _field(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 turns clipping off).", ge=0)
    optimizer: str = _field(
        "adamw",
        "adamw (torch's fused AdamW), adamw_foreach (its multi-tensor form), adamw_8bit (bitsandbytes), "
        "paged_adamw_8bit, paged_adamw_32bit, lion_8bit, paged_lion_8bit, adafactor, sgd, rmsprop - or any "
        "optimizer name transformers knows. paged_* variants "
        "page optimizer state to CPU memory on CUDA; elsewhere they run as their non-paged form.",
    )
    gradient_checkpointing: bool = _field(
        False, "Recompute activations in the backward pass: less memory, about 30% slower steps."
    )
    seed: int = _field(
        42,
        "Seed of every random number generator (Python, NumPy, torch; every process), set before the data is "
        "shuffled and the model is built: initial weights, new heads and adapters, sampling and dropout follow it.",
    )
    deterministic: bool = _field(
        False,
        "Ask torch for deterministic kernels everywhere (torch.use_deterministic_algorithms, deterministic cuDNN "
        "and CUDA matmul settings). On a CPU runs repeat bit for bit without it; on GPUs it costs speed.",
    )
    stop_grace_seconds: int | None = _field(
        None,
        "After SIGTERM (what Slurm and Kubernetes send before killing a job), llmtune finishes the current step, "
        "saves a checkpoint and exits with code 143. If that takes longer than this many seconds it exits at once "
        "without the new checkpoint (the previous complete one stays). Set it below the scheduler's kill delay. "
        "Empty: no limit.",
        ge=1,
    )
    precision: str = _field(
        "auto",
        "Mixed precision (autocast; weights stay fp32). auto: bf16 on GPUs that support it and on CPUs with "
        "native bf16 (avx512_bf16 or AMX), fp32 elsewhere.",
        choices=PRECISIONS,
    )
    eval_every: int | Literal["epoch", "no"] = _field(
        "epoch", "Evaluate every N steps, every 'epoch', or 'no'.", ge=1
    )
    save_every: int | Literal["epoch", "eval", "no"] = _field(
        "eval", "Checkpoint every N steps, every 'epoch', with each evaluation ('eval'), or 'no'.", ge=1
    )
    log_every: int = _field(10, "Log the training loss every N steps.", ge=1)
    report_to: list[str] = _field(
        [], "Experiment trackers that receive every logged value, through transformers' integrations: tensorboard "
        "(event files in the run's tensorboard/ folder), trackio, wandb, mlflow, comet_ml, neptune, clearml, dvclive, "
        "swanlab, codecarbon. Each needs its package installed; online trackers follow their own settings (e.g. "
        "WANDB_MODE=offline). Default: none (the run's trainer_state.json always exists, and report.html unless "
        "output.report is false).",
        choices=TRACKERS,
    )
    keep_checkpoints: int = _field(2, "Checkpoints kept on disk (the best one is always kept).", ge=1)
    metric_for_best: str | None = _field(
        None, "Eval metric that picks the best checkpoint and drives early stopping (default: the task's main metric)."
    )
    early_stopping_patience: int | None = _field(
        None, "Stop after this many evaluations without improvement of `metric_for_best`.", ge=1
    )
    dataloader_workers: int = _field(0, "Worker processes feeding batches.", ge=0)
    compile: bool = _field(
        False,
        "torch.compile the model (opt-in): the first steps pay for compilation, and varying batch shapes "
        "recompile; measure with benchmarks/speed.py before turning it on.",
    )
    liger_kernels: Literal["auto", "on", "off"] = _field(
        "auto",
        "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, ...) in place of the model's layers, for the decoders "
        "Liger supports. auto: on when training on CUDA with the liger-kernel package installed; on: required.",
    )
    release_memory: bool = _field(
        False,
        "On a CPU (glibc), after optimizer steps hand the memory the heap holds free back to the OS (malloc_trim), "
        "at most 3% of the time in the trim itself. Lowers the peak resident memory where batch shapes vary a lot "
        "(SmolLM2 LoRA DPO: 3.94 rather than 4.31 GB), but the next step faults the pages back in: SFT LoRA ran "
        "10% slower for 3% less memory. Off: glibc keeps freed memory for reuse.",
    )
    group_by_length: bool = _field(
        True,
        "Padded batches: put samples of similar length in the same batch (the batches in random order), so little "
        "compute goes to padding. Classification batches are padded; causal-LM batches only with lm.padding_free "
        "off.",
    )
    trainer_args: dict[str, Any] = _field(
        {},
        "Extra keyword arguments for transformers' TrainingArguments that llmtune does not map itself, applied "
        "last, e.g. {adam_beta2: 0.95, lr_scheduler_kwargs: {min_lr: 1e-6}, neftune_noise_alpha: 5, ddp_timeout: "
        "7200}. Unknown names are refused, and so are arguments a recipe key already sets (learning_rate: use "
        "training.learning_rate).",
    )


@dataclass
class EvalConfig:
    metrics: list[str] | None = _field(
        None,
        "Metrics to report (empty: all of the task's). classification: accuracy, f1, precision, recall (macro "
        "averages), roc_auc (binary only). sft / pretrain: loss, perplexity and token accuracy are always reported.",
    )
    before_training: bool = _field(True, "Evaluate once before training so the run shows what fine-tuning changed.")
    benchmarks: list[str] = _field(
        [],
        "sft / pretrain / dpo / kto / orpo / simpo: standard benchmarks (lm-evaluation-harness task names) scored "
        "before and after training on the model in memory - the forgetting check: the report, metrics.json and the "
        "console flag a score that fell by more than its 95% interval. Offline, from `benchmark_data_dir`: "
        "arc_easy, arc_challenge, piqa, hellaswag, boolq, winogrande, mmlu (or mmlu_<subject>), gsm8k; any other "
        "lm-eval task when the Hub is reachable.",
    )
    benchmark_limit: int | None = _field(
        None, "Items per benchmark (the first N of each task; null: all). A few hundred keep the check quick on a "
        "CPU; the stderr columns say how precise the scores are.", ge=1)
    benchmark_num_fewshot: int | None = _field(None, "Few-shot examples per benchmark question (null: each task's "
                                               "default: 0, GSM8K 5).", ge=0)
    benchmark_batch_size: int = _field(8, "Benchmark requests per forward pass.", ge=1)
    benchmark_data_dir: str | None = _field(
        None, "Folder with the benchmark files in their published layouts (arc_easy/ARC-Easy-Test.jsonl, "
        "piqa/valid.jsonl, hellaswag/hellaswag_val_full.txt.bz2, mmlu/test/*.csv, ...). Default: "
        "$LLMTUNE_BENCHMARK_DATA; without either, tasks come from the Hub.", path=True)


@dataclass
class OutputConfig:
    dir: str = _field(
        "runs/{task}-{model}-{time}",
        "Run directory (relative to the current folder). {task}, {model} and {time} (YYYYmmdd-HHMMSS) are filled in.",
    )
    overwrite: bool = _field(
        False, "Replace an existing run in `dir`. Off: a directory that already holds a run is refused."
    )
    save: Literal["auto", "adapter", "merged", "full"] = _field(
        "auto",
        "What the run leaves: 'adapter' (LoRA/DoRA weights + head), 'merged' (adapter folded into a full-"
        "precision copy of the base; the adapter is kept in adapter/), 'full' (the whole model). auto: adapter "
        "for lora/dora, full for full fine-tuning.",
    )
    report: bool = _field(
        True,
        "Write report.html and plots/*.png when the run ends (matplotlib, about 0.05 s a plot). false: skip them, "
        "e.g. for many short runs; `llmtune report RUN_DIR` draws them later from the run's saved history.",
    )
    push_to_hub: str | None = _field(
        None,
        "Hub repo id (user/name) to publish the saved model to after training, with a generated model card. "
        "The token comes from `hf auth login` or HF_TOKEN; HF_ENDPOINT points at a private hub.",
    )
    hub_private: bool = _field(False, "Create the pushed repo as private.")
    license: str | None = _field(
        None, "License written in the model card (default: the base model's license where llmtune knows it)."
    )


@dataclass
class Recipe:
    task: str = _field(
        "classification",
        "What to train. classification: labelled text -> labels. image_classification: labelled images -> labels. "
        "distill: text classification taught by a finished run (distill.teacher). sft: instructions / chats on a causal LM. "
        "pretrain: plain text on a causal LM (continued pretraining, or from scratch with model.init=scratch). "
        "dpo: preference pairs (prompt, chosen, rejected) against a reference model. kto: unpaired feedback "
        "(prompt, completion, label true/false). orpo, simpo: preference pairs without a reference model. "
        "reward: a reward model (one score per text) trained on preference pairs. grpo: online RL - completions "
        "sampled for prompts, scored by rl.rewards, the policy moved towards the better ones in each group.",
        choices=TASKS,
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
