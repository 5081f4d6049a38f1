"""`llmtune ui` in a real browser (headless Chromium driven by Selenium), each scenario asserting what a user sees:
a run created from recipes/quickstart.yaml through the form, live curves, the UI restarted mid-run, stop (exit 143)
and resume, the finished run's before -> after table as the CLI prints it, an ONNX export from the page, a chat with
a SmolLM2 SFT run that replies as `llmtune generate` does, and a wrong API key that gets nothing.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the tests skip, except where
LLMTUNE_REQUIRE_BROWSER=1 (CI), where a missing browser fails. With LLMTUNE_SCREENSHOTS=DIR the screenshots the
README shows are written there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NO_REPORT, SHARED_DATA, require_shared

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KEY = "browser-test-key"

pytestmark = pytest.mark.slow

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("LLMTUNE_REQUIRE_BROWSER") == "1":
        raise RuntimeError("LLMTUNE_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("no chromium + chromedriver to drive (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to exist
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class UiProcess:
    """`llmtune ui` as a user starts it, in its own process (so it can be killed and started again)."""

    def __init__(self, runs: Path, api_key: str | None = None) -> None:
        self.runs, self.api_key, self.port = runs, api_key, free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> UiProcess:
        command = [sys.executable, "-m", "llmtune", "ui", "--runs", str(self.runs), "--port", str(self.port)]
        env = {**os.environ, **({"LLMTUNE_API_KEY": self.api_key} if self.api_key else {})}
        self.log = (self.runs.parent / f"ui-{self.port}.log").open("a")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                assert self.process.poll() is None, (self.runs.parent / f"ui-{self.port}.log").read_text()
                time.sleep(0.3)
        raise AssertionError("the UI did not start listening in 120 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for a driver on the network
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 120, what: str = ""):
    # The page redraws parts of itself as events arrive: an element found a moment ago may be gone (stale).
    return WebDriverWait(driver, seconds, poll_frequency=0.2, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException)).until(lambda d: condition(d), message=what)


def text_of(driver, css: str) -> str:
    """The element's text, read in one step in the page (a redraw cannot slip between finding and reading)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    if os.environ.get("LLMTUNE_SCREENSHOTS"):
        folder = Path(os.environ["LLMTUNE_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{name}.png"))


def curve_points(driver) -> int:
    return int(driver.execute_script(
        "const svg = document.querySelector('#chart-loss svg'); return svg ? svg.getAttribute('data-points') : 0"))


def set_field(driver, key: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f'[data-key="{key}"]:not(.field-error)')
    driver.execute_script("arguments[0].closest('details').open = true; arguments[0].scrollIntoView()", field)
    field.clear()
    field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def field_error(driver, key: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'.field-error[data-key="{key}"]').text


def test_a_run_from_the_form_goes_live_stops_resumes_survives_a_ui_restart_finishes_and_exports(browser, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    ui = UiProcess(runs).start()
    try:
        name = launch_quickstart_from_the_form(browser, ui, tmp_path)
        watch_and_stop(browser, runs, name, tmp_path)
        resume_across_a_ui_restart(browser, ui, name)
        check_the_finished_run(browser, runs, name, tmp_path)

        # ship: an ONNX export from the page, the files and the equivalent command shown
        wait(browser, lambda d: d.find_element(By.ID, "export-button")).click()
        wait(browser, lambda d: "model.onnx" in text_of(d, "#ship-output") or "rror" in text_of(d, "#ship-output"), 300)
        assert f"llmtune export {runs / name} --format onnx" in text_of(browser, "#ship-output")
        assert (runs / name / "export" / f"{name}-onnx" / "model.onnx").is_file()

        browser.get(f"{ui.url}/#/")
        row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'#runs-table tr[data-run="{name}"]'))
        assert "finished" in row.text and "accuracy" in row.text
        shot(browser, tmp_path, "ui-runs")
    finally:
        ui.stop()


