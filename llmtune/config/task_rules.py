"""Cross-field rules of the task-specific sections: causal LMs (lm, data.mixture), preference tasks (pref), online
RL (rl), images, pruning and distillation. Like the rules in `rules.py`, each returns its problems and never changes
the recipe."""

from __future__ import annotations

import re
from typing import Any

from llmtune.config.schema import Recipe
from llmtune.config.vocab import (
    BUILTIN_REWARDS,
    CAUSAL_LM_TASKS,
    DPO_LOSSES,
    KTO_LOSSES,
    PREFERENCE_TASKS,
    REWARD_KEYS,
    REWARD_SOURCES,
)
from llmtune.errors import did_you_mean

MIXTURE_KEYS = ("train_file", "dataset", "subset", "train_split", "weight", "format", "columns")


# --- causal LMs -----------------------------------------------------------------------------------------------------


def scratch_models_learn_text_first(recipe: Recipe) -> list[str]:
    if recipe.task in ("classification", "reward") and recipe.model.init == "scratch":
        return [f"'model.init' is 'scratch', but {recipe.task} starts from a pretrained checkpoint. "
                "Use task=pretrain to build a model from scratch, then classify with model.name=<that run>."]
    return []


def max_length_fits_the_scratch_context(recipe: Recipe) -> list[str]:
    data, scratch = recipe.data, recipe.scratch
    if recipe.task in CAUSAL_LM_TASKS and recipe.model.init == "scratch" and data.max_length > scratch.context_length:
        return [
            f"'data.max_length' is {data.max_length}, longer than the model built from scratch can see "
            f"('scratch.context_length' is {scratch.context_length}). Lower data.max_length or raise "
            "scratch.context_length."
        ]
    return []


def benchmarks_score_causal_lms(recipe: Recipe) -> list[str]:
    if recipe.eval.benchmarks and recipe.task not in CAUSAL_LM_TASKS:
        return [f"'eval.benchmarks' is set for task {recipe.task}; benchmarks score causal language models "
                f"({', '.join(CAUSAL_LM_TASKS)}). Remove it, or benchmark a causal LM run with "
                "`llmtune eval RUN --tasks ...`."]
    return []


def pretrain_reads_plain_text(recipe: Recipe) -> list[str]:
    if recipe.task == "pretrain" and recipe.data.format not in ("auto", "text"):
        return [f"'data.format' is {recipe.data.format!r}, but task 'pretrain' trains on plain text. "
                "Use task=sft for instruction or chat data, or data.format=text."]
    return []


def plain_text_has_no_assistant_turns(recipe: Recipe) -> list[str]:
    if recipe.task == "sft" and recipe.data.format == "text" and recipe.lm.loss_on == "assistant":
        return ["'lm.loss_on' is 'assistant', but data.format=text has no assistant turns. "
                "Set lm.loss_on=all, or use a prompt_completion / alpaca / messages / sharegpt format."]
    return []


def stride_within_max_length(recipe: Recipe) -> list[str]:
    stride, max_length = recipe.lm.stride, recipe.data.max_length
    if recipe.task in CAUSAL_LM_TASKS and stride is not None and stride > max_length:
        return [f"'lm.stride' is {stride}; it must be between 1 and data.max_length ({max_length})."]
    return []


def mixture_sources(recipe: Recipe) -> list[str]:
    if recipe.task not in CAUSAL_LM_TASKS:
        return []
    return [problem for i, source in enumerate(recipe.data.mixture) for problem in _source_problems(i, source)]


def _source_problems(i: int, source: dict[str, Any]) -> list[str]:
    where, found = f"data.mixture[{i}]", []
    unknown = [k for k in source if k not in MIXTURE_KEYS]
    if unknown:
        found.append(f"'{where}' has unknown key {unknown[0]!r}.{did_you_mean(str(unknown[0]), MIXTURE_KEYS)} "
                     f"Valid keys: {', '.join(MIXTURE_KEYS)}.")
    if bool(source.get("train_file")) == bool(source.get("dataset")):
        found.append(f"'{where}' needs exactly one of train_file or dataset.")
    weight = source.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        found.append(f"'{where}.weight' is {weight!r}; it must be a positive number (1 = every row once).")
    return found


# --- preference tasks -------------------------------------------------------------------------------------------------


def preference_tunes_a_pretrained_model(recipe: Recipe) -> list[str]:
    if recipe.task in (*PREFERENCE_TASKS, "grpo") and recipe.model.init == "scratch":
        return [f"'model.init' is 'scratch', but task {recipe.task} tunes a model that can already write replies. "
                "Start from a pretrained or SFT checkpoint (model.name), e.g. an llmtune SFT run directory."]
    return []


