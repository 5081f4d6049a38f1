"""Standard benchmarks through lm-evaluation-harness: llmtune's offline task files, scores equal to a direct
log-likelihood computation, the forgetting check and its bad input. Real checkpoints and the real benchmark files
are in test_real_benchmarks.py."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.errors import LlmtuneError
from llmtune.measure.forgetting import compare, stderr_name
from llmtune.measure.harness import BenchmarkSettings, check_benchmarks, run_benchmarks

ARC = [  # (question, choices, answer)
    ("Which gas do plants take in from the air?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    ("What is frozen water called?", ["ice", "steam", "sand"], "A"),
    ("How many legs does a spider have?", ["six", "ten", "eight", "four"], "C"),
    ("Which is a mammal?", ["shark", "trout", "salmon", "whale", "eel"], "D"),
]

IFEVAL = {"key": 7, "prompt": "Describe a dog in fewer than 3 sentences, without commas, with at least 2 words in "
                              "capitals.",
          "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_sentences",
                                  "change_case:capital_word_frequency"],
          "kwargs": [{}, {"num_sentences": 3, "relation": "less than"},
                     {"capital_frequency": 2, "capital_relation": "at least"}]}


def write_benchmark_folder(folder: Path) -> Path:
    """A few items of every benchmark, each in its published layout (see ../shared/data/benchmarks/README.md)."""
    def jsonl(path: str, rows: list[dict]) -> None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("".join(json.dumps(r) + "\n" for r in rows))

    arc = [{"id": f"q{i}", "question": {"stem": q, "choices": [{"text": c, "label": "ABCDE"[j]}
                                                                for j, c in enumerate(choices)]}, "answerKey": a}
           for i, (q, choices, a) in enumerate(ARC)]
    for name, stem in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        for split in ("Test", "Dev", "Train"):
            jsonl(f"{name}/{stem}-{split}.jsonl", arc)
    jsonl("piqa/valid.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                               {"goal": "Dry a towel", "sol1": "soak it", "sol2": "hang it in the sun"}])
    (folder / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    hellaswag = ["Cooking: A man cracks an egg. he", "2", "sings.", "flies away.", "pours it into a bowl.",
                 "paints the egg.", "Sports: A woman lifts a bar. she", "0", "sets it down.", "swims.", "melts.",
                 "reads."]
    (folder / "hellaswag").mkdir()
    (folder / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress("\n".join(hellaswag).encode()))
    jsonl("boolq/val.jsonl", [{"question": "is water wet", "passage": "Water -- water is wet.", "idx": 0,
                               "label": "true"},
                              {"question": "is fire cold", "passage": "Fire -- fire is hot.", "idx": 1,
                               "label": "false"}])
    jsonl("winogrande/dev.jsonl", [{"qID": "a", "sentence": "The cup beat the plate because _ was stronger.",
                                    "option1": "the cup", "option2": "the plate", "answer": "1"}])
    jsonl("gsm8k/test.jsonl", [{"question": f"What is {n} + {n}?", "answer": f"{n} + {n} = {2 * n}\n#### {2 * n}"}
                               for n in range(1, 7)])
    jsonl("ifeval/input_data.jsonl", [IFEVAL])
    for split in ("test", "dev"):
        (folder / "mmlu" / split).mkdir(parents=True)
        (folder / "mmlu" / split / f"anatomy_{split}.csv").write_text(
            '"Where is the femur?",leg,arm,head,hand,A\nWhich organ pumps blood?,lung,liver,heart,skin,C\n')
    return folder


@pytest.fixture(scope="module")
def benchmark_folder(tmp_path_factory) -> Path:
    return write_benchmark_folder(tmp_path_factory.mktemp("benchmarks"))


def test_every_task_reads_its_published_layout_as_lm_evals_own_fields(benchmark_folder):
    """What lm-eval's prompt, choices and gold answer become for one item of each format (oracle: the files)."""
    from lm_eval.tasks import TaskManager

    from llmtune.measure.harness import TASK_DIR

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"data_dir": str(benchmark_folder)})
    tasks = manager.load(["arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "winogrande", "gsm8k",
                          "mmlu_anatomy", "ifeval"])["tasks"]

    def first(name: str, index: int = 0):
        task = tasks[name]
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        doc = docs[index]
        choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
        return task.doc_to_text(doc), choices, task.doc_to_target(doc), len(docs)

    assert first("arc_easy", 3) == ("Question: Which is a mammal?\nAnswer:", ARC[3][1], 3, 4)
    assert first("arc_challenge", 2)[2] == 2
    assert first("piqa", 1) == ("Question: Dry a towel\nAnswer:", ["soak it", "hang it in the sun"], 1, 2)
    assert first("hellaswag") == ("Cooking: A man cracks an egg. he", ["sings.", "flies away.", "pours it into a bowl.",
                                                                       "paints the egg."], 2, 2)
    assert [first("boolq", i)[2] for i in (0, 1)] == [1, 0]  # "true" / "false" -> yes / no
    assert first("boolq")[1] == ["no", "yes"]
    assert first("winogrande") == (0, ["The cup beat the plate because the cup", "The cup beat the plate because "
                                       "the plate"], "was stronger.", 1)
    assert first("gsm8k")[0] == "Question: What is 1 + 1?\nAnswer:" and first("gsm8k")[2].endswith("#### 2")
    text, choices, target, count = first("mmlu_anatomy", 1)
    assert text.startswith("Which organ pumps blood?\nA. lung") and choices == ["A", "B", "C", "D"]
    assert (target, count) == (2, 2)
    assert first("ifeval") == (IFEVAL["prompt"], None, 0, 1)


