"""Held-out prompts before and after GRPO training: the greedy reply and rl.num_generations sampled replies to each,
every reward's mean, the pass rate, how varied the replies are (distinct-n), and exact sign tests over prompts -
did training turn more prompts from failing to passing than the other way round, and raise more prompts' mean
sampled reward than it lowered?

A reply passes when every built-in reward with a known range (constraints, all_constraints, exact_answer, regex:
0 to 1; soft_overlong: -1 to 0) gives it its best score - the top for a positive weight, the bottom for a negative
one (a penalty); user, classifier and reward-model rewards have no pass line and count in the means only. Replies
are sampled as trl samples in training (top_k and repetition penalty off). A reward that fails here is reported,
not raised: the trained weights are saved all the same. Each prompt's replies, rewards and pass before and after
are kept in held_out.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from llmtune.config.schema import Recipe
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import replies
from llmtune.run.distributed import is_main_process, launched_with
from llmtune.run.files import read_json, write_json, write_text
from llmtune.tasks.grpo_rewards import call_reward, weighted_total

logger = logging.getLogger(__name__)

HELD_OUT_FILE = "held_out.jsonl"
HELD_OUT_BEFORE = "held_out_before.json"  # the untrained scores, read back by --resume
SCORE_RANGE = {"constraints": (0.0, 1.0), "all_constraints": (0.0, 1.0), "exact_answer": (0.0, 1.0),
               "regex": (0.0, 1.0), "soft_overlong": (-1.0, 0.0)}  # (lowest, highest)


class HeldOut:
    """Scores the model on the held-out prompts; `before` once training is about to start, `after` once it ends."""

    def __init__(self, recipe: Recipe, prompts: Any, names: list[str], weights: list[float], scorers: list[Any],
                 resume: bool = False) -> None:
        self.rl, self.prompts, self.names, self.weights, self.scorers = recipe.rl, prompts, names, weights, scorers
        self.resume = resume
        self.best = {name: SCORE_RANGE[item["function"]][1 if weight > 0 else 0]
                     for name, item, weight in zip(names, recipe.rl.rewards, weights)
                     if item.get("function") in SCORE_RANGE and weight != 0}
        self.model: Any = None
        self.tokenizer: Any = None
        self.first: dict[str, Any] | None = None

    def before(self, run_dir: Path) -> None:
        if launched_with("FSDP") or launched_with("DEEPSPEED"):
            logger.info("Held-out replies are not scored under FSDP or DeepSpeed (the weights are sharded across "
                        "processes); trl's own sampled evaluation still runs.")
            return
        if not is_main_process():
            return
        saved = run_dir / HELD_OUT_BEFORE
        if self.resume and saved.exists():  # the first start scored the untrained model: read it back
            self.first = read_json(saved)
            return
        with torch.random.fork_rng():  # sampling here leaves training's random stream as it was
            self.first = self.score()
        write_json(saved, self.first)

    def after(self, run_dir: Path) -> dict[str, Any]:
        if not is_main_process() or self.first is None:
            return {}
        try:
            with torch.random.fork_rng():
                last = self.score()
        except LlmtuneError as exc:  # the trained weights are saved next: a reward's failure here must not cost them
            logger.error("Held-out replies after training could not be scored: %s", exc)
            return {"held_out": {"error": str(exc)}}
        write_text(run_dir / HELD_OUT_FILE, "".join(
            json.dumps({"prompt": a["prompt"], "before": a["replies"], "after": b["replies"]}, ensure_ascii=False) + "\n"
            for a, b in zip(self.first["per_prompt"], last["per_prompt"])))
        (run_dir / HELD_OUT_BEFORE).unlink(missing_ok=True)  # now in held_out.jsonl
        result = {"prompts": len(self.prompts), "before": self.first["summary"], "after": last["summary"]}
        kinds = ("greedy_pass", "sampled_pass") if self.best else ()
        result["sign_test"] = {kind: sign_test([p[kind] for p in self.first["per_prompt"]],
                                               [p[kind] for p in last["per_prompt"]]) for kind in kinds}
        # every reward, pass line or not: did each prompt's mean sampled reward rise?
        result["sign_test"]["sampled_reward"] = sign_test([self.sampled_reward(p) for p in self.first["per_prompt"]],
                                                          [self.sampled_reward(p) for p in last["per_prompt"]])
        return {"held_out": result}

    def sampled_reward(self, record: dict[str, Any]) -> float:
        return _mean([self.total(reply["rewards"]) for reply in record["replies"]["sampled"]])

    def score(self) -> dict[str, Any]:
        conversations = list(self.prompts["prompt"])
        columns = {c: list(self.prompts[c]) for c in self.prompts.column_names if c != "prompt"}
        greedy = replies(self.model, self.tokenizer, conversations, self.rl.max_completion_length,
                         progress="Held-out prompts, greedy replies")
        sampled = replies(self.model, self.tokenizer, conversations, self.rl.max_completion_length,
                          self.rl.num_generations, self.rl.temperature, self.rl.top_p,
                          progress=f"Held-out prompts, {self.rl.num_generations} sampled replies each", top_k=0,
                          repetition_penalty=1.0)
        summary, per_prompt = {}, [{"prompt": c[-1]["content"], "replies": {}} for c in conversations]
        for kind, groups in (("greedy", greedy), ("sampled", sampled)):
            flat = [(i, reply) for i, group in enumerate(groups) for reply in group]
            rows = {name: [values[i] for i, _ in flat] for name, values in columns.items()}
            scores = {name: call_reward(scorer, name, f"rl.rewards[{k}]", [r["text"] for _, r in flat],
                                        prompts=[conversations[i] for i, _ in flat],
                                        completion_ids=[r["ids"] for _, r in flat], **rows)
                      for k, (name, scorer) in enumerate(zip(self.names, self.scorers))}
            passed = [self.passes({n: scores[n][j] for n in self.names}) for j in range(len(flat))]
            summary[kind] = {"reward": _mean([self.total({n: scores[n][j] for n in self.names})
                                              for j in range(len(flat))]),
                             **{f"reward_{n}": _mean(scores[n]) for n in self.names}}
            if self.best:
                summary[kind]["pass_rate"] = _mean([float(p) for p in passed])
            summary[kind].update(diversity([r["text"] for _, r in flat]))
            for j, (i, reply) in enumerate(flat):
                per_prompt[i]["replies"].setdefault(kind, []).append(
                    {"text": reply["text"], "rewards": {n: scores[n][j] for n in self.names}, "passed": passed[j]})
        for record in per_prompt:
            record["greedy_pass"] = float(record["replies"]["greedy"][0]["passed"])
            record["sampled_pass"] = _mean([float(r["passed"]) for r in record["replies"]["sampled"]])
        return {"summary": summary, "per_prompt": per_prompt}

    def passes(self, scores: dict[str, float | None]) -> bool:
        judged = [(scores[n], best) for n, best in self.best.items() if scores[n] is not None]
        return bool(judged) and all(abs(value - best) < 1e-9 for value, best in judged)

    def total(self, scores: dict[str, float | None]) -> float | None:
        return weighted_total(self.weights, list(scores.values()))


def sign_test(before: list[float], after: list[float]) -> dict[str, Any]:
    """Exact one-sided sign test over prompts: of those whose score changed, how many rose, how many fell, and the
    chance of at least that many rising if rises and falls were equally likely (ties dropped)."""
    rose = sum(a > b for b, a in zip(before, after))
    fell = sum(a < b for b, a in zip(before, after))
    changed = rose + fell
    p = sum(math.comb(changed, k) for k in range(rose, changed + 1)) / 2 ** changed if changed else 1.0
    return {"rose": rose, "fell": fell, "unchanged": len(before) - changed, "p_value": p}


def diversity(texts: list[str]) -> dict[str, float]:
    """How varied the replies are, so a collapse into one repeated answer shows: distinct-1 and distinct-2 (unique
    word uni- and bigrams over all of them, lower-cased, split on spaces) and the share of replies that are unique."""
    words = [text.lower().split() for text in texts]
    grams = {n: [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)] for n in (1, 2)}
    return {**{f"distinct_{n}": len(set(g)) / len(g) if g else 0.0 for n, g in grams.items()},
            "unique_replies": len({t.strip() for t in texts}) / len(texts) if texts else 0.0}


def held_out_lines(held_out: dict[str, Any]) -> list[str]:
    """The console's end-of-run lines for the held-out prompts."""
    lines = [f"Held-out prompts ({held_out['prompts']}): before -> after"]
    for kind in ("greedy", "sampled"):
        before, after = held_out["before"][kind], held_out["after"][kind]
        parts = [f"{name} {before[name]:.3f} -> {after[name]:.3f}" for name in after]
        lines.append(f"  {kind}: " + ", ".join(parts))
    for kind, test in held_out.get("sign_test", {}).items():
        lines.append(f"  {kind.replace('_', ' ')}: {test['rose']} prompts rose, {test['fell']} fell, "
                     f"sign test p = {test['p_value']:.3g}")
    return lines


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")