def launch_quickstart_from_the_form(browser, ui: UiProcess, tmp_path: Path) -> str:
    """New run from recipes/quickstart.yaml: a bad value's message appears and goes, one override, launch."""
    browser.get(f"{ui.url}/#/new")
    Select(wait(browser, lambda d: d.find_element(By.ID, "recipe-select"))).select_by_value("quickstart.yaml")
    wait(browser, lambda d: "quickstart.yaml" in text_of(d, "#command"), what="the command for quickstart")
    set_field(browser, "training.learning_rate", "-1")
    wait(browser, lambda d: "must be a positive number" in field_error(d, "training.learning_rate"))
    assert browser.find_element(By.ID, "launch").get_attribute("disabled") is not None
    shot(browser, tmp_path, "ui-new-run-error")
    set_field(browser, "training.learning_rate", "0.0001")
    wait(browser, lambda d: field_error(d, "training.learning_rate") == "", what="the error to go")

    set_field(browser, "training.log_every", "2")  # the override
    wait(browser, lambda d: "training.log_every=2 output.dir=" in d.find_element(By.ID, "command").text)
    command = browser.find_element(By.ID, "command").text
    assert command.startswith("llmtune train recipes/quickstart.yaml") and "learning_rate" not in command
    assert f"output.dir={ui.runs}/quickstart-" in command  # the run's folder, inside the UI's runs folder
    assert "log_every: 2" in browser.find_element(By.ID, "yaml").text
    browser.execute_script("window.scrollTo(0, 0)")
    shot(browser, tmp_path, "ui-new-run")
    browser.find_element(By.ID, "launch").click()
    wait(browser, lambda d: "/#/run/quickstart-" in d.current_url, what="the run's page")
    return browser.current_url.split("/#/run/")[1]


def watch_and_stop(browser, runs: Path, name: str, tmp_path: Path) -> None:
    """The loss curve gains points as the run trains; Stop: a checkpoint, exit 143."""
    wait(browser, lambda d: curve_points(d) >= 1, 240, "a first point on the loss curve")
    first = curve_points(browser)
    wait(browser, lambda d: curve_points(d) > first, 120, "the curve to gain points")
    shot(browser, tmp_path, "ui-live-run")
    browser.find_element(By.ID, "stop").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: text_of(d, "#run-state") == "stopped", 120, "the run to stop")
    assert "exit code 143" in text_of(browser, "#progress-text")
    exit_file = runs / ".llmtune-ui" / f"{name}.exit"
    wait(browser, lambda d: exit_file.is_file(), 60, "the training process to exit")
    assert json.loads(exit_file.read_text())["exit_code"] == 143
    assert any((runs / name).glob("checkpoint-*"))


def resume_across_a_ui_restart(browser, ui: UiProcess, name: str) -> None:
    """Resume, then kill the UI process and start it again while the resumed run loads and trains: the run is still
    live on the new UI, its curve keeps growing, and it finishes."""
    stopped_points = curve_points(browser)
    browser.find_element(By.ID, "resume").click()
    wait(browser, lambda d: text_of(d, "#run-state") in ("starting", "running"), 60, "the resumed run to start")
    ui.stop()
    ui.start()
    browser.get(f"{ui.url}/#/run/{name}")
    wait(browser, lambda d: text_of(d, "#run-state") in ("starting", "running", "finished"), 60)
    assert text_of(browser, "#run-state") != "finished", "the resumed run ended before the UI was back: no live check"
    wait(browser, lambda d: curve_points(d) > stopped_points, 240, "the curve to grow after the UI restart")
    wait(browser, lambda d: text_of(d, "#run-state") == "finished", 300, "the resumed run to finish")