def test_ifeval_replies_are_scored_by_lm_evals_checkers_offline(benchmark_folder):
    """IFEval's checkers work without nltk's downloadable data; oracle: the three rules applied by hand. "Dr." ends
    no sentence, THE and BIG are the capital words, the comma and the fourth sentence break the rules."""
    from lm_eval.tasks import TaskManager

    from llmtune.measure.harness import TASK_DIR
    from llmtune.patches.ifeval_without_nltk_data import ifeval_checkers

    ifeval_checkers()
    task = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                       metadata={"data_dir": str(benchmark_folder)}).load(["ifeval"])["tasks"]["ifeval"]
    doc = task.test_docs()[0]
    follows = task.process_results(doc, ["Dr. Smith walks THE BIG dog. It barks."])
    assert follows["prompt_level_strict_acc"] is True and follows["inst_level_strict_acc"] == [True, True, True]
    breaks = task.process_results(doc, ["Dr. Smith, a vet, walks the dog. It barks. It runs. It sleeps."])
    assert breaks["prompt_level_strict_acc"] is False and breaks["inst_level_strict_acc"] == [False, False, False]
    half = task.process_results(doc, ["Dr. Smith walks THE dog. It barks."])
    assert half["inst_level_strict_acc"] == [True, True, False] and half["prompt_level_loose_acc"] is False


