"""Every command as a Python function (llmtune.api, re-exported from llmtune): each is called here from Python and
checked against an oracle - the run's own records, the plain libraries, or another API function's result."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import NO_REPORT, REPO, write_reviews

import llmtune
from llmtune.errors import LlmtuneError


@pytest.fixture(scope="module")
def classifier_run(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-classifier")
    files = write_reviews(folder)
    recipe = llmtune.load_recipe("recipes/quickstart.yaml", [
        f"model.name={tiny_bert}", f"data.train_file={files['train']}", f"data.eval_file={files['eval']}",
        "data.test_file=null", f"output.dir={folder / 'run'}", "training.epochs=1", "training.learning_rate=1e-3",
        "method.type=lora", "method.target_modules=[query, value]", NO_REPORT,
    ])
    metrics = llmtune.train(recipe)
    return {"recipe": recipe, "run": folder / "run", "files": files, "metrics": metrics}


def lm_recipe(model: str, train_file, out, *extra: str):
    return llmtune.load_recipe({"task": "sft", "model": {"name": str(model)}, "data": {"train_file": str(train_file)},
                                "method": {"type": "lora"}, "output": {"dir": str(out), "report": False}},
                               ["training.max_steps=1", "training.batch_size=4", *extra])


@pytest.fixture(scope="module")
def lm_run(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-lm")
    rows = [{"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
            for word in ("yes", "no", "maybe", "hello") * 4]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "text.txt").write_text("The cat sat on the mat. " * 12)
    recipe = lm_recipe(tiny_llama, folder / "train.jsonl", folder / "run", "training.max_steps=2")
    llmtune.train(recipe)
    return {"recipe": recipe, "run": folder / "run", "text": folder / "text.txt", "tiny_llama": tiny_llama}


def test_the_package_re_exports_every_api_function():
    from llmtune import api

    for name in api.__all__:
        assert getattr(llmtune, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        llmtune.no_such_command  # noqa: B018


def test_validate_and_plan_leave_the_recipe_and_its_output_folder_untouched(classifier_run, tmp_path):
    recipe = llmtune.load_recipe("recipes/quickstart.yaml", [
        f"model.name={classifier_run['recipe'].model.name}", f"data.train_file={classifier_run['files']['train']}",
        f"data.eval_file={classifier_run['files']['eval']}", "data.test_file=null", f"output.dir={tmp_path / 'new'}",
    ])
    summary = llmtune.validate(recipe)
    assert summary["task"] == "classification" and summary["method"] == recipe.method.type
    plan = llmtune.plan(recipe, "64GB", dry_run=False)
    assert plan.fits is True and plan.predicted_peak_bytes > 0
    assert recipe.output.dir == str(tmp_path / "new") and not (tmp_path / "new").exists()
    with pytest.raises(LlmtuneError, match="more than 0"):
        llmtune.plan(recipe, "0GB")


def test_evaluate_reproduces_the_runs_own_metrics_and_predict_agrees_with_it(classifier_run):
    run, eval_file = classifier_run["run"], classifier_run["files"]["eval"]
    record = json.loads((run / "run.json").read_text())
    assert "peft_custom_module" in record["patches"]  # the fused LoRA layer went in through peft's hook
    metrics = llmtune.evaluate(run, eval_file)
    assert metrics["accuracy"] == pytest.approx(classifier_run["metrics"]["after"]["accuracy"], abs=1e-6)
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    predictions = llmtune.predict(run, file=eval_file)
    assert [p["text"] for p in predictions] == [r["text"] for r in rows]
    correct = sum(p["label"] == r["label"] for p, r in zip(predictions, rows))
    assert correct / len(rows) == pytest.approx(metrics["accuracy"])
    assert llmtune.predict(run, ["Superb."]) == llmtune.predict(run, file=None, texts=["Superb."])
    with pytest.raises(LlmtuneError, match="batch_size must be at least 1"):
        llmtune.predict(run, ["x"], batch_size=0)
    with pytest.raises(LlmtuneError, match="causal language model"):
        llmtune.generate(run, ["hi"])  # a classifier, refused before loading


def test_resuming_a_finished_run_says_it_finished_and_changes_nothing(classifier_run):
    run = classifier_run["run"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(LlmtuneError, match="already finished"):
        llmtune.train(classifier_run["recipe"], resume=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_missing_run_is_named_as_missing_not_looked_up_on_the_hub(tmp_path):
    (tmp_path / "runs" / "real").mkdir(parents=True)
    (tmp_path / "runs" / "real" / "run.json").write_text("{}")
    with pytest.raises(LlmtuneError, match=r"does not exist.*Runs in .*: real") as caught:
        llmtune.predict(tmp_path / "runs" / "typo", ["x"])
    assert "hf download" not in str(caught.value)


@pytest.mark.slow
def test_merge_export_and_serve_give_the_runs_own_predictions(classifier_run, tmp_path):
    from fastapi.testclient import TestClient

    run, texts = classifier_run["run"], ["A superb toaster.", "Broke on day one."]
    expected = llmtune.predict(run, texts)
    merged = llmtune.merge(run, tmp_path / "merged")
    assert merged.max_logit_difference < 1e-4
    exported = llmtune.export(run, "onnx", out=tmp_path / "export")
    onnx = llmtune.predict(exported.files[0], texts)
    for want, got in zip(expected, onnx):
        assert np.allclose(list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-4)
        if abs(np.subtract(*want["probabilities"].values())) > 1e-3:  # a tiny model near 50/50 may flip by rounding
            assert got["label"] == want["label"]
    client = TestClient(llmtune.serve_app(run, api_key="k"))
    answer = client.post("/v1/classify", json={"input": texts}, headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200
    assert [item["label"] for item in answer.json()["data"]] == [p["label"] for p in expected]
    page = llmtune.report([run])
    assert page.is_file() and page.parent == run


def test_cli_reads_a_negative_device_memory_as_a_value_and_refuses_it_in_its_own_words(capsys):
    from llmtune.cli import main

    assert main(["plan", "recipes/quickstart.yaml", "--device-memory", "-5GB"]) == 2
    assert "device memory must be more than 0; got '-5GB'" in capsys.readouterr().err


def test_serve_refuses_a_missing_run_and_a_busy_port_before_loading_a_model(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    (tmp_path / "runs").mkdir()
    with pytest.raises(LlmtuneError, match="does not exist") as caught:
        llmtune.serve(tmp_path / "runs" / "typo", port=port)
    assert "hf download" not in str(caught.value)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LlmtuneError, match=f"port {port}.*in use"):
            llmtune.serve(tmp_path / "no-model-is-loaded", port=port)


def test_generate_and_perplexity_match_plain_transformers_and_peft(lm_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = lm_run["run"]
    replies = llmtune.generate(run, ["Say yes."], max_new_tokens=5)
    tokenizer = AutoTokenizer.from_pretrained(run)
    base = AutoModelForCausalLM.from_pretrained(lm_run["tiny_llama"])
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, run).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert replies[0]["completion"] == plain

    text = lm_run["text"].read_text()
    scored = llmtune.perplexity(run, lm_run["text"], max_length=512, precision="fp32")  # as the plain loop computes
    tokens = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss.item()
    assert scored["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    loaded = llmtune.load_language_model(run, "generate")
    assert llmtune.generate(loaded, ["Say yes."], max_new_tokens=5) == replies  # loaded once, used again
    with pytest.raises(LlmtuneError, match="stride"):
        llmtune.perplexity(loaded, lm_run["text"], max_length=8, stride=9)


def test_preview_and_build_trainer_show_and_train_the_recipes_data(lm_run, tmp_path):
    recipe = lm_run["recipe"]
    shown = llmtune.preview(recipe, samples=1)
    assert "--- sample 0" in shown and "[[" in shown  # the answer is marked as trained
    trainer = llmtune.build_trainer(lm_recipe(recipe.model.name, recipe.data.train_file, tmp_path / "run"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_launch_and_sweep_check_their_arguments_before_starting_anything(tmp_path):
    with pytest.raises(LlmtuneError, match="not one of llmtune's accelerate configs"):
        llmtune.launch("recipes/quickstart.yaml", [f"output.dir={tmp_path}"], accelerate="no-such-config")
    with pytest.raises(LlmtuneError, match="Did you mean .learning_rate."):
        llmtune.launch("recipes/quickstart.yaml", ["training.learnig_rate=1e-4"])
    for trials in (0, -1):
        with pytest.raises(LlmtuneError, match="trials.* is -?[0-9]+; give the number of finished trials"):
            llmtune.sweep("recipes/quickstart.yaml", trials=trials, out=tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_push_from_python_publishes_the_run(lm_run, tmp_path):
    """In its own process: the Hub client reads HF_ENDPOINT and offline mode when it is imported."""
    import os

    sys.path.insert(0, str(REPO / "tests"))
    from hub_server import LocalHub

    with LocalHub("secret-token") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": "secret-token", "HF_HOME": str(tmp_path / "hf")}
        code = f"import llmtune; print(llmtune.push({str(lm_run['run'])!r}, 'tester/api-push'))"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "tester/api-push" in result.stdout and "adapter_model.safetensors" in hub.repos["tester/api-push"].files
        assert "secret-token" not in result.stdout + result.stderr


def test_api_calls_leave_the_callers_warning_filters_environment_and_trl_as_they_were(classifier_run, tmp_path):
    """Global state is the caller's: only the CLI silences the libraries' warnings, and trl's head choice is
    swapped only inside a preference trainer's own calls."""
    import os
    import warnings

    from trl.trainer import utils as trl_utils

    filters, environment, trl_choice = list(warnings.filters), dict(os.environ), trl_utils._use_triton
    recipe = llmtune.load_recipe("recipes/quickstart.yaml", [
        f"model.name={classifier_run['recipe'].model.name}", f"data.train_file={classifier_run['files']['train']}",
        f"data.eval_file={classifier_run['files']['eval']}", "data.test_file=null", f"output.dir={tmp_path / 'run'}",
        "training.max_steps=2", NO_REPORT,
    ])
    llmtune.train(recipe)
    llmtune.predict(tmp_path / "run", ["Fine."])
    assert warnings.filters == filters
    assert dict(os.environ) == environment
    assert trl_utils._use_triton is trl_choice
