"""`llmtune plan`: what a recipe will cost before it runs - parameters, memory per device broken down, dataset
tokens, steps, and a time estimate from measured steps on the run's own batches.

The breakdown (weights by dtype, gradients, optimizer state, activations with and without checkpointing, eval
logits) is computed from the built model and data for the worst case, the longest rows in one batch; the activation
term uses the per-layer estimate of Korthikanti et al. (2022), sbh(34 + 5as/h) bytes at 16-bit, scaled to the
compute dtype. Then, unless that bound already exceeds the device, the plan draws the batches train() will draw
(same sampler, same seed) and runs real training steps on the largest and a median one and eval passes likewise:
the process's peak memory after them (resident set on a CPU, peak allocated on CUDA) is the predicted peak, and a
line through the timed steps (fixed cost per batch plus cost per token) prices every batch of the run.
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmtune.config.schema import Recipe

GIB = 2**30
# Bytes of optimizer state per trainable parameter (two moments at the parameter's size for Adam-style ones).
_STATE_PER_PARAM = {"8bit": 2.0, "sgd": 0.0, "adafactor": 0.05, "rmsprop": 1.0}


@dataclass
class Plan:
    parameters: dict[str, int]
    memory: dict[str, float]  # component -> bytes (per device)
    tokens: dict[str, int]
    steps: dict[str, int]
    estimate_bytes: float
    measured_peak_bytes: float | None = None
    step_seconds: float | None = None
    time_seconds: float | None = None
    device: str = "cpu"
    device_memory: float | None = None
    advice: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> float:
        """The peak measured over the dry steps and eval passes when there is one, else the breakdown's sum."""
        return self.estimate_bytes if self.measured_peak_bytes is None else self.measured_peak_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.predicted_peak_bytes <= self.device_memory


def make_plan(trainer: Any, recipe: Recipe, device_memory: float | None = None, dry_run: bool = True) -> Plan:
    """Estimate, then (if it may fit) measure, the recipe's memory and time with its built Trainer."""
    model, args = trainer.model, trainer.args
    lengths = [_row_length(row) for row in trainer.train_dataset]
    longest = max(lengths)
    micro_batches = math.ceil(len(lengths) / (args.per_device_train_batch_size * args.world_size))
    per_epoch = max(1, micro_batches // args.gradient_accumulation_steps)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    evals = _evaluations(args, steps, per_epoch)

    memory = breakdown(model, recipe, args.per_device_train_batch_size, longest,
                       args.per_device_eval_batch_size, eval_length=_eval_length(trainer))
    estimate = sum(v for k, v in memory.items() if k not in ("activations with checkpointing", "training logits"))
    plan = Plan(
        parameters={"total": sum(p.numel() for p in model.parameters()),
                    "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        memory=memory, estimate_bytes=estimate,
        tokens={"train": sum(lengths), "longest": longest, "mean": round(sum(lengths) / len(lengths))},
        steps={"optimizer_steps": steps, "micro_batches_per_step": args.gradient_accumulation_steps,
               "evaluations": evals},
        device="cuda" if torch.cuda.is_available() else "cpu", device_memory=device_memory,
    )
    if dry_run and (device_memory is None or estimate <= device_memory):
        train_seconds, plan.step_seconds = time_training(trainer, steps * args.gradient_accumulation_steps, steps)
        plan.time_seconds = train_seconds + evals * time_evaluation(trainer)
        plan.measured_peak_bytes = _peak_bytes()
    plan.advice = advice(plan, recipe)
    return plan


def breakdown(model: torch.nn.Module, recipe: Recipe, batch: int, length: int, eval_batch: int,
              eval_length: int) -> dict[str, float]:
    """Bytes per device by component (the activation terms for the longest training batch)."""
    memory: dict[str, float] = {}
    for param in model.parameters():
        key = f"weights ({_dtype_name(param)})"
        memory[key] = memory.get(key, 0.0) + param.numel() * param.element_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    memory["gradients"] = float(sum(p.numel() * p.element_size() for p in trainable))
    per_param = next((v for k, v in _STATE_PER_PARAM.items() if k in recipe.training.optimizer), None)
    memory["optimizer state"] = float(sum(p.numel() * (per_param if per_param is not None else 2 * p.element_size())
                                          for p in trainable))
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 1) or 1
    scale = _compute_bytes(recipe) / 2  # the estimate counts 16-bit activations
    per_layer = length * batch * hidden * (34 + 5 * heads * length / max(hidden, 1)) * scale
    inputs_only = length * batch * hidden * 2 * scale  # what checkpointing keeps per layer: its input
    checkpointing = recipe.training.gradient_checkpointing
    memory["activations"] = layers * (inputs_only if checkpointing else per_layer) + (per_layer if checkpointing else 0)
    memory["activations with checkpointing"] = layers * inputs_only + per_layer
    outputs = _output_width(model)
    # Logits in fp32, their log-softmax and its gradient: three copies while the loss is computed.
    memory["training logits"] = 3.0 * batch * length * outputs * 4
    memory["eval logits"] = 2.0 * eval_batch * eval_length * outputs * 4
    return memory


def time_training(trainer: Any, micro_batches: int, optimizer_steps: int) -> tuple[float, float]:
    """(seconds for the whole training, seconds of its largest micro-batch), from real steps on the run's batches.

    The batches are the ones train() will draw: the Trainer's own dataloader, seeded for epoch 0 as train() seeds
    it (later epochs are assumed to cost what the first does). The largest batch trains twice - the first time
    pays one-off warm-up, counted once - and a median batch once; a line through the two (a fixed cost per
    micro-batch plus a cost per token) prices every batch of the run. Optimizer steps are timed on their own."""
    model = trainer.model
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    if trainer.args.activation_checkpointing:  # as Trainer.train() would turn it on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def step(batch: dict) -> None:  # what a training step does, on a batch the prepared loader already placed
        with trainer.compute_loss_context_manager():  # the run's autocast
            loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)

    sizes, per_batch, warm_up, largest = _price_batches(trainer.get_train_dataloader, step)
    optimizer_seconds = _timed(trainer.optimizer.step)
    trainer.optimizer.zero_grad()
    cycle = [per_batch(sizes[i % len(sizes)]) for i in range(micro_batches)]
    return sum(cycle) + warm_up + optimizer_steps * optimizer_seconds, largest + optimizer_seconds