def preference_data_is_detected(recipe: Recipe) -> list[str]:
    if recipe.task in (*PREFERENCE_TASKS, "reward") and recipe.data.format != "auto":
        return [
            f"'data.format' is {recipe.data.format!r}, but preference data is detected from its columns "
            "(prompt/chosen/rejected, messages/chosen/rejected, chosen/rejected transcripts, prompt/completion/label). "
            "Leave data.format=auto and map other column names with data.columns."
        ]
    return []


def prompts_leave_room_for_replies(recipe: Recipe) -> list[str]:
    longest, max_length = recipe.pref.max_prompt_length, recipe.data.max_length
    if recipe.task in (*PREFERENCE_TASKS, "reward") and longest is not None and longest >= max_length:
        return [f"'pref.max_prompt_length' is {longest}; it must be positive and below data.max_length "
                f"({max_length}) so that replies have room."]
    return []


def kto_batches_hold_two(recipe: Recipe) -> list[str]:
    if recipe.task == "kto" and recipe.training.batch_size < 2:
        return [
            f"'training.batch_size' is {recipe.training.batch_size}, but kto estimates its KL term from the other "
            "completions in a batch, so it needs at least 2 per device. Raise training.batch_size (use "
            "training.gradient_accumulation to keep memory down)."
        ]
    return []


def reference_needs_a_reference_task(recipe: Recipe) -> list[str]:
    task, reference = recipe.task, recipe.pref.reference
    if reference and task in ("orpo", "simpo", "reward"):
        why = "it is reference-free" if task != "reward" else "a reward model is trained from pairs alone"
        return [f"'pref.reference' is {reference!r}, but task {task} uses no reference model ({why}). "
                "Remove pref.reference, or use task=dpo or kto to train against a reference."]
    return []


def loss_weights_weigh_a_loss_list(recipe: Recipe) -> list[str]:
    pref = recipe.pref
    if recipe.task in (*PREFERENCE_TASKS, "reward") and pref.loss_weights is not None and not isinstance(pref.loss, list):
        return [
            f"'pref.loss_weights' is {pref.loss_weights}, but 'pref.loss' is {pref.loss!r}, not a list of losses to "
            "weigh. Give both as lists of one length, e.g. pref.loss=[sigmoid, sft] pref.loss_weights=[1, 0.5]."
        ]
    return []


def losses_of_the_task(recipe: Recipe) -> list[str]:
    task, pref = recipe.task, recipe.pref
    if task not in (*PREFERENCE_TASKS, "reward") or pref.loss is None:
        return []
    valid = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "simpo": ("simpo",)}.get(task)
    if valid is None:
        return [f"'pref.loss' is {pref.loss!r}, but task {task} has a single loss of its own. Remove pref.loss, or "
                "use task=dpo for the DPO family of losses."]
    losses = [pref.loss] if isinstance(pref.loss, str) else list(pref.loss)
    found = []
    for name in (n for n in losses if n not in valid):
        hint = " 'simpo' and 'orpo' are tasks of their own (task=simpo, task=orpo)." if name in ("simpo", "orpo") else ""
        found.append(f"'pref.loss' names {name!r}, which task {task} does not have.{did_you_mean(name, valid)}{hint} "
                     f"Valid: {', '.join(valid)}.")
    if len(losses) > 1 and task != "dpo":
        found.append(f"'pref.loss' lists {len(losses)} losses; only task dpo combines several.")
    if losses == ["sft"]:
        found.append("'pref.loss' is only 'sft', which ignores the rejected replies. Combine it with a preference "
                     "loss, e.g. pref.loss=[sigmoid, sft], or train with task=sft.")
    if pref.loss_weights is not None and isinstance(pref.loss, list) and len(pref.loss_weights) != len(losses):
        found.append(f"'pref.loss_weights' has {len(pref.loss_weights)} weights for {len(losses)} losses "
                     f"({', '.join(losses)}); give one weight per loss.")
    return found


# --- online RL ---------------------------------------------------------------------------------------------------


