"""`llmtune ui` endpoints without a browser: run states read from folders, the key on every route, paths confined
to the folders given at start, the form checked by the loader's rules, 100 runs listed quickly.
The browser scenarios are in tests/test_ui_browser.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmtune.config.explain import explain
from llmtune.errors import LlmtuneError
from llmtune.run.checkpoints import MARKER
from llmtune.run.process import PROCESS_FILE, process_started
from llmtune.ui import UiSettings, check_host, make_app
from llmtune.ui.jobs import JOBS_FOLDER

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret-key-for-tests"


def fake_run(root: Path, name: str, process: dict | None = None, metrics: dict | None = None,
             checkpoint: bool = False, progress: list[dict] | None = None) -> Path:
    """A run folder as llmtune leaves it, without training."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"recipe": {"task": "classification", "model": {"name": "minilm"},
                                                            "method": {"type": "full"}},
                                                 "precision": {"training": "fp32"}}))
    if process is not None:
        (folder / PROCESS_FILE).write_text(json.dumps(process))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if checkpoint:
        (folder / "checkpoint-4").mkdir()
        (folder / "checkpoint-4" / MARKER).write_text("")
    if progress:
        (folder / "progress.jsonl").write_text("".join(json.dumps(line) + "\n" for line in progress))
    return folder


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


def client(root: Path, api_key: str | None = None) -> TestClient:
    """The app as the page reaches it: addressed as 127.0.0.1, actions with the page's X-Llmtune header."""
    return TestClient(make_app(UiSettings(root, REPO / "recipes", api_key)), base_url="http://127.0.0.1:7860",
                      headers={"X-Llmtune": "1"})


def states(root: Path) -> dict[str, str]:
    return {run["name"]: run["state"] for run in client(root).get("/api/runs").json()["runs"]}


def test_each_runs_state_comes_from_its_folder_and_a_live_process_check(runs_root):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its trainer was killed without a word
    me = {"pid": os.getpid(), "process_started": process_started(os.getpid()), "started": time.time()}
    fake_run(runs_root, "done", {**me, "state": "finished", "exit_code": 0}, {"before": {"accuracy": 0.5},
                                                                               "after": {"accuracy": 0.9}})
    fake_run(runs_root, "live", {**me, "state": "running"},
             progress=[{"time": 1, "step": 3, "max_steps": 10, "event": "step"}])
    fake_run(runs_root, "stopped", {**me, "state": "stopped", "exit_code": 143}, checkpoint=True)
    fake_run(runs_root, "killed", {"pid": dead.pid, "process_started": 1.0, "state": "running", "started": 1.0},
             checkpoint=True)
    fake_run(runs_root, "killed-early", {"pid": dead.pid, "process_started": 1.0, "state": "running", "started": 1.0})
    fake_run(runs_root, "reused-pid", {**me, "process_started": me["process_started"] - 1000, "state": "running"})
    fake_run(runs_root, "failed", {**me, "state": "failed", "exit_code": 1, "message": "'data.train_file' is gone."})
    runs = {run["name"]: run for run in client(runs_root).get("/api/runs").json()["runs"]}
    assert {name: run["state"] for name, run in runs.items()} == {
        "done": "finished", "live": "running", "stopped": "stopped", "killed": "resumable", "killed-early": "failed",
        "reused-pid": "failed", "failed": "failed"}
    assert runs["done"]["headline"] == {"accuracy": {"before": 0.5, "after": 0.9}}
    assert (runs["live"]["step"], runs["live"]["max_steps"]) == (3, 10)
    assert runs["stopped"]["exit_code"] == 143 and runs["stopped"]["can_resume"]
    assert runs["failed"]["message"] == "'data.train_file' is gone."
    assert "without a word" in runs["killed-early"]["message"]


