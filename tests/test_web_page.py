"""The web page at / in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium loads the page served with the bundled demo model, sends a message, waits for the streamed reply and
for the expert view to fill from /v1/trace, and saves a screenshot (set FLASHMOE_SCREENSHOT=PATH to keep it;
docs/serving.md shows one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _runs(binary: str) -> bool:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not (_runs(CHROMIUM) and _runs(DRIVER)):
    pytest.skip(f"no working Chromium here ({CHROMIUM}, {DRIVER}): apt-get install chromium chromium-driver "
                "(.ci/run does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium drives the browser")
openai = pytest.importorskip("openai", reason="the reply is compared with the API's")


@pytest.fixture(scope="module")
def demo_url():
    from flashmoe.runtime.load import default_model_dir, load_engine
    from flashmoe.serve.server import FlashMoeServer, RunningServer
    from flashmoe.serve.tokenizer import Tokenizer

    directory = default_model_dir()
    engine = load_engine(directory, backend="numpy", context=512)
    app = FlashMoeServer(engine, Tokenizer(directory), directory.name, context=512)
    with RunningServer(app) as running:
        yield running.url
    app.close()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,820",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def test_the_page_streams_a_reply_and_shows_the_experts_it_read(demo_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(demo_url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "context 512 tokens" in b.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "settings").click()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("12")
    browser.find_element(By.ID, "input").send_keys("Tell me about the sea.")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='1'] .content"))[0].text
    usage = browser.find_element(By.ID, "usage").text  # "prompt P tokens (R reused ...), reply C tokens"
    prompt, reused, completion = (int(w) for w in re.findall(r"\d+", usage))
    # Every forward is traced: the prompt's tokens and each generated token but the last (never fed back).
    traced = prompt - reused + completion - 1
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-traced") == str(traced))
    assert browser.find_element(By.ID, "n-tokens").text == str(traced)
    assert " of 32" in browser.find_element(By.ID, "hits").text  # the last token: 4 experts in each of 8 MoE layers
    assert browser.find_element(By.ID, "tok-s").text != "–"
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("FLASHMOE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["FLASHMOE_SCREENSHOT"]))
    # The page's reply is the API's own at temperature 0.
    client = openai.OpenAI(base_url=demo_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "Tell me about the sea."}],
                                              temperature=0, max_tokens=12)
    assert reply and reply == expected.choices[0].message.content.strip()


def test_a_server_with_an_api_key_opens_the_settings_at_the_key_field_and_works_once_it_is_typed(browser, tmp_path):
    from chat_helpers import FakeEngine, scripted_reply, write_model_dir
    from chat_templates import QWEN3
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flashmoe.serve.server import FlashMoeServer, RunningServer
    from flashmoe.serve.tokenizer import Tokenizer

    tokenizer = Tokenizer(write_model_dir(tmp_path / "model", QWEN3))
    app = FlashMoeServer(FakeEngine(tokenizer, scripted_reply), tokenizer, "fake", api_key="sk-page")
    with RunningServer(app) as running:
        browser.get(running.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "needs its API key" in b.find_element(By.ID, "model").text)
        assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
        assert browser.switch_to.active_element.get_attribute("id") == "api_key"
        browser.find_element(By.ID, "api_key").send_keys("sk-page")
        browser.find_element(By.ID, "input").click()  # leaving the field commits it (a change event)
        wait.until(lambda b: "fake" in b.find_element(By.ID, "model").text)
    app.close()
