"""Cross-field rules: every check that involves more than one recipe key lives here.

Each message says which keys clash and how to fix the recipe.
"""

from __future__ import annotations

import math

from llmtune.config.schema import Recipe
from llmtune.config.vocab import DPO_LOSSES, KTO_LOSSES, OPTIMIZERS, PREFERENCE_TASKS, TRACKERS, task_metrics
from llmtune.errors import LlmtuneError, did_you_mean


def check(recipe: Recipe) -> None:
    """Raise LlmtuneError on the first rule the recipe breaks."""
    data, method, training, output = recipe.data, recipe.method, recipe.training, recipe.output

    if bool(data.dataset) == bool(data.train_file):
        raise LlmtuneError(
            "Set exactly one data source: 'data.dataset' (a Hub id or local dataset folder) or "
            f"'data.train_file' (a local file). Got dataset={data.dataset!r}, train_file={data.train_file!r}. "
            "On the command line, clear the other one with e.g. data.dataset=null."
        )
    if not data.dataset:
        # Split names pick splits of data.dataset; with local files they mean nothing. A recipe written for the
        # Hub (eval_split: validation) switched to files on the command line (data.dataset=null
        # data.train_file=... data.eval_file=...) should simply work.
        for key in ("eval_split", "test_split"):
            if getattr(data, key) and not getattr(data, key.replace("_split", "_file")):
                file_key = key.replace("_split", "_file")
                raise LlmtuneError(
                    f"'data.{key}' is {getattr(data, key)!r}, a split of 'data.dataset', but data.dataset is empty "
                    f"(training reads data.train_file). Give the file instead with data.{file_key}=PATH, or "
                    f"drop the split with data.{key}=null."
                )
            setattr(data, key, None)
    if data.eval_split and data.eval_file:
        raise LlmtuneError(
            f"Both 'data.eval_split' ({data.eval_split!r}) and 'data.eval_file' ({data.eval_file!r}) are set; "
            "keep one of them."
        )
    if not 0.0 <= data.validation_fraction < 1.0:
        raise LlmtuneError(f"'data.validation_fraction' is {data.validation_fraction}; it must be in [0, 1).")
    if data.holdout_every is not None and (data.holdout_every < 2 or data.validation_fraction or data.eval_split
                                           or data.eval_file):
        raise LlmtuneError(
            f"'data.holdout_every' is {data.holdout_every}: it must be 2 or more, and it is the eval set, so "
            "data.validation_fraction, data.eval_split and data.eval_file must be empty beside it."
        )
    if data.validation_fraction and (data.eval_split or data.eval_file):
        raise LlmtuneError(
            "'data.validation_fraction' carves an eval set out of the training data, but an eval set is already "
            "given ('data.eval_split' or 'data.eval_file'). Set data.validation_fraction=0 or drop the eval set."
        )
    for key in ("max_length", "max_train_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(data, key)
        if value is not None and value <= 0:
            raise LlmtuneError(f"'data.{key}' is {value}; it must be a positive number (or empty for no limit).")

    if method.type in ("lora", "dora") and (method.r <= 0 or method.alpha <= 0):
        raise LlmtuneError(f"'method.r' ({method.r}) and 'method.alpha' ({method.alpha}) must be positive.")
    if method.quantization != "none":
        if method.type == "full":
            raise LlmtuneError(
                f"'method.quantization' is {method.quantization!r} with method.type=full, but quantized weights "
                "cannot be trained directly. Use method.type=lora (QLoRA) or dora, or method.quantization=none."
            )
        if recipe.model.init == "scratch":
            raise LlmtuneError(
                "'method.quantization' needs pretrained weights to quantize, but model.init is 'scratch'. "
                "Set method.quantization=none."
            )
        if output.save == "full":
            raise LlmtuneError(
                "'output.save' is 'full', but the base is quantized: a full save would write low-precision "
                "weights. Use output.save=adapter, or merged (the adapter is merged into a full-precision base)."
            )
    if method.type == "full" and output.save in ("adapter", "merged"):
        raise LlmtuneError(
            f"'output.save' is {output.save!r} but 'method.type' is 'full': there is no adapter. "
            "Use output.save=full (or auto), or train with method.type=lora."
        )

    for key in ("batch_size", "gradient_accumulation", "log_every", "keep_checkpoints"):
        if getattr(training, key) <= 0:
            raise LlmtuneError(f"'training.{key}' is {getattr(training, key)}; it must be at least 1.")
    if training.global_batch_size is not None:
        if training.global_batch_size <= 0:
            raise LlmtuneError(f"'training.global_batch_size' is {training.global_batch_size}; it must be positive.")
        if training.gradient_accumulation != 1:
            raise LlmtuneError(
                f"Both 'training.global_batch_size' ({training.global_batch_size}) and 'training.gradient_accumulation' "
                f"({training.gradient_accumulation}) are set, and the first decides the second. Keep one of them."
            )
    for key in ("weight_decay", "max_grad_norm", "warmup"):
        if getattr(training, key) < 0:
            raise LlmtuneError(f"'training.{key}' is {getattr(training, key)}; it must be 0 or more.")
    if not 0 <= method.dropout < 1:
        raise LlmtuneError(f"'method.dropout' is {method.dropout}; it must be in [0, 1) (0 turns dropout off).")
    if training.learning_rate <= 0:
        raise LlmtuneError(f"'training.learning_rate' is {training.learning_rate}; it must be positive, e.g. 5e-5.")
    if training.max_steps is not None and training.max_steps <= 0:
        raise LlmtuneError(f"'training.max_steps' is {training.max_steps}; leave it empty or make it positive.")
    if training.max_steps is None and training.epochs <= 0:
        raise LlmtuneError(f"'training.epochs' is {training.epochs}; it must be positive (or set training.max_steps).")
    for key in ("eval_every", "save_every"):
        value = getattr(training, key)
        if isinstance(value, int) and value <= 0:
            raise LlmtuneError(f"'training.{key}' is {value}; give a positive number of steps or 'epoch'.")
    evaluates = training.eval_every != "no"
    if training.save_every == "eval" and not evaluates:
        raise LlmtuneError(
            "'training.save_every' is 'eval' but 'training.eval_every' is 'no'. "
            "Set training.save_every to a number of steps or 'epoch'."
        )
    if training.early_stopping_patience is not None:
        if training.early_stopping_patience <= 0:
            raise LlmtuneError("'training.early_stopping_patience' must be at least 1 (or empty to turn it off).")
        if not evaluates:
            raise LlmtuneError(
                "'training.early_stopping_patience' needs evaluations: set training.eval_every to N or 'epoch'."
            )
        if not (data.eval_split or data.eval_file or data.validation_fraction):
            raise LlmtuneError(
                "'training.early_stopping_patience' needs an eval set: set data.eval_split, data.eval_file "
                "or data.validation_fraction."
            )

    if training.optimizer not in OPTIMIZERS:
        from transformers.training_args import OptimizerNames  # only for names that are not llmtune's own

        optimizers = sorted({*OPTIMIZERS, *(o.value for o in OptimizerNames)})
        if training.optimizer not in optimizers:
            raise LlmtuneError(
                f"'training.optimizer' is {training.optimizer!r}, which is not an optimizer llmtune knows."
                f"{did_you_mean(training.optimizer, optimizers)} Common choices: {', '.join(OPTIMIZERS)}."
            )
    if training.stop_grace_seconds is not None and training.stop_grace_seconds <= 0:
        raise LlmtuneError(
            f"'training.stop_grace_seconds' is {training.stop_grace_seconds}; give a positive number of seconds, "
            "or leave it empty for no limit."
        )
    if output.push_to_hub:
        check_repo_id(output.push_to_hub, "output.push_to_hub")

    _check_metrics(recipe)
    _check_trackers(recipe.training.report_to)
    _check_causal_lm(recipe)
    _check_preference(recipe)
    _check_images(recipe)
    _check_compression(recipe)


def check_repo_id(repo_id: str, where: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LlmtuneError(
            f"{where} is {repo_id!r}, which is not a valid Hub repo id ({str(exc).splitlines()[0]}). Use "
            "'user/name' or 'org/name': letters, digits, '-', '_' and '.', at most 96 characters."
        ) from None


MIXTURE_KEYS = ("train_file", "dataset", "subset", "train_split", "weight", "format", "columns")


def _check_trackers(names: list[str]) -> None:
    """Each tracker is one transformers knows, and its package is installed (looked up, not imported)."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise LlmtuneError(
                f"'training.report_to' names {name!r}, which is not a tracker llmtune knows.{did_you_mean(name, TRACKERS)} "
                f"Available: {', '.join(TRACKERS)}; or leave the list empty."
            )
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise LlmtuneError(
                f"'training.report_to' names {name!r}, but its package is not installed: pip install {package} "
                f"(or drop {name!r} from training.report_to)."
            )


def _check_metrics(recipe: Recipe) -> None:
    valid = task_metrics(recipe.task)
    metrics = recipe.eval.metrics or list(valid)
    for name in metrics:
        if name not in valid:
            raise LlmtuneError(
                f"'eval.metrics' names {name!r}, which the {recipe.task} task does not have."
                f"{did_you_mean(name, valid)} Available: {', '.join(valid)}."
            )
    best = recipe.training.metric_for_best
    if best is not None and best != "loss" and best not in metrics:
        raise LlmtuneError(
            f"'training.metric_for_best' is {best!r}, which is not among 'eval.metrics' "
            f"({', '.join(metrics)}) nor 'loss'. Add it to eval.metrics or pick one of those."
        )


def _check_causal_lm(recipe: Recipe) -> None:
    data, lm = recipe.data, recipe.lm
    if recipe.task == "image_classification":
        return
    if recipe.task in ("classification", "reward", "distill"):
        if recipe.model.init == "scratch" and recipe.task != "distill":
            raise LlmtuneError(
                f"'model.init' is 'scratch', but {recipe.task} starts from a pretrained checkpoint. "
                "Use task=pretrain to build a model from scratch, then classify with model.name=<that run>."
            )
        return
    if recipe.model.init == "scratch" and data.max_length > recipe.scratch.context_length:
        raise LlmtuneError(
            f"'data.max_length' is {data.max_length}, longer than the model built from scratch can see "
            f"('scratch.context_length' is {recipe.scratch.context_length}). Lower data.max_length or raise "
            "scratch.context_length."
        )
    if recipe.task == "pretrain" and data.format not in ("auto", "text"):
        raise LlmtuneError(
            f"'data.format' is {data.format!r}, but task 'pretrain' trains on plain text. "
            "Use task=sft for instruction or chat data, or data.format=text."
        )
    if recipe.task == "sft" and data.format == "text" and lm.loss_on == "assistant":
        raise LlmtuneError(
            "'lm.loss_on' is 'assistant', but data.format=text has no assistant turns. "
            "Set lm.loss_on=all, or use a prompt_completion / alpaca / messages / sharegpt format."
        )
    if lm.stride is not None and not 0 < lm.stride <= data.max_length:
        raise LlmtuneError(
            f"'lm.stride' is {lm.stride}; it must be between 1 and data.max_length ({data.max_length})."
        )
    if lm.max_new_tokens <= 0:
        raise LlmtuneError(f"'lm.max_new_tokens' is {lm.max_new_tokens}; it must be at least 1.")
    for i, source in enumerate(data.mixture):
        where = f"data.mixture[{i}]"
        unknown = [k for k in source if k not in MIXTURE_KEYS]
        if unknown:
            raise LlmtuneError(
                f"'{where}' has unknown key {unknown[0]!r}.{did_you_mean(unknown[0], MIXTURE_KEYS)} "
                f"Valid keys: {', '.join(MIXTURE_KEYS)}."
            )
        if bool(source.get("train_file")) == bool(source.get("dataset")):
            raise LlmtuneError(f"'{where}' needs exactly one of train_file or dataset.")
        weight = source.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise LlmtuneError(f"'{where}.weight' is {weight!r}; it must be a positive number (1 = every row once).")


def _check_preference(recipe: Recipe) -> None:
    task, pref = recipe.task, recipe.pref
    if task not in (*PREFERENCE_TASKS, "reward"):
        return
    if recipe.model.init == "scratch":
        raise LlmtuneError(
            f"'model.init' is 'scratch', but task {task} tunes a model that can already write replies. Start from a "
            "pretrained or SFT checkpoint (model.name), e.g. an llmtune SFT run directory."
        )
    if recipe.data.format not in ("auto",):
        raise LlmtuneError(
            f"'data.format' is {recipe.data.format!r}, but preference data is detected from its columns "
            "(prompt/chosen/rejected, messages/chosen/rejected, chosen/rejected transcripts, prompt/completion/label). "
            "Leave data.format=auto and map other column names with data.columns."
        )
    if not math.isfinite(pref.beta) or pref.beta <= 0:
        raise LlmtuneError(f"'pref.beta' is {pref.beta}; it must be a positive number, e.g. 0.1.")
    if not 0 <= pref.label_smoothing < 0.5:
        raise LlmtuneError(f"'pref.label_smoothing' is {pref.label_smoothing}; it must be in [0, 0.5).")
    if pref.max_prompt_length is not None and not 0 < pref.max_prompt_length < recipe.data.max_length:
        raise LlmtuneError(
            f"'pref.max_prompt_length' is {pref.max_prompt_length}; it must be positive and below data.max_length "
            f"({recipe.data.max_length}) so that replies have room."
        )
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(pref, key) <= 0:
            raise LlmtuneError(f"'pref.{key}' is {getattr(pref, key)}; it must be positive (1 = unweighted).")
    if task == "kto" and recipe.training.batch_size < 2:
        raise LlmtuneError(
            f"'training.batch_size' is {recipe.training.batch_size}, but kto estimates its KL term from the other "
            "completions in a batch, so it needs at least 2 per device. Raise training.batch_size (use "
            "training.gradient_accumulation to keep memory down)."
        )
    if pref.reference and task in ("orpo", "simpo", "reward"):
        raise LlmtuneError(
            f"'pref.reference' is {pref.reference!r}, but task {task} uses no reference model "
            f"({'it is reference-free' if task != 'reward' else 'a reward model is trained from pairs alone'}). "
            "Remove pref.reference, or use task=dpo or kto to train against a reference."
        )
    valid = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "simpo": ("simpo",)}.get(task)
    if pref.loss_weights is not None and not isinstance(pref.loss, list):
        raise LlmtuneError(
            f"'pref.loss_weights' is {pref.loss_weights}, but 'pref.loss' is {pref.loss!r}, not a list of losses to "
            "weigh. Give both as lists of one length, e.g. pref.loss=[sigmoid, sft] pref.loss_weights=[1, 0.5]."
        )
    if valid is None or pref.loss is None:
        if pref.loss is not None:
            raise LlmtuneError(
                f"'pref.loss' is {pref.loss!r}, but task {task} has a single loss of its own. Remove pref.loss, or "
                "use task=dpo for the DPO family of losses."
            )
        return
    losses = [pref.loss] if isinstance(pref.loss, str) else list(pref.loss)
    for name in losses:
        if name not in valid:
            hint = " 'simpo' and 'orpo' are tasks of their own (task=simpo, task=orpo)." if name in ("simpo", "orpo") else ""
            raise LlmtuneError(
                f"'pref.loss' names {name!r}, which task {task} does not have.{did_you_mean(name, valid)}{hint} "
                f"Valid: {', '.join(valid)}."
            )
    if len(losses) > 1 and task != "dpo":
        raise LlmtuneError(f"'pref.loss' lists {len(losses)} losses; only task dpo combines several.")
    if losses == ["sft"]:
        raise LlmtuneError(
            "'pref.loss' is only 'sft', which ignores the rejected replies. Combine it with a preference loss, "
            "e.g. pref.loss=[sigmoid, sft], or train with task=sft."
        )
    if pref.loss_weights is not None and len(pref.loss_weights) != len(losses):
        raise LlmtuneError(
            f"'pref.loss_weights' has {len(pref.loss_weights)} weights for {len(losses)} losses ({', '.join(losses)}); "
            "give one weight per loss."
        )


def _check_images(recipe: Recipe) -> None:
    image, scratch = recipe.image, recipe.scratch
    images = recipe.task == "image_classification"
    if recipe.model.init == "scratch" and images != (scratch.architecture in ("cnn", "mlp")):
        fits = "cnn or mlp" if images else "gpt2 or llama"
        raise LlmtuneError(
            f"'scratch.architecture' is {scratch.architecture!r}, which does not fit task {recipe.task!r}: a model "
            f"from scratch for this task is {fits}. Set scratch.architecture accordingly."
        )
    if images and recipe.method.quantization != "none":
        raise LlmtuneError(
            f"'method.quantization' is {recipe.method.quantization!r}, but llmtune quantizes text models only. "
            "Image models here are small enough to train in full precision: set method.quantization=none."
        )
    if not 0 <= image.shift <= 0.5 or not 0 <= image.rotation <= 180:
        raise LlmtuneError(
            f"'image.shift' is {image.shift} and 'image.rotation' is {image.rotation}: shift is a fraction of the "
            "image size from 0 to 0.5, rotation degrees from 0 to 180 (0 turns either off)."
        )
    if image.size is not None and image.size < 4:
        raise LlmtuneError(f"'image.size' is {image.size}; give a side length of at least 4 pixels, or leave it empty.")
    if not 0 <= scratch.dropout < 1:
        raise LlmtuneError(f"'scratch.dropout' is {scratch.dropout}; it must be in [0, 1).")


def _check_compression(recipe: Recipe) -> None:
    model, distill = recipe.model, recipe.distill
    if model.keep_layers is not None or model.num_layers is not None:
        if model.keep_layers is not None and model.num_layers is not None:
            raise LlmtuneError(
                f"Both 'model.keep_layers' ({model.keep_layers}) and 'model.num_layers' ({model.num_layers}) are set; "
                "keep one: the list names the blocks, the number spreads them evenly."
            )
        if recipe.method.type != "full":
            raise LlmtuneError(
                f"'model.keep_layers' / 'model.num_layers' with method.type={recipe.method.type}: an adapter is saved "
                "against its base checkpoint, and the base reloads with all its blocks, so the adapter would not fit "
                "it. Prune in a full run (method.type=full), then train adapters on that run (model.name=<the run>)."
            )
        if model.init == "scratch" or recipe.task in PREFERENCE_TASKS:
            raise LlmtuneError(
                "'model.keep_layers' / 'model.num_layers' prune a pretrained checkpoint for the tasks classification, "
                "image_classification, distill, reward, sft and pretrain; with model.init=scratch set scratch.layers "
                f"instead (task here: {recipe.task}, init: {model.init})."
            )
    if recipe.task != "distill":
        if distill.teacher:
            raise LlmtuneError(
                f"'distill.teacher' is set, but task is {recipe.task!r}: only task distill reads it. Set task=distill "
                "or clear distill.teacher."
            )
        return
    if not distill.teacher:
        raise LlmtuneError(
            "task distill needs 'distill.teacher': the finished classification run (or model folder) the student "
            "learns from, e.g. distill.teacher=runs/sst2-teacher."
        )
    if model.init == "scratch":
        raise LlmtuneError("task distill starts the student from a checkpoint (model.name); set model.init=pretrained.")
    if not 0 <= distill.alpha <= 1 or distill.temperature <= 0:
        raise LlmtuneError(
            f"'distill.alpha' is {distill.alpha} and 'distill.temperature' is {distill.temperature}: alpha is a "
            "share from 0 to 1, the temperature a positive number (2 to 4 is usual)."
        )
