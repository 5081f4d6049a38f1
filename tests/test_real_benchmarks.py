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


def test_ifeval_scores_the_models_chat_replies_with_lm_evals_checkers(smollm2_path, tmp_path):
    """IFEval on the real prompts, offline: each logged reply came through the chat template and is cut at the
    token cap asked for, each item's four scores are lm-eval's checkers re-run on the logged reply, and the task's
    accuracies are their means."""
    import json

    from lm_eval.tasks.ifeval.utils import process_results
    from transformers import AutoTokenizer

    from llmtune import api

    require_shared(BENCHMARKS / "ifeval" / "input_data.jsonl")
    out = tmp_path / "ifeval.json"
    ours = api.benchmark("smollm2-135m-instruct", ["ifeval"], limit=4, data_dir=BENCHMARKS, out=out,
                         log_samples=True, chat_template=True, max_gen_tokens=32)
    samples = [json.loads(line) for line in (tmp_path / "ifeval-samples-ifeval.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in (BENCHMARKS / "ifeval" / "input_data.jsonl").read_text().splitlines()[:4]]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    strict = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc, reply = prompts[sample["doc_id"]], sample["resps"][0][0]
        assert doc["prompt"] in sample["arguments"][0][0] and "<|im_start|>user" in sample["arguments"][0][0]
        assert len(tokenizer(reply, add_special_tokens=False).input_ids) <= 32 + 1
        again = process_results(doc, [reply])
        assert sample["prompt_level_strict_acc"] == again["prompt_level_strict_acc"]
        assert sample["inst_level_loose_acc"] == again["inst_level_loose_acc"]
        strict.append(float(again["prompt_level_strict_acc"]))
    assert ours["scores"]["ifeval"]["prompt_level_strict_acc"] == pytest.approx(sum(strict) / 4)
    assert json.loads(out.read_text())["llmtune"]["settings"]["max_gen_tokens"] == 32
