"""`llmtune export`: GGUF files transformers reads back as the same model, Ollama Modelfiles that format
conversations exactly as training did, and ONNX classifiers that onnxruntime runs with PyTorch's probabilities.

Fast tests use tiny models with SmolLM2's / MiniLM's real tokenizers; the slow ones export a real SmolLM2 SFT run
and a real SST-2 classifier."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, require_shared, run_main
from go_template import render_ollama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmtune.errors import LlmtuneError
from llmtune.hub.model_card import render
from llmtune.inference.generation import generate
from llmtune.ship.ollama import go_template, modelfile, template_pieces

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And {{ 3 + 3 }}?\nThink \"carefully\"."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
     {"role": "user", "content": "z"}],
]


def modelfile_parts(text: str) -> dict[str, str | list[str]]:
    """TEMPLATE, SYSTEM and the stop strings read back out of Modelfile text."""
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    stops = [json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if line.startswith("PARAMETER stop")]
    return {"template": template, "system": system, "stops": stops, "from": text.splitlines()[0]}


def test_the_modelfile_renders_conversations_exactly_as_the_training_template_does(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    parts = modelfile_parts(modelfile(tokenizer, "m-f16.gguf", ["<|im_end|>"]))
    assert parts["from"] == "FROM ./m-f16.gguf" and parts["stops"] == ["<|im_end|>"]
    assert parts["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama(parts["template"], messages, parts["system"]) == expected, messages
    # A final assistant message is one Ollama continues: left open, as transformers' continue_final_message does.
    prefill = [*CONVERSATIONS[0], {"role": "assistant", "content": "Sure, here"}]
    expected = tokenizer.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert render_ollama(parts["template"], prefill, parts["system"]) == expected


def test_a_chatml_template_without_a_default_system_prompt_gets_no_system_line(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    parts = modelfile_parts(modelfile(tokenizer, "m.gguf", ["<|im_end|>"]))
    assert parts["system"] is None
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama(parts["template"], messages) == expected


def test_a_template_that_folds_the_system_prompt_into_the_first_user_turn_is_refused(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = (  # Llama 2 style: <<SYS>> inside the first [INST]
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set messages = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + ('<<SYS>>' + sys + '<</SYS>> ' if loop.first and sys else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")
    with pytest.raises(LlmtuneError, match="cannot be translated into an Ollama TEMPLATE.*--format gguf"):
        template_pieces(tokenizer)


def test_template_text_holding_go_delimiters_is_quoted(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '{{' + m['role'] + '}}: ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '{{assistant}}: ' }}{% endif %}")
    pieces, _ = template_pieces(tokenizer)
    messages = CONVERSATIONS[2]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_ollama(go_template(pieces), messages) == expected


@pytest.mark.slow  # reads the file back through transformers' GGUF loader (~20 s)
def test_a_wrongly_laid_out_file_is_caught_by_the_check(tiny_llama, tmp_path, monkeypatch):
    """The check must fail when the file does not hold the model: here query rows are left in Hugging Face's
    order instead of llama.cpp's."""
    from llmtune.ship import gguf_file

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    monkeypatch.setattr(gguf_file, "_interleave_rotary_rows", lambda weight, heads: weight)
    path = tmp_path / "wrong.gguf"
    gguf_file.write_gguf(model, tokenizer, path, "f32", "tiny", {tokenizer.eos_token_id})
    with pytest.raises(LlmtuneError, match="layout or settings are wrong"):
        gguf_file.verify_gguf(path, model, tokenizer, "f32", "Some probe text, 12 + 30 = 42.")


