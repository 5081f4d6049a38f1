"""Real checkpoint, real data: MiniLM on SST-2 (GLUE files), full fine-tuning and LoRA.

These train for a minute or two each on 2 CPU cores; they are the proof that fine-tuning works, not a
smoke test. Accuracy is measured on the whole SST-2 dev set (872 sentences, 444 positive).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, check_report, run_main

from llmtune import load_recipe, train
from llmtune.models.sources import resolve_model

pytestmark = pytest.mark.slow  # trains or loads a real checkpoint on real data

MAJORITY_RATE = 444 / 872


def sst2_recipe(shared_data, recipe: str, run_dir, *extra: str):
    return load_recipe(f"recipes/{recipe}", [
        "data.dataset=null",
        f"data.train_file={shared_data / 'sst2' / 'train.tsv'}",
        f"data.eval_file={shared_data / 'sst2' / 'dev.tsv'}",
        "data.eval_split=null",
        "data.max_train_samples=512",
        f"output.dir={run_dir}",
        "training.epochs=3",
        "training.batch_size=16",
        "training.eval_every=no",
        "training.save_every=epoch",
        "training.early_stopping_patience=null",
        *extra,
    ])


@pytest.fixture(scope="module")
def lora_run(shared_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sst2") / "lora"
    metrics = train(sst2_recipe(shared_data, "sst2_minilm_lora.yaml", run_dir))
    return run_dir, metrics


def test_full_fine_tune_on_512_sentences_reaches_070_dev_accuracy(shared_data, tmp_path):
    metrics = train(sst2_recipe(shared_data, "sst2_minilm_full.yaml", tmp_path / "full", "training.learning_rate=1.5e-4"))
    assert metrics["after"]["accuracy"] >= 0.70, metrics
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"]


def test_lora_trains_above_majority_rate(lora_run):
    _, metrics = lora_run
    assert metrics["after"]["accuracy"] > MAJORITY_RATE, metrics


def test_the_run_report_plots_its_logged_curves_and_the_confusion_matrix(lora_run):
    run_dir, metrics = lora_run
    page = check_report(run_dir, {"loss.png", "learning_rate.png", "grad_norm.png", "confusion_matrix.png",
                                  "throughput_samples_per_second.png"})
    matrix = metrics["eval_details"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == 872 and [sum(row) for row in matrix] == [428, 444]  # true labels per row
    assert "<h2>Per class" in page


def test_adapter_loads_with_plain_peft_and_matches_llmtune_predict(lora_run, shared_data, tmp_path):
    run_dir, _ = lora_run
    sentences = [line.split("\t")[0] for line in (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[1:21]]
    inputs = tmp_path / "sentences.json"
    inputs.write_text(json.dumps(sentences))

    llmtune_out = run_main("predict", str(run_dir), "--precision", "fp32", *sum((["--text", s] for s in sentences), []),
                          cwd=REPO)
    assert llmtune_out.returncode == 0, llmtune_out.stderr[-2000:]
    ours = [json.loads(line) for line in llmtune_out.stdout.strip().splitlines()]

    # The adapter names its base by Hub id (AutoPeftModelForSequenceClassification finds it where the Hub is
    # reachable); offline, a user's script puts it on the local copy. Plain peft + transformers, no llmtune.
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    base = resolve_model("minilm").path
    script = textwrap.dedent(f"""
        import json, sys, torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(run_dir)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(run_dir)!r})
        texts = json.load(open({str(inputs)!r}))
        with torch.no_grad():
            probs = torch.softmax(model(**tokenizer(texts, padding=True, truncation=True, max_length=64,
                                                    return_tensors="pt")).logits, -1)
        print(json.dumps({{"label_ids": probs.argmax(-1).tolist(),
                          "probs": probs.tolist(), "llmtune_loaded": "llmtune" in sys.modules}}))
    """)
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    theirs = json.loads(plain.stdout.strip().splitlines()[-1])
    assert theirs["llmtune_loaded"] is False
    labels = json.loads((run_dir / "run.json").read_text())["labels"]
    assert [labels[i] for i in theirs["label_ids"]] == [p["label"] for p in ours]
    for probs, record in zip(theirs["probs"], ours):
        assert probs == pytest.approx(list(record["probabilities"].values()), abs=1e-5)
