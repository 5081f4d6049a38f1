"""The recipe sections only some tasks read: lm (sft, pretrain), pref (preference tasks), rl (grpo), scratch (models
from zero), image (image_classification), distill (distill) and sweep (`llmtune sweep`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmtune.config.fields import _field
from llmtune.config.vocab import GRPO_LOSSES, REWARD_SCALING


@dataclass
class LMConfig:
    chat_template: str | None = _field(
        None,
        "Chat template: empty = the tokenizer's own (ChatML when it has none), 'chatml', a Jinja string, or "
        "a .jinja file.",
        path=True,
    )
    loss_on: Literal["auto", "assistant", "all"] = _field(
        "auto",
        "Tokens that carry loss. assistant: every assistant turn (completions) only. all: every token. "
        "auto: assistant for sft, all for pretrain.",
    )
    padding_free: bool = _field(
        True,
        "Put each batch's samples end to end in one row instead of padding them to the longest: no compute is "
        "spent on padding, and attention stays within each sample (position ids restart). Off: padded batches.",
    )
    packing: bool = _field(
        False,
        "Fill every row up to max_length with several samples (best-fit decreasing, padding-free): fewer, fuller "
        "steps. Off: each step trains on batch_size samples, as a padded batch would.",
    )
    perplexity_file: str | None = _field(
        None, "Text file scored with a sliding window after training (perplexity reported in metrics.json).", path=True
    )
    stride: int | None = _field(
        None, "Sliding-window stride for perplexity (default: max_length, no overlap; at most data.max_length).", ge=1
    )
    generation_prompts: list[str] = _field(
        [], "Prompts whose greedy generations are logged at each evaluation (generations.jsonl)."
    )
    max_new_tokens: int = _field(64, "Generation length for generation_prompts and `llmtune generate`.", ge=1)


@dataclass
class PreferenceConfig:
    loss: str | list[str] | None = _field(
        None,
        "Empty: the task's own loss (dpo: sigmoid, kto: kto, simpo: simpo). dpo: the preference loss - sigmoid "
        "(DPO), ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, exo_pair, "
        "aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm - or a list that is summed with "
        "`loss_weights`, e.g. [sigmoid, sft] (DPO plus an SFT term on the chosen reply, as in RPO). "
        "kto: kto or apo_zero_unpaired. orpo, simpo, reward: one loss of their own.",
    )
    reference: str | None = _field(
        None,
        "dpo/kto: the reference model, when it is not the model training starts from (a Hub id, folder, or run "
        "directory). orpo and simpo use no reference model.",
        path=True,
    )
    loss_weights: list[float] | None = _field(None, "Weight of each loss in a `loss` list (default: all 1).")
    beta: float = _field(
        0.1,
        "Strength of the preference signal: dpo/kto - how far the policy may move from the reference (higher: "
        "closer); orpo - the odds-ratio term's weight (lambda); simpo - the reward scale.",
        gt=0,
    )
    label_smoothing: float = _field(
        0.0, "dpo: assumed share of flipped labels in the data (robust, exo_pair, aot losses).", ge=0, lt=0.5
    )
    max_prompt_length: int | None = _field(
        None,
        "Longest prompt in tokens: longer prompts lose their oldest turns first (the last user turn is always "
        "kept). Empty: prompts are kept whole. Either way data.max_length bounds prompt + reply, and a pair whose "
        "prompt leaves no room for a reply is dropped and counted in run.json.",
        ge=1,
    )
    precompute_reference: Literal["auto", "on", "off"] = _field(
        "auto",
        "dpo/kto reference log-probabilities. With LoRA/DoRA/QLoRA the reference is the policy with its adapters "
        "turned off (no second model). With full fine-tuning: on - computed once before training (no second "
        "model in memory, one extra pass over the data); off - a frozen copy of the model; auto - the copy when "
        "it fits twice in free memory, else precomputed.",
    )
    desirable_weight: float = _field(1.0, "kto: weight of the losses of desirable (label true) completions.", gt=0)
    undesirable_weight: float = _field(
        1.0, "kto: weight of the losses of undesirable (label false) completions.", gt=0
    )
    simpo_gamma: float = _field(0.5, "simpo: target reward margin (gamma) between chosen and rejected replies.")
    sft_adapter: Literal["merge", "continue"] = _field(
        "merge",
        "When model.name is an SFT run saved as an adapter: merge - fold it into its base and train a new adapter "
        "on top (the reference is the SFT model); continue - keep training the SFT adapter itself (the reference "
        "is a frozen copy of it).",
    )
    center_rewards: float | None = _field(
        None, "reward: weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards centred on 0.", ge=0
    )


@dataclass
class RLConfig:
    rewards: list[dict[str, Any]] = _field(
        [],
        "grpo: what a completion earns - a list, summed with weights. Each item is one of: {function: NAME} a "
        "built-in reward (constraints: share of the row's `constraints` met; all_constraints: 1 when all are; "
        "exact_answer: the final number against the row's `answer`; regex: 1 when `pattern` matches, `full: true` "
        "for the whole text; soft_overlong: 0 up to max_length - cache tokens, down to -1 at max_length); "
        "{function: path/to/file.py:name} your own function(completions, **columns) -> one float per completion "
        "(the prompts' other columns arrive as lists); {classifier: RUN, label: NAME} an llmtune classification "
        "run's probability of that label; {reward_model: RUN} an llmtune reward run's score. Every item takes "
        "`weight` (default 1) and `name` (its name in logs; default the function's).",
        path=True,
    )
    num_generations: int = _field(
        4, "grpo: completions sampled per prompt (the group whose rewards are compared). At least 2.", ge=2
    )
    max_completion_length: int = _field(64, "grpo: longest completion in tokens; longer ones are cut.", ge=1)
    max_prompt_length: int | None = _field(
        None,
        "grpo: longest prompt in tokens as the model sees it (chat template included); longer prompts lose their "
        "oldest turns, and a prompt that still does not fit is dropped and counted in run.json. Empty: "
        "data.max_length minus max_completion_length.",
        ge=1,
    )
    temperature: float = _field(1.0, "grpo: sampling temperature of the completions.", gt=0)
    top_p: float = _field(1.0, "grpo: nucleus sampling - the smallest set of tokens with this much probability.",
                          gt=0, le=1)
    loss_type: str = _field(
        "dapo",
        "grpo: how token losses are averaged - dapo (over all tokens of the batch; trl's default), grpo (per "
        "completion, then over completions: favours short completions), dr_grpo (over a constant, removing the "
        "length bias), bnpo (over the tokens of the local batch).",
        choices=GRPO_LOSSES,
    )
    scale_rewards: str = _field(
        "group",
        "grpo: advantages are rewards minus their group's mean, divided by the standard deviation of the group "
        "(group), of the whole batch (batch), or not at all (none; Dr. GRPO).",
        choices=REWARD_SCALING,
    )
    beta: float = _field(
        0.0,
        "grpo: weight of the KL penalty against the starting model. 0: no reference model is used at all (fastest). "
        "Above 0 with LoRA/DoRA/QLoRA: the policy with its adapters off is the reference (no second model).",
        ge=0,
    )
    epsilon: float = _field(0.2, "grpo: the policy ratio is clipped to [1 - epsilon, 1 + epsilon_high].", gt=0, lt=1)
    epsilon_high: float | None = _field(
        None, "grpo: the upper clip (DAPO's clip-higher, e.g. 0.28). Empty: epsilon.", gt=0
    )
    mask_truncated_completions: bool = _field(
        False, "grpo: completions cut at max_completion_length add no loss (their reward judged an unfinished text)."
    )
    num_iterations: int = _field(
        1, "grpo: optimizer passes over each batch of completions before new ones are sampled (mu in the paper).", ge=1
    )
    add_constraints: int = _field(
        0,
        "grpo: append 1..N sampled, checkable instruction constraints to each prompt (lowercase, word and sentence "
        "limits, keywords, exact start/end, quotes, bullets, sections, JSON) and give each row the `constraints` "
        "the built-in constraints rewards check - seeded by training.seed, so every run and split sees the same. "
        "0: the prompts as they are (their own `constraints` column, if any, is used).",
        ge=0,
    )
    sft_adapter: Literal["merge", "continue"] = _field(
        "merge",
        "grpo: when model.name is an SFT run saved as an adapter: merge - fold it into its base and train a new "
        "adapter on top; continue - keep training the SFT adapter itself.",
    )


@dataclass
class ScratchConfig:
    architecture: Literal["gpt2", "llama", "cnn", "mlp"] = _field(
        "gpt2",
        "Model family of a model built from scratch. Text: gpt2, llama. Images (task image_classification): cnn "
        "(convolution blocks, then a dense layer) or mlp (dense layers on the flattened pixels).",
    )
    layers: int = _field(4, "Transformer blocks; cnn: convolution blocks (32 channels, doubling per block); mlp: "
                         "hidden layers.", ge=1)
    hidden_size: int = _field(256, "Width of the residual stream; cnn / mlp: width of the dense layer(s).", ge=1)
    dropout: float = _field(0.1, "cnn / mlp: dropout before each dense layer while training.", ge=0, lt=1)
    heads: int = _field(4, "Attention heads.", ge=1)
    vocab_size: int = _field(8000, "Size of the BPE tokenizer trained on the training data.", ge=1)
    context_length: int = _field(256, "Longest sequence the model can see (position embeddings).", ge=1)


@dataclass
class SweepConfig:
    """Read by `llmtune sweep` only; `llmtune train` trains the recipe's own values."""

    space: dict[str, dict[str, list[int | float | str]]] = _field(
        {}, "Recipe keys to search and their ranges: {log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}, "
        "{choice: [a, b, ...]}; e.g. training.learning_rate: {log_uniform: [1e-5, 1e-3]}.",
    )
    metric: str | None = _field(None, "Evaluation metric to optimise (default: the task's main metric, e.g. accuracy).")
    direction: Literal["auto", "maximize", "minimize"] = _field(
        "auto", "auto: minimize losses and perplexity, maximize everything else.")
    trials: int = _field(10, "Finished trials (complete or pruned) the sweep runs to; --trials overrides it.", ge=1)
    pruning: bool = _field(True, "Stop trials whose evaluations fall below the median of earlier trials at the same "
                           "step (Optuna's median pruner, after 2 finished trials).")