def test_a_job_launched_from_the_ui_is_starting_until_its_run_claims_the_folder_then_keeps_its_exit_code(runs_root):
    from llmtune.ui import jobs

    command = ["llmtune", "validate", "--explain"]  # a real llmtune command through the real runner, quick
    job = jobs.launch(runs_root, "job-run", command, "recipes/quickstart.yaml", [])
    assert states(runs_root)["job-run"] == "starting"
    for _ in range(200):
        if jobs.read_job(runs_root, "job-run").get("exit_code") is not None:
            break
        time.sleep(0.1)
    ended = jobs.read_job(runs_root, "job-run")
    assert ended["exit_code"] == 0 and ended["pid"] == job["pid"]
    assert "training.learning_rate" in jobs.log_tail(runs_root, "job-run", 10**6)  # what the command printed
    summary = client(runs_root).get("/api/runs").json()["runs"][0]
    assert summary["state"] == "failed"  # it ended without making a run: nothing trained


def test_progress_is_read_incrementally_and_a_half_written_line_waits(runs_root):
    from llmtune.ui.runs import progress_since

    folder = fake_run(runs_root, "r", progress=[{"step": 1, "log": {"loss": 2.0}}])
    entries, offset = progress_since(folder, 0)
    assert entries == [{"step": 1, "log": {"loss": 2.0}}]
    with (folder / "progress.jsonl").open("a") as handle:
        handle.write('{"step": 2, "log": {"lo')
    assert progress_since(folder, offset) == ([], offset)
    with (folder / "progress.jsonl").open("a") as handle:
        handle.write('ss": 1.5}}\n')
    assert progress_since(folder, offset)[0] == [{"step": 2, "log": {"loss": 1.5}}]


def test_a_restart_at_an_earlier_checkpoint_drops_the_logs_it_trains_again(runs_root):
    from llmtune.ui.runs import history

    folder = fake_run(runs_root, "r", progress=[
        {"step": 0, "event": "begin"}, *({"step": s, "log": {"loss": 1.0 / s}} for s in (2, 4, 6)),
        {"step": 4, "event": "begin"}, {"step": 6, "log": {"loss": 0.1}}])  # killed at 6, resumed from checkpoint-4
    assert [(log["step"], log["loss"]) for log in history(folder)[0]] == [(2, 0.5), (4, 0.25), (6, 0.1)]


