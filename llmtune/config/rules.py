"""Cross-field rules: every check that involves more than one recipe key, one small named function each.

A rule reads the recipe and returns its problems (one paragraph each, saying which keys clash and how to fix the
recipe); it never changes the recipe. `check` runs the fields' own bounds and choices and every rule, and reports
all the problems at once. Limits of a single key live on the field (`fields.py`), not here.
"""

from __future__ import annotations

from collections.abc import Callable

from llmtune.config.fields import field_problems
from llmtune.config.schema import Recipe
from llmtune.config.task_rules import TASK_RULES
from llmtune.config.trainer_args import trainer_args_problems
from llmtune.config.vocab import OPTIMIZERS, TRACKERS, task_metrics
from llmtune.errors import LlmtuneError, did_you_mean

Rule = Callable[[Recipe], list[str]]
RULES: list[Rule] = []  # the general rules below; the task-specific ones (task_rules.py) run after them


def rule(function: Rule) -> Rule:
    """Register a cross-field rule; `check` runs them in the order they are written."""
    RULES.append(function)
    return function


def problems(recipe: Recipe) -> list[str]:
    """Every problem of the recipe: values outside their field's bounds or choices, then broken cross-field rules."""
    return [*field_problems(recipe), *(problem for each in (*RULES, *TASK_RULES) for problem in each(recipe))]


def check(recipe: Recipe) -> None:
    """Raise one LlmtuneError listing every problem of the recipe (numbered when there are several)."""
    found = problems(recipe)
    if len(found) == 1:
        raise LlmtuneError(found[0])
    if found:
        numbered = "\n".join(f"{i}. {problem}" for i, problem in enumerate(found, 1))
        raise LlmtuneError(f"The recipe has {len(found)} problems:\n{numbered}")


def check_repo_id(repo_id: str, where: str) -> None:
    problem = repo_id_problem(repo_id, where)
    if problem:
        raise LlmtuneError(problem)