def check_the_finished_run(browser, runs: Path, name: str, tmp_path: Path) -> None:
    """Resumed from the stop's checkpoint; the page's before -> after table is metrics.json, as the CLI printed it."""
    record = json.loads((runs / name / "run.json").read_text())
    assert len(record["resumes"]) == 1
    metrics = json.loads((runs / name / "metrics.json").read_text())
    log = (runs / ".llmtune-ui" / f"{name}.log").read_text()
    printed = re.search(r"^accuracy +([0-9.]+) +([0-9.]+) +[+-][0-9.]+$", log, re.M)
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#headline-table tr[data-metric="accuracy"]'))
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:3] == [f"{metrics['before']['accuracy']:.4f}", f"{metrics['after']['accuracy']:.4f}"]
    assert [float(printed[1]), float(printed[2])] == [float(cells[1]), float(cells[2])]
    assert metrics["after"]["accuracy"] >= 0.9 > metrics["before"]["accuracy"] + 0.2
    assert len((runs / name / "predictions.jsonl").read_text().splitlines()) == 20
    shot(browser, tmp_path, "ui-finished-run")


def test_chat_with_an_sft_run_replies_as_llmtune_generate_does(browser, tmp_path):
    from llmtune import api
    from llmtune.config.loader import load_recipe

    alpaca = require_shared(SHARED_DATA / "alpaca" / "alpaca_5000.json")
    rows = json.loads(alpaca.read_text())[:24]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    runs = tmp_path / "runs"
    api.train(load_recipe(REPO / "recipes" / "smollm2_alpaca_lora.yaml", [
        "data.dataset=null", f"data.train_file={tmp_path / 'train.json'}", "data.validation_fraction=0.25",
        "data.max_length=128", "training.max_steps=2", "training.batch_size=4", "training.gradient_accumulation=1",
        "training.eval_every=no", "training.save_every=no", "eval.before_training=false", "lm.generation_prompts=[]",
        f"output.dir={runs / 'sft'}", NO_REPORT]))
    prompt = "Name a fruit that is yellow."
    expected = api.generate(runs / "sft", [prompt], max_new_tokens=24)[0]["completion"]

    ui = UiProcess(runs).start()
    try:
        browser.get(f"{ui.url}/#/run/sft")
        box = wait(browser, lambda d: d.find_element(By.ID, "chat-input"))
        box.send_keys(prompt)
        tokens = browser.find_element(By.ID, "max-new-tokens")
        tokens.clear()
        tokens.send_keys("24")
        browser.find_element(By.ID, "chat-send").click()
        wait(browser, lambda d: d.find_element(By.ID, "base-reply").get_attribute("data-finish"), 300,
             "the run's reply and then the base model's")
        assert browser.find_element(By.ID, "chat-reply").text == expected.strip()
        assert browser.find_element(By.ID, "base-reply").text  # the base model answered beside it
        shot(browser, tmp_path, "ui-chat")
    finally:
        ui.stop()


def test_a_wrong_api_key_gets_nothing_and_the_right_one_gets_in(browser, tmp_path):
    runs = tmp_path / "runs"
    (runs / "secret-run").mkdir(parents=True)
    (runs / "secret-run" / "run.json").write_text(json.dumps({"recipe": {"task": "classification"}}))
    ui = UiProcess(runs, api_key=KEY).start()
    try:
        browser.delete_all_cookies()
        browser.get(f"{ui.url}/#/")
        wait(browser, lambda d: "/login" in d.current_url, 30, "the login page")
        assert "secret-run" not in browser.page_source
        browser.find_element(By.ID, "key").send_keys("not-the-key")
        browser.find_element(By.ID, "login").click()
        wait(browser, lambda d: "Wrong key." in d.page_source, 30)
        status = browser.execute_async_script(
            "const done = arguments[0]; fetch('/api/runs', {headers: {Authorization: 'Bearer not-the-key'}})"
            ".then(r => r.text().then(t => done([r.status, t])))")
        assert status[0] == 401 and "secret-run" not in status[1]
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "login").click()
        wait(browser, lambda d: "secret-run" in text_of(d, "#runs-table"), 30, "the runs behind the login")
        assert KEY not in browser.page_source
        assert KEY not in (runs.parent / f"ui-{ui.port}.log").read_text()
    finally:
        ui.stop()
