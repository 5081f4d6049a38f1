"""Names a recipe may use, kept where the config room can check them without importing any training library.

The modules that act on these names (training, metrics) import them from here, so a recipe is checked against
the same list that is later used.
"""

from __future__ import annotations

TASKS = ("classification", "image_classification", "distill", "sft", "pretrain", "dpo", "kto", "orpo", "simpo", "reward",
         "grpo")
PREFERENCE_TASKS = ("dpo", "kto", "orpo", "simpo")  # causal LMs trained on preferences
CAUSAL_LM_TASKS = ("sft", "pretrain", *PREFERENCE_TASKS, "grpo")
# Compute precisions (training.precision, and --precision of the commands that use a run; auto = the run's own).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torch dtypes by name: what weights are loaded in (model.dtype) and 4-bit layers compute in (method.compute_dtype);
# packed 4-bit weights may also be stored as bytes (method.quant_storage).
DTYPES = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = (*DTYPES, "uint8")

# trl's DPO losses (trl 1.16); sft is an extra term, only meaningful in a list beside a preference loss.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
# trl's GRPO loss aggregations and advantage scalings (trl 1.16; trl itself checks neither before the first step).
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo")
REWARD_SCALING = ("group", "batch", "none")
# Keys of one rl.rewards item: its source (exactly one), and what every item or a built-in may add.
REWARD_SOURCES = ("function", "classifier", "reward_model")
# The built-in reward functions (llmtune/rewards/builtin.py) and the parameters each takes from its rl.rewards item.
BUILTIN_REWARDS = {"constraints": (), "all_constraints": (), "exact_answer": (), "regex": ("pattern", "full"),
                   "soft_overlong": ("max_length", "cache")}
REWARD_KEYS = (*REWARD_SOURCES, "weight", "name", "label", *{p for ps in BUILTIN_REWARDS.values() for p in ps})

# llmtune's optimizer names -> transformers' (any other name transformers knows is passed through as is).
OPTIMIZERS = {
    "adamw": "adamw_torch_fused",  # one fused kernel per step: 3.5x faster than foreach on CPU (5M LoRA weights)
    "adamw_foreach": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "lion_8bit": "lion_8bit",
    "paged_lion_8bit": "paged_lion_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "rmsprop": "rmsprop",
}

CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall", "roc_auc")
LM_METRICS = ("loss", "perplexity", "token_accuracy")
# Measured on held-out pairs: implicit reward of chosen > rejected, mean reward margin, mean log-probabilities.
PREFERENCE_METRICS = ("loss", "accuracy", "margin", "chosen_logp", "rejected_logp")
KTO_METRICS = ("loss", "margin", "chosen_logp", "rejected_logp", "kl")
REWARD_METRICS = ("loss", "accuracy", "margin")
# Held-out prompts, completions sampled: the weighted reward's mean and spread, completion length and cut share.
GRPO_METRICS = ("reward", "reward_std", "completion_length", "clipped_ratio")

# Recipe keys that may differ when a run is resumed: they change what is logged, kept or published, not what
# is trained. Any other difference is refused unless the user passes --force.
RESUME_SAFE_KEYS = (
    "output.dir", "output.overwrite", "output.report", "output.push_to_hub", "output.hub_private", "output.license",
    "training.log_every", "training.keep_checkpoints", "training.dataloader_workers", "training.eval_batch_size",
    "training.stop_grace_seconds", "eval.before_training", "lm.generation_prompts",
    "lm.max_new_tokens", "lm.perplexity_file", "lm.stride",
)


def task_metrics(task: str) -> tuple[str, ...]:
    """The metrics a task reports (and the names `eval.metrics` may pick from)."""
    if task in ("dpo", "orpo", "simpo"):
        return PREFERENCE_METRICS
    return {"classification": CLASSIFICATION_METRICS, "image_classification": CLASSIFICATION_METRICS,
            "distill": CLASSIFICATION_METRICS, "kto": KTO_METRICS, "reward": REWARD_METRICS,
            "grpo": GRPO_METRICS}.get(task, LM_METRICS)

# Experiment trackers (training.report_to), through transformers' integrations: name -> (module, pip package).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "neptune": ("neptune", "neptune"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "codecarbon": ("codecarbon", "codecarbon"),
}