def test_every_route_wants_the_key_and_the_key_never_appears_in_a_page(runs_root):
    fake_run(runs_root, "done", {"state": "finished", "exit_code": 0, "pid": 1}, {"after": {"accuracy": 1.0}})
    app_client = client(runs_root, KEY)
    app = app_client.app
    listed = [*app.routes, *(route for router in app.state.routers for route in router.routes)]
    routes = [(route.path, sorted(route.methods)[0]) for route in listed if getattr(route, "methods", None)]
    assert len(routes) >= 15
    for path, method in routes:
        url = path.replace("{name}", "done").replace("{path:path}", "x")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}):
            response = app_client.request(method, url, headers=headers, follow_redirects=False, json={})
            if path == "/login":
                assert KEY not in response.text
                continue
            assert response.status_code in (401, 303), (method, path, headers, response.status_code)
            assert "accuracy" not in response.text and KEY not in response.text
    good = app_client.get("/api/runs", headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200 and good.json()["runs"][0]["name"] == "done" and KEY not in good.text


def test_logging_in_sets_a_session_cookie_that_is_not_the_key(runs_root):
    app_client = client(runs_root, KEY)
    assert app_client.post("/login", content="key=wrong", follow_redirects=False).status_code == 401
    response = app_client.post("/login", content=f"key={KEY}", follow_redirects=False,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 303
    cookie = response.cookies.get("llmtune_ui_session")
    assert cookie and KEY not in cookie and "httponly" in response.headers["set-cookie"].lower()
    assert app_client.get("/api/runs").status_code == 200  # the client keeps the cookie


def test_listening_beyond_this_machine_needs_a_key_or_insecure():
    check_host("127.0.0.1", None, False)
    check_host("0.0.0.0", KEY, False)
    check_host("0.0.0.0", None, True)
    with pytest.raises(LlmtuneError, match="--api-key or LLMTUNE_API_KEY"):
        check_host("0.0.0.0", None, False)


@pytest.mark.parametrize("name", ["..", "%2E%2E", ".llmtune-ui", "a%2Fb", "..%2F..%2Fetc", "%2Fetc"])
def test_run_names_cannot_leave_the_runs_folder(runs_root, name):
    response = client(runs_root).get(f"/api/runs/{name}")
    assert response.status_code in (400, 404)
    assert "root:" not in response.text


@pytest.mark.parametrize("recipe", ["../pyproject.toml", "/etc/passwd", "../tests/conftest.py", "data/reviews/train.jsonl",
                                    "missing.yaml", str(REPO / "recipes" / ".." / "pyproject.toml")])
def test_recipes_are_read_from_the_recipes_folder_only(runs_root, recipe):
    response = client(runs_root).post("/api/form", json={"recipe": recipe})
    assert response.status_code == 400 and "is not a recipe in" in response.json()["error"]


def test_the_form_has_every_recipe_key_with_its_help_as_validate_explain_prints_it(runs_root):
    fields = client(runs_root).get("/api/schema").json()["fields"]
    explained = re.findall(r"^  ([\w.]+) = ", explain(), flags=re.M)
    assert [field["key"] for field in fields] == explained
    epochs = next(field for field in fields if field["key"] == "training.epochs")
    assert epochs["help"] and epochs["help"] in explain()
    method = next(field for field in fields if field["key"] == "method.type")
    assert method["kind"] == "choice" and "lora" in method["choices"]


def test_the_form_is_checked_by_the_loaders_rules_with_each_message_beside_its_field(runs_root):
    app_client = client(runs_root)
    values = app_client.post("/api/form", json={"recipe": "quickstart.yaml"}).json()["values"]
    assert values["training.epochs"] == "3" and values["task"] == "classification"
    bad = app_client.post("/api/check", json={"recipe": "quickstart.yaml",
                                              "values": {**values, "training.learning_rate": "-1"}}).json()
    assert list(bad["errors"]) == ["training.learning_rate"]
    with pytest.raises(LlmtuneError) as cli_error:  # the same message `llmtune validate` prints
        from llmtune.config.loader import load_recipe

        load_recipe(REPO / "recipes" / "quickstart.yaml", ["training.learning_rate=-1"])
    assert bad["errors"]["training.learning_rate"] == str(cli_error.value)
    good = app_client.post("/api/check", json={"recipe": "quickstart.yaml",
                                               "values": {**values, "training.epochs": "1"}}).json()
    assert good["errors"] == {} and good["general"] == [] and good["overrides"] == ["training.epochs=1"]
    assert good["command"].startswith("llmtune train recipes/quickstart.yaml training.epochs=1 output.dir=")
    assert good["command"].endswith(f"{runs_root}/{good['name']}") and good["name"].startswith("quickstart-")
    assert "epochs: 1" in good["yaml"] and f"dir: {runs_root}/{good['name']}" in good["yaml"]
    typo = app_client.post("/api/check", json={"recipe": "quickstart.yaml", "values": {"method.type": "lorra"}}).json()
    assert 'Did you mean "lora"' in typo["errors"]["method.type"]


def test_a_launch_with_an_invalid_form_starts_nothing(runs_root):
    response = client(runs_root).post("/api/launch", json={"recipe": "quickstart.yaml",
                                                           "values": {"training.batch_size": "0"}})
    assert response.status_code == 400 and "'training.batch_size' is 0" in response.json()["error"]
    assert not (runs_root / JOBS_FOLDER).exists() and not any(runs_root.iterdir())


def test_launch_takes_llmtunes_accelerate_configs_only(runs_root):
    response = client(runs_root).post("/api/launch", json={"recipe": "quickstart.yaml", "accelerate": "/tmp/mine.yaml"})
    assert response.status_code == 400 and "cpu_ddp" in response.json()["error"]
    assert not any(runs_root.iterdir())


def test_a_hundred_runs_list_in_under_a_second(runs_root):
    for index in range(100):
        fake_run(runs_root, f"run-{index:03d}", {"state": "finished", "exit_code": 0, "pid": 1, "started": 1e9 + index},
                 {"before": {"accuracy": 0.5}, "after": {"accuracy": 0.8}},
                 progress=[{"step": s, "max_steps": 50, "log": {"loss": 1.0 / s}} for s in range(1, 51)])
    app_client = client(runs_root)
    app_client.get("/api/runs")  # warm: imports
    start = time.perf_counter()
    runs = app_client.get("/api/runs").json()["runs"]
    elapsed = time.perf_counter() - start
    assert len(runs) == 100 and runs[0]["name"] == "run-099"  # newest first
    assert elapsed < 1.0, f"listing 100 runs took {elapsed:.2f} s"


def test_compare_returns_each_runs_curves_and_scores(runs_root):
    for name, loss in (("a", 1.0), ("b", 2.0)):
        fake_run(runs_root, name, {"state": "finished", "exit_code": 0, "pid": 1},
                 {"before": {"accuracy": 0.5}, "after": {"accuracy": 1 / loss}},
                 progress=[{"step": 2, "max_steps": 4, "log": {"loss": loss}}])
    data = client(runs_root).post("/api/compare", json={"runs": ["a", "b"]}).json()["runs"]
    assert data["a"]["history"] == [{"step": 2, "loss": 1.0}] and data["b"]["headline"]["accuracy"]["after"] == 0.5


def test_stop_refuses_a_run_that_is_not_running(runs_root):
    fake_run(runs_root, "done", {"state": "finished", "exit_code": 0, "pid": 1})
    response = client(runs_root).post("/api/runs/done/stop")
    assert response.status_code == 400 and "not running" in response.json()["error"]


def test_a_page_of_another_site_gets_nothing_from_a_local_ui_without_a_key(runs_root):
    """DNS rebinding (another site's name resolving to 127.0.0.1) and cross-site forms: refused before any route."""
    fake_run(runs_root, "done", {"state": "finished", "exit_code": 0, "pid": 1}, {"after": {"accuracy": 1.0}})
    app = make_app(UiSettings(runs_root, REPO / "recipes"))
    rebound = TestClient(app, base_url="http://evil.example:7860")
    response = rebound.get("/api/runs")
    assert response.status_code == 403 and "done" not in response.text
    form_post = TestClient(app, base_url="http://127.0.0.1:7860")  # a form's POST: no X-Llmtune header
    response = form_post.post("/api/launch", data={"recipe": "quickstart.yaml"})
    assert response.status_code == 403 and not (runs_root / JOBS_FOLDER).exists()
    assert TestClient(app, base_url="http://localhost:7860").get("/api/runs").status_code == 200


def test_an_unknown_run_is_404_and_a_strange_name_400(runs_root):
    app_client = client(runs_root)
    assert app_client.get("/api/runs/no-such-run").status_code == 404
    assert app_client.post("/api/runs/no-such-run/stop").status_code == 404
    assert app_client.get("/api/runs/a%00b").status_code == 400
    assert app_client.get(f"/api/runs/{'x' * 300}").status_code == 400


def test_a_resume_launched_but_not_yet_claimed_is_starting_and_its_early_failure_shows(runs_root):
    from llmtune.ui import jobs

    me = {"pid": os.getpid(), "process_started": process_started(os.getpid())}
    fake_run(runs_root, "r", {**me, "state": "stopped", "exit_code": 143, "started": time.time() - 60}, checkpoint=True)
    folder = runs_root / JOBS_FOLDER
    folder.mkdir()
    (folder / "r.json").write_text(json.dumps({**me, "name": "r", "started": time.time()}))  # the resume's job, alive
    app_client = client(runs_root)
    summary = app_client.get("/api/runs/r").json()["summary"]
    assert summary["state"] == "starting" and not summary["can_resume"]
    assert "starting" in app_client.post("/api/runs/r/resume").json()["error"]  # a second click starts nothing
    (folder / "r.exit").write_text(json.dumps({"exit_code": 2, "ended": time.time()}))
    (folder / "r.log").write_text("$ llmtune train ...\nerror: 'data.train_file' is gone.\n")
    summary = app_client.get("/api/runs/r").json()["summary"]
    assert (summary["state"], summary["exit_code"]) == ("resumable", 2)  # failed, with the stop's checkpoint intact
    assert summary["message"] == "'data.train_file' is gone." and summary["can_resume"]
    assert jobs.read_job(runs_root, "r")["exit_code"] == 2


def test_a_run_training_on_another_machine_offers_no_stop_or_resume(runs_root):
    fake_run(runs_root, "elsewhere", {"pid": 1, "host": "another-machine", "state": "running", "started": 1.0},
             checkpoint=True)
    summary = client(runs_root).get("/api/runs/elsewhere").json()["summary"]
    assert (summary["state"], summary["host"], summary["can_resume"]) == ("running", "another-machine", False)


def test_a_task_template_fills_the_form_with_defaults_and_names_what_is_missing(runs_root):
    app_client = client(runs_root)
    assert "sft" in app_client.get("/api/recipes").json()["tasks"]
    values = app_client.post("/api/form", json={"recipe": "task:sft"}).json()["values"]
    assert values["task"] == "sft" and values["data.train_file"] == ""
    checked = app_client.post("/api/check", json={"recipe": "task:sft"}).json()
    assert any("data.train_file" in message for message in [*checked["errors"].values(), *checked["general"]])
    assert app_client.post("/api/form", json={"recipe": "task:nonsense"}).status_code == 400


def test_a_runs_newest_samples_come_with_it(runs_root):
    folder = fake_run(runs_root, "grpo", {"state": "finished", "exit_code": 0, "pid": 1})
    rows = [{"step": s, "split": "train", "prompt": f"p{s}", "completion": f"c{s}", "rewards": {"x": 1.0}, "reward": s / 10}
            for s in range(1, 21)]
    (folder / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = client(runs_root).get("/api/runs/grpo").json()["samples"]
    assert [r["step"] for r in shown] == list(range(13, 21)) and shown[-1] == {
        "step": 20, "split": "train", "prompt": "p20", "completion": "c20", "reward": 2.0}


def test_validate_reads_the_data_as_llmtune_validate_does_and_names_a_missing_file(runs_root, tmp_path):
    from llmtune import api
    from llmtune.config.loader import load_recipe

    app_client = client(runs_root)
    shown = app_client.post("/api/validate", json={"recipe": "quickstart.yaml"}).json()["summary"]
    assert shown == json.loads(json.dumps(api.validate(load_recipe(REPO / "recipes" / "quickstart.yaml")), default=str))
    missing = app_client.post("/api/validate", json={"recipe": "quickstart.yaml",
                                                     "values": {"data.train_file": str(tmp_path / "gone.jsonl")}})
    assert missing.status_code == 400 and "gone.jsonl" in missing.json()["error"]


def test_a_filled_in_task_template_checks_clean_and_errors_go_beside_the_keys_they_name(runs_root):
    app_client = client(runs_root)
    reviews = REPO / "recipes" / "data" / "reviews"
    filled = app_client.post("/api/check", json={"recipe": "task:classification", "values": {
        "data.train_file": str(reviews / "train.jsonl"), "data.eval_file": str(reviews / "eval.jsonl")}}).json()
    assert filled["errors"] == {} and filled["general"] == []
    both = app_client.post("/api/check", json={"recipe": "quickstart.yaml", "values": {"training.epochs": "-1"}}).json()
    assert list(both["errors"]) == ["training.epochs"] and "0 or more" in both["errors"]["training.epochs"]


def test_a_relative_path_typed_in_the_form_is_read_from_the_recipes_folder(runs_root):
    checked = client(runs_root).post("/api/check", json={"recipe": "quickstart.yaml",
                                                         "values": {"data.eval_file": "data/reviews/test.jsonl"}}).json()
    assert checked["errors"] == {}
    assert checked["overrides"] == [f"data.eval_file={REPO / 'recipes' / 'data' / 'reviews' / 'test.jsonl'}"]


def test_compare_leaves_out_a_run_that_is_not_there_and_says_so(runs_root):
    fake_run(runs_root, "a", {"state": "finished", "exit_code": 0, "pid": 1}, {"after": {"accuracy": 1.0}})
    data = client(runs_root).post("/api/compare", json={"runs": ["a", "gone", "../x"]}).json()
    assert list(data["runs"]) == ["a"] and data["missing"] == ["gone", "../x"]


def test_the_command_refuses_another_address_without_a_key_before_listening(runs_root, capsys, monkeypatch):
    from llmtune.cli import main

    monkeypatch.delenv("LLMTUNE_API_KEY", raising=False)
    assert main(["ui", "--runs", str(runs_root), "--recipes", str(REPO / "recipes"), "--host", "0.0.0.0"]) == 2
    assert "--api-key or LLMTUNE_API_KEY" in capsys.readouterr().err
    assert main(["ui", "--runs", str(runs_root), "--recipes", str(runs_root / "none")]) == 2
    assert "--recipes is" in capsys.readouterr().err