def direct_log_likelihoods(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """log P(continuation | context), summed over its tokens, by a plain forward pass per choice."""
    scores = []
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    for continuation in continuations:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
    return scores


@pytest.mark.slow  # ~3 s: lm-eval's task index and 15 requests on a tiny model
def test_scores_equal_a_direct_log_likelihood_computation(tiny_llama, benchmark_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    settings = BenchmarkSettings(["arc_easy"], batch_size=3, data_dir=str(benchmark_folder), log_samples=True)
    result = run_benchmarks(model, tokenizer, settings)

    acc, acc_norm = [], []
    for sample, (question, choices, answer) in zip(result.samples["arc_easy"], ARC):
        lls = direct_log_likelihoods(model, tokenizer, f"Question: {question}\nAnswer:", [" " + c for c in choices])
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(lls, abs=1e-4)
        gold = "ABCDE".index(answer)
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        normalised = [ll / len(c) for ll, c in zip(lls, choices)]
        acc_norm.append(float(max(range(len(lls)), key=normalised.__getitem__) == gold))
    scores = result.scores["arc_easy"]
    assert scores["acc"] == pytest.approx(sum(acc) / 4) and scores["acc_norm"] == pytest.approx(sum(acc_norm) / 4)
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(sum((a - sum(acc) / 4) ** 2 for a in acc) / 3 / 4))


def test_forgetting_flags_a_drop_beyond_the_95_percent_interval_only():
    before = {"arc_easy": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": 0.62, "acc_norm_stderr": 0.02},
              "gsm8k": {"exact_match,strict-match": 0.10, "exact_match_stderr,strict-match": 0.01}}
    after = {"arc_easy": {"acc": 0.5, "acc_stderr": 0.02, "acc_norm": 0.58, "acc_norm_stderr": 0.02},
             "gsm8k": {"exact_match,strict-match": 0.05, "exact_match_stderr,strict-match": 0.01}}
    rows = {r["task"]: r for r in compare(before, after)}
    # acc_norm is the headline where it exists: 0.04 < 1.96 * sqrt(2) * 0.02 = 0.0554 -> within chance
    assert rows["arc_easy"]["metric"] == "acc_norm" and not rows["arc_easy"]["dropped"]
    assert rows["arc_easy"]["interval_95"] == pytest.approx(1.96 * math.sqrt(2) * 0.02)
    # 0.05 > 1.96 * sqrt(2) * 0.01 = 0.0277 -> flagged
    assert rows["gsm8k"]["dropped"] and rows["gsm8k"]["change"] == pytest.approx(-0.05)
    assert stderr_name("exact_match,strict-match") == "exact_match_stderr,strict-match"


def test_an_unknown_task_offline_is_refused_with_the_closest_name(benchmark_folder):
    with pytest.raises(LlmtuneError, match='"hellaswag"') as caught:
        check_benchmarks(BenchmarkSettings(["helaswag"], data_dir=str(benchmark_folder)))
    assert "arc_easy" in str(caught.value)


def test_a_missing_folder_or_file_names_what_the_tasks_read(benchmark_folder, tmp_path, monkeypatch):
    with pytest.raises(LlmtuneError, match="does not exist.*arc_easy/ARC-Easy-Test.jsonl"):
        check_benchmarks(BenchmarkSettings(["arc_easy"], data_dir=str(tmp_path / "nowhere")))
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(LlmtuneError, match="lacks piqa/valid-labels.lst"):
        check_benchmarks(BenchmarkSettings(["piqa"], data_dir=str(tmp_path)))
    monkeypatch.delenv("LLMTUNE_BENCHMARK_DATA", raising=False)
    with pytest.raises(LlmtuneError, match="--data-dir"):
        check_benchmarks(BenchmarkSettings(["piqa"]))  # tests run offline: the Hub copy is out of reach
    with pytest.raises(LlmtuneError, match="limit is 0"):
        check_benchmarks(BenchmarkSettings(["piqa"], limit=0, data_dir=str(benchmark_folder)))


def test_eval_tasks_refuses_a_classifier_run_before_loading_it(tiny_bert, benchmark_folder, tmp_path):
    import shutil

    run = tmp_path / "classifier-run"
    shutil.copytree(tiny_bert, run)
    (run / "run.json").write_text(json.dumps({"recipe": {"task": "classification"}}))
    result = run_main("eval", str(run), "--tasks", "arc_easy", "--data-dir", str(benchmark_folder))
    assert result.returncode == 2 and "needs a causal language model" in result.stderr, result.stderr


def test_benchmarks_in_a_classification_recipe_are_refused():
    from llmtune import load_recipe

    with pytest.raises(LlmtuneError, match="eval.benchmarks' is set for task classification"):
        load_recipe("recipes/quickstart.yaml", ["eval.benchmarks=[arc_easy]"])


@pytest.mark.slow  # an SFT run with benchmarks before and after (~6 s)
def test_a_run_scores_its_benchmarks_before_and_after_and_reports_them(tiny_llama, alpaca_files, benchmark_folder,
                                                                      tmp_path):
    from llmtune import load_recipe, train

    run_dir = tmp_path / "run"
    metrics = train(load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        f"model.name={tiny_llama}", "data.dataset=null", f"data.train_file={alpaca_files['train']}",
        f"data.eval_file={alpaca_files['eval']}", "data.validation_fraction=0", "training.max_steps=2", "training.batch_size=2",
        "training.gradient_accumulation=1", "lm.generation_prompts=[]", "training.learning_rate=1e-2",
        "eval.benchmarks=[arc_easy,piqa]", f"eval.benchmark_data_dir={benchmark_folder}", f"output.dir={run_dir}"]))
    benchmarks = metrics["benchmarks"]
    assert set(benchmarks["before"]) == set(benchmarks["after"]) == {"arc_easy", "piqa"}
    saved = json.loads((run_dir / "metrics.json").read_text())["benchmarks"]
    assert saved == json.loads(json.dumps(benchmarks))
    rows = {r["task"]: r for r in benchmarks["forgetting"]}
    assert rows["arc_easy"]["before"] == benchmarks["before"]["arc_easy"]["acc_norm"]
    assert rows["piqa"]["after"] == benchmarks["after"]["piqa"]["acc_norm"]
    results = json.loads((run_dir / "benchmarks" / "after.json").read_text())
    assert results["scores"] == saved["after"] and results["results"]["arc_easy"]["acc,none"] == saved["after"][
        "arc_easy"]["acc"]
    assert results["llmtune"]["data_files"]["arc_easy/ARC-Easy-Test.jsonl"]  # which copy of the data scored it
    report = (run_dir / "report.html").read_text()
    assert "Benchmarks (forgetting check)" in report and "arc_easy" in report
    assert "### Benchmarks" in (run_dir / "README.md").read_text()