def repo_id_problem(repo_id: str, where: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return (
            f"{where} is {repo_id!r}, which is not a valid Hub repo id ({str(exc).splitlines()[0]}). Use "
            "'user/name' or 'org/name': letters, digits, '-', '_' and '.', at most 96 characters."
        )
    return None


# --- data ---------------------------------------------------------------------------------------------------------


@rule
def one_data_source(recipe: Recipe) -> list[str]:
    data = recipe.data
    if bool(data.dataset) == bool(data.train_file):
        return [
            "Set exactly one data source: 'data.dataset' (a Hub id or local dataset folder) or "
            f"'data.train_file' (a local file). Got dataset={data.dataset!r}, train_file={data.train_file!r}. "
            "On the command line, clear the other one with e.g. data.dataset=null."
        ]
    return []


@rule
def splits_need_a_dataset(recipe: Recipe) -> list[str]:
    """A split without its file when training reads local files (the loader drops splits that have a file)."""
    data = recipe.data
    if data.dataset or not data.train_file:
        return []
    return [
        f"'data.{key}' is {getattr(data, key)!r}, a split of 'data.dataset', but data.dataset is empty "
        f"(training reads data.train_file). Give the file instead with data.{key.replace('_split', '_file')}=PATH, "
        f"or drop the split with data.{key}=null."
        for key in ("eval_split", "test_split") if getattr(data, key)
    ]


@rule
def one_eval_set(recipe: Recipe) -> list[str]:
    data = recipe.data
    if data.eval_split and data.eval_file:
        return [f"Both 'data.eval_split' ({data.eval_split!r}) and 'data.eval_file' ({data.eval_file!r}) are set; "
                "keep one of them."]
    return []


@rule
def holdout_is_the_eval_set(recipe: Recipe) -> list[str]:
    data = recipe.data
    others = {"validation_fraction": data.validation_fraction, "eval_split": data.eval_split,
              "eval_file": data.eval_file}
    given = [f"data.{key}={value!r}" for key, value in others.items() if value]
    if data.holdout_every is not None and given:
        return [
            f"'data.holdout_every' is {data.holdout_every}, which holds out the eval set, but {', '.join(given)} "
            "gives another one. Keep one: data.validation_fraction, data.eval_split and data.eval_file must be "
            "empty beside data.holdout_every."
        ]
    return []


@rule
def validation_fraction_without_eval_set(recipe: Recipe) -> list[str]:
    data = recipe.data
    if data.validation_fraction and (data.eval_split or data.eval_file):
        return [
            "'data.validation_fraction' carves an eval set out of the training data, but an eval set is already "
            "given ('data.eval_split' or 'data.eval_file'). Set data.validation_fraction=0 or drop the eval set."
        ]
    return []


# --- method and output ------------------------------------------------------------------------------------------------


@rule
def quantization_needs_an_adapter(recipe: Recipe) -> list[str]:
    method = recipe.method
    if method.quantization != "none" and method.type == "full":
        return [
            f"'method.quantization' is {method.quantization!r} with method.type=full, but quantized weights "
            "cannot be trained directly. Use method.type=lora (QLoRA) or dora, or method.quantization=none."
        ]
    return []


@rule
def quantization_needs_pretrained_weights(recipe: Recipe) -> list[str]:
    if recipe.method.quantization != "none" and recipe.model.init == "scratch":
        return ["'method.quantization' needs pretrained weights to quantize, but model.init is 'scratch'. "
                "Set method.quantization=none."]
    return []


@rule
def quantized_base_is_not_saved_full(recipe: Recipe) -> list[str]:
    if recipe.method.quantization != "none" and recipe.output.save == "full":
        return [
            "'output.save' is 'full', but the base is quantized: a full save would write low-precision "
            "weights. Use output.save=adapter, or merged (the adapter is merged into a full-precision base)."
        ]
    return []


@rule
def adapter_save_needs_an_adapter(recipe: Recipe) -> list[str]:
    save = recipe.output.save
    if recipe.method.type == "full" and save in ("adapter", "merged"):
        return [f"'output.save' is {save!r} but 'method.type' is 'full': there is no adapter. "
                "Use output.save=full (or auto), or train with method.type=lora."]
    return []


@rule
def valid_hub_repo(recipe: Recipe) -> list[str]:
    repo = recipe.output.push_to_hub
    problem = repo_id_problem(repo, "output.push_to_hub") if repo else None
    return [problem] if problem else []


# --- training -------------------------------------------------------------------------------------------------------


@rule
def accumulation_set_once(recipe: Recipe) -> list[str]:
    training = recipe.training
    if training.global_batch_size is not None and training.gradient_accumulation != 1:
        return [
            f"Both 'training.global_batch_size' ({training.global_batch_size}) and 'training.gradient_accumulation' "
            f"({training.gradient_accumulation}) are set, and the first decides the second. Keep one of them."
        ]
    return []


@rule
def training_has_a_length(recipe: Recipe) -> list[str]:
    training = recipe.training
    if training.max_steps is None and training.epochs <= 0:
        return [f"'training.epochs' is {training.epochs}; it must be positive (or set training.max_steps)."]
    return []


@rule
def saves_with_evaluations(recipe: Recipe) -> list[str]:
    if recipe.training.save_every == "eval" and recipe.training.eval_every == "no":
        return ["'training.save_every' is 'eval' but 'training.eval_every' is 'no'. "
                "Set training.save_every to a number of steps or 'epoch'."]
    return []


@rule
def early_stopping_needs_evaluations(recipe: Recipe) -> list[str]:
    data, training = recipe.data, recipe.training
    if training.early_stopping_patience is None:
        return []
    found = []
    if training.eval_every == "no":
        found.append("'training.early_stopping_patience' needs evaluations: set training.eval_every to N or 'epoch'.")
    if not (data.eval_split or data.eval_file or data.validation_fraction or data.holdout_every):
        found.append("'training.early_stopping_patience' needs an eval set: set data.eval_split, data.eval_file, "
                     "data.validation_fraction or data.holdout_every.")
    return found


@rule
def known_optimizer(recipe: Recipe) -> list[str]:
    name = recipe.training.optimizer
    if name in OPTIMIZERS:
        return []
    from transformers.training_args import OptimizerNames  # only for names that are not llmtune's own

    optimizers = sorted({*OPTIMIZERS, *(o.value for o in OptimizerNames)})
    if name in optimizers:
        return []
    return [f"'training.optimizer' is {name!r}, which is not an optimizer llmtune knows."
            f"{did_you_mean(name, optimizers)} Common choices: {', '.join(OPTIMIZERS)}."]


@rule
def trackers_installed(recipe: Recipe) -> list[str]:
    """Each tracker's package is installed (looked up, not imported); unknown names are the field's problem."""
    import importlib.util

    return [
        f"'training.report_to' names {name!r}, but its package is not installed: pip install {TRACKERS[name][1]} "
        f"(or drop {name!r} from training.report_to)."
        for name in recipe.training.report_to if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None
    ]


@rule
def trainer_args_known(recipe: Recipe) -> list[str]:
    return trainer_args_problems(recipe.training.trainer_args)


@rule
def metrics_of_the_task(recipe: Recipe) -> list[str]:
    valid = task_metrics(recipe.task)
    return [
        f"'eval.metrics' names {name!r}, which the {recipe.task} task does not have."
        f"{did_you_mean(name, valid)} Available: {', '.join(valid)}."
        for name in recipe.eval.metrics or [] if name not in valid
    ]


@rule
def best_metric_is_reported(recipe: Recipe) -> list[str]:
    metrics = recipe.eval.metrics or list(task_metrics(recipe.task))
    best = recipe.training.metric_for_best
    if best is not None and best != "loss" and best not in metrics:
        return [f"'training.metric_for_best' is {best!r}, which is not among 'eval.metrics' "
                f"({', '.join(metrics)}) nor 'loss'. Add it to eval.metrics or pick one of those."]
    return []
