"""`llmtune serve` as a client sees it: the real `openai` client (and raw HTTP for what a client library would not
send) against a server process on 127.0.0.1 serving the real SmolLM2-135M-Instruct, and a trained classifier (slow);
and bad requests against the app itself in this process, on a tiny random Llama (fast)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
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
from conftest import REPO, run_main

slow = pytest.mark.slow  # a server process on a real checkpoint

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


@slow
def test_greedy_chat_replies_equal_llmtune_generate_and_streams_concatenate_to_them(lm_server):
    url, _, model = lm_server
    done = run_main("generate", model, *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens",
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


@slow
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


@slow
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


@slow
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


@slow
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


# --- bad requests against the app in this process (fast) ------------------------------------------------------

HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
PROMPT = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
BASES = {"/v1/chat/completions": HELLO, "/v1/completions": PROMPT}
DROP = object()  # a field left out of the request


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.ship.serve import LanguageModel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    return LanguageModel(model, AutoTokenizer.from_pretrained(tiny_llama), chat=True, precision="fp32")


def app_client(engine: Any, **limits: int) -> Any:
    from fastapi.testclient import TestClient

    from llmtune.ship.serve import Limits, make_app

    # raise_server_exceptions=False: a client sees what the server sends for a crash, not the exception
    return TestClient(make_app(engine, "tiny", KEY, Limits(**limits)), raise_server_exceptions=False,
                      headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def lm_app(tiny_lm) -> Any:
    return app_client(tiny_lm, max_tokens=8)


def post(client: Any, path: str, body: dict | bytes, **change: Any) -> tuple[int, Any]:
    """(status, JSON answer or the raw text of an event stream) of a POST; `change` overrides fields of `body`."""
    if isinstance(body, dict):
        body = {k: v for k, v in {**body, **change}.items() if v is not DROP}
        answer = client.post(path, json=body)
    else:
        answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    if answer.headers.get("content-type", "").startswith("application/json"):
        return answer.status_code, answer.json()
    return answer.status_code, answer.text


def events(stream: str) -> list[str]:
    """The data of each server-sent event, in order."""
    return [block.removeprefix("data: ") for block in stream.split("\n\n") if block]


def assert_names(answer: dict, param: str) -> str:
    """The answer is OpenAI's error shape naming `param`, in its `param` and its message; returns the message."""
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param in error["message"], error
    return error["message"]


