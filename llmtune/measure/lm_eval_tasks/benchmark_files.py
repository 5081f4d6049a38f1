"""Loaders for the benchmark files in their published layouts (the folder `llmtune eval --data-dir` names), each
returning the rows in the fields lm-evaluation-harness's own task of that name reads, so the YAML files beside this
module keep lm-eval's prompts, choices and metrics unchanged.

lm-eval imports this file by path (`!function benchmark_files.NAME` in the YAML) and calls a loader with the task's
metadata: `data_dir` (given with `--metadata '{"data_dir": ...}'` or by llmtune) and whatever else the metadata
holds, which the loaders ignore. Plain Python and `datasets` only: no llmtune import, so the same folder works with
the `lm_eval` command (`--include_path`).
"""

from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path
from typing import Any

import datasets

# The files each task reads, relative to the data folder: what a missing-file error lists.
FILES = {
    "arc_easy": ["arc_easy/ARC-Easy-Test.jsonl", "arc_easy/ARC-Easy-Dev.jsonl", "arc_easy/ARC-Easy-Train.jsonl"],
    "arc_challenge": ["arc_challenge/ARC-Challenge-Test.jsonl", "arc_challenge/ARC-Challenge-Dev.jsonl",
                      "arc_challenge/ARC-Challenge-Train.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"],
    "boolq": ["boolq/val.jsonl"],
    "winogrande": ["winogrande/dev.jsonl"],
    "gsm8k": ["gsm8k/test.jsonl"],
    "ifeval": ["ifeval/input_data.jsonl"],
    "mmlu": ["mmlu/test/SUBJECT_test.csv", "mmlu/dev/SUBJECT_dev.csv"],
}


def _folder(data_dir: str | None) -> Path:
    if not data_dir:
        raise ValueError("These tasks read local benchmark files: give their folder as metadata "
                         "(lm_eval --metadata '{\"data_dir\": \"/path/to/benchmarks\"}', llmtune eval --data-dir).")
    return Path(data_dir)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _splits(rows: dict[str, list[dict[str, Any]]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(items) for name, items in rows.items()})


def _arc_rows(path: Path) -> list[dict[str, Any]]:
    """AI2's nested layout flattened into the Hub copy's: question, choices {text, label}, answerKey."""
    rows = []
    for item in _jsonl(path):
        choices = item["question"]["choices"]
        rows.append({"id": item["id"], "question": item["question"]["stem"], "answerKey": item["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return rows


def _arc(data_dir: str | None, folder: str, stem: str) -> datasets.DatasetDict:
    base = _folder(data_dir) / folder
    return _splits({split: _arc_rows(base / f"{stem}-{name}.jsonl")
                    for split, name in (("train", "Train"), ("validation", "Dev"), ("test", "Test"))})


def arc_easy(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _arc(data_dir, "arc_easy", "ARC-Easy")


def arc_challenge(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _arc(data_dir, "arc_challenge", "ARC-Challenge")


def piqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """goal, sol1, sol2, with the label joined from valid-labels.lst line by line."""
    base = _folder(data_dir) / "piqa"
    rows = _jsonl(base / "valid.jsonl")
    labels = [int(line) for line in (base / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{base}: valid.jsonl has {len(rows)} rows but valid-labels.lst {len(labels)} labels.")
    return _splits({"validation": [{**row, "label": label} for row, label in zip(rows, labels)]})


def hellaswag(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The 6-line records (context, gold digit, four endings) as lm-eval's processed rows: query, choices, label.

    The file's text was already cleaned of WikiHow's bracket tags when it was made, so it is used as is."""
    path = _folder(data_dir) / "hellaswag" / "hellaswag_val_full.txt.bz2"
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a whole number of 6-line records.")
    rows = [{"query": lines[i], "label": lines[i + 1].strip(), "choices": lines[i + 2:i + 6]}
            for i in range(0, len(lines), 6)]
    return _splits({"validation": rows})


def boolq(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """SuperGLUE's BoolQ with the label as 0 (false) / 1 (true) for the choices no / yes."""
    rows = _jsonl(_folder(data_dir) / "boolq" / "val.jsonl")
    return _splits({"validation": [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                                    "label": int(str(r["label"]).lower() == "true")} for r in rows]})


def winogrande(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _splits({"validation": _jsonl(_folder(data_dir) / "winogrande" / "dev.jsonl")})


def gsm8k(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return _splits({"test": _jsonl(_folder(data_dir) / "gsm8k" / "test.jsonl")})


def ifeval(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The authors' prompts with their instruction ids and each instruction's arguments (key, prompt,
    instruction_id_list, kwargs), the fields of the Hub copy lm-eval's own task reads."""
    return _splits({"train": _jsonl(_folder(data_dir) / "ifeval" / "input_data.jsonl")})


def ifeval_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, results)


def ifeval_instruction_mean(items: list[list[bool]]) -> float:
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    return agg_inst_level_acc(items)


def mmlu(data_dir: str | None = None, subject: str = "", **_: Any) -> datasets.DatasetDict:
    """One subject's headerless CSVs (question, A, B, C, D, answer letter) as question, choices, answer index."""
    base = _folder(data_dir) / "mmlu"

    def read(split: str) -> list[dict[str, Any]]:
        with (base / split / f"{subject}_{split}.csv").open(newline="", encoding="utf-8") as handle:
            return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(answer.strip())}
                    for q, a, b, c, d, answer in csv.reader(handle)]

    return _splits({"test": read("test"), "dev": read("dev")})


def winogrande_text(doc: dict[str, Any]) -> int:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text

    return doc_to_text(doc)


def winogrande_target(doc: dict[str, Any]) -> str:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target

    return doc_to_target(doc)


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice

    return doc_to_choice(doc)
