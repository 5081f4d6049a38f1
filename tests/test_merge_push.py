"""`llmtune merge` and `llmtune push` on a tiny Llama LoRA run; pushes go through the real huggingface_hub
client over HTTP to a local Hub endpoint (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import yaml
from conftest import REPO, run_cli, run_main, write_jsonl
from hub_server import LocalHub
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune import load_recipe, train

TOKEN = "hf_llmtune_test_secret_0123456789"
CHATS = [{"prompt": f"Say the word number {i}.", "completion": f"Word {i}."} for i in range(16)]


pytestmark = pytest.mark.slow  # pushes over HTTP and merges in real processes


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(folder / "train.jsonl", CHATS)
    train(load_recipe(None, [
        "task=sft", f"model.name={tiny_llama}", f"data.train_file={data}", "data.validation_fraction=0.25",
        "data.max_length=64", "method.type=lora", "method.r=4", "training.max_steps=4", "training.batch_size=4",
        "training.gradient_accumulation=2", "training.learning_rate=5e-2", "training.save_every=no",
        "training.eval_every=no", "output.license=mit", f"output.dir={folder / 'run'}",
    ]))
    return folder / "run"


@pytest.fixture()
def hub():
    with LocalHub(TOKEN) as server:
        yield server


def hub_env(hub: LocalHub, tmp_path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
    if token:
        env["HF_TOKEN"] = token
    return env


def run_state(run_dir) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def download(hub: LocalHub, repo_id: str, dest) -> None:
    """Fetch the pushed repo with the real client, as a user elsewhere would."""
    import huggingface_hub.constants
    from huggingface_hub import snapshot_download

    # The test session runs offline (HF_HUB_OFFLINE=1, read once at import); this download is local HTTP.
    offline, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, False
    try:
        snapshot_download(repo_id, local_dir=dest, endpoint=hub.url, token=TOKEN)
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline


def outputs(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer("Say the word number 3.", return_tensors="pt")).logits


# --- merge --------------------------------------------------------------------------------------------------


def test_the_run_folder_holds_llmtunes_card_not_a_library_draft(lora_run, tiny_llama):
    """The base is a local folder (no Hub id): trl's and peft's drafts name it as [None] or not at all."""
    card = (lora_run / "README.md").read_text()
    assert "trained with llmtune" in card and f"the local checkpoint `{tiny_llama}`" in card
    assert "[None]" not in card and "| loss |" in card  # with the run's results


def test_merge_matches_adapter_on_base_and_saves_a_plain_model(lora_run, tiny_llama, tmp_path):
    result = run_main("merge", str(lora_run), "--out", str(tmp_path / "merged"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["max_logit_difference"] <= 1e-4
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "generation_config.json").is_file() and (merged_dir / "tokenizer_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.resize_token_embeddings(merged.config.vocab_size)  # the run added ChatML tokens
    adapter = PeftModel.from_pretrained(base, lora_run).eval()
    assert (outputs(merged, tokenizer) - outputs(adapter, tokenizer)).abs().max() <= 1e-4
    untrained = AutoModelForCausalLM.from_pretrained(tiny_llama)
    untrained.resize_token_embeddings(merged.config.vocab_size)
    assert not torch.allclose(outputs(merged, tokenizer), outputs(untrained.eval(), tokenizer), atol=1e-3)


def test_merge_refuses_to_overwrite_and_explains_a_missing_base(lora_run, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    result = run_main("merge", str(lora_run), "--out", str(occupied), cwd=REPO)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (occupied / "keep.txt").read_text() == "mine"

    # An adapter copied elsewhere whose base folder no longer exists
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer_config.json",
                 "tokenizer.json"):
        (orphan / name).write_bytes((lora_run / name).read_bytes())
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    result = run_main("merge", str(orphan), "--out", str(tmp_path / "m2"), cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "base model of the adapter" in result.stderr and "--base" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m2").exists()


# --- push ---------------------------------------------------------------------------------------------------


def test_push_uploads_adapter_and_card_that_load_back_identically(lora_run, tiny_llama, hub, tmp_path):
    before = run_state(lora_run)
    result = run_cli("push", str(lora_run), "--repo-id", "tester/tiny-lora", "--private",
                     env=hub_env(hub, tmp_path), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "POST /api/models/tester/tiny-lora/commit/main" in hub.requests
    assert hub.repos["tester/tiny-lora"].private
    assert run_state(lora_run) == before  # the run is only read

    dest = tmp_path / "downloaded"
    download(hub, "tester/tiny-lora", dest)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
            "llmtune_recipe.json"} <= {p.name for p in dest.iterdir()}
    assert not (dest / "training_args.bin").exists() and not (dest / "run.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(dest)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.resize_token_embeddings(len(tokenizer))
    pushed = PeftModel.from_pretrained(base, dest).eval()
    local_base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    local_base.resize_token_embeddings(len(tokenizer))
    local = PeftModel.from_pretrained(local_base, lora_run).eval()
    assert torch.equal(outputs(pushed, tokenizer), outputs(local, tokenizer))

    card = (dest / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "peft" and header["license"] == "mit"
    assert header["pipeline_tag"] == "text-generation" and {"llmtune", "sft", "lora"} <= set(header["tags"])
    assert "| global batch size | 8 |" in card  # 4 per device x 2 accumulation x 1 process
    assert "| learning rate | 0.05 |" in card and "## Results" in card and "transformers:" in card
    assert "PeftModel.from_pretrained" in card
    everything = [p.read_bytes() for p in dest.rglob("*") if p.is_file()] + [p.read_bytes() for p in lora_run.rglob("*")
                                                                               if p.is_file()]
    assert not any(TOKEN.encode() in blob for blob in everything) and TOKEN not in result.stdout + result.stderr


def test_push_without_a_token_uploads_nothing(lora_run, hub, tmp_path):
    result = run_cli("push", str(lora_run), "--repo-id", "tester/x", env=hub_env(hub, tmp_path, token=None), cwd=REPO)
    assert result.returncode == 2 and "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr
    assert hub.requests == []


def test_push_rejects_an_invalid_repo_id(lora_run, hub, tmp_path):
    result = run_cli("push", str(lora_run), "--repo-id", "not a/valid/id", env=hub_env(hub, tmp_path), cwd=REPO)
    assert result.returncode == 2 and "'not a/valid/id', which is not a valid Hub repo id" in result.stderr
    assert hub.requests == []


def test_push_refused_by_the_endpoint_names_the_token_problem(lora_run, hub, tmp_path):
    hub.fail["create"] = 403
    result = run_cli("push", str(lora_run), "--repo-id", "tester/x", env=hub_env(hub, tmp_path), cwd=REPO)
    assert result.returncode == 2 and "refused the token (HTTP 403)" in result.stderr
    assert "untouched" in result.stderr and "Traceback" not in result.stderr


def test_push_failing_mid_upload_leaves_nothing_half_done_and_a_retry_works(lora_run, hub, tmp_path):
    before = run_state(lora_run)
    hub.fail["commit"] = 500
    env = hub_env(hub, tmp_path)
    result = run_cli("push", str(lora_run), "--repo-id", "tester/retry", env=env, cwd=REPO)
    assert result.returncode == 2 and "HTTP 500" in result.stderr and "run the same command again" in result.stderr
    assert hub.repos["tester/retry"].files == {}  # the repo was created, but no file landed
    assert run_state(lora_run) == before

    del hub.fail["commit"]
    retry = run_cli("push", str(lora_run), "--repo-id", "tester/retry", env=env, cwd=REPO)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "adapter_model.safetensors" in hub.repos["tester/retry"].files


def test_recipe_push_to_hub_publishes_after_training_and_checks_the_token_first(tiny_llama, hub, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "sft", "model": {"name": tiny_llama}, "data": {"train_file": str(data), "max_length": 64},
        "method": {"type": "lora"}, "training": {"max_steps": 1, "batch_size": 4, "eval_every": "no",
                                                "save_every": "no"},
        "output": {"dir": str(tmp_path / "run"), "push_to_hub": "tester/from-recipe"},
    }))
    refused = run_cli("train", str(recipe), env=hub_env(hub, tmp_path, token=None), cwd=REPO)
    assert refused.returncode == 2 and "hf auth login" in refused.stderr
    assert not (tmp_path / "run").exists()  # nothing trained for a push that could not happen

    result = run_cli("train", str(recipe), env=hub_env(hub, tmp_path), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.repos["tester/from-recipe"].files
    assert "adapter_model.safetensors" in files and b"library_name: peft" in files["README.md"]


def test_push_merged_uploads_a_full_model_with_a_transformers_card(lora_run, hub, tmp_path):
    result = run_cli("push", str(lora_run), "--repo-id", "tester/tiny-merged", "--merged",
                     env=hub_env(hub, tmp_path), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.repos["tester/tiny-merged"].files
    assert "model.safetensors" in files and "adapter_config.json" not in files
    header = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert header["library_name"] == "transformers" and "merged" not in header["tags"]
    assert not (lora_run / "model.safetensors").exists()  # the merge happened outside the run directory
