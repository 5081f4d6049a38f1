"""trl's preference trainers behind llmtune's recipe: the only module that names them and their config fields, so a
trl rename or move (ORPO and CPO live in `trl.experimental` in trl 1.16) is absorbed here.

    dpo    -> DPOTrainer    (pairs, against a reference model)
    kto    -> KTOTrainer    (unpaired feedback, against a reference model)
    orpo   -> ORPOTrainer   (pairs, reference-free: SFT loss + odds-ratio term)
    simpo  -> CPOTrainer    (pairs, reference-free: length-normalised margin, loss_type=simpo, no SFT term)
    reward -> RewardTrainer (pairs, a sequence classifier with one score)

The reference of dpo/kto: with adapters, the policy with its adapters turned off (no second model); with full
fine-tuning, a frozen copy or log-probabilities computed once before training.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError
from llmtune.kernels.lora_linear import keep_frozen_weights_unpacked
from llmtune.models.adapters import is_adapter
from llmtune.patches.trl_compact_lm_head import (
    fused_head_breaks_fsdp2,
    labelled_positions_only_on_cpu,
    project_labelled_positions_only_on_cpu,
)
from llmtune.run.distributed import launched_with
from llmtune.run.training import training_arguments

logger = logging.getLogger(__name__)

# llmtune's metric names -> the keys trl logs at evaluation (after its 'eval_' prefix).
METRIC_KEYS = {
    "dpo": {"accuracy": "rewards/accuracies", "margin": "rewards/margins", "chosen_logp": "logps/chosen",
            "rejected_logp": "logps/rejected"},
    "kto": {"margin": "rewards/margins", "chosen_logp": "logps/chosen", "rejected_logp": "logps/rejected",
            "kl": "kl"},
    "reward": {"accuracy": "accuracy", "margin": "margin"},
}
METRIC_KEYS["orpo"] = METRIC_KEYS["simpo"] = METRIC_KEYS["dpo"]
MAIN_METRIC = {"dpo": "accuracy", "orpo": "accuracy", "simpo": "accuracy", "reward": "accuracy", "kto": "loss"}


def trainer_classes(task: str) -> tuple[type, type]:
    """(Trainer class, config class) for a preference task."""
    if task in ("orpo", "simpo"):
        # trl warns on importing trl.experimental; the README says it once instead of every run (scoped: a later
        # import of trl.experimental by the user's own code still warns).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*trl.experimental")
            if task == "orpo":
                from trl.experimental.orpo import ORPOConfig, ORPOTrainer

                return ORPOTrainer, ORPOConfig
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOTrainer, CPOConfig
    import trl

    return {"dpo": (trl.DPOTrainer, trl.DPOConfig), "kto": (trl.KTOTrainer, trl.KTOConfig),
            "reward": (trl.RewardTrainer, trl.RewardConfig)}[task]


def task_arguments(recipe: Recipe, precompute: bool) -> dict[str, Any]:
    """The trl config fields of the task, from the recipe's `pref` section."""
    pref, task = recipe.pref, recipe.task
    common = {"max_length": recipe.data.max_length, "dataset_num_proc": recipe.data.preprocessing_workers}
    if task == "dpo":
        losses = [pref.loss or "sigmoid"] if not isinstance(pref.loss, list) else pref.loss
        return {**common, "loss_type": losses, "loss_weights": pref.loss_weights, "beta": pref.beta,
                "label_smoothing": pref.label_smoothing, "precompute_ref_log_probs": precompute,
                "truncation_mode": "keep_start"}
    if task == "kto":
        return {**common, "loss_type": pref.loss or "kto", "beta": pref.beta,
                "desirable_weight": pref.desirable_weight, "undesirable_weight": pref.undesirable_weight,
                "precompute_ref_log_probs": precompute,
                "train_sampling_strategy": "sequential"}  # trl's KL estimate pairs neighbouring rows (shuffled before)
    if task == "orpo":
        return {**common, "beta": pref.beta}
    if task == "simpo":
        return {**common, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": pref.simpo_gamma, "beta": pref.beta}
    return {**common, "center_rewards_coefficient": pref.center_rewards}


def build_trainer(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, train: Any, eval_set: Any,
                  run_dir: Path, resume: bool, callbacks: list, reference: torch.nn.Module | None = None,
                  new_adapter: bool = True) -> Any:
    """The trl trainer of `recipe.task`, data prepared, reference model chosen (and logged)."""
    task = recipe.task
    trainer_class, config_class = trainer_classes(task)
    with_reference = task in ("dpo", "kto")
    if with_reference and launched_with("FSDP") and fused_head_breaks_fsdp2():  # their trainers use trl's fused head
        name = task.upper()
        raise LlmtuneError(
            f"{name} under FSDP needs torch >= 2.13, and this is torch {torch.__version__}: trl's {name} trainer "
            "computes log-probabilities with a fused output head that on older torch breaks FSDP2's gathering of the "
            "tied embedding after the first checkpoint save. Upgrade torch, or launch with data parallelism "
            "(--accelerate multi_gpu), which holds a whole model on every GPU."
        )
    precompute = with_reference and reference is None and not is_adapter(model) and precompute_reference(recipe, model)
    args = training_arguments(
        recipe, str(run_dir), MAIN_METRIC[task], eval_set is not None, resume, config_class,
        padded=False,  # trl batches pairs itself; llmtune's length grouping needs an input_ids column
        metric_keys=METRIC_KEYS[task], **task_arguments(recipe, precompute),
    )
    kwargs: dict[str, Any] = {}
    if with_reference:
        keep_frozen_weights_unpacked(model)
        if reference is None and not is_adapter(model) and not precompute:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        kwargs["ref_model"] = reference
        logger.info("Reference model: %s", describe_reference(model, reference, precompute, new_adapter))
    with labelled_positions_only_on_cpu():  # trl's constructor may precompute the reference log-probabilities
        trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=eval_set,
                                processing_class=tokenizer, callbacks=callbacks, **kwargs)
    project_labelled_positions_only_on_cpu(trainer)
    if with_reference and is_adapter(model) and new_adapter and "ref" in model.peft_config:
        # trl keeps a frozen copy of a PeftModel's adapter as the reference ("ref"), right when re-training an
        # adapter that already learned something (an SFT adapter trained on). A new adapter starts as a no-op,
        # so the policy with adapters off is the same reference without the copy.
        model.delete_adapter("ref")
    return trainer


