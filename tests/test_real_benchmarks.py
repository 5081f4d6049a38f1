"""Benchmarks on a real checkpoint and the real benchmark files (../shared/data/benchmarks): llmtune's scores
equal lm-evaluation-harness's own loading and scoring. A real LoRA run's eval.benchmarks (before / after, unmerged
= merged) are checked with the SFT run of tests/test_real_smollm2_sft.py."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, require_shared

pytestmark = pytest.mark.slow  # a real checkpoint on real benchmark files

BENCHMARKS = SHARED_DATA / "benchmarks"


def test_smollm2_scores_equal_lm_evals_own_loading_and_scoring(smollm2_path):
    """lm-eval loads the checkpoint itself (its `hf` model from the folder) on the same task files: per-task
    acc and acc_norm on 20 items of ARC-Easy, PIQA and HellaSwag equal llmtune's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmtune import api
    from llmtune.measure.harness import TASK_DIR, scores

    require_shared(BENCHMARKS / "arc_easy" / "ARC-Easy-Test.jsonl")
    tasks = ["arc_easy", "piqa", "hellaswag"]
    ours = api.benchmark("smollm2-135m-instruct", tasks, limit=20, batch_size=16, data_dir=BENCHMARKS)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(BENCHMARKS)})
    theirs = scores(simple_evaluate(model="hf", model_args={"pretrained": smollm2_path, "dtype": "float32",
                                                            "device": "cpu"},
                                    tasks=tasks, limit=20, batch_size=16, task_manager=manager, log_samples=False))
    assert ours["precision"] == "fp32" and ours["limit"] == 20
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            assert ours["scores"][task][metric] == theirs[task][metric], (task, metric)
    assert ours["scores"]["arc_easy"]["acc_norm"] > 0.3  # above chance (0.25): the model reads the questions


def test_gsm8k_answers_are_the_models_greedy_continuations_and_exact_match_follows_from_them(smollm2_path, tmp_path):
    """GSM8K is scored by generation: each logged answer is transformers' own greedy continuation of the logged
    prompt (cut at the task's stop words or the 48-token cap asked for), the target is the file's "#### N" answer,
    and both filters' exact match is what their regexes make of the answers."""
    import json
    import re

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune import api

    require_shared(BENCHMARKS / "gsm8k" / "test.jsonl")
    out = tmp_path / "gsm8k.json"
    ours = api.benchmark("smollm2-135m-instruct", ["gsm8k"], limit=3, num_fewshot=1, data_dir=BENCHMARKS,
                         out=out, log_samples=True, max_gen_tokens=48)
    samples = [json.loads(line) for line in (tmp_path / "gsm8k-samples-gsm8k.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (BENCHMARKS / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    assert {s["doc_id"] for s in samples} == {0, 1, 2}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    for filter_name, pattern, group in (("strict-match", r"#### (\-?[0-9\.\,]+)", 0),
                                        ("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)):
        matches = []
        for sample in (s for s in samples if s["filter"] == filter_name):
            question = questions[sample["doc_id"]]
            assert sample["target"] == question["answer"]
            prompt, answer = sample["arguments"][0][0], sample["resps"][0][0]
            assert prompt.endswith(f"Question: {question['question']}\nAnswer:") and prompt.count("Question:") == 2
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            steps = len(tokenizer(answer).input_ids) + 8
            with torch.no_grad():
                greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                        do_sample=False)
            continuation = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=False)
            assert re.split(r"Question:|</s>|<\|im_end\|>", continuation)[0].startswith(answer)
            assert len(tokenizer(answer).input_ids) <= 48 + 1
            found = re.findall(pattern, answer)
            extracted = (found[group] if found else "[invalid]")
            extracted = extracted if isinstance(extracted, str) else next(g for g in extracted if g)
            wanted = question["answer"].split("#### ")[-1]
            clean = [re.sub(r",|\$|\.$", "", text.split("#### ")[-1]).strip().lower() for text in (extracted, wanted)]
            matches.append(float(clean[0] == clean[1]))
            assert sample["exact_match"] == matches[-1]
        assert ours["scores"]["gsm8k"][f"exact_match,{filter_name}"] == sum(matches) / len(matches)
