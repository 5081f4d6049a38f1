"""`llmtune serve` as a client sees it: the real `openai` client (and raw HTTP for what a client library would not
send) against a server process on 127.0.0.1 serving the real SmolLM2-135M-Instruct, and a trained classifier."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # a server process on a real checkpoint

KEY = "sk-test-4f1d2c9a8b7e"
MAX_TOKENS = 24
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?"]


def http(url: str, body: bytes | dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON answer) of a raw request: GET without a body, POST with one (bytes are sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(model: str, *extra: str) -> Iterator[tuple[str, Any]]:
    """A running `llmtune serve MODEL` (key from the environment); yields (base URL, its log file)."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "serve", model, "--port", str(port), "--max-tokens", str(MAX_TOKENS),
         *extra], cwd=REPO, env={**os.environ, "LLMTUNE_API_KEY": KEY}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None and time.time() < deadline, _read(log)
            with contextlib.suppress(OSError):
                if http(f"{url}/health")[0] == 200:
                    break
            time.sleep(0.3)
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=60)


def _read(log: Any) -> str:
    log.seek(0)
    return log.read()


@pytest.fixture(scope="module")
def lm_server(smollm2_path) -> Iterator[tuple[str, Any, str]]:
    with server(smollm2_path, "--name", "smol") as (url, log):
        yield url, log, smollm2_path


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_greedy_chat_replies_equal_llmtune_generate_and_streams_concatenate_to_them(lm_server):
    url, _, model = lm_server
    done = run_cli("generate", model, *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens",
                   str(MAX_TOKENS), cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = [json.loads(line)["completion"] for line in done.stdout.splitlines() if line.startswith("{")]
    api = client(url)
    assert [m.id for m in api.models.list().data] == ["smol"]
    for prompt, reply in zip(PROMPTS, expected):
        answer = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == reply and reply
        assert answer.usage.completion_tokens <= MAX_TOKENS
        stream = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=MAX_TOKENS, stream=True)
        chunks = [c.choices[0] for c in stream]
        assert "".join(c.delta.content or "" for c in chunks) == reply
        assert len(chunks) > 3 and chunks[-1].finish_reason in ("stop", "length")


def test_completions_stop_strings_and_seeded_sampling(lm_server):
    url, _, _ = lm_server
    api = client(url)
    plain = api.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=12)
    text = plain.choices[0].text
    assert text.strip()
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    cut = api.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=12,
                                 stop=[word])
    assert cut.choices[0].text == text[:text.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=12,
                                      stop=[word], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    ask = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 1.0,
           "top_p": 0.9, "max_tokens": 16}
    first, again, other = (api.chat.completions.create(**ask, seed=seed).choices[0].message.content
                           for seed in (1, 1, 2))
    assert first == again and first != other


def test_32_concurrent_requests_are_all_answered_as_each_would_be_alone(lm_server):
    url, _, _ = lm_server
    api = client(url)
    questions = [f"Say the number {n} in words." for n in range(4)]

    def ask(question: str) -> str:
        return api.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=3).choices[0].message.content

    alone = {q: ask(q) for q in questions}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, questions * 8))
    assert together == [alone[q] for q in questions * 8]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(lm_server):
    url, log, _ = lm_server
    api = client(url)

    def still_serving() -> None:
        reply = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                            temperature=0, max_tokens=2)
        assert reply.choices[0].message.content is not None

    status, answer = http(f"{url}/v1/chat/completions", b'{"model": "smol", "messages": [')
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    still_serving()
    status, answer = http(f"{url}/v1/chat/completions", {"model": "smol", "messages": "hi"})
    assert status == 400 and answer["error"]["param"].startswith("messages")
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    still_serving()
    with pytest.raises(openai.BadRequestError, match=f"limit of {MAX_TOKENS}"):
        api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=MAX_TOKENS + 1)
    still_serving()
    status, answer = http(f"{url}/v1/models", key=None)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key=KEY[:-1] + "x").models.list()
    still_serving()
    assert KEY not in _read(log)  # the key never reaches the log


def test_a_classifier_serves_labels_and_probabilities_as_llmtune_predict_gives_them(tiny_bert, reviews_files,
                                                                                     tmp_path):
    from llmtune import api, load_recipe
    from llmtune.inference.classifier import Classifier

    run_dir = tmp_path / "clf"
    api.train(load_recipe("recipes/quickstart.yaml", [
        f"model.name={tiny_bert}", f"data.train_file={reviews_files['train']}", "data.test_file=null",
        f"data.eval_file={reviews_files['eval']}", "training.max_steps=2", f"output.dir={run_dir}"]))
    texts = ["a gripping, beautiful film", "two hours I will not get back", "fine"]
    expected = Classifier.load(run_dir).predict(texts)  # what `llmtune predict` prints
    with server(str(run_dir)) as (url, _):
        status, answer = http(f"{url}/v1/classify", {"input": texts})
        assert status == 200, answer
        got = answer["data"]
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected):
            assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)
        status, answer = http(f"{url}/v1/classify", {"input": []})
        assert status == 400 and "input" in answer["error"]["message"]
        status, _ = http(f"{url}/v1/chat/completions", {"model": "clf", "messages": []})
        assert status == 404  # a classifier has no chat endpoint