def test_content_parts_are_read_as_their_text_and_a_part_that_is_not_text_is_a_400_naming_it(lm_app):
    status, plain = post(lm_app, "/v1/chat/completions", HELLO)
    assert status == 200, plain
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    status, joined = post(lm_app, "/v1/chat/completions", HELLO, messages=parts)
    assert status == 200 and (joined["choices"], joined["usage"]) == (plain["choices"], plain["usage"])

    status, answer = post(lm_app, "/v1/chat/completions", HELLO,
                          messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert status == 400
    message = assert_names(answer, "messages[0].content[0].text")
    assert "5" in message and "string" in message
    status, answer = post(lm_app, "/v1/chat/completions", HELLO,
                          messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert status == 400
    message = assert_names(answer, "messages[0].content[0].type")
    assert "image_url" in message and "'text'" in message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(BASES))
def test_a_seed_outside_int64_is_a_400_before_any_stream_and_the_ends_of_int64_sample_repeatably(lm_app, path, stream):
    for seed in (2**70, -2**70):
        status, answer = post(lm_app, path, BASES[path], seed=seed, stream=stream, temperature=1.0)
        assert status == 400, answer
        assert str(seed) in assert_names(answer, "seed")
    if not stream:
        for seed in (-2**63, 2**63 - 1):  # torch.manual_seed takes both
            first, again = (post(lm_app, path, BASES[path], seed=seed, temperature=1.0) for _ in range(2))
            assert first[0] == again[0] == 200 and first[1]["choices"] == again[1]["choices"]


def test_an_error_once_a_stream_has_begun_ends_it_with_an_error_event_then_done_and_is_logged(lm_app, tiny_lm,
                                                                                             monkeypatch, caplog):
    import torch

    tokenizer = tiny_lm.tokenizer
    produced = tokenizer.encode("Hello there, friend", add_special_tokens=False)

    def fail_midway(input_ids: torch.Tensor, streamer: Any = None, **options: Any) -> None:
        streamer.put(input_ids.cpu())  # the prompt, which the streamer skips
        streamer.put(torch.tensor(produced))
        raise RuntimeError("out of memory")

    monkeypatch.setitem(tiny_lm.model.__dict__, "generate", fail_midway)
    with caplog.at_level(logging.ERROR, logger="llmtune"):
        for path, body in BASES.items():
            status, stream = post(lm_app, path, body, stream=True)
            sent = events(stream)
            assert status == 200 and sent[-1] == "[DONE]", stream
            error = json.loads(sent[-2])["error"]
            assert error["type"] == "server_error" and "RuntimeError" in error["message"], error
            chunks = [json.loads(event)["choices"][0] for event in sent[:-2]]
            text = "".join(c["delta"].get("content", "") if "delta" in c else c["text"] for c in chunks)
            assert text == tokenizer.decode(produced, skip_special_tokens=True)
            assert all(c["finish_reason"] is None for c in chunks)  # it did not finish: no finish reason
        failures = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
        assert len(failures) == 2

        status, answer = post(lm_app, "/v1/chat/completions", HELLO)  # without a stream: a 500 in OpenAI's shape
        assert status == 500 and answer["error"]["type"] == "server_error", answer
    monkeypatch.undo()
    assert post(lm_app, "/v1/chat/completions", HELLO)[0] == 200  # and the server keeps serving


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_FIELDS = [
    (CHAT, {"temperature": -0.5}, "temperature"),
    (CHAT, {"temperature": 2.5}, "temperature"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"top_p": 1.5}, "top_p"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": 9}, "max_tokens"),  # above the server's limit of 8
    (CHAT, {"max_tokens": 2**70}, "max_tokens"),
    (CHAT, {"max_tokens": 2.5}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"max_completion_tokens": 9}, "max_completion_tokens"),
    (CHAT, {"n": 2}, "n"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": "two"}, "n"),
    (CHAT, {"seed": 1.5}, "seed"),
    (CHAT, {"seed": "lucky"}, "seed"),
    (CHAT, {"stream": "maybe"}, "stream"),
    (CHAT, {"stop": 5}, "stop"),
    (CHAT, {"stop": [""]}, "stop"),
    (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CHAT, {"stop": [1]}, "stop[0]"),
    (CHAT, {"model": 5}, "model"),
    (CHAT, {"model": DROP}, "model"),
    (CHAT, {"messages": DROP}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [5]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[1].content[0].text"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": DROP}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    (COMPLETIONS, {"prompt": [5]}, "prompt[0]"),
    (COMPLETIONS, {"temperature": 3}, "temperature"),
    (COMPLETIONS, {"top_p": -1}, "top_p"),
    (COMPLETIONS, {"max_tokens": 9}, "max_tokens"),
    (COMPLETIONS, {"n": 3}, "n"),
    (COMPLETIONS, {"seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "change", "param"), BAD_FIELDS,
                         ids=[f"{path[4:]}-{json.dumps(c, default=lambda _: 'DROP')}" for path, c, _ in BAD_FIELDS])
def test_every_bad_field_is_a_400_naming_it_streamed_or_not(lm_app, path, change, param, stream):
    status, answer = post(lm_app, path, BASES[path], **{"stream": stream, **change})
    assert status == 400, answer
    assert_names(answer, param)


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "messages": [',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
    b"[" * 100_000,
    b"\xff\xfe{}",
    b"[]",
    b"null",
], ids=["cut-short", "nan", "infinity", "5000-digits", "deep", "not-utf8", "list", "null"])
def test_a_body_that_is_not_a_json_object_is_a_400(lm_app, body):
    status, answer = post(lm_app, CHAT, body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert "JSON" in answer["error"]["message"]


def test_a_chat_template_that_refuses_the_messages_is_a_400_with_its_reason(lm_app, tiny_lm, monkeypatch):
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    monkeypatch.setattr(tiny_lm.tokenizer, "chat_template", refusing)
    status, answer = post(lm_app, CHAT, HELLO)
    assert status == 400 and "roles must alternate" in assert_names(answer, "messages")


def test_an_unknown_path_or_method_is_answered_in_openai_error_shape(lm_app):
    status, answer = post(lm_app, "/v1/classify", {"input": "hi"})  # a causal LM has no /v1/classify
    assert status == 404 and answer["error"]["type"] == "not_found_error" and "/v1/classify" in answer["error"]["message"]
    answer = lm_app.get(CHAT)
    assert answer.status_code == 405 and "POST" in answer.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": ["a"] * 5}, "input"),  # above max_inputs=4
    ({"input": [5]}, "input[0]"),
    ({"input": DROP}, "input"),
    ({"input": ["a"], "pairs": ["x", "y"]}, "pairs"),
    ({"input": "a", "pairs": 5}, "pairs"),
])
def test_classify_answers_as_the_classifier_does_and_bad_fields_are_400s_naming_them(body, param):
    from llmtune.ship.serve import TextClassifier

    def predict(texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        return [{"label": "long" if len(t) > 3 else "short", "probabilities": {"long": 0.5, "short": 0.5}} for t in texts]

    client = app_client(TextClassifier(predict, ["long", "short"]), max_inputs=4)
    status, answer = post(client, "/v1/classify", {"input": ["good film", "bad"]})
    assert status == 200 and answer["data"] == [{"index": i, **r} for i, r in enumerate(predict(["good film", "bad"], None))]
    status, answer = post(client, "/v1/classify", {"input": "x"}, **body)
    assert status == 400, answer
    assert_names(answer, param)


def test_check_port_free_refuses_a_port_a_server_listens_on_and_passes_a_free_one_leaving_it_free():
    from llmtune.errors import LlmtuneError
    from llmtune.ship.serve import check_port_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(LlmtuneError, match=f"port {port} on 127.0.0.1 is already in use") as refused:
            check_port_free("127.0.0.1", port)
        assert "--port" in str(refused.value)
    check_port_free("127.0.0.1", port)
    with socket.socket() as again:  # check_port_free closed its own socket: the port can be taken
        again.bind(("127.0.0.1", port))