@dataclass
class ImageConfig:
    column: str = _field("image", "Column holding the image: a decoded image, a file path, or bytes (imagefolder: image).")
    size: int | None = _field(
        None,
        "Side length images are resized to (square). Empty: the checkpoint's image-processor size, or for a model "
        "from scratch the size of the first training image.",
        ge=4,
    )
    channels: Literal["auto", 1, 3] = _field(
        "auto",
        "Colour channels the model sees: 1 (grayscale) or 3 (RGB); images of other modes are converted. auto: 3 "
        "for a pretrained checkpoint; from scratch, 1 when the first training image is grayscale, else 3.",
    )
    shift: float = _field(
        0.0, "Training augmentation: random shift of up to this fraction of the image size each way (0.1 = 10%). 0: off.",
        ge=0, le=0.5,
    )
    rotation: float = _field(
        0.0, "Training augmentation: random rotation of up to this many degrees either way. 0: off.", ge=0, le=180
    )


@dataclass
class DistillConfig:
    teacher: str | None = _field(
        None,
        "The finished classification run (or model folder) the student learns from. Its labels must be the "
        "training data's labels. The student is `model.name`, e.g. the teacher's checkpoint with fewer layers "
        "(model.num_layers).",
        path=True,
    )
    transfer_file: str | None = _field(
        None,
        "Extra unlabelled rows (a data file with the same text column) that the teacher scores and the student also "
        "learns from, through the distillation term alone: how a teacher passes on more than the labels say. Any "
        "label column in it is ignored.",
        path=True,
    )
    alpha: float = _field(
        0.5,
        "Share of the distillation term: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * "
        "cross-entropy with the labels (T = temperature). 1: the teacher only; 0: the labels only.",
        ge=0, le=1,
    )
    temperature: float = _field(
        2.0, "Softmax temperature T for both models in the distillation term: above 1 shows the student the teacher's "
        "ranking of the wrong classes too.", gt=0
    )