def grpo_has_rewards(recipe: Recipe) -> list[str]:
    if recipe.task != "grpo":
        if recipe.rl.rewards:
            return [f"'rl.rewards' is set, but task {recipe.task} does not sample completions; only task grpo reads "
                    "it. Remove rl.rewards, or use task=grpo."]
        return []
    if not recipe.rl.rewards:
        return ["task grpo needs 'rl.rewards': what a completion earns, e.g. rl.rewards=[{function: constraints}] "
                "(built-in), [{function: my_rewards.py:score}] (your own), or [{classifier: runs/sst2, label: "
                "positive}] (an llmtune classifier run)."]
    found = [problem for i, item in enumerate(recipe.rl.rewards) for problem in _reward_problems(i, item)]
    names = [item.get("name") for item in recipe.rl.rewards if isinstance(item, dict) and item.get("name")]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            found.append(f"'rl.rewards' names two rewards {name!r}; each reward's name must be its own.")
        if name == "std":
            found.append("'rl.rewards' has a reward named 'std', which would hide the reward spread (reward_std) in "
                         "the metrics. Name it otherwise.")
    return found


def grpo_prompts_have_room(recipe: Recipe) -> list[str]:
    rl, max_length = recipe.rl, recipe.data.max_length
    if recipe.task == "grpo" and rl.max_prompt_length is None and max_length <= rl.max_completion_length:
        return [f"'data.max_length' is {max_length} and 'rl.max_completion_length' is {rl.max_completion_length}, "
                "which leaves no room for a prompt (a prompt gets data.max_length - max_completion_length tokens). "
                "Raise data.max_length, lower rl.max_completion_length, or set rl.max_prompt_length."]
    return []


def _reward_problems(i: int, item: Any) -> list[str]:
    where = f"rl.rewards[{i}]"
    if not isinstance(item, dict):
        return [f"'{where}' is {item!r}; each reward is a mapping such as {{function: constraints, weight: 1.0}}."]
    found = [f"'{where}' has unknown key {k!r}.{did_you_mean(str(k), REWARD_KEYS)} Valid keys: {', '.join(REWARD_KEYS)}."
             for k in item if k not in REWARD_KEYS]
    sources = [k for k in REWARD_SOURCES if item.get(k)]
    if len(sources) != 1:
        found.append(f"'{where}' needs exactly one of {', '.join(REWARD_SOURCES)} (it has "
                     f"{', '.join(sources) or 'none'}).")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        found.append(f"'{where}.weight' is {weight!r}; it must be a number (negative weights penalise).")
    function = item.get("function")
    if isinstance(function, str) and ".py:" not in function:
        found += _builtin_problems(where, function, item)
    if item.get("classifier") and not item.get("label"):
        found.append(f"'{where}' rewards with a classifier run; name the 'label' whose probability is the reward "
                     "(e.g. label: positive).")
    return found


def _builtin_problems(where: str, function: str, item: dict[str, Any]) -> list[str]:
    """A built-in reward's name, and the parameters it needs or does not take."""
    if function not in BUILTIN_REWARDS:
        return [f"'{where}.function' is {function!r}, not a built-in reward{did_you_mean(function, BUILTIN_REWARDS)} "
                f"(built-in: {', '.join(BUILTIN_REWARDS)}); your own function is given as path/to/file.py:name."]
    found = []
    if function == "regex" and not item.get("pattern"):
        found.append(f"'{where}' (regex) needs a 'pattern': the regular expression a good completion matches.")
    elif function == "regex":
        try:
            re.compile(str(item["pattern"]))
        except re.error as exc:
            found.append(f"'{where}.pattern' is {item['pattern']!r}, not a valid regular expression ({exc}).")
    params = {p for ps in BUILTIN_REWARDS.values() for p in ps}
    extra = [k for k in item if k in params and k not in BUILTIN_REWARDS[function]]
    if extra:
        found.append(f"'{where}.{extra[0]}' is not a parameter of the built-in reward {function!r}.")
    return found


def grpo_batches_hold_whole_groups(recipe: Recipe) -> list[str]:
    """trl samples a generation batch of batch_size x accumulation (x processes) completions, num_generations per
    prompt; on one process the recipe alone decides whether they divide (more processes: checked at launch)."""
    if recipe.task != "grpo":
        return []
    cfg, group = recipe.training, recipe.rl.num_generations
    found = []
    per_step = cfg.batch_size * cfg.gradient_accumulation
    if per_step % group:
        found.append(
            f"'training.batch_size' x 'training.gradient_accumulation' is {cfg.batch_size} x "
            f"{cfg.gradient_accumulation} = {per_step} completions per step, which is not a multiple of "
            f"'rl.num_generations' ({group}): each prompt's {group} completions must be sampled together. Use e.g. "
            f"training.batch_size={group} (or a multiple), or rl.num_generations={_divisor(per_step, group)}."
        )
    evaluated = cfg.eval_batch_size or 2 * cfg.batch_size
    if evaluated % group:
        found.append(f"'training.eval_batch_size' is {evaluated} completions, which is not a multiple of "
                     f"'rl.num_generations' ({group}); held-out prompts are sampled in whole groups too. Set "
                     f"training.eval_batch_size={group * max(1, evaluated // group)}.")
    return found