def time_evaluation(trainer: Any) -> float:
    """Seconds for one evaluation, priced as training is: forward passes on the largest and a median eval batch."""
    if trainer.eval_dataset is None:
        return 0.0
    trainer.model.eval()
    # as evaluate() decides: without compute_metrics only the loss is kept
    only_loss = True if trainer.compute_metrics is None else trainer.args.prediction_loss_only

    def predict(batch: dict) -> None:
        trainer.prediction_step(trainer.model, batch, prediction_loss_only=only_loss)

    sizes, per_batch, warm_up, _ = _price_batches(trainer.get_eval_dataloader, predict)
    return sum(per_batch(size) for size in sizes) + warm_up


def advice(plan: Plan, recipe: Recipe) -> list[str]:
    """What to change when it will not fit: the knob that saves the most first."""
    if plan.fits is not False:
        return []
    memory, training, method = plan.memory, recipe.training, recipe.method
    savings = []
    if not training.gradient_checkpointing:
        savings.append((memory["activations"] - memory["activations with checkpointing"],
                        "training.gradient_checkpointing=true"))
    if training.batch_size > 1:
        savings.append((memory["activations"] / 2 + memory["training logits"] / 2,
                        f"training.batch_size={training.batch_size // 2} with "
                        f"training.gradient_accumulation={training.gradient_accumulation * 2} (same global batch)"))
    if "8bit" not in training.optimizer and memory["optimizer state"] > 0:
        savings.append((memory["optimizer state"] * 0.75, "training.optimizer=adamw_8bit"))
    weights = sum(v for k, v in memory.items() if k.startswith("weights"))
    if method.type == "full":
        savings.append((memory["gradients"] + memory["optimizer state"], "method.type=lora"))
    elif method.quantization == "none":
        savings.append((weights * 0.7, "method.quantization=4bit (QLoRA)"))
    return [f"{knob}: saves about {saved / GIB:.2f} GiB" for saved, knob in sorted(savings, reverse=True) if saved > 0]


def format_plan(plan: Plan) -> str:
    lines = [f"parameters   {plan.parameters['total']:,} total, {plan.parameters['trainable']:,} trainable"]
    if "prompts" in plan.tokens:  # task grpo: prompts whose completions are sampled in training
        lines += [f"data         {plan.tokens['prompts']:,} training prompts, each with its completion at most "
                  f"{plan.tokens['longest']} tokens",
                  f"steps        {plan.steps['optimizer_steps']} optimizer steps of "
                  f"{plan.steps['completions_per_step']} sampled completions, {plan.steps['evaluations']} "
                  f"evaluations, {plan.steps['held_out_prompts']} held-out prompts replied to before and after"]
    else:
        lines += [f"data         {plan.tokens['train']:,} training tokens (longest example {plan.tokens['longest']}, "
                  f"mean {plan.tokens['mean']})",
                  f"steps        {plan.steps['optimizer_steps']} optimizer steps x "
                  f"{plan.steps['micro_batches_per_step']} micro-batches, {plan.steps['evaluations']} evaluations"]
    lines.append(f"memory per device ({plan.device}), estimated for the worst batch:")
    for name, value in plan.memory.items():
        lines.append(f"  {name:<32s} {value / GIB:8.3f} GiB")
    lines.append(f"  {'sum: longest rows in one batch':<32s} {plan.estimate_bytes / GIB:8.3f} GiB  "
                 "(process baseline not included)")
    if plan.measured_peak_bytes is not None:
        where = "real steps (sampling included)" if "prompts" in plan.tokens else "steps on the run's largest batch"
        lines.append(f"measured     peak {plan.measured_peak_bytes / GIB:.2f} GiB over {where}; "
                     f"{plan.step_seconds:.2f} s a step")
        lines.append(f"predicted    peak {plan.predicted_peak_bytes / GIB:.2f} GiB, time {_duration(plan.time_seconds)}")
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "will NOT fit"
        lines.append(f"verdict      {verdict} in {_size(plan.device_memory)}")
        lines += [f"  try {line}" for line in plan.advice]
    return "\n".join(lines)