def test_export_refuses_what_it_cannot_write_before_writing_anything(tiny_bert, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtune.ship.export import export

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(gpt2)
    with pytest.raises(LlmtuneError, match="Llama-architecture decoders.*GPT2LMHeadModel"):
        export(gpt2, "gguf")
    with pytest.raises(LlmtuneError, match="--format onnx exports classification models.*--format gguf or ollama"):
        export(gpt2, "onnx")
    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(classifier)
    with pytest.raises(LlmtuneError, match="--format gguf exports causal lm models.*--format onnx"):
        export(classifier, "gguf")
    with pytest.raises(LlmtuneError, match="--quant applies to GGUF"):
        export(classifier, "onnx", quant="q8_0")
    assert not (gpt2 / "export").exists() and not (classifier / "export").exists()


def config_only_model(folder: Path, architecture: str) -> Path:
    """A model folder with a config and no weights: anything that tried to load it would fail with another error,
    so a test that gets the --out message proves the check ran before loading."""
    folder.mkdir()
    model_type = "bert" if architecture.startswith("Bert") else "llama"
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
    return folder


def read_only_folder(folder: Path) -> Path | None:
    """A folder no file can be created in: a read-only tmpfs mounted there as root (root writes through chmod),
    else a chmod 0o555 folder. None when neither is possible here."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    return folder if mounted.returncode == 0 else None


@pytest.mark.parametrize(("fmt", "architecture"), [("gguf", "LlamaForCausalLM"), ("onnx", "BertForSequenceClassification")])
def test_an_out_folder_that_cannot_be_written_is_refused_before_loading(tmp_path, fmt, architecture):
    from llmtune.ship.export import check_output_folder, export

    model = config_only_model(tmp_path / "model", architecture)
    (tmp_path / "file.txt").write_text("not a folder")
    for out, why in ((tmp_path / "file.txt" / "out", r"file\.txt' is a file"),
                     (tmp_path / "file.txt", r"file\.txt' is a file"),
                     (Path("/proc/llmtune-out"), r"no file can be created in '/proc'")):
        with pytest.raises(LlmtuneError, match=rf"^--out is '{out}', but .*{why}.*Give --out a folder you can write"):
            export(model, fmt, out=out)
    assert not (model / "export").exists() and not Path("/proc/llmtune-out").exists()
    check_output_folder(tmp_path / "new" / "deeper")  # a missing folder under a writable one is fine
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_out_folder_on_a_read_only_filesystem_is_refused(tmp_path):
    from llmtune.ship.export import check_output_folder

    folder = read_only_folder(tmp_path / "ro")
    if folder is None:
        pytest.skip("running as root without permission to mount a read-only tmpfs: root writes into chmod-0555 "
                    "folders, so there is no read-only folder to test with")
    try:
        with pytest.raises(LlmtuneError, match=r"--out is '.*ro/exports', but no file can be created in '.*ro'"):
            check_output_folder(folder / "exports")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


@pytest.mark.slow  # torch.export of a model (~10 s)
def test_a_decoder_classifier_exports_to_onnx_too(tiny_llama, tmp_path):
    """Classification heads on decoders (last-token pooling over padded batches) export as encoders do."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    from llmtune.inference.classifier import Classifier
    from llmtune.ship.export import PROBE_SENTENCES
    from llmtune.ship.onnx_file import verify_onnx, write_onnx

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = AutoConfig.from_pretrained(tiny_llama, num_labels=3)
    model = LlamaForSequenceClassification(config).eval()
    classifier = Classifier(model, tokenizer, ["a", "b", "c"], 64, {"text": "text", "text_pair": None, "label": "y"})
    write_onnx(classifier, tmp_path)
    checks = verify_onnx(tmp_path, classifier, PROBE_SENTENCES)
    assert checks["max_probability_diff"] <= 1e-4 and checks["label_agreement"] == 1.0


# ---- real checkpoints ----

README_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A real SmolLM2-135M-Instruct LoRA SFT run on Alpaca (a few steps: enough to move the weights)."""
    from llmtune import load_recipe, train

    source = require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    rows = [r for r in json.loads(source.read_text()) if len(r["output"]) < 300][:32]
    data = tmp_path_factory.mktemp("alpaca") / "train.json"
    data.write_text(json.dumps(rows))
    run_dir = tmp_path_factory.mktemp("export") / "smol-sft"
    train(load_recipe("recipes/smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={data}", "data.eval_file=null", "data.validation_fraction=0",
        "data.max_length=128", "training.max_steps=4", "training.batch_size=4", "training.gradient_accumulation=1",
        "training.eval_every=no", "training.save_every=no", "training.learning_rate=5e-4", "lm.generation_prompts=[]",
        f"output.dir={run_dir}"]))
    return run_dir


@pytest.mark.slow
def test_a_real_sft_run_exported_for_ollama_reloads_as_the_same_model_and_talks_the_same(sft_run, smollm2_path):
    from llmtune.inference.trained import load_trained

    result = run_main("export", str(sft_run), "--format", "ollama", "--quant", "f16", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    gguf_path, modelfile_path = sft_run / "export" / "smol-sft-f16.gguf", sft_run / "export" / "smol-sft-f16.Modelfile"
    assert f"Wrote {gguf_path}" in result.stdout and modelfile_path.is_file()
    assert f"ollama create smol-sft -f {modelfile_path.name}" in result.stdout
    assert not list((sft_run / "export").glob(".partial*"))
    entry = json.loads((sft_run / "run.json").read_text())["exports"][-1]
    assert entry["format"] == "ollama" and entry["checks"]["max_logit_diff_vs_stored_weights"] <= 1e-3
    # f16 costs ~1e-3 of the logits' size (SmolLM2's reach ~40); the top token does not move.
    assert entry["checks"]["max_logit_diff_vs_full_precision"] <= 2e-3 * entry["checks"]["max_abs_logit"]
    assert entry["checks"]["top1_agreement_vs_full_precision"] == 1.0

    tokenizer = AutoTokenizer.from_pretrained(sft_run)
    # The export compared both models' greedy replies to the README's prompts: the same text.
    replies = entry["checks"]["greedy_replies"]
    assert [r["prompt"] for r in replies] == README_PROMPTS and entry["checks"]["greedy_replies_equal"] == 2, replies
    assert all(r["gguf"] == r["model"] and r["model"] for r in replies)
    expected = generate(load_trained(sft_run, AutoModelForCausalLM)[0], tokenizer, README_PROMPTS[:1], 32, chat=True)
    assert replies[0]["model"] == expected[0]["completion"]  # the run as `llmtune generate` loads it

    parts = modelfile_parts(modelfile_path.read_text())
    assert parts["from"] == f"FROM ./{gguf_path.name}" and parts["stops"] == ["<|im_end|>"]
    for messages in CONVERSATIONS:
        assert render_ollama(parts["template"], messages, parts["system"]) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_q8_0_changes_the_top_token_only_where_the_model_was_torn_on_wikitext(smollm2_path, tmp_path):
    """Measured on SmolLM2-135M: q8_0 keeps the top token on 97.9% of 2,000 WikiText-2 tokens (f16 99.9%), and
    every position it changes is one where full precision's top two tokens were within 0.2 logits."""
    from llmtune.models.sources import load_gguf
    from llmtune.ship.gguf_file import _rounded_like_file, write_gguf

    source = require_shared(SHARED_DATA / "wikitext-2" / "valid.txt")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    path = tmp_path / "smol-q8_0.gguf"
    write_gguf(model, tokenizer, path, "q8_0", "smol", {tokenizer.eos_token_id})
    quantized, _ = load_gguf(path)
    ids = tokenizer(source.read_text()[:12_000], return_tensors="pt")["input_ids"][:, :2000]
    assert ids.shape[1] == 2000
    with torch.inference_mode():
        full = torch.cat([model(window).logits[0] for window in ids.split(500, dim=1)])
        got = torch.cat([quantized(window).logits[0] for window in ids.split(500, dim=1)]).argmax(-1)
        # The file holds exactly the q8_0-rounded weights: the same logits as rounding them in memory.
        stored = _rounded_like_file(model, "q8_0")(ids[:, :200]).logits[0]
        assert (quantized(ids[:, :200]).logits[0] - stored).abs().max().item() <= 1e-4 * stored.abs().max().item()
    changed = got != full.argmax(-1)
    top_two = full.topk(2, dim=-1).values
    assert changed.float().mean().item() <= 0.025
    assert (top_two[changed, 0] - top_two[changed, 1]).max().item() < 0.25
    assert path.stat().st_size < 0.3 * sum(p.numel() * 4 for p in model.parameters())  # about 8.5 bits a weight


@pytest.mark.slow
def test_a_real_sst2_classifier_in_onnx_predicts_as_pytorch_does_on_200_dev_sentences(minilm_path, tmp_path):
    from llmtune import api, load_recipe
    from llmtune.inference.classifier import Classifier
    from llmtune.inference.onnx_classifier import load_onnx_classifier
    from llmtune.ship.export import export

    dev = require_shared(SHARED_DATA / "sst2" / "dev.tsv")
    run_dir = tmp_path / "sst2"
    api.train(load_recipe("recipes/sst2_minilm_lora.yaml", [
        "data.dataset=null", f"data.train_file={SHARED_DATA / 'sst2' / 'train.tsv'}", f"data.eval_file={dev}",
        "data.eval_split=null", "data.max_train_samples=256", "data.max_eval_samples=64", "training.max_steps=8",
        "training.eval_every=no", "training.save_every=no", f"output.dir={run_dir}"]))
    result = export(run_dir, "onnx")  # a LoRA run: the adapter is merged (and checked) first
    folder = run_dir / "export" / "sst2-onnx"
    assert result.files == [folder] and (folder / "model.onnx").is_file()
    assert result.checks["max_probability_diff"] <= 1e-4
    record = json.loads((run_dir / "run.json").read_text())
    assert record["exports"][-1]["format"] == "onnx" and record["exports"][-1]["files"][0]["path"] == "export/sst2-onnx"
    assert "recipe" in record and "versions" in record  # what training recorded is still there

    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:201]]
    expected = Classifier.load(run_dir, precision="fp32").probabilities(sentences)
    got = load_onnx_classifier(folder).probabilities(sentences)
    assert len(sentences) == 200 and abs(expected - got).max() <= 1e-4

    texts = sentences[:3]
    predicted = run_main("predict", str(folder), *sum((["--text", t] for t in texts), []), cwd=REPO)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    lines = [json.loads(line) for line in predicted.stdout.strip().splitlines()]
    assert [line["text"] for line in lines] == texts
    for line, row in zip(lines, expected[:3]):
        assert list(line["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-4)

    model_file = (folder / "model.onnx").read_bytes()
    with pytest.raises(LlmtuneError, match="will not overwrite an export.*--overwrite"):
        export(run_dir, "onnx")
    assert (folder / "model.onnx").read_bytes() == model_file
    export(run_dir, "onnx", overwrite=True)
    record = json.loads((run_dir / "run.json").read_text())
    assert len(record["exports"]) == 1  # replaced, not listed twice
    card = render(record, {}, "me/sst2", "adapter")
    assert "## Exports" in card and "| onnx | float32 | `sst2-onnx` | onnxruntime probabilities within" in card