def precompute_reference(recipe: Recipe, model: torch.nn.Module) -> bool:
    """Full fine-tuning: compute the reference log-probabilities once (on), keep a frozen copy (off), or auto: the
    copy when two more copies of the weights fit in free memory, else precompute."""
    setting = recipe.pref.precompute_reference
    if setting != "auto":
        return setting == "on"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights > available_memory(model)


def available_memory(model: torch.nn.Module) -> int:
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available


def describe_reference(model: Any, reference: Any, precompute: bool, new_adapter: bool) -> str:
    if reference is not None and not precompute:
        return "a frozen copy of the starting model"
    if is_adapter(model):
        return ("the policy with its adapters turned off (no second model)" if new_adapter
                else "a frozen copy of the adapter training continues from")
    return "log-probabilities computed once before training (no second model in memory)"


def summarize(task: str) -> Any:
    """Trainer metrics (with a prefix) -> llmtune's metric names for the task. trl logs its own metrics under
    'eval_' whatever prefix evaluate() was given."""
    keys = METRIC_KEYS[task]

    def metrics(raw: dict[str, float], prefix: str) -> dict[str, float]:
        found = {"loss": raw[f"{prefix}loss"]} if f"{prefix}loss" in raw else {}
        for name, key in keys.items():
            for candidate in (f"{prefix}{key}", f"eval_{key}"):
                if candidate in raw:
                    found[name] = raw[candidate]
                    break
        if found.get("accuracy") == 0.0 and found.get("margin") == 0.0:
            # trl counts a tie as 'not preferred'. No pair preferred and a mean margin of exactly 0 means every margin
            # is 0: every pair ties, as before DPO training, where the policy is its reference. A tie is a coin flip.
            found["accuracy"] = 0.5
        return found

    return metrics