@pytest.mark.slow  # ~8 s: the same tasks four times on a tiny model
def test_the_shared_context_scorer_gives_lm_evals_own_log_likelihoods(tiny_llama, benchmark_folder, caplog):
    """llmtune's scorer (each question once, its answers beside it in one packed row) against lm-eval's HF model, on
    tasks with short answers (ARC, HellaSwag), long ones (PIQA) and per-choice contexts (WinoGrande) - and, for a
    model whose attention ignores the mask it is given, lm-eval's numbers all the same, with a warning."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmtune.measure.harness import TASK_DIR
    from llmtune.measure.scorer import SharedContextLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    maskless = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    forward = maskless.forward
    maskless.forward = lambda *args, **kwargs: forward(*args, **{k: v for k, v in kwargs.items()
                                                                 if k not in ("attention_mask", "position_ids")})
    unhooked = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    unhooked.get_output_embeddings = lambda: None  # no head to hook: every position's logits, the read ones picked
    tasks = ["arc_easy", "hellaswag", "piqa", "winogrande"]
    log_likelihoods = []
    for kind, scored in ((HFLM, model), (SharedContextLM, model), (SharedContextLM, maskless),
                         (SharedContextLM, unhooked)):
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                              metadata={"data_dir": str(benchmark_folder)})
        with caplog.at_level("WARNING", logger="llmtune.measure.scorer"):
            result = simple_evaluate(kind(pretrained=scored, tokenizer=tokenizer, batch_size=3), tasks=tasks,
                                     task_manager=manager, log_samples=True, bootstrap_iters=0)
        log_likelihoods.append({t: [r[0] for s in result["samples"][t] for r in s["resps"]] for t in tasks})
    lm_eval_own, *ours = log_likelihoods
    for shared in ours:
        for task in tasks:
            assert [greedy for _, greedy in shared[task]] == [greedy for _, greedy in lm_eval_own[task]], task
            assert [ll for ll, _ in shared[task]] == pytest.approx([ll for ll, _ in lm_eval_own[task]], abs=1e-4), task
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmtune.measure.scorer"]
    assert len(warnings) == 1 and "as its own sequence" in warnings[0]  # the maskless model only
    model.config.sliding_window = 12  # the mask built for trees has no window: longer sequences are lm-eval's
    windowed = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    assert windowed._handles([1] * 7, [2] * 5) and not windowed._handles([1] * 8, [2] * 5)


def test_packed_rows_hold_every_question_once_without_overlap():
    """Question trees (context, then each answer but its last token) packed longest first into the first row with
    room: every request placed once, no two trees overlapping, none past its batch's width (its longest tree), at
    most `rows` rows a batch - and fewer padded tokens than one tree per row."""
    from llmtune.measure.scorer import packed, tree_inputs, tree_length

    generator = torch.Generator().manual_seed(0)
    requests, questions = [], []
    for q in range(200):
        context = [q + 1] * int(torch.randint(1, 30, (1,), generator=generator))
        members = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            members.append(len(requests))
            requests.append((("c", "a"), context, [7] * int(torch.randint(1, 25, (1,), generator=generator))))
        questions.append((tuple(context), members))
    batches = list(packed(questions, requests, rows=8))
    placed = [i for batch in batches for row in batch for tree in row for i in tree.members]
    assert sorted(placed) == list(range(len(requests)))
    padded = 0
    for batch in batches:
        assert len(batch) <= 8
        width = max(tree.end for row in batch for tree in row)
        for row in batch:
            spans = sorted((tree.offset, tree.end) for tree in row)
            assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
            assert spans[-1][1] <= width
            padded += width - sum(end - start for start, end in spans)
        ids, positions, mask = tree_inputs(batch, requests, pad=0, dtype=torch.float32)
        assert ids.shape == positions.shape == (len(batch), width) and mask.shape == (len(batch), 1, width, width)
    lengths = sorted((tree_length(q, requests) for q in questions), reverse=True)
    one_per_row = sum(lengths[start] - length for start in range(0, len(lengths), 8)
                      for length in lengths[start:start + 8])
    assert padded < one_per_row
