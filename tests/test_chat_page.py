"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, selenium):
load the page against a real server (SmolLM2), send a message, watch the answer stream in, see the
model and tokens/s; JSON mode gives a JSON object. Under CI=true a missing browser is a failure."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need_browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not (chromium and driver):
        msg = "headless Chromium test needs Debian's chromium and chromium-driver and pip's selenium"
        if CI:
            pytest.fail(msg + " (under CI a missing browser is a failure)")
        pytest.skip(msg)
    return chromium, driver


@pytest.fixture(scope="module")
def server(smollm2_path):
    from conftest import serve_process
    yield from serve_process(smollm2_path, "-c", "1024", "--alias", "smollm2-page")


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=420,820"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(cond, timeout=180.0, step=0.05):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def _send(b, text):
    from selenium.webdriver.common.by import By
    box = b.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    b.find_element(By.ID, "send").click()


def test_page_streams_an_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    b = browser
    b.get(server + "/")
    assert b.title == "tinyinfer chat"
    _wait(lambda: "smollm2-page" in b.find_element(By.ID, "model").text, 30)
    b.find_element(By.TAG_NAME, "summary").click()              # the options
    t = b.find_element(By.ID, "temp")
    t.clear()
    t.send_keys("0")
    m = b.find_element(By.ID, "maxtok")
    m.clear()
    m.send_keys("48")
    _send(b, "Name three colors of the rainbow.")
    _wait(lambda: b.find_elements(By.CSS_SELECTOR, ".msg.assistant"), 10)
    # while it streams, the answer grows in steps (one per chunk)
    seen = set()

    def done():
        el = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        txt = b.execute_script("return arguments[0].firstChild ? arguments[0].firstChild.textContent : ''", el)
        if el.get_attribute("data-state") == "streaming" and txt:
            seen.add(txt)
        return el.get_attribute("data-state") == "done" and el
    el = _wait(done)
    assert not b.find_elements(By.CSS_SELECTOR, ".msg.err")
    answer = el.text
    assert len(seen) >= 2, f"no streaming seen: {seen}"          # partial texts before the end
    assert "tokens/s" in answer and len(answer.split("\n")[0].strip()) > 0
    assert "tokens/s" in b.find_element(By.ID, "speed").text
    b.save_screenshot(str(tmp_path / "chat.png"))
    shot = os.environ.get("TINYINFER_SCREENSHOT")
    if shot:
        shutil.copy(tmp_path / "chat.png", shot)
    assert (tmp_path / "chat.png").stat().st_size > 1000
    # JSON mode: the answer is a JSON object (constrained decoding in the server)
    b.find_element(By.ID, "json").click()
    m = b.find_element(By.ID, "maxtok")
    m.clear()
    m.send_keys("200")
    _send(b, "Describe a cat as JSON with keys name and color.")
    _wait(lambda: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
          and b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state") == "done")
    last = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    text = b.execute_script("return arguments[0].firstChild.textContent", last)
    assert text.lstrip().startswith("{"), text
    assert not b.find_elements(By.CSS_SELECTOR, ".msg.err")