def _divisor(total: int, near: int) -> int:
    """The divisor of `total` closest to `near` that is at least 2 (a group needs two)."""
    divisors = [d for d in range(2, total + 1) if total % d == 0] or [2]
    return min(divisors, key=lambda d: abs(d - near))


# --- images, pruning, distillation -----------------------------------------------------------------------------------


def scratch_architecture_fits_the_task(recipe: Recipe) -> list[str]:
    images = recipe.task == "image_classification"
    architecture = recipe.scratch.architecture
    if recipe.model.init == "scratch" and images != (architecture in ("cnn", "mlp")):
        fits = "cnn or mlp" if images else "gpt2 or llama"
        return [f"'scratch.architecture' is {architecture!r}, which does not fit task {recipe.task!r}: a model "
                f"from scratch for this task is {fits}. Set scratch.architecture accordingly."]
    return []


def images_are_not_quantized(recipe: Recipe) -> list[str]:
    if recipe.task == "image_classification" and recipe.method.quantization != "none":
        return [f"'method.quantization' is {recipe.method.quantization!r}, but llmtune quantizes text models only. "
                "Image models here are small enough to train in full precision: set method.quantization=none."]
    return []


def one_way_to_prune(recipe: Recipe) -> list[str]:
    model = recipe.model
    if model.keep_layers is not None and model.num_layers is not None:
        return [f"Both 'model.keep_layers' ({model.keep_layers}) and 'model.num_layers' ({model.num_layers}) are set; "
                "keep one: the list names the blocks, the number spreads them evenly."]
    return []


def pruning_trains_in_full(recipe: Recipe) -> list[str]:
    model, method = recipe.model, recipe.method
    if (model.keep_layers is not None or model.num_layers is not None) and method.type != "full":
        return [
            f"'model.keep_layers' / 'model.num_layers' with method.type={method.type}: an adapter is saved "
            "against its base checkpoint, and the base reloads with all its blocks, so the adapter would not fit "
            "it. Prune in a full run (method.type=full), then train adapters on that run (model.name=<the run>)."
        ]
    return []


def pruning_needs_a_pretrained_model(recipe: Recipe) -> list[str]:
    model = recipe.model
    pruned = model.keep_layers is not None or model.num_layers is not None
    if pruned and (model.init == "scratch" or recipe.task in PREFERENCE_TASKS):
        return [
            "'model.keep_layers' / 'model.num_layers' prune a pretrained checkpoint for the tasks classification, "
            "image_classification, distill, reward, sft and pretrain; with model.init=scratch set scratch.layers "
            f"instead (task here: {recipe.task}, init: {model.init})."
        ]
    return []


def teacher_only_for_distill(recipe: Recipe) -> list[str]:
    if recipe.task != "distill" and recipe.distill.teacher:
        return [f"'distill.teacher' is set, but task is {recipe.task!r}: only task distill reads it. Set task=distill "
                "or clear distill.teacher."]
    return []


def distill_has_a_teacher_and_a_student(recipe: Recipe) -> list[str]:
    if recipe.task != "distill":
        return []
    found = []
    if not recipe.distill.teacher:
        found.append("task distill needs 'distill.teacher': the finished classification run (or model folder) the "
                     "student learns from, e.g. distill.teacher=runs/sst2-teacher.")
    if recipe.model.init == "scratch":
        found.append("task distill starts the student from a checkpoint (model.name); set model.init=pretrained.")
    return found


TASK_RULES = (
    benchmarks_score_causal_lms,
    scratch_models_learn_text_first, max_length_fits_the_scratch_context, pretrain_reads_plain_text,
    plain_text_has_no_assistant_turns, stride_within_max_length, mixture_sources,
    preference_tunes_a_pretrained_model, preference_data_is_detected, prompts_leave_room_for_replies,
    kto_batches_hold_two, reference_needs_a_reference_task, loss_weights_weigh_a_loss_list, losses_of_the_task,
    grpo_has_rewards, grpo_batches_hold_whole_groups, grpo_prompts_have_room,
    scratch_architecture_fits_the_task, images_are_not_quantized,
    one_way_to_prune, pruning_trains_in_full, pruning_needs_a_pretrained_model,
    teacher_only_for_distill, distill_has_a_teacher_and_a_student,
)
