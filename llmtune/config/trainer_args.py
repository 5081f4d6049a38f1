"""`training.trainer_args`: extra transformers TrainingArguments that llmtune does not map from a recipe key.

The names are checked when the recipe loads. TrainingArguments' fields are read from the source of transformers'
training_args.py rather than by importing it, since that import pulls in torch (seconds) and a recipe check must
stay light; where that file cannot be read the class is imported after all.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
from pathlib import Path

from llmtune.errors import did_you_mean

# TrainingArguments that llmtune sets from a recipe key (llmtune/run/training.py): setting them through
# training.trainer_args would silently fight the recipe, so the recipe key is named instead.
MAPPED = {
    "output_dir": "output.dir", "overwrite_output_dir": "output.overwrite",
    "num_train_epochs": "training.epochs", "max_steps": "training.max_steps",
    "learning_rate": "training.learning_rate", "lr_scheduler_type": "training.scheduler",
    "warmup_steps": "training.warmup", "warmup_ratio": "training.warmup",
    "per_device_train_batch_size": "training.batch_size", "per_device_eval_batch_size": "training.eval_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation (or training.global_batch_size)",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm", "optim": "training.optimizer",
    "activation_checkpointing": "training.gradient_checkpointing",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "torch_compile": "training.compile", "use_liger_kernel": "training.liger_kernels", "seed": "training.seed",
    "full_determinism": "training.deterministic", "bf16": "training.precision", "fp16": "training.precision",
    "eval_strategy": "training.eval_every", "eval_steps": "training.eval_every",
    "eval_on_start": "eval.before_training", "save_strategy": "training.save_every",
    "save_steps": "training.save_every", "logging_steps": "training.log_every",
    "save_total_limit": "training.keep_checkpoints", "load_best_model_at_end": "training.metric_for_best",
    "metric_for_best_model": "training.metric_for_best", "greater_is_better": "training.metric_for_best",
    "dataloader_num_workers": "training.dataloader_workers", "train_sampling_strategy": "training.group_by_length",
    "group_by_length": "training.group_by_length", "report_to": "training.report_to",
    "push_to_hub": "output.push_to_hub", "hub_model_id": "output.push_to_hub", "hub_private_repo": "output.hub_private",
    # Decided by llmtune itself rather than by one recipe key:
    "remove_unused_columns": "the task (it keeps the columns its collator or trainer reads)",
    "average_tokens_across_devices": "the task (a classification loss is a mean over examples, not tokens)",
    "use_cpu": "the machine (llmtune trains on the GPU when there is one; CUDA_VISIBLE_DEVICES= hides it)",
    "resume_from_checkpoint": "the --resume flag of llmtune train",
    "fsdp": "an accelerate config (llmtune train --accelerate fsdp)",
    "fsdp_config": "an accelerate config (llmtune train --accelerate fsdp)",
    "deepspeed": "an accelerate config (llmtune train --accelerate deepspeed_zero3)",
}
# Set by llmtune to a fixed value, not from a recipe key: a recipe may change them here.
OVERRIDABLE = ("ddp_find_unused_parameters",)


@functools.lru_cache(maxsize=1)
def training_arguments_fields() -> frozenset[str]:
    """The keyword arguments transformers' TrainingArguments accepts (empty when transformers is missing)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return frozenset()
    source = Path(spec.origin).parent / "training_args.py"
    names = _dataclass_fields(source.read_text(), "TrainingArguments") if source.is_file() else set()
    if not names:  # the class moved or changed shape: ask the class itself
        import dataclasses

        from transformers import TrainingArguments

        names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    return frozenset(names)


def _dataclass_fields(source: str, class_name: str) -> set[str]:
    """The init fields a dataclass declares in its own body (annotated names, less `field(init=False)` ones)."""
    tree = ast.parse(source)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    names = set()
    for node in cls.body if cls else []:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation) or node.target.id.startswith("_"):
            continue
        call = node.value
        init_false = isinstance(call, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in call.keywords)
        if not init_false:
            names.add(node.target.id)
    return names


def trainer_args_problems(trainer_args: dict) -> list[str]:
    """One paragraph per name in `training.trainer_args` that TrainingArguments lacks or llmtune already sets."""
    problems = []
    known = training_arguments_fields()
    for key in trainer_args:
        if key in MAPPED:
            problems.append(
                f"'training.trainer_args' sets {key!r}, which llmtune already sets from {MAPPED[key]}. "
                f"Set that instead and drop {key} from training.trainer_args."
            )
        elif known and key not in known:
            version = importlib.metadata.version("transformers")
            problems.append(
                f"'training.trainer_args' sets {key!r}, which is not an argument of transformers' TrainingArguments "
                f"(transformers {version}).{did_you_mean(key, sorted(known - set(MAPPED)))} Its arguments are listed "
                "at https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments."
            )
    return problems