def parse_size(text: str) -> float:
    """'24GB', '24GiB', '24G', '512MB' -> bytes (powers of 1024, as memory is sold and reported). ValueError, with
    a message for the user, for anything else and for sizes of 0 or less."""
    units = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 2**40, "tb": 2**40}
    found = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in units:
        raise ValueError(f"{text!r} is not a size; write e.g. 24GB or 512MB")
    size = float(found.group(1)) * units[found.group(2)]
    if size <= 0:
        raise ValueError(f"device memory must be more than 0; got {text!r} (write e.g. 24GB or 512MB)")
    return size


# --- pieces ------------------------------------------------------------------------------------------------


def _row_length(row: dict[str, Any]) -> int:
    """Tokens a training row puts through the model (a preference pair: the prompt twice, each reply once)."""
    ids = {k: len(v) for k, v in row.items()
           if k.endswith("input_ids") or k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")}
    if "chosen_ids" in ids:
        return 2 * ids.get("prompt_ids", 0) + ids["chosen_ids"] + ids.get("rejected_ids", 0)
    return sum(ids.values())


def _eval_length(trainer: Any) -> int:
    data = trainer.eval_dataset
    return max((_row_length(row) for row in data), default=0) if data is not None else 0


def _evaluations(args: Any, steps: int, per_epoch: int) -> int:
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    count = {"steps": steps // args.eval_steps if args.eval_steps else 0,
             "epoch": math.ceil(steps / per_epoch)}.get(strategy, 0)
    return count + 1 + int(bool(args.eval_on_start))  # plus the final evaluation


def _batch_tokens(batch: dict[str, Any]) -> int:
    """Token positions a collated batch puts through the model, padding included (what its compute follows)."""
    ids = [v.numel() for k, v in batch.items() if isinstance(v, torch.Tensor) and (
        k.endswith("input_ids") or k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids"))]
    return sum(ids) or next((v.numel() for v in batch.values() if isinstance(v, torch.Tensor)), 1)


def _price_batches(make_loader: Callable[[], Any], run: Callable[[dict], None]
                   ) -> tuple[list[int], Callable[[int], float], float, float]:
    """Run `run` on a loader's largest batch twice (the first pays the warm-up) and on a median one: (token count of
    every batch, seconds of a batch by its tokens, the one-off warm-up, seconds of the largest batch). The loader is
    walked twice - once for the sizes, once to fetch the two batches - so that no other batch is kept in memory."""
    sizes = _batch_sizes(make_loader())
    largest, median = _largest_and_median(sizes)
    batches = _batches_at(make_loader(), {largest, median})
    first, big, typical = (_timed(lambda b=batches[i]: run(b)) for i in (largest, largest, median))
    return sizes, _line((sizes[largest], big), (sizes[median], typical)), max(0.0, first - big), big


def _batch_sizes(loader: Any) -> list[int]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)  # the order train() draws in its first epoch
    return [_batch_tokens(batch) for batch in loader]


def _batches_at(loader: Any, wanted: set[int]) -> dict[int, dict[str, Any]]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    found = {}
    for index, batch in enumerate(loader):
        if index in wanted:
            found[index] = batch
        if len(found) == len(wanted):
            break
    return found


def _largest_and_median(sizes: list[int]) -> tuple[int, int]:
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    return order[-1], order[len(order) // 2]


def _line(a: tuple[int, float], b: tuple[int, float]) -> Callable[[int], float]:
    """Seconds as a function of tokens through two measured points; proportional when they cannot be told apart."""
    (x1, y1), (x2, y2) = a, b
    slope = (y1 - y2) / (x1 - x2) if x1 != x2 else 0.0
    fixed = y1 - slope * x1
    if x1 == x2 or slope < 0 or fixed < 0:
        return lambda tokens: y1 * tokens / max(x1, 1)
    return lambda tokens: fixed + slope * tokens


def _timed(work: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes() -> float:
    """Peak allocated on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _compute_bytes(recipe: Recipe) -> int:
    from llmtune.run.precision import resolved_precision

    return 2 if resolved_precision(recipe.training.precision) in ("bf16", "fp16") else 4


def _output_width(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None)
    if "ForCausalLM" in type(getattr(model, "base_model", model)).__name__ or hasattr(model, "lm_head") or (
            hasattr(getattr(model, "base_model", None), "model") and hasattr(model.base_model.model, "lm_head")):
        return getattr(config, "vocab_size", 0) or 0
    return labels or 1


def _dtype_name(param: torch.Tensor) -> str:
    if param.dtype == torch.uint8:
        return "4-bit packed"
    if param.dtype == torch.int8:
        return "int8"
    return str(param.dtype).removeprefix("torch.")


def _size(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{rest:02d}s"
